"""A finished combination, over every shard: the means of its per-image metrics, its set-level
metrics (diversity, FID, KID: over all its images at once), its timing, its per-image records
and a sample grid. Read from the images and sidecars the shards wrote; nothing is generated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from contract.inference import (
    IMAGES_DIR,
    TIMING_DIR,
    Combination,
    StudyPrompt,
    combination_folder,
    image_key,
)
from contract.layout import (
    METRIC_DENOISER_ITERATIONS_PER_SECOND,
    METRIC_PEAK_MEMORY_MB,
    METRIC_SECONDS_PER_IMAGE_MEAN,
    METRIC_SECONDS_PER_IMAGE_P50,
    METRIC_SECONDS_PER_IMAGE_P90,
)
from contract.spec import EvalSpec
from evaluation.context import GeneratedImages, TrialContext
from evaluation.evaluator import GRID_PROMPTS, image_grid
from evaluation.jobs import ImageJob
from evaluation.registry import chosen_metrics
from inference.shard import read_png


class SetScorer:
    """The set-level metrics of a combination's images (encoders loaded once per study)."""

    def __init__(self, spec: EvalSpec, names: list[str], images: int, device: torch.device):
        jobs = [
            ImageJob("", i, 0, 0, prompt="", text_prompt="", negative_prompt="")
            for i in range(images)
        ]
        self.context = TrialContext(
            spec, class_token="", reference_files=[], jobs=jobs, variants=[""], device=device
        )
        chosen = chosen_metrics(names)
        self.context.load_encoders(set().union(*(m.needs(self.context) for m in chosen)))
        self.metrics = [metric(self.context) for metric in chosen]

    def __call__(self, images: list[Image.Image]) -> tuple[dict[str, float], dict[str, list]]:
        """Each metric's value over the set, and the per-image values of those that have one."""
        generated = GeneratedImages(self.context, images)
        rows = list(range(len(images)))
        values: dict[str, float] = {}
        per_image_columns: dict[str, list] = {}
        for metric in self.metrics:
            per_image = metric.per_image(generated)
            if per_image is not None:
                per_image_columns[metric.name] = per_image.tolist()
            values[metric.name] = metric.curve(generated, rows, per_image)
        return values, per_image_columns


@dataclass
class CombinationSummary:
    metrics: dict[str, float]
    """Each metric's mean (per-image ones) or set value, and the timing metrics."""
    records: list[dict[str, Any]]
    """One row per image: prompt_index, image_index, prompt, phrase.<slot>, seconds, metrics."""
    grid: Image.Image
    memory_source: str


def _timing(sidecars: list[dict[str, Any]], folder: Path) -> tuple[dict[str, float], str]:
    timed = [s for s in sidecars if not s["warmup"]] or sidecars
    seconds = np.array([s["seconds"] for s in timed], dtype=np.float64)
    steps = sum(s["denoiser_steps"] for s in timed)
    denoising = sum(s["denoise_seconds"] for s in timed)  # the loops only (inference.shard)
    peaks = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((folder / TIMING_DIR).glob("shard_*.json"))
    ]
    metrics = {
        METRIC_SECONDS_PER_IMAGE_MEAN: float(seconds.mean()),
        METRIC_SECONDS_PER_IMAGE_P50: float(np.percentile(seconds, 50)),
        METRIC_SECONDS_PER_IMAGE_P90: float(np.percentile(seconds, 90)),
    }
    if steps and denoising > 0:  # a pipeline that never called back timed no loop: no rate
        metrics[METRIC_DENOISER_ITERATIONS_PER_SECOND] = steps / denoising
    if peaks:
        metrics[METRIC_PEAK_MEMORY_MB] = max(p["peak_memory_mb"] for p in peaks)
    return metrics, ",".join(sorted({p["memory_source"] for p in peaks}))


def summarize_combination(
    study_dir: Path,
    combination: Combination,
    prompts: list[StudyPrompt],
    images_per_prompt: int,
    *,
    per_image_metrics: list[str],
    set_scorer: SetScorer | None,
) -> CombinationSummary:
    """The combination's summary; raises FileNotFoundError if a shard left an image unscored."""
    images_dir = combination_folder(study_dir, combination.combination_id) / IMAGES_DIR
    keys = [(p, k) for p in prompts for k in range(images_per_prompt)]
    sidecars = []
    for prompt, k in keys:
        path = images_dir / f"{image_key(prompt, k)}.json"
        sidecars.append(json.loads(path.read_text(encoding="utf-8")))
    metrics = {
        name: float(np.mean([s["metrics"][name] for s in sidecars])) for name in per_image_metrics
    }
    # Only the grid's images, unless a set-level metric needs every image (thousands of PNGs).
    shown = GRID_PROMPTS * images_per_prompt
    wanted = keys if set_scorer is not None else keys[:shown]
    images = [read_png(images_dir / f"{image_key(p, k)}.png")[0] for p, k in wanted]
    set_columns: dict[str, list] = {}
    if set_scorer is not None:
        set_values, set_columns = set_scorer(images)
        metrics |= set_values
    timing, memory_source = _timing(sidecars, images_dir.parent)
    metrics |= timing
    records = []
    for index, ((prompt, k), sidecar) in enumerate(zip(keys, sidecars, strict=True)):
        row: dict[str, Any] = {
            "prompt_index": prompt.index,
            "image_index": k,
            "prompt": sidecar["prompt"],
            "negative_prompt": sidecar["negative_prompt"] or "",
            "seed": sidecar["seed"],
        }
        row |= {f"phrase.{slot}": phrase for slot, phrase in prompt.phrases.items()}
        row |= {
            "seconds": sidecar["seconds"],
            "denoiser_steps": sidecar["denoiser_steps"],
            "warmup": sidecar["warmup"],
        }
        row |= sidecar["metrics"]
        row |= {name: values[index] for name, values in set_columns.items()}
        records.append(row)
    grid = image_grid(images[:shown], columns=images_per_prompt)
    return CombinationSummary(metrics, records, grid, memory_source)
