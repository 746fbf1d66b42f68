"""The toy world's public face: samples (image, caption, labels, masks) drawn from a seed, the
subjects' image folders, and batches as tensors for training.

Every sample is a pure function of (seed, index): the same seed gives the same bytes, on any
machine, whatever was drawn before; so a training run resumed at step t draws what an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from toyworld.corrupt import random_corruption
from toyworld.render import Render, render
from toyworld.scene import (
    SUBJECTS,
    Scene,
    caption,
    pretraining_scene,
    scene_rng,
    subject_scene,
)

CAPTION_STREAM = 100
CORRUPTION_STREAM = 200


@dataclass
class Sample:
    scene: Scene
    render: Render
    caption: str

    @property
    def image(self) -> Image.Image:
        return self.render.image

    @property
    def labels(self) -> dict[str, str]:
        return self.render.labels


def pretraining_sample(seed: int, index: int, *, mention: float = 0.75) -> Sample:
    """Draw `index` of the pretraining world of `seed`: no subject's instance ever."""
    scene = pretraining_scene(seed, index)
    text = caption(scene, scene_rng(seed, index, CAPTION_STREAM), mention=mention)
    return Sample(scene, render(scene), text)


def pretraining_samples(seed: int, start: int, count: int) -> list[Sample]:
    return [pretraining_sample(seed, index) for index in range(start, start + count)]


def corrupted_image(seed: int, index: int) -> tuple[Image.Image, str, float]:
    """Draw `index`'s image with a random artefact: (image, kind, severity)."""
    image = pretraining_sample(seed, index).image
    return random_corruption(image, scene_rng(seed, index, CORRUPTION_STREAM))


def subject_sample(subject: str, seed: int, index: int) -> Sample:
    scene = subject_scene(subject, seed, index)
    text = caption(scene, scene_rng(seed, index, CAPTION_STREAM), mention=1.0)
    return Sample(scene, render(scene), text)


def write_subject_folder(
    subject: str, folder: Path, *, count: int = 4, seed: int = 0
) -> list[Path]:
    """The subject's image folder (`00.png` …): the instance in `count` varied contexts."""
    if subject not in SUBJECTS:
        raise ValueError(f"unknown toy-world subject {subject!r}; known: {sorted(SUBJECTS)}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:02d}.png"
        subject_sample(subject, seed, index).image.save(path, optimize=True)
        paths.append(path)
    return paths


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """float32 [N, 3, 64, 64] in [-1, 1] (what the VAE and UNet train on)."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """The inverse of `images_to_tensor` (clamped)."""
    array = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB") for a in array]


def grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    """Images side by side, `columns` to a row (the README's sample grids)."""
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet
