"""Prompts → images → metrics, at every point of a trial's step grid.

The same prompts and the same per-image seeds are used at every step, so each curve compares
like with like: the only thing that changes between two points is the trained weights. The
encoders are loaded once per trial and the reference images' embeddings are cached on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from contract.layout import METRIC_EVAL_SECONDS, NO_NEGATIVE
from contract.prompts import Prompt, expand, fixed_prompts, load_template
from contract.spec import FACE_CLASSES, EvalSpec, subject_image_files
from evaluation.aesthetics import load_aesthetic_head
from evaluation.clip import Clip
from evaluation.dino import Dino
from evaluation.encoders import ImageEncoder, InceptionFeatures, reference_embeddings
from evaluation.in_domain import HaarFaceDetector, zero_shot_in_domain
from evaluation.metrics import (
    clip_t_per_image,
    diversity_per_image,
    frechet_distance,
    similarity_per_image,
)

GRID_PROMPTS = 8
"""Prompts shown per variant in the logged sample grid (all images go into the records)."""
AESTHETIC_SCALE = 10.0
"""The LAION predictor rates 1–10; dividing by 10 gives the study's 0–1 scale (0.3–0.7)."""


def validation_prompts(spec: EvalSpec) -> list[Prompt]:
    """`eval.prompts`, or the first `n_validation` prompts drawn from `eval.prompt_template`."""
    if spec.prompts is not None:
        return fixed_prompts(spec.prompts)
    template = load_template(spec.prompt_template.template)
    return expand(template, spec.prompt_template.n_validation, seed=spec.prompt_template.seed)


def in_domain_mode(spec: EvalSpec, class_token: str) -> str:
    if spec.in_domain != "auto":
        return spec.in_domain
    return "face" if class_token.lower() in FACE_CLASSES else "zero_shot"


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


