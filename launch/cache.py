"""The on-disk cache for things dreamsweep builds once (offline tiny models).

`DREAMSWEEP_CACHE` overrides the location (default `~/.cache/dreamsweep`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def cache_root() -> Path:
    return Path(os.environ.get("DREAMSWEEP_CACHE", Path.home() / ".cache" / "dreamsweep"))


def build_once(name: str, build: Callable[[Path], None]) -> Path:
    """Return `cache_root()/name`, calling `build(folder)` first if it is not there yet.

    The build writes to a temporary folder that is renamed into place, so concurrent trials
    never see a half-written model; if two build at once, the first rename wins.
    """
    target = cache_root() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        # Builders seed torch for reproducible weights; the caller's RNG stream must not
        # depend on whether the cache was warm.
        with torch.random.fork_rng(devices=[]):
            build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
