"""How the training loop talks to its caller: progress goes to a `Reporter`, a `Stopper` may end a
trial at an evaluated step, and `TrialPaused` says the trial checkpointed and stopped to be resumed.

The loop knows nothing of MLflow, SLURM or Ray: these are all it sees of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from evaluation.evaluator import Evaluation


class Reporter(Protocol):
    """Where the loop's progress goes (MLflow, a progress bar, …)."""

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None: ...
    def on_train_step(self, step: int, *, loss: float, lr: float) -> None: ...
    def on_evaluation(self, step: int, evaluation: Evaluation) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_checkpoint_removed(self, step: int) -> None: ...
    def on_early_stop(self, step: int, reason: str) -> None: ...
    def on_finish(self) -> None: ...


class NullReporter:
    """A reporter that ignores every event: a base for one that listens to a few."""

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        pass

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        pass

    def on_evaluation(self, step: int, evaluation: Evaluation) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_checkpoint_removed(self, step: int) -> None:
        pass

    def on_early_stop(self, step: int, reason: str) -> None:
        pass

    def on_finish(self) -> None:
        pass


Stopper = Callable[[int, dict[str, float]], str | None]
"""After each evaluation: (step, metrics) → why the trial should stop now, or None."""


class TrialPaused(Exception):
    """The trial checkpointed `step` and stopped, to be resumed later (requeue, preemption)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"paused after checkpointing step {step}")
        self.step = step
