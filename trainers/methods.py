"""What a training method is to the shared loop, and the registry of methods.

A method says which weights train, which word stands for the subject in prompts, what to do after
each optimizer step, and how its weights are checkpointed and saved. Everything else (data,
noise, loss, optimizer, evaluation, checkpoints) is the loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from launch.spec import SubjectSpec, TrainSpec
from trainers.lora import LoRAMethod
from trainers.models import BaseModel
from trainers.textual_inversion import TextualInversionMethod


class TrainingMethod(Protocol):
    name: str
    trains_text_encoder: bool
    """True when the prompt embedding changes with training (it is then not cached)."""

    @property
    def subject_token(self) -> str:
        """The word that stands for the subject in training and evaluation prompts."""
        ...

    def setup(self, model: BaseModel) -> list[torch.nn.Parameter]:
        """Freeze the base, add what trains, return the parameters the optimizer steps."""
        ...

    def after_optimizer_step(self, model: BaseModel) -> None: ...
    def trainable_state(self, model: BaseModel) -> dict[str, torch.Tensor]: ...
    def load_trainable_state(self, model: BaseModel, state: dict[str, torch.Tensor]) -> None: ...
    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """Save in the format diffusers' pipelines load."""
        ...


METHODS: dict[str, type] = {
    "lora": LoRAMethod,
    "textual_inversion": TextualInversionMethod,
}


def make_method(name: str, train: TrainSpec, subject: SubjectSpec) -> TrainingMethod:
    return METHODS[name](train, subject)
