"""Subject images → training tensors (no torchvision: PIL + torch only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


def load_rgb(path: Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) and in RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to `resolution`, centre-crop square, scale to [-1, 1], CHW."""
    square = ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_subject_pixels(files: list[Path], resolution: int) -> torch.Tensor:
    """The trial's images as one `[N, 3, resolution, resolution]` tensor in [-1, 1]."""
    return torch.stack([to_training_tensor(load_rgb(p), resolution) for p in files])
