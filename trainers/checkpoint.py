"""Atomic checkpoints: written to a temporary folder, marked COMPLETE, then renamed into place.

A kill during a save leaves only a `.tmp-*` folder, never a `step_*` folder that looks valid;
resume takes the newest `step_*` folder that has the COMPLETE marker. An evaluated step's
checkpoint also holds the metrics measured there (`evaluation.json`), so the retention policy
can rank the kept checkpoints by their weighted score without the tracking store, and still does
after a resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from contract.scoring import best_step, weighted_scores

if TYPE_CHECKING:
    from contract.trial import TrialConfig

COMPLETE = "COMPLETE"
EVALUATION = "evaluation.json"
"""The metrics evaluated at a checkpoint's step, written into it before it is published."""
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoints_root(config: TrialConfig) -> Path:
    """Where a trial's checkpoints live."""
    return config.output_dir / "checkpoints"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(root: Path, step: int) -> Path:
    """Where step `step` is written before it is published; every rank can name it."""
    return root / f".tmp-{checkpoint_dir(root, step).name}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """A fresh, empty staging folder for step `step` (a killed save's leftovers are dropped)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish_checkpoint(root: Path, step: int) -> Path:
    """Make the staged step durable, mark it COMPLETE, and rename it into place atomically."""
    staging, final = staging_dir(root, step), checkpoint_dir(root, step)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    (staging / COMPLETE).write_text(f"{step}\n")
    _fsync_dir(staging)
    if final.exists():  # a re-run of the same step (after a kill): replace it whole
        remove_checkpoint(final)
    os.rename(staging, final)
    _fsync_dir(root)
    return final


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on a staging folder and atomically publish it as step `step`."""
    staging = begin_checkpoint(root, step)
    try:
        write(staging)
        return publish_checkpoint(root, step)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): the message says which step,
    where, why, and which complete checkpoint a rerun will resume from."""

    def __init__(self, root: Path, step: int, cause: BaseException) -> None:
        previous = latest_checkpoint(root)
        try:
            free = f"{shutil.disk_usage(root).free:,} bytes free there"
        except OSError:
            free = "free space unknown"
        kept = (
            f"the last complete checkpoint (step {previous[0]}) is intact and a rerun resumes "
            "from it"
            if previous
            else "no earlier checkpoint exists; a rerun starts from step 0"
        )
        super().__init__(
            f"could not write the checkpoint of step {step} in {root} "
            f"({type(cause).__name__}: {cause}; {free}): {kept}"
        )


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest COMPLETE checkpoint, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every COMPLETE checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def write_evaluation(folder: Path, metrics: Mapping[str, float]) -> None:
    """Record the metrics evaluated at this checkpoint's step in its (staging) folder."""
    (folder / EVALUATION).write_text(json.dumps(dict(metrics), sort_keys=True), encoding="utf-8")


def checkpoint_scores(
    checkpoints: list[tuple[int, Path]],
    weights: Mapping[str, float],
    ranges: Mapping[str, tuple[float, float]],
) -> dict[int, float]:
    """The weighted score of every checkpoint that records its evaluation (the steps that were
    not evaluated, and checkpoints from before evaluations were recorded, have none)."""
    histories: dict[str, dict[int, float]] = {}
    for step, folder in checkpoints:
        recorded = folder / EVALUATION
        if recorded.is_file():
            for metric, value in json.loads(recorded.read_text(encoding="utf-8")).items():
                histories.setdefault(metric, {})[step] = value
    return weighted_scores(histories, weights, ranges)


def steps_to_remove(
    steps: list[int],
    *,
    keep_last: int | None,
    protected: set[int],
    scores: Mapping[int, float] | None = None,
) -> list[int]:
    """The retention policy: all but the newest `keep_last` steps, minus the `protected` ones
    and the best-scoring step of `scores` (ties to the earlier step, as selection breaks them).

    `keep_last=None` keeps everything. The newest step is never removed. Applied after every
    save, with the scores of the checkpoints kept so far, it never removes the best evaluated
    step so far: a step removed was beaten then, and stays beaten, so `dreamsweep select` with
    the spec's weights always finds the trial's best trained step on disk.
    """
    if keep_last is None:
        return []
    kept = set(sorted(steps)[-keep_last:]) | protected
    ranked = {step: score for step, score in (scores or {}).items() if step in steps}
    if ranked:
        kept.add(best_step(ranked)[0])
    return [step for step in sorted(steps) if step not in kept]


def remove_checkpoint(folder: Path) -> None:
    """Rename away first, so a kill mid-delete never leaves a partial `step_*` folder."""
    doomed = folder.with_name(f".removing-{folder.name}")
    os.rename(folder, doomed)
    shutil.rmtree(doomed)


def clean_leftovers(root: Path) -> None:
    """Delete what killed saves and deletes left behind (`.tmp-*`, `.removing-*`)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith((".tmp-", ".removing-")):
                shutil.rmtree(path, ignore_errors=True)
