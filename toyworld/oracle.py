"""The oracle: judges an image (a generated one) against the toy world's ground truth.

Per image, each in [0, 1]:

- `subject`: does it show the subject? p(class) × mean(p(variant), p(primary colour),
  p(secondary colour), p(pattern)), from a small CNN trained on the renderer's labels (below). The
  class is a gate: a foreign class scores near 0 however its colours look.
- `prompt`: does it follow the context the prompt asks for? The mean, over what the prompt names
  of background colour and position, of: the share of the image's border pixels nearest (over
  every lighting, texture tone and shadow) to the asked background colour; and the softmax weight
  of the asked position among the five, from the centroid of the foreground (pixels far from the
  background's tones). Analytic, from pixels. A prompt naming neither scores 1.
- `clean`: p(no artefact), the CNN's clean-vs-corrupted head (noise, blur, banding, blocking,
  colour shifts: `toyworld.corrupt`).
- `score`: the geometric mean (subject · prompt · clean)^(1/3): 1 only when all three are, 0 when
  any is, and each counts alike.

The CNN (`AttributeNet`) is trained on renders of the *whole* instance space (subjects included:
the judge may know them; the pretrained models never see them) in varied contexts, half of them
corrupted, with mirrored and shifted copies, and a dense auxiliary target (each 4 px cell's
part, from the renderer's masks); its input is the pixels plus their closeness to each palette
colour. In the build, half the renders pass through the toy VAE's round trip first (clean
unless corrupted after): a generated image is at best what the VAE decodes, softer than a
render, and an oracle trained on renders alone called every generated image corrupted
(`oracle/clean` 0.00-0.17 on the quickstart's images, whatever the step). Probabilities are
averaged over the image and its mirror. Deterministic from its seed; saved as safetensors, its
build (seed, steps, data, validation accuracies, seconds) in the file's metadata. At the build's
settings (1600 steps × 64 of 4000 draws: 91 s on 2 CPU threads), validation accuracy on clean
images (renders and round trips): class 0.99, variant 0.94, primary 0.69, secondary 0.76,
pattern 0.52 (the VAE's 8× latents blur stripes and dots), clean 0.97.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from toyworld.corrupt import random_corruption
from toyworld.render import SHADOW, TEXTURE_TONE, render
from toyworld.scene import (
    BACKGROUND_COLOURS,
    CLASSES,
    LIGHTINGS,
    OBJECT_COLOURS,
    PATTERNS,
    POSITIONS,
    SUBJECTS,
    VARIANTS,
    WORLD_VERSION,
    Instance,
    Scene,
    draw_context,
    draw_instance,
    parse_context,
    scene_rng,
)

HEADS = {
    "object_class": list(CLASSES),
    "variant": ["0", "1"],  # the index in VARIANTS[class]
    "primary": list(OBJECT_COLOURS),
    "secondary": list(OBJECT_COLOURS),
    "pattern": list(PATTERNS),
    "clean": ["corrupted", "clean"],
}
COLOUR_HEADS = ("primary", "secondary")
PART_LABELS = 4  # background, primary, secondary, detail
ORACLE_STREAM = 300
FOREGROUND_DISTANCE = 40.0
"""RGB distance from every background tone above which a pixel is the object's."""
POSITION_TEMPERATURE = 0.003
"""Softmax temperature over squared distances (in image fractions) to the five positions."""
BORDER = 3
DECODE_BATCH = 256
Decoder = Callable[[list[Image.Image]], list[Image.Image]]
"""Images → the same images as a decoder renders them (the toy VAE's round trip)."""


def _blocks(channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.SiLU()]
    return nn.Sequential(*layers)


