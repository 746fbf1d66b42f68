"""What a training method is to the shared loop, and the registry of methods.

A method says which weights train (and in which precision the frozen rest is held), which word
stands for the subject in prompts, what to do after each optimizer step, and how its weights are
saved in the format diffusers' pipelines load. Everything else (data, noise, loss, optimizer,
evaluation, checkpoints and resume) is the loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from diffusers import DiffusionPipeline

from contract.spec import ExportSpec, MethodOptions, SubjectSpec
from trainers.dreambooth import DreamBoothMethod
from trainers.lora import LoRAMethod
from trainers.models import BaseModel, resolve_model_source
from trainers.textual_inversion import TextualInversionMethod


class TrainingMethod(Protocol):
    name: str
    trains_text_encoder: bool
    """True when the prompt embedding changes with training (it is then not cached)."""

    @property
    def subject_token(self) -> str:
        """The word that stands for the subject in training and evaluation prompts."""
        ...

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        """Freeze the base (held in `frozen_dtype`), add what trains (in fp32), and return the
        parameters the optimizer steps."""
        ...

    def after_optimizer_step(self, model: BaseModel) -> None: ...

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """Save in the format diffusers' pipelines load."""
        ...

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> DiffusionPipeline:
        """The base model's pipeline (of its family) with a checkpoint's weights loaded the
        diffusers way."""
        ...


METHODS: dict[str, type] = {
    "dreambooth": DreamBoothMethod,
    "lora": LoRAMethod,
    "textual_inversion": TextualInversionMethod,
}


def make_method(
    name: str, options: MethodOptions, subject: SubjectSpec, export: ExportSpec | None = None
) -> TrainingMethod:
    """The method `name`; `export` says which extra formats it saves (LoRA: kohya)."""
    return METHODS[name](options, subject, export)


def load_trained_pipeline(
    base_model: str, method: str, checkpoint: Path, *, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """A ready pipeline of the model's family (`StableDiffusionPipeline`, or
    `StableDiffusionXLPipeline` for SDXL) from a trial's checkpoint folder: `base_model` as in
    the spec (hub id, folder or a built-in name), `method` the trial's method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return METHODS[method].load_pipeline(resolve_model_source(base_model), checkpoint, dtype)
