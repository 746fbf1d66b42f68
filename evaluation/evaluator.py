"""Prompts → images → metrics, at every point of a trial's step grid.

The same prompts and the same per-image seeds are used at every step, so each curve compares
like with like: the only thing that changes between two points is the trained weights. The
encoders are loaded once per trial and the reference images' embeddings are cached on disk.
Each metric is an object from `evaluation.registry`; this module generates the images and runs
the chosen metrics over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from contract.layout import METRIC_EVAL_SECONDS, NO_NEGATIVE, no_negative_key
from contract.spec import EvalSpec
from evaluation.context import GeneratedImages, TrialContext
from evaluation.jobs import ImageJob, image_jobs, image_variants
from evaluation.metric import EvalMetric
from evaluation.registry import chosen_metrics

__all__ = ["Evaluation", "Evaluator", "image_grid"]

GRID_PROMPTS = 8
"""Prompts shown per variant in the logged sample grid (all images go into the records)."""


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


@dataclass
class Evaluation:
    metrics: dict[str, float]
    """Metric name → value; includes `eval_seconds`."""
    images: list[Image.Image]
    """Generated images, in job order (variant, then prompt, then image)."""
    grid: Image.Image
    """Some of the images as one picture: a row per prompt."""
    records: list[dict[str, object]]
    """One row per image: its prompt, phrases, seed and per-image metrics."""


class Evaluator:
    """Generates the validation images with a trial's current weights and measures them."""

    def __init__(
        self,
        spec: EvalSpec,
        *,
        token: str,
        class_token: str,
        reference_files: list[Path],
        resolution: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.resolution = resolution
        self.device = torch.device(device)
        self.jobs = image_jobs(spec, token=token, class_token=class_token)
        self.variants = [variant for variant, _ in image_variants(spec)]
        self.context = TrialContext(
            spec,
            class_token=class_token,
            reference_files=reference_files,
            jobs=self.jobs,
            variants=self.variants,
            device=self.device,
        )
        chosen = chosen_metrics(spec.metrics)
        # All shared encoders before any metric builds its own parts (heads, references), as
        # before the registry: what loading draws from the global RNG stays in the same order.
        self.context.load_encoders(set().union(*(metric.needs(self.context) for metric in chosen)))
        self.metrics: dict[str, EvalMetric] = {m.name: m(self.context) for m in chosen}

    @property
    def setup(self) -> dict[str, str]:
        """What the metrics really ran (e.g. the face detector), for the trial's setup tags."""
        return {k: v for metric in self.metrics.values() for k, v in metric.setup().items()}

    @property
    def reference(self) -> torch.Tensor:
        """The subject's reference embeddings on `eval.encoder` (what similarity compares to)."""
        return self.context.subject_reference

    def batches(self) -> list[list[ImageJob]]:
        """The jobs in the pipeline calls they are generated in. Batches never mix variants, so
        an image does not depend on whether the other variant is generated too (batch
        composition changes the numerics in the last bits)."""
        size = self.spec.batch_size
        batches: list[list[ImageJob]] = []
        for variant in self.variants:
            jobs = [job for job in self.jobs if job.variant == variant]
            batches += [jobs[start : start + size] for start in range(0, len(jobs), size)]
        return batches

    def generate_batch(
        self, pipeline: DiffusionPipeline, jobs: list[ImageJob]
    ) -> list[Image.Image]:
        """One pipeline call for `jobs` (which may come from several evaluators of the same
        `eval` spec: a pack's members, each row through its own weights)."""
        negatives = [job.negative_prompt for job in jobs]
        # CPU generators: the same noise whatever the accelerator.
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        result = pipeline(
            prompt=[job.prompt for job in jobs],
            negative_prompt=negatives if any(negatives) else None,
            generator=generators,
            num_inference_steps=self.spec.num_inference_steps,
            guidance_scale=self.spec.guidance_scale,
            height=self.resolution,
            width=self.resolution,
            output_type="pil",
        )
        return list(result.images)

    def generate(self, pipeline: DiffusionPipeline) -> list[Image.Image]:
        return [image for jobs in self.batches() for image in self.generate_batch(pipeline, jobs)]

    def measure(self, images: list[Image.Image]) -> tuple[dict[str, float], dict[str, list]]:
        """The curves' values and each image's own values (records column → one value per job:
        each per-image metric's, and the columns the metrics add)."""
        generated = GeneratedImages(self.context, images)
        per_image: dict[str, torch.Tensor] = {}
        columns: dict[str, list] = {}
        for name, metric in self.metrics.items():  # registry order: the records' columns
            values = metric.per_image(generated)
            if values is not None:
                per_image[name] = values
                columns[name] = values.tolist()
            columns |= metric.record_columns(generated)
        curves: dict[str, float] = {}
        for variant, rows in self.context.variant_rows():
            for name in self.spec.metrics:  # the spec's order: the logged curves' order
                values = self.metrics[name].curves(generated, rows, per_image.get(name))
                for curve, value in values.items():
                    curves[no_negative_key(curve) if variant == NO_NEGATIVE else curve] = value
        return curves, columns

    def records(self, per_image: dict[str, list]) -> list[dict[str, object]]:
        rows = []
        for index, job in enumerate(self.jobs):
            row: dict[str, object] = {
                "variant": job.variant or "main",
                "prompt_index": job.prompt_index,
                "image_index": job.image_index,
                "seed": job.seed,
                "prompt": job.prompt,
                "negative_prompt": job.negative_prompt,
            }
            row |= {f"phrase.{slot}": phrase for slot, phrase in job.phrases.items()}
            row |= {name: values[index] for name, values in per_image.items()}
            rows.append(row)
        return rows

    def grid(self, images: list[Image.Image]) -> Image.Image:
        shown = [
            image
            for image, job in zip(images, self.jobs, strict=True)
            if job.prompt_index < GRID_PROMPTS
        ]
        return image_grid(shown, columns=self.spec.images_per_prompt)

    def __call__(self, pipeline: DiffusionPipeline) -> Evaluation:
        started = time.perf_counter()
        images = self.generate(pipeline)
        return self.evaluation(images, started=started)

    def evaluation(self, images: list[Image.Image], *, started: float) -> Evaluation:
        """Measure generated `images` (in job order); `eval_seconds` counts from `started`
        (`time.perf_counter()` when generation began)."""
        metrics, per_image = self.measure(images)
        metrics[METRIC_EVAL_SECONDS] = time.perf_counter() - started
        return Evaluation(
            metrics=metrics,
            images=images,
            grid=self.grid(images),
            records=self.records(per_image) if self.spec.records else [],
        )
