"""Image encoders behind the metrics, and the on-disk cache of reference-image embeddings.

Every encoder maps PIL images to a float32 `[N, D]` tensor on the CPU (`embed_images`) and names
where its weights came from (`source`). CLIP and DINO load a hub id or local folder unchanged,
or build their offline `tiny` variant; Inception-v3 (FID, KID) is `evaluation.inception`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from contract.cache import cache_key, cache_root
from contract.images import load_rgb


class ImageEncoder(Protocol):
    source: str

    def embed_images(
        self, images: list[Image.Image], *, normalize: bool = True, batch_size: int = 32
    ) -> torch.Tensor: ...


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_embeddings(
    encoder: ImageEncoder, files: list[Path], *, normalize: bool
) -> torch.Tensor:
    """The embeddings of a fixed image set, computed once and cached on disk.

    Keyed by the encoder's weights and every file's content, so all trials of a subject (and all
    sweeps on one cache) encode its reference images once, and an edited image is re-encoded.
    """
    key = cache_key(
        type(encoder).__name__, encoder.source, normalize, *(file_digest(f) for f in files)
    )
    target = cache_root() / "embeddings" / f"{key}.pt"
    if target.is_file():
        return torch.load(target, weights_only=True)
    embeddings = encoder.embed_images([load_rgb(f) for f in files], normalize=normalize)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a concurrent reader sees all of it or nothing.
    handle, staging = tempfile.mkstemp(prefix=f"{key}-", suffix=".part", dir=target.parent)
    os.close(handle)
    torch.save(embeddings, staging)
    os.replace(staging, target)
    return embeddings
