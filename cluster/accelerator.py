"""The Accelerator a trial trains under: precision, gradient accumulation, and DeepSpeed ZeRO
with its config generated from the spec (never hand-edited, so it cannot drift from it)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin

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


def make_accelerator(train: TrainSpec) -> Accelerator:
    plugin = None
    if train.deepspeed is not None:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(train))
    return Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
    )