@dataclass(frozen=True)
class ImageJob:
    """One evaluation image: what it is generated from, identical at every step."""

    variant: str
    """`""` (the spec's negative prompt, if any) or `no_negative`."""
    prompt_index: int
    image_index: int
    """Which of the prompt's `images_per_prompt` images."""
    seed: int
    prompt: str
    text_prompt: str
    """The prompt without the subject's identifier (DreamBench's CLIP-T prompt)."""
    negative_prompt: str
    phrases: dict[str, str] = field(default_factory=dict)


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
        variants = [("", spec.negative_prompt or "")]
        if spec.compare_negative:
            variants.append((NO_NEGATIVE, ""))
        self.jobs = [
            ImageJob(
                variant=variant,
                prompt_index=index,
                image_index=k,
                seed=spec.seed + index * spec.images_per_prompt + k,
                prompt=prompt.render(token=token, class_token=class_token),
                text_prompt=prompt.render(token="", class_token=class_token),
                negative_prompt=negative,
                phrases=prompt.phrases,
            )
            for variant, negative in variants
            for index, prompt in enumerate(validation_prompts(spec))
            for k in range(spec.images_per_prompt)
        ]
        self.variants = [variant for variant, _ in variants]
        self._load_measures(class_token, reference_files)

    def _load_measures(self, class_token: str, reference_files: list[Path]) -> None:
        """Load each encoder the chosen metrics need, once, and what they compare against."""
        spec, metrics = self.spec, set(self.spec.metrics)
        self.in_domain_mode = in_domain_mode(spec, class_token)
        wants_clip = (
            (spec.encoder == "clip" and metrics & {"similarity", "diversity"})
            or metrics & {"aesthetics", "clip_t"}
            or ("in_domain" in metrics and self.in_domain_mode == "zero_shot")
            or ("fid" in metrics and spec.fid_features == "clip")
        )
        wants_dino = (spec.encoder == "dino" and metrics & {"similarity", "diversity"}) or (
            "fid" in metrics and spec.fid_features == "dino"
        )
        self.clip = Clip(spec.clip_model, device=self.device) if wants_clip else None
        self.dino = Dino(spec.dino_model, device=self.device) if wants_dino else None
        self.subject_encoder: ImageEncoder | None = (
            self.clip if spec.encoder == "clip" else self.dino
        )
        if "similarity" in metrics:
            self.reference = reference_embeddings(
                self.subject_encoder, reference_files, normalize=True
            )
        if "aesthetics" in metrics:
            self.aesthetic_head = load_aesthetic_head(spec.aesthetics_head, device=self.device)
            width = self.aesthetic_head.layers[0].in_features
            if width != self.clip.dim:
                raise ValueError(
                    f"eval.aesthetics_head {spec.aesthetics_head!r} takes {width}-d embeddings "
                    f"but eval.clip_model {spec.clip_model!r} gives {self.clip.dim}-d ones; the "
                    "LAION head needs CLIP ViT-L/14 (openai/clip-vit-large-patch14)"
                )
        if "clip_t" in metrics:
            texts = sorted({job.text_prompt for job in self.jobs})
            embedded = dict(zip(texts, self.clip.embed_texts(texts), strict=True))
            self.text_embeddings = torch.stack([embedded[job.text_prompt] for job in self.jobs])
        if "in_domain" in metrics:
            if self.in_domain_mode == "face":
                self.face_detector = HaarFaceDetector()
            else:
                distractors = [
                    c for c in spec.distractor_classes if c.lower() != class_token.lower()
                ]
                self.class_text = self.clip.embed_texts([f"a photo of a {class_token}"])[0]
                self.distractor_texts = self.clip.embed_texts(
                    [f"a photo of a {c}" for c in distractors]
                )
        if "fid" in metrics:
            self.fid_encoder: ImageEncoder = (
                InceptionFeatures(device=self.device)
                if spec.fid_features == "inception"
                else self.clip
                if spec.fid_features == "clip"
                else self.dino
            )
            self.fid_reference = reference_embeddings(
                self.fid_encoder, subject_image_files(spec.fid_reference), normalize=False
            )

    def generate(self, pipeline: DiffusionPipeline) -> list[Image.Image]:
        # Batches never mix variants, so an image does not depend on whether the other variant
        # is generated too (batch composition changes the numerics in the last bits).
        size = self.spec.batch_size
        batches: list[list[ImageJob]] = []
        for variant in self.variants:
            jobs = [job for job in self.jobs if job.variant == variant]
            batches += [jobs[start : start + size] for start in range(0, len(jobs), size)]
        images: list[Image.Image] = []
        for chunk in batches:
            negatives = [job.negative_prompt for job in chunk]
            # CPU generators: the same noise whatever the accelerator.
            generators = [torch.Generator("cpu").manual_seed(job.seed) for job in chunk]
            result = pipeline(
                prompt=[job.prompt for job in chunk],
                negative_prompt=negatives if any(negatives) else None,
                generator=generators,
                num_inference_steps=self.spec.num_inference_steps,
                guidance_scale=self.spec.guidance_scale,
                height=self.resolution,
                width=self.resolution,
                output_type="pil",
            )
            images.extend(result.images)
        return images

    def measure(self, images: list[Image.Image]) -> tuple[dict[str, float], dict[str, list]]:
        """The curves' values and each image's own values (metric → one value per job)."""
        metrics = set(self.spec.metrics)
        batch = self.spec.batch_size
        per_image: dict[str, torch.Tensor] = {}
        clip_embeddings = None
        if self.clip is not None:
            clip_embeddings = self.clip.embed_images(images, batch_size=batch)
        subject_embeddings = None
        if metrics & {"similarity", "diversity"}:
            subject_embeddings = (
                clip_embeddings
                if self.spec.encoder == "clip"
                else self.dino.embed_images(images, batch_size=batch)
            )
        if "similarity" in metrics:
            per_image["similarity"] = similarity_per_image(subject_embeddings, self.reference)
        if "aesthetics" in metrics:
            with torch.no_grad():
                scores = self.aesthetic_head(clip_embeddings.to(self.device)).double().cpu()
            per_image["aesthetics"] = scores / AESTHETIC_SCALE
        if "clip_t" in metrics:
            per_image["clip_t"] = clip_t_per_image(clip_embeddings, self.text_embeddings)
        if "in_domain" in metrics:
            if self.in_domain_mode == "face":
                found = [self.face_detector.has_face(image) for image in images]
                per_image["in_domain"] = torch.tensor(found, dtype=torch.float64)
            else:
                per_image["in_domain"] = zero_shot_in_domain(
                    clip_embeddings, self.class_text, self.distractor_texts
                ).double()
        if "diversity" in metrics:
            per_image["diversity"] = torch.zeros(len(images), dtype=torch.float64)

        curves: dict[str, float] = {}
        for variant in self.variants:
            rows = [i for i, job in enumerate(self.jobs) if job.variant == variant]
            suffix = f"/{variant}" if variant else ""
            if "diversity" in metrics:
                per_image["diversity"][rows] = diversity_per_image(subject_embeddings[rows])
            for name in self.spec.metrics:
                if name == "fid":
                    features = self.fid_encoder.embed_images(
                        [images[i] for i in rows], normalize=False
                    )
                    curves[name + suffix] = frechet_distance(features, self.fid_reference)
                else:
                    curves[name + suffix] = per_image[name][rows].mean().item()
        return curves, {name: values.tolist() for name, values in per_image.items()}

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
        metrics, per_image = self.measure(images)
        metrics[METRIC_EVAL_SECONDS] = time.perf_counter() - started
        return Evaluation(
            metrics=metrics,
            images=images,
            grid=self.grid(images),
            records=self.records(per_image) if self.spec.records else [],
        )
