"""A trial's MLflow writes survive a tracking server that is down: journaled, then replayed.

Every write of a trial's run goes through `JournaledWriter`. When the server cannot be reached,
the write is appended (one JSON line, fsynced) to `mlflow-journal.jsonl` in the trial's folder,
beside its checkpoints, with the images and texts it carried under `mlflow-journal/`, and
training goes on. Later writes try the server again (at most every `retry_every` seconds, so a
dead server does not slow training down); once it answers, the journal is replayed in order
and removed. A trial that ends with the server still down leaves its journal for the next run
of the trial or for `dreamsweep sync SPEC`.

Replaying is idempotent, so a journal replayed twice (or a write that reached the server before
its answer was lost) never duplicates anything: metrics already in the run at a (key, step) are
not logged again, tags and artifacts are overwritten with the same content.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from PIL import Image

JOURNAL_FILE = "mlflow-journal.jsonl"
JOURNAL_FILES = "mlflow-journal"  # the images and texts journaled writes carry
# A worker fails over to its journal after about 3 s instead of MLflow's default of minutes of
# retries; users' own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# Refusals that say the request itself is wrong; a retry cannot fix them, so they raise.
_REFUSED = {
    ErrorCode.Name(code)
    for code in (
        ErrorCode.INVALID_PARAMETER_VALUE,
        ErrorCode.RESOURCE_DOES_NOT_EXIST,
        ErrorCode.INVALID_STATE,
        ErrorCode.BAD_REQUEST,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.UNAUTHENTICATED,
    )
}


def fail_fast_over_http() -> None:
    """Make MLflow give up on an unreachable server within seconds (unless the user chose)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def unreachable(err: BaseException) -> bool:
    """Whether `err` means the store could not be reached or was busy (worth journaling)."""
    if isinstance(err, MlflowException):
        return err.error_code not in _REFUSED
    return isinstance(err, OSError)  # connection errors of requests and of sqlite alike


def journal_path(folder: Path) -> Path:
    return folder / JOURNAL_FILE


@dataclass
class JournalSummary:
    """What a trial's journal holds: the MLflow writes `dreamsweep sync` has yet to replay."""

    writes: int = 0
    last_loss_step: int | None = None
    metrics: dict[str, tuple[int, float]] = field(default_factory=dict)
    """metric → (step, value) of its latest journaled value (loss apart)."""
    terminated: str | None = None
    """The run's final status, when the worker closed it while the server was down."""


def read_journal(folder: Path) -> JournalSummary:
    """What the trial's journal holds (nothing when there is none). Read without its lock: a
    journal a replay removes meanwhile reads as none, and a line being appended counts as a
    write but tells nothing yet."""
    summary = JournalSummary()
    try:
        lines = journal_path(folder).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return summary
    for line in lines:
        if not line.strip():
            continue
        summary.writes += 1
        try:
            entry: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("op") == "terminate":
            summary.terminated = entry["status"]
        elif entry.get("op") == "metrics":
            for key, value, _timestamp, step in entry["rows"]:
                if key == "loss":
                    last = summary.last_loss_step
                    summary.last_loss_step = step if last is None else max(last, step)
                elif step >= summary.metrics.get(key, (step, value))[0]:
                    summary.metrics[key] = (step, value)
    return summary


def pending_writes(folder: Path) -> int:
    """How many writes the trial's journal holds (0 when there is none)."""
    return read_journal(folder).writes


def _apply(client: MlflowClient, run_id: str, folder: Path, op: dict[str, Any]) -> None:
    kind = op["op"]
    if kind == "metrics":
        metrics = [
            Metric(key, value, timestamp, step) for key, value, timestamp, step in op["rows"]
        ]
        if op.get("replay"):  # only the (key, step) pairs the run does not hold yet
            held = {
                (key, m.step)
                for key in {m.key for m in metrics}
                for m in client.get_metric_history(run_id, key)
            }
            metrics = [m for m in metrics if (m.key, m.step) not in held]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "delete_tag":
        try:
            client.delete_tag(run_id, op["key"])
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
    elif kind == "artifact":
        local = folder / JOURNAL_FILES / op["artifact_file"]
        client.log_artifact(run_id, str(local), os.path.dirname(op["artifact_file"]) or None)
    elif kind == "terminate":
        client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown journal entry {kind!r}")


