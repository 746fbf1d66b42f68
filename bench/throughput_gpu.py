"""The GPU section of bench/throughput.py (run only when CUDA is available).

UNTESTED: no GPU was lent while it was written; it ran only in pieces on the CPU (the bare step
on the tiny model). Kept small on purpose: where it breaks on a GPU, the case is recorded as
failed with its error and the rest still run.

SD 1.5's architecture at 512 px with random weights, built in code (no download) and saved once
as a diffusers folder in the cache: its UNet (320/640/1280/1280, 2 layers a block, cross
attention 768, 8 heads), its VAE (128/256/512/512), a CLIP ViT-L/14-sized text encoder (12
layers, width 768) and the CLIP tokenizer. dreamsweep's cases train it in bf16 with cached
latents and text embeddings (the defaults) at batch 1 and 4; beside them a bare LoRA step on
the same UNet, eager and under `torch.compile(mode="reduce-overhead")` (CUDA graphs: the
step's shapes never change), which bounds what the loop's overhead costs; and diffusers'
scripts at 512 px in bf16 when the peer venv is there.
"""

from __future__ import annotations

import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path
from typing import Any

import throughput_cases as cases
import torch
import torch.nn.functional as F

SD15_CACHE_NAME = "bench-sd15-random-v1"
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def build_sd15(directory: Path) -> None:
    """Save a random-init pipeline with SD 1.5's architecture to `directory`."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from evaluation.tokenizer import write_clip_tokenizer

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 1 B weights: faster
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=write_clip_tokenizer(directory / "tokenizer"),
        unet=unet,
        scheduler=DDPMScheduler(  # SD 1.5's scheduler_config.json
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
            clip_sample=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)


def bare_lora_step(
    folder: Path, *, batch: int, steps: int, warmup: int, compiled: bool, resolution: int = 512
) -> dict[str, Any]:
    """LoRA rank 4 on the UNet's attention, bf16 frozen weights, fp32 adapters, cached inputs
    (random latents and embeddings on the device): the step and nothing else."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    cases.peak_memory_reset()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    )
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    unet.to(device).train()
    schedule = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    side = resolution // 8
    width = unet.config.cross_attention_dim
    latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    embeddings = torch.randn(batch, 77, width, device=device, dtype=dtype)
    forward = torch.compile(unet, mode="reduce-overhead") if compiled else unet

    def step() -> None:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are done
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = schedule.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=dtype):
            prediction = forward(noisy, timesteps, encoder_hidden_states=embeddings).sample
        F.mse_loss(prediction.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    stamps = []
    for _ in range(warmup + steps):
        step()
        sync()
        stamps.append(time.perf_counter())
    rate = cases.steady_rate(stamps, warmup)
    memory, source = cases.peak_memory()
    return {
        "status": "ok",
        "members": 1,
        "steps": len(stamps),
        "warmup_steps": warmup,
        "steps_per_s": rate,
        "trial_steps_per_s": rate,
        "images_per_s": rate * batch,
        "peak_memory_mib": memory,
        "peak_memory_source": source,
        "first_step_s": stamps[0] - started,
        "first_step_includes": "UNet load" + (", compilation" if compiled else ""),
        "note": f"bare step, batch {batch}" + (", reduce-overhead" if compiled else ", eager"),
    }


def _case(name: str, run: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        result = {"case": name} | run(*args, **kwargs)
        result["case"] = name
    except Exception as err:  # recorded; the other cases still run
        result = {"case": name, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
    print(result, flush=True)
    return result


def peer_scripts(
    folder: Path, scratch: Path, settings: cases.Settings, args: Namespace
) -> list[dict[str, Any]]:
    """diffusers' scripts on the same folder at 512 px in bf16 (batch 1; LoRA at 4 too), in the
    peer venv: its torch may differ from this venv's (both are in the json)."""
    from throughput_peer import (
        PeerUnavailable,
        ensure_peer_venv,
        example_scripts,
        peer_env,
        run_scripts,
    )

    scratch.mkdir(parents=True, exist_ok=True)
    try:
        versions = ensure_peer_venv(args.peer_venv)
        scripts, source = example_scripts(scratch, args.examples, args.examples_rev)
    except PeerUnavailable as err:
        return [{"case": "diffusers_scripts", "status": "unavailable", "reason": str(err)}]
    python, env = args.peer_venv / "bin" / "python", peer_env()
    options = {"resolution": 512, "mixed_precision": "bf16"}
    found = run_scripts(python, scripts, folder, scratch, settings, env, batch=1, **options)
    lora = {"lora": scripts["lora"]}
    found += run_scripts(python, lora, folder, scratch, settings, env, batch=4, **options)
    return [r | {"peer_torch": versions["torch"], "scripts": source} for r in found]


def gpu_section(scratch: Path, args: Namespace) -> dict[str, Any]:
    from contract.cache import build_once

    folder = build_once(SD15_CACHE_NAME, build_sd15)
    steps, warmup = (10, 3) if args.quick else (100, 10)
    base = cases.Settings(
        root=scratch,
        steps=steps,
        warmup=warmup,
        base_model=str(folder),
        resolution=512,
        mixed_precision="bf16",
    )
    results = []
    for batch in (1, 4):
        settings = replace(base, batch_size=batch, root=scratch / f"b{batch}")
        for method in ("lora", "textual_inversion"):
            results.append(
                _case(f"{method}_b{batch}", cases.lone_case, settings, f"{method}_b{batch}", method)
            )
        for compiled in (False, True):
            name = f"bare_lora_b{batch}_{'compiled' if compiled else 'eager'}"
            kwargs = {"batch": batch, "steps": steps, "warmup": warmup, "compiled": compiled}
            results.append(_case(name, bare_lora_step, folder, **kwargs))
    batch1 = replace(base, root=scratch / "b1")
    results.append(_case("dreambooth_adamw8bit_gc_b1", cases.dreambooth_case, batch1))
    results.append(_case("pack_lora_k4_b1", cases.pack_case, batch1, "lora", 4))
    results.append(_case("evaluation", cases.evaluation_case, batch1, 1 if args.quick else 3))
    results += peer_scripts(folder, scratch / "peer", batch1, args)
    return {
        "about": (
            "UNTESTED section (written without a GPU). Random weights with SD 1.5's "
            f"architecture ({folder}), 512 px, bf16 frozen weights, fp32 trained ones, cached "
            f"latents and text embeddings; {steps} timed steps after {warmup}. The bare LoRA "
            "steps are the step alone (no loop), eager and under torch.compile's "
            "reduce-overhead (CUDA graphs). Targets (issue 21): LoRA ≥ 40 steps/s at ≤ 4 GiB, "
            "TI ≥ 30, DreamBooth (8-bit AdamW + GC) ≥ 10 at ≤ 12 GiB, K = 4 LoRA pack ≥ 90 "
            "trial-steps/s, evaluation ≥ 8 images/s (25 steps, CFG)."
        ),
        "model_folder": str(folder),
        "cases": results,
    }
