"""Prompts → images → metrics, at every point of a trial's step grid.

The same prompts and the same per-image seeds are used at every step, so each curve compares
like with like: the only thing that changes between two points is the trained weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from evaluation.encoders import ImageEncoder
from evaluation.metrics import diversity, similarity
from launch.spec import EvalSpec

SAMPLERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
}


def make_sampler(name: str, training_scheduler_config: dict):
    """The evaluation sampler, configured from the base model's noise schedule."""
    return SAMPLERS[name].from_config(training_scheduler_config)


def fill_prompt(template: str, *, token: str, class_token: str) -> str:
    return template.format(token=token, **{"class": class_token})


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
    """Generated images, prompt-major (all images of prompt 0, then prompt 1, …)."""
    grid: Image.Image
    """The images as one picture: a row per prompt."""


class Evaluator:
    """Generates the validation images with a trial's current weights and measures them."""

    def __init__(
        self,
        spec: EvalSpec,
        *,
        token: str,
        class_token: str,
        reference_images: list[Image.Image],
        resolution: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.spec = spec
        self.resolution = resolution
        self.prompts = [fill_prompt(p, token=token, class_token=class_token) for p in spec.prompts]
        self.jobs = [  # (prompt, seed): seeds fixed per image, identical at every step
            (prompt, spec.seed + index * spec.images_per_prompt + k)
            for index, prompt in enumerate(self.prompts)
            for k in range(spec.images_per_prompt)
        ]
        self.encoder = ImageEncoder(spec.image_encoder, device=device)
        # The subject's reference embeddings are computed once per trial, not per step.
        self.reference = self.encoder.embed(reference_images)

    def generate(self, pipeline: DiffusionPipeline) -> list[Image.Image]:
        images: list[Image.Image] = []
        for start in range(0, len(self.jobs), self.spec.batch_size):
            chunk = self.jobs[start : start + self.spec.batch_size]
            # CPU generators: the same noise whatever the accelerator.
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in chunk]
            result = pipeline(
                prompt=[prompt for prompt, _ in chunk],
                generator=generators,
                num_inference_steps=self.spec.num_inference_steps,
                guidance_scale=self.spec.guidance_scale,
                height=self.resolution,
                width=self.resolution,
                output_type="pil",
            )
            images.extend(result.images)
        return images

    def __call__(self, pipeline: DiffusionPipeline) -> Evaluation:
        started = time.perf_counter()
        images = self.generate(pipeline)
        embeddings = self.encoder.embed(images)
        measures = {
            "similarity": lambda: similarity(embeddings, self.reference),
            "diversity": lambda: diversity(embeddings),
        }
        metrics = {name: measures[name]() for name in self.spec.metrics}
        metrics["eval_seconds"] = time.perf_counter() - started
        return Evaluation(
            metrics=metrics,
            images=images,
            grid=image_grid(images, columns=self.spec.images_per_prompt),
        )
