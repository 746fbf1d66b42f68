"""A combination's pipeline: the model entry's pipeline (through the trainers' loaders, so each
family loads its own way), its scheduler built from the model's scheduler config plus the
study's overrides, and the fixed initial latents of each (prompt, image)."""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, SchedulerMixin

from contract.inference import ResolvedModel, ResolvedScheduler, image_seed
from trainers.methods import load_trained_pipeline
from trainers.models import assemble_pipeline, load_base_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(
    model: ResolvedModel, *, dtype: str, device: torch.device
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The model's pipeline on `device` and the scheduler config it was trained with."""
    torch_dtype = DTYPES[dtype]
    if model.method is None:
        base = load_base_model(model.base_model, dtype=torch_dtype)
        pipeline = assemble_pipeline(base, base.noise_scheduler)
    else:
        assert model.checkpoint is not None, "a trained model has its checkpoint"
        pipeline = load_trained_pipeline(
            model.base_model, model.method, model.checkpoint, dtype=torch_dtype
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device), dict(pipeline.scheduler.config)


def make_scheduler(scheduler: ResolvedScheduler, model_config: dict[str, Any]) -> SchedulerMixin:
    """`scheduler.class_name` configured from the model's noise schedule and the overrides."""
    return getattr(diffusers, scheduler.class_name).from_config(model_config, **scheduler.config)


def initial_latents(
    pipeline: DiffusionPipeline, *, seed: int, prompt_index: int, image_index: int, resolution: int
) -> torch.Tensor:
    """The same noise for (prompt, image) in every combination of the same latent shape: drawn
    on the CPU in float32 (identical whatever the accelerator), then cast."""
    channels = pipeline.unet.config.in_channels
    side = resolution // pipeline.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(image_seed(seed, prompt_index, image_index))
    latents = torch.randn((1, channels, side, side), generator=generator, dtype=torch.float32)
    return latents.to(device=pipeline.device, dtype=pipeline.unet.dtype)
