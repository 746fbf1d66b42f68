"""The state one trial's recipe steps share (`trainers.loop`): plain containers, built by the
recipe's setup steps and read by its training steps.

`Training` is what the optimizer steps, as Accelerate prepared it; `TrialState` gathers it with
the model, the method, the inputs and the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler

if TYPE_CHECKING:
    from contract.trial import TrialConfig
    from evaluation.evaluator import Evaluator
    from trainers.batches import TrainingData
    from trainers.methods import TrainingMethod
    from trainers.models import BaseModel
    from trainers.reporting import Reporter


@dataclass
class Training:
    """What the optimizer steps, as `accelerator.prepare` returned it. Only modules with trained
    weights are wrapped (DDP refuses a module with none); `model.unet` / `model.text_encoder`
    stay the plain modules, sharing the same weights."""

    trainable: list[torch.nn.Parameter]  # what the optimizer steps and the gradients clip
    modules: dict[str, torch.nn.Module]  # "unet", "text_encoder"(, "text_encoder_2"): the
    # wrapper where it trains
    trained: list[str]  # the names of the wrapped modules
    wrapped: list[torch.nn.Module]
    optimizer: AcceleratedOptimizer
    lr_scheduler: AcceleratedScheduler

    def train_mode(self) -> None:
        for name in self.trained:
            self.modules[name].train()

    def release(self) -> None:
        """Drop the references to the wrappers (see `trainers.loop.finish`)."""
        self.modules.clear()
        self.wrapped.clear()


@dataclass
class TrialState:
    """What the recipe's steps share once the trial is set up."""

    config: TrialConfig
    accelerator: Accelerator
    reporter: Reporter
    model: BaseModel
    method: TrainingMethod
    data: TrainingData
    training: Training
    offloaded: list[tuple[str, torch.nn.Module]]  # encoders kept on the CPU (cached inputs)
    generator: torch.Generator
    evaluator: Evaluator | None  # the main process's; None on the others