def replay_journal(client: MlflowClient, folder: Path) -> int:
    """Replay the trial's journal into its run, in order, and remove it; returns the number of
    writes replayed. Raises (leaving the journal whole) when the store is still unreachable."""
    path = journal_path(folder)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            return 0
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        for entry in lines:
            _apply(client, entry["run_id"], folder, {**entry, "replay": True})
        path.unlink()
        shutil.rmtree(folder / JOURNAL_FILES, ignore_errors=True)
    return len(lines)


class JournaledWriter:
    """The writes of one trial's run: to MLflow, or to the journal while MLflow is unreachable."""

    def __init__(
        self, client: MlflowClient, run_id: str, folder: Path, *, retry_every: float = 30.0
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.folder = folder
        self.retry_every = retry_every
        self.journaled = 0
        """Writes that went to the journal (the store did not take them at first)."""
        self._next_try = 0.0

    @property
    def pending(self) -> int:
        return pending_writes(self.folder)

    def log_metrics(self, metrics: list[Metric]) -> None:
        rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
        self._write({"op": "metrics", "rows": rows})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"op": "tags", "tags": tags})

    def delete_tag(self, key: str) -> None:
        self._write({"op": "delete_tag", "key": key})

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self._write({"op": "artifact", "artifact_file": artifact_file}, lambda p: image.save(p))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._write(
            {"op": "artifact", "artifact_file": artifact_file},
            lambda p: p.write_text(text, encoding="utf-8"),
        )

    def set_terminated(self, status: str) -> None:
        self._write({"op": "terminate", "status": status})

    def sync(self) -> bool:
        """Replay the journal now (whatever the retry interval); True when nothing is left."""
        self._next_try = 0.0
        self._replay_if_due()
        return self.pending == 0

    def _replay_if_due(self) -> None:
        if journal_path(self.folder).exists() and time.monotonic() >= self._next_try:
            try:
                replay_journal(self.client, self.folder)
            except Exception as err:
                if not unreachable(err):
                    raise
                self._next_try = time.monotonic() + self.retry_every

    def _write(self, op: dict[str, Any], save: Callable[[Path], None] | None = None) -> None:
        self._replay_if_due()
        if not journal_path(self.folder).exists() and time.monotonic() >= self._next_try:
            try:
                self._send(op, save)
                return
            except Exception as err:
                if not unreachable(err):
                    raise
                self._next_try = time.monotonic() + self.retry_every
        self._append(op, save)

    def _send(self, op: dict[str, Any], save: Callable[[Path], None] | None) -> None:
        if op["op"] == "artifact":
            # The same calls as a journaled write, from a scratch copy of the file.
            local = self.folder / ".mlflow-outgoing" / op["artifact_file"]
            local.parent.mkdir(parents=True, exist_ok=True)
            assert save is not None
            save(local)
            try:
                self.client.log_artifact(
                    self.run_id, str(local), os.path.dirname(op["artifact_file"]) or None
                )
            finally:
                shutil.rmtree(self.folder / ".mlflow-outgoing", ignore_errors=True)
            return
        _apply(self.client, self.run_id, self.folder, op)

    def _append(self, op: dict[str, Any], save: Callable[[Path], None] | None) -> None:
        if save is not None:
            local = self.folder / JOURNAL_FILES / op["artifact_file"]
            local.parent.mkdir(parents=True, exist_ok=True)
            save(local)
        self.journaled += 1
        line = json.dumps({"run_id": self.run_id, **op}) + "\n"
        path = journal_path(self.folder)
        with FileLock(str(path) + ".lock"), open(path, "a", encoding="utf-8") as journal:
            journal.write(line)
            journal.flush()
            os.fsync(journal.fileno())