class AttributeNet(nn.Module):
    """A small CNN: 64 px RGB → one logit vector per head (global pooling: position-free).

    While training, a 1×1 convolution on the 16×16 features also predicts each cell's part
    (background, primary, secondary, detail) from the renderer's masks: dense labels teach the
    net which region is which part far faster than the image-level labels alone."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = _blocks([3 + len(OBJECT_COLOURS), width, width * 2])  # → 16×16
        self.trunk = _blocks([width * 2, width * 2, width * 4])  # → 4×4
        self.parts = nn.Conv2d(width * 2, PART_LABELS, 1)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(8 * width, len(values)) for name, values in HEADS.items()}
        )

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """`inputs`: `net_inputs(pixels)`. Also `parts`: [N, 4, 16, 16] logits."""
        early = self.stem(inputs)
        features = self.trunk(early)
        # Mean and max pooling: where the object is does not matter, that a part is there does.
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return {"parts": self.parts(early), **{n: h(pooled) for n, h in self.heads.items()}}


_OBJECT_TONES = (  # [C, K, 3] in 0–1: each object colour under every lighting
    torch.tensor(list(OBJECT_COLOURS.values()), dtype=torch.float32)[:, None, :]
    * torch.tensor(list(LIGHTINGS.values()), dtype=torch.float32)[None, :, :]
).clamp(0, 255) / 255.0
COLOUR_WIDTH = 40 / 255


def colour_maps(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in 0–1 → [N, C, H, W]: how close each pixel is to each object colour (under
    any lighting or shade). Given to the CNN beside the pixels: the palette is known, so the
    net need only learn which region is which part."""
    n, _, h, w = pixels.shape
    flat = pixels.permute(0, 2, 3, 1).reshape(-1, 3)
    tones = _OBJECT_TONES.reshape(-1, 3)
    # ‖x − t‖² = ‖x‖² − 2 x·t + ‖t‖², as one matrix product.
    distance = flat.square().sum(1, keepdim=True) - 2 * flat @ tones.T + tones.square().sum(1)
    nearest = distance.reshape(n * h * w, len(OBJECT_COLOURS), -1).amin(-1).clamp_min(0)
    maps = torch.exp(-nearest / (2 * COLOUR_WIDTH**2))
    return maps.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def net_inputs(pixels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The CNN's input: the pixels and their colour maps, [N, 3 + C, 64, 64]."""
    return torch.cat([torch.cat([part, colour_maps(part)], dim=1) for part in pixels.split(chunk)])


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """float32 [N, 3, 64, 64] in [0, 1] (resized to 64 px if needed)."""
    arrays = [
        np.asarray(
            image.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
            if image.size != (64, 64)
            else image.convert("RGB"),
            dtype=np.float32,
        )
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def _targets(instance: Instance, clean: bool) -> dict[str, int]:
    return {
        "object_class": CLASSES.index(instance.object_class),
        "variant": VARIANTS[instance.object_class].index(instance.variant),
        "primary": list(OBJECT_COLOURS).index(instance.primary),
        "secondary": list(OBJECT_COLOURS).index(instance.secondary),
        "pattern": PATTERNS.index(instance.pattern),
        "clean": int(clean),
    }


def training_data(
    seed: int, count: int, decode: Decoder | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`count` renders of any instance (subjects too), half corrupted; a colour head's target is
    -1 (ignored) on a colour-shifted image, whose colours are no longer the instance's. `parts`:
    each image's part labels on a 16×16 grid.

    With `decode` (the toy VAE's round trip), half the images are shown as the decoder renders
    them, before any corruption: a generated image is at best what the VAE decodes, softer than a
    render, and the oracle must call that clean and read its attributes."""
    images, targets = [], {name: [] for name in (*HEADS, "parts")}
    draws = []
    for index in range(count):
        rng = scene_rng(seed, index, ORACLE_STREAM)
        scene = Scene(draw_instance(rng, allow_held_out=True), draw_context(rng))
        clean = bool(rng.random() < 0.5)
        decoded = decode is not None and bool(rng.random() < 0.5)
        draws.append((rng, scene, render(scene), clean, decoded))
    shown_images = [shown.image for _, _, shown, _, _ in draws]
    if decode is not None:
        chosen = [i for i, (*_, decoded) in enumerate(draws) if decoded]
        for start in range(0, len(chosen), DECODE_BATCH):
            rows = chosen[start : start + DECODE_BATCH]
            for row, image in zip(rows, decode([shown_images[i] for i in rows]), strict=True):
                shown_images[row] = image
    for (rng, scene, shown, clean, _), image in zip(draws, shown_images, strict=True):
        parts = np.zeros(shown.object_mask.shape, dtype=np.int64)
        for label, part in enumerate(("primary", "secondary", "detail"), start=1):
            parts[shown.part_masks[part]] = label
        targets["parts"].append(parts[2::4, 2::4])
        kind = ""
        if not clean:
            image, kind, _ = random_corruption(image, rng)
        images.append(image)
        for name, value in _targets(scene.instance, clean).items():
            ignored = name in COLOUR_HEADS and kind == "colour_shift"
            targets[name].append(-1 if ignored else value)
    # float16 in memory (4000 inputs: 360 MB rather than 720), float32 per batch.
    inputs = net_inputs(to_pixels(images)).half()
    return inputs, {name: torch.tensor(np.array(v)) for name, v in targets.items()}


def train_attribute_net(
    *,
    seed: int = 0,
    steps: int = 600,
    count: int = 4000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    decode: Decoder | None = None,
) -> tuple[AttributeNet, dict[str, object]]:
    """Train the oracle's CNN (on decoded renders too with `decode`: `training_data`); returns
    it (eval mode) and its build record."""
    started = time.monotonic()
    torch.manual_seed(seed)
    pixels, targets = training_data(seed, count, decode)
    held = max(32, count // 10)  # the last draws are the validation set
    net = AttributeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps
    )
    order = np.random.default_rng(seed)
    loss_value = float("nan")
    for _ in range(steps):
        batch = torch.from_numpy(order.integers(0, count - held, batch_size))
        inputs, parts = pixels[batch].float(), targets["parts"][batch]
        if order.random() < 0.5:  # a mirrored image has the same labels: twice the data
            inputs, parts = inputs.flip(-1), parts.flip(-1)
        # So has a shifted one (whole 4 px cells, so the part grid shifts with it).
        dy, dx = (int(v) * 4 for v in order.integers(-1, 2, 2))
        inputs, parts = inputs.roll((dy, dx), (2, 3)), parts.roll((dy // 4, dx // 4), (1, 2))
        logits = net(inputs)
        loss = sum(
            nn.functional.cross_entropy(logits[name], targets[name][batch], ignore_index=-1)
            for name in HEADS
        ) + nn.functional.cross_entropy(logits["parts"], parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
    net.eval()
    with torch.no_grad():
        logits = net(pixels[count - held :].float())
    accuracy, clean_accuracy = {}, {}
    clean = targets["clean"][count - held :] == 1
    for name in HEADS:
        truth = targets[name][count - held :]
        right = logits[name].argmax(-1) == truth
        accuracy[name] = round(float(right[truth >= 0].float().mean()), 4)
        clean_accuracy[name] = round(float(right[clean].float().mean()), 4)
    record = {
        "world": WORLD_VERSION,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "train_images": count - held,
        "decoded_share": 0.5 if decode is not None else 0.0,
        "validation_images": held,
        "final_loss": round(loss_value, 4),
        "validation_accuracy": accuracy,
        "validation_accuracy_clean": clean_accuracy,
        "seconds": round(time.monotonic() - started, 1),
        "torch": torch.__version__,
    }
    return net, record


def save_attribute_net(net: AttributeNet, record: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(net.state_dict(), str(partial), metadata={"build": json.dumps(record)})
    partial.replace(path)


def load_attribute_net(path: Path) -> tuple[AttributeNet, dict[str, object]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        record = json.loads((handle.metadata() or {}).get("build", "{}"))
    net = AttributeNet()
    net.load_state_dict(load_file(str(path)))
    return net.eval(), record


# ---- the analytic part: background and position ----------------------------------------------

_TONES = np.array([1.0, TEXTURE_TONE, SHADOW, SHADOW * TEXTURE_TONE], dtype=np.float32)
_LIGHTS = np.array(list(LIGHTINGS.values()), dtype=np.float32)
BACKGROUND_TONES = {  # colour → [K, 3]: every shade a background pixel of it can take
    name: (
        np.array(rgb, dtype=np.float32)[None, None] * _LIGHTS[:, None] * _TONES[None, :, None]
    ).reshape(-1, 3)
    for name, rgb in BACKGROUND_COLOURS.items()
}


def _nearest_distance(pixels: np.ndarray, tones: np.ndarray) -> np.ndarray:
    """[..., 3] pixels → distance to the nearest of `tones` [K, 3]."""
    return np.sqrt(((pixels[..., None, :] - tones) ** 2).sum(-1)).min(-1)


def background_votes(image: np.ndarray) -> dict[str, float]:
    """Share of the border pixels nearest to each background colour."""
    border = np.concatenate(
        [
            image[:BORDER].reshape(-1, 3),
            image[-BORDER:].reshape(-1, 3),
            image[:, :BORDER].reshape(-1, 3),
            image[:, -BORDER:].reshape(-1, 3),
        ]
    ).astype(np.float32)
    distances = np.stack([_nearest_distance(border, t) for t in BACKGROUND_TONES.values()])
    winners = distances.argmin(0)
    return {name: float((winners == i).mean()) for i, name in enumerate(BACKGROUND_TONES)}


def foreground_mask(image: np.ndarray, background: str) -> np.ndarray:
    return _nearest_distance(image.astype(np.float32), BACKGROUND_TONES[background]) > (
        FOREGROUND_DISTANCE
    )


def position_weights(image: np.ndarray, background: str) -> dict[str, float]:
    """Softmax over the five positions of the foreground centroid's closeness (all 0 with no
    foreground)."""
    mask = foreground_mask(image, background)
    if mask.sum() < 4:
        return dict.fromkeys(POSITIONS, 0.0)
    rows, cols = np.nonzero(mask)
    centre = np.array([cols.mean() + 0.5, rows.mean() + 0.5]) / image.shape[1]
    targets = np.array(list(POSITIONS.values()))
    logits = -((targets - centre) ** 2).sum(-1) / POSITION_TEMPERATURE
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    return dict(zip(POSITIONS, weights.tolist(), strict=True))


def prompt_following(image: Image.Image, prompt: str) -> float:
    """The `prompt` part of the oracle for one image (see the module doc)."""
    asked = parse_context(prompt)
    pixels = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)
    votes = background_votes(pixels)
    parts = []
    if "background" in asked:
        parts.append(votes[asked["background"]])
    if "position" in asked:
        seen = asked.get("background") or max(votes, key=votes.get)
        parts.append(position_weights(pixels, seen)[asked["position"]])
    return float(np.mean(parts)) if parts else 1.0


def _subject_match(p: dict[str, torch.Tensor], subject: Instance | str) -> torch.Tensor:
    """p(class) × mean(p(variant), p(primary), p(secondary), p(pattern)) of the subject's."""
    instance = SUBJECTS[subject] if isinstance(subject, str) else subject
    truth = _targets(instance, clean=True)
    attributes = torch.stack(
        [p[name][:, truth[name]] for name in ("variant", "primary", "secondary", "pattern")]
    )
    return p["object_class"][:, truth["object_class"]] * attributes.mean(0)


@dataclass
class Judgement:
    """Per-image oracle values, float64 [N] each."""

    subject: torch.Tensor
    prompt: torch.Tensor
    clean: torch.Tensor
    score: torch.Tensor


class Oracle:
    def __init__(self, net: AttributeNet, record: dict[str, object] | None = None) -> None:
        self.net = net.eval()
        self.record = record or {}

    @classmethod
    def load(cls, path: Path) -> Oracle:
        return cls(*load_attribute_net(path))

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Per head, the softmax over its values [N, K]."""
        inputs = net_inputs(to_pixels(images))
        # The image and its mirror (the labels do not change), probabilities averaged.
        views = [self.net(inputs), self.net(inputs.flip(-1))]
        return {
            name: sum(view[name].softmax(-1).double() for view in views) / len(views)
            for name in HEADS
        }

    def nearest_subject(self, images: list[Image.Image]) -> tuple[str, float]:
        """Which of the world's subjects (`SUBJECTS`) a subject's own images show, and their
        mean match to it: the subjects differ in class, so a few images tell them apart where
        reading each attribute alone would not (a variant is misread in some renders)."""
        probabilities = self.probabilities(images)
        matches = {name: float(_subject_match(probabilities, name).mean()) for name in SUBJECTS}
        best = max(matches, key=matches.get)
        return best, matches[best]

    def subject_match(self, images: list[Image.Image], subject: Instance | str) -> torch.Tensor:
        return _subject_match(self.probabilities(images), subject)

    def judge(
        self, images: list[Image.Image], prompts: list[str], subject: Instance | str
    ) -> Judgement:
        """Each image judged against the subject and its own prompt."""
        if len(images) != len(prompts):
            raise ValueError(f"oracle: {len(images)} images but {len(prompts)} prompts")
        probabilities = self.probabilities(images)  # once: the CNN is most of a judgement's cost
        subject_values = _subject_match(probabilities, subject)
        clean = probabilities["clean"][:, 1]
        prompt = torch.tensor(
            [prompt_following(i, p) for i, p in zip(images, prompts, strict=True)],
            dtype=torch.float64,
        )
        score = (subject_values * prompt * clean).clamp_min(0) ** (1 / 3)
        return Judgement(subject_values, prompt, clean, score)
