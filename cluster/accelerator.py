"""The Accelerator a trial trains under: precision, gradient accumulation, `torch.compile`, and
DeepSpeed ZeRO with its config generated from the spec (never hand-edited, so it cannot drift
from it); and the precisions a machine cannot train in, refused before any work
(`precision_problem`)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, TorchDynamoPlugin

from contract.spec import TrainSpec


def deepspeed_config(train: TrainSpec) -> dict[str, Any]:
    """The DeepSpeed config for `train.deepspeed`: ZeRO stage, optimizer offload, and the batch,
    accumulation and clipping values the loop uses (DeepSpeed applies them itself)."""
    assert train.deepspeed is not None
    zero: dict[str, Any] = {
        "stage": train.deepspeed.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    config: dict[str, Any] = {}
    if train.deepspeed.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # The loop's torch AdamW steps the offloaded partitions (DeepSpeedCPUAdam would need a
        # compiled extension); DeepSpeed refuses a client optimizer with offload unless told.
        config["zero_force_ds_cpu_optimizer"] = False
    return config | {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "fp16": {"enabled": train.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # the loop's own AdamW, not DeepSpeed's
    }


def precision_problem(mixed_precision: str, *, device_type: str, where: str) -> str | None:
    """Why `train.mixed_precision` cannot train on a `device_type` device (`where` names the
    machine in the message), or None when it can.

    fp16 needs an accelerator: on the CPU, Accelerate neither autocasts nor scales the loss in
    fp16 (it does both only on a GPU), so the frozen fp16 weights would meet the fp32 trained ones
    in one forward pass. Bypassing Accelerate with torch's own CPU fp16 autocast would run, but
    measured on the tiny UNet (Xeon with AVX512-FP16 and AMX, torch 2.13) a step took about 10x as
    long as in fp32 and 3x as long as in bf16: nothing to gain over bf16."""
    if mixed_precision == "fp16" and device_type == "cpu":
        return (
            f"train.mixed_precision: 'fp16' needs a GPU ({where} has none, and Accelerate "
            "runs fp16 autocast and loss scaling only on a GPU); use 'bf16' (which runs on the "
            "CPU too) or 'no'"
        )
    return None


def make_accelerator(train: TrainSpec) -> Accelerator:
    plugin = None
    if train.deepspeed is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train))
    # Accelerate compiles each module it prepares (the trained ones): the training passes. Every
    # field set, so ACCELERATE_DYNAMO_* in the environment cannot turn on what the spec did not.
    dynamo = TorchDynamoPlugin(
        backend=train.compile,
        mode=train.compile_mode,
        fullgraph=False,
        use_regional_compilation=False,
    )
    return Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        dynamo_plugin=dynamo,
    )
