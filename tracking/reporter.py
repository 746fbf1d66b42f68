"""The reporter that writes a trial's trajectory to its MLflow run."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from contract.layout import (
    METRIC_LOSS,
    METRIC_LR,
    TAG_CHECKPOINT,
    TAG_EARLY_STOP_REASON,
    TAG_EARLY_STOP_STEP,
    TAG_ERROR,
    TAG_RESUMED_AFTER_ERROR,
    TAG_RESUMED_FROM_STEP,
    TAG_SETUP_PREFIX,
    records_file,
    samples_file,
)
from tracking.journal import JournaledWriter

if TYPE_CHECKING:
    from evaluation.evaluator import Evaluation


class MlflowReporter:
    """Logs a trial's curves, sample images and checkpoint paths to its MLflow run.

    A retried trial resumes into the same run and may redo steps it had already logged before it
    was killed; (key, step) pairs already in the run are not logged again, so every curve keeps
    exactly one point per step. Writes go through a `JournaledWriter`: while the tracking server
    is down they are journaled in the trial's folder and replayed once it answers.
    """

    flush_every = 50

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        folder: Path,
        *,
        on_writes_pending: Callable[[int], None] | None = None,
    ) -> None:
        self.client = client
        self.on_writes_pending = on_writes_pending
        """Told how many writes still wait in the journal when the trial ends."""
        self.run_id = run_id
        self.writer = JournaledWriter(client, run_id, folder)
        self.writer.sync()  # a journal an earlier attempt left, before anything new
        self.pending: list[Metric] = []
        self.logged: set[tuple[str, int]] = set()
        run = client.get_run(run_id)
        self.earlier_error = run.data.tags.get(TAG_ERROR)
        for key in run.data.metrics:
            self.logged |= {(key, m.step) for m in client.get_metric_history(run_id, key)}

    def _add(self, key: str, value: float, step: int) -> None:
        if (key, step) not in self.logged:
            self.logged.add((key, step))
            self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))

    def flush(self) -> None:
        if self.pending:
            self.writer.log_metrics(self.pending)
        self.pending = []

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        tags = {f"{TAG_SETUP_PREFIX}{key}": value for key, value in setup.items()}
        if start_step:
            tags[TAG_RESUMED_FROM_STEP] = str(start_step)
        if self.earlier_error is not None:
            # An attempt that failed, resumed here: its error says why the run was interrupted,
            # and is no longer the run's error.
            tags[TAG_RESUMED_AFTER_ERROR] = self.earlier_error
        self.writer.set_tags(tags)
        if self.earlier_error is not None:
            self.writer.delete_tag(TAG_ERROR)

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        self._add(METRIC_LOSS, loss, step)
        self._add(METRIC_LR, lr, step)
        if len(self.pending) >= self.flush_every:
            self.flush()

    def on_evaluation(self, step: int, evaluation: Evaluation) -> None:
        for key, value in evaluation.metrics.items():
            self._add(key, value, step)
        self.flush()
        self.writer.log_image(evaluation.grid, samples_file(step))
        if evaluation.records:
            # One file per step, in mlflow.load_table's JSON layout; written with log_text,
            # which overwrites, so a step redone after a resume is not recorded twice
            # (log_table would append).
            table = pd.DataFrame(evaluation.records).assign(step=step)
            text = table.to_json(orient="split", index=False)
            self.writer.log_text(text, records_file(step))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.writer.set_tags({TAG_CHECKPOINT.format(step=step): str(path)})

    def on_checkpoint_removed(self, step: int) -> None:
        """The retention policy deleted it: its tag would point at nothing."""
        self.writer.delete_tag(TAG_CHECKPOINT.format(step=step))

    def on_early_stop(self, step: int, reason: str) -> None:
        self.flush()
        self.writer.set_tags({TAG_EARLY_STOP_STEP: str(step), TAG_EARLY_STOP_REASON: reason})

    def on_finish(self) -> None:
        self.flush()
        self.writer.set_terminated("FINISHED")
        if not self.writer.sync() and self.on_writes_pending is not None:
            self.on_writes_pending(self.writer.pending)  # the server is still down
