"""Atomic checkpoints: written to a temporary folder, marked COMPLETE, then renamed into place.

A kill during a save leaves only a `.tmp-*` folder, never a `step_*` folder that looks valid;
resume takes the newest `step_*` folder that has the COMPLETE marker.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from contract.trial import TrialConfig

COMPLETE = "COMPLETE"
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


def steps_to_remove(steps: list[int], *, keep_last: int | None, protected: set[int]) -> list[int]:
    """The retention policy: all but the newest `keep_last` steps, minus the `protected` ones.

    `keep_last=None` keeps everything. The newest step is never removed.
    """
    if keep_last is None:
        return []
    newest = set(sorted(steps)[-keep_last:])
    return [step for step in sorted(steps) if step not in newest and step not in protected]


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
