"""The on-disk cache for things dreamsweep builds once: offline tiny models, class images,
cached latents and prompt embeddings.

`DREAMSWEEP_CACHE` overrides the location (default `~/.cache/dreamsweep`); on a cluster, point
it at a filesystem every node sees, so the subjects' trials share one copy.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def cache_root() -> Path:
    return Path(os.environ.get("DREAMSWEEP_CACHE", Path.home() / ".cache" / "dreamsweep"))


def build_once(name: str, build: Callable[[Path], None], *, isolate: bool = False) -> Path:
    """Return `cache_root()/name`, calling `build(folder)` first if it is not there yet.

    The build writes to a temporary folder that is renamed into place, so no reader ever sees a
    half-written result; a lock file makes concurrent trials wait for one build rather than
    repeat it (class images can take minutes).

    `isolate=True` builds in a fresh process when torch.distributed is initialised here:
    transformers' `save_pretrained` writes weights only on global rank 0, so a node's main
    process of a multi-node job (rank ≠ 0) would otherwise publish a model without weights.
    """
    target = cache_root() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_dir():
            _build(target, build, isolate=isolate)
    return target


def _build(target: Path, build: Callable[[Path], None], *, isolate: bool) -> None:
    import torch  # here, not on import: the contract imports without torch

    name = target.name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if isolate and torch.distributed.is_available() and torch.distributed.is_initialized():
            process = multiprocessing.get_context("spawn").Process(target=build, args=(staging,))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"building {name} failed (exit status {process.exitcode})")
        else:
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


def cache_key(*parts: object) -> str:
    """A short stable hash of what a cached result depends on."""
    blob = json.dumps([str(p) for p in parts]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
