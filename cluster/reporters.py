"""Reporters of the worker: progress events for the launcher, and several reporters as one
(the MLflow one is `tracking.reporter.MlflowReporter`)."""

from __future__ import annotations

from pathlib import Path

from cluster import events
from evaluation.evaluator import Evaluation
from trainers.reporting import Reporter


class ProgressReporter:
    """Emits progress events on stdout for the launcher's progress bars; with `trial_id` (a
    pack's member, whose worker trains several trials), every event carries it."""

    def __init__(self, trial_id: str | None = None) -> None:
        self.fields = {} if trial_id is None else {"trial_id": trial_id}

    def _emit(self, event: str, **fields: object) -> None:
        events.emit(event, **self.fields, **fields)

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        self._emit("start", start_step=start_step, max_steps=max_steps)

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        self._emit("step", step=step, loss=loss)

    def on_evaluation(self, step: int, evaluation: Evaluation) -> None:
        self._emit("evaluation", step=step, metrics=evaluation.metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._emit("checkpoint", step=step, path=str(path))

    def on_checkpoint_removed(self, step: int) -> None:
        pass

    def on_early_stop(self, step: int, reason: str) -> None:
        self._emit("early_stop", step=step, reason=reason)

    def on_finish(self) -> None:
        self._emit("finish")


class Reporters:
    """Passes each event to several reporters, in order."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        for reporter in self.reporters:
            reporter.on_start(start_step=start_step, max_steps=max_steps, setup=setup)

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        for reporter in self.reporters:
            reporter.on_train_step(step, loss=loss, lr=lr)

    def on_evaluation(self, step: int, evaluation: Evaluation) -> None:
        for reporter in self.reporters:
            reporter.on_evaluation(step, evaluation)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for reporter in self.reporters:
            reporter.on_checkpoint(step, path)

    def on_checkpoint_removed(self, step: int) -> None:
        for reporter in self.reporters:
            reporter.on_checkpoint_removed(step)

    def on_early_stop(self, step: int, reason: str) -> None:
        for reporter in self.reporters:
            reporter.on_early_stop(step, reason)

    def on_finish(self) -> None:
        for reporter in self.reporters:
            reporter.on_finish()
