"""Artefacts for the aesthetic head's and the oracle's `clean` training: what a collapsing
fine-tune tends to produce (noise, blur, banding, blocking, colour shifts), each at a severity in
(0, 1]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from toyworld.scene import SIZE

CORRUPTIONS = ("noise", "blur", "banding", "blocking", "colour_shift")


def corrupt(
    image: Image.Image, kind: str, severity: float, rng: np.random.Generator
) -> Image.Image:
    """`image` with the artefact `kind` at `severity` (0 none … 1 heavy)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {list(CORRUPTIONS)}")
    if not 0.0 < severity <= 1.0:
        raise ValueError(f"corruption severity {severity} is not in (0, 1]")
    pixels = np.asarray(image, dtype=np.float32)
    if kind == "noise":
        pixels = pixels + rng.normal(0.0, 12 + 58 * severity, pixels.shape)
    elif kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.8 + 2.2 * severity))
    elif kind == "banding":
        levels = round(6 - 4 * severity)  # per channel: 6 … 2
        step = 255 / (levels - 1)
        pixels = np.rint(pixels / step) * step
    elif kind == "blocking":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=max(1, round(12 - 11 * severity)))
        blocky = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        block = 2 + round(4 * severity)  # also coarse pixel blocks, as a decoder's artefacts
        small = blocky.resize((SIZE // block, SIZE // block), Image.Resampling.BOX)
        return small.resize((SIZE, SIZE), Image.Resampling.NEAREST)
    else:  # colour_shift: a channel gain and offset cast over the whole image
        gains = 1 + rng.uniform(-0.5, 0.5, 3) * severity
        offsets = rng.uniform(-70, 70, 3) * severity
        pixels = pixels * gains + offsets
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def random_corruption(
    image: Image.Image, rng: np.random.Generator, *, low: float = 0.25
) -> tuple[Image.Image, str, float]:
    """A random artefact at a random severity in [low, 1]: (image, kind, severity)."""
    kind = CORRUPTIONS[int(rng.integers(len(CORRUPTIONS)))]
    severity = float(rng.uniform(low, 1.0))
    return corrupt(image, kind, severity, rng), kind, severity
