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

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on a temporary folder and atomically publish it as step `step`."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, step)
    staging = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        (staging / COMPLETE).write_text(f"{step}\n")
        _fsync_dir(staging)
        if final.exists():  # a re-run of the same step (after a kill): replace it whole
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def latest_checkpoint(root: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest COMPLETE checkpoint, or None."""
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return max(found) if found else None
