"""One shard of an inference study: every combination, for the shard's prompts.

Each image is written atomically (a temporary file, then a rename) as
`combinations/<id>/images/p<prompt>_i<image>_<prompt digest>.png` (`image_key`), its
generation time and denoiser steps in the PNG's own text chunk, so an image on disk is complete
whether or not it has been scored.
Once every image of (shard, combination) exists they are scored in one pass, always the same
images in the same order (so a resumed shard's scores equal an uninterrupted one's to the
bit), and each image gets its sidecar `p…_i….json`: key, prompt, seconds, per-image metrics
and the digest of the settings they were scored with (`SCORING_KEY`).
A killed shard resumes where it stopped: existing images are not generated again, scored ones
not scored again; changed metric settings score the images again without generating them.
`generated.log` in the shard's folder gets one line per pipeline call.

Timing: seconds per image exclude the first image a process generates for a combination (the
warm-up: kernel selection, allocator growth), which is flagged `warmup` in its sidecar. Peak
memory is CUDA's max allocated during the combination on a GPU, else the process's peak RSS
(which is the whole process's so far, not the combination's): `memory_source` says which.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from contract.inference import (
    IMAGES_DIR,
    SHARD_DONE,
    TIMING_DIR,
    Combination,
    Shard,
    combination_folder,
    image_seed,
    step_noise_seed,
)
from evaluation.context import GeneratedImages, TrialContext
from evaluation.jobs import ImageJob
from evaluation.registry import chosen_metrics
from inference.pipelines import initial_latents, load_pipeline, make_scheduler

GENERATION_LOG = "generated.log"
PNG_INFO_KEY = "dreamsweep"
SCORING_KEY = "image_scoring"
"""A sidecar's `Shard.image_scoring_digest`: the settings its metrics were scored with."""
Progress = Callable[[int, int], None]
"""Called with (images generated so far, images of the shard) after each image."""


def _atomic_write_text(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def _save_png(image: Image.Image, path: Path, info: dict[str, Any]) -> None:
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text(PNG_INFO_KEY, json.dumps(info))
    staging = path.with_name(path.name + ".tmp")
    image.save(staging, format="PNG", pnginfo=chunk)
    os.replace(staging, path)


def read_png(path: Path) -> tuple[Image.Image, dict[str, Any]]:
    """An image and what was recorded at its generation (seconds, denoiser steps, warm-up)."""
    with Image.open(path) as opened:
        opened.load()
        info = json.loads(opened.text[PNG_INFO_KEY])
        return opened.convert("RGB"), info


def shard_jobs(shard: Shard, combination: Combination) -> list[ImageJob]:
    """The shard's images of a combination, in generation and scoring order."""
    model = combination.model
    return [
        ImageJob(
            variant="",
            prompt_index=prompt.index,
            image_index=k,
            seed=image_seed(combination.seed, prompt.index, k),
            prompt=prompt.render(model.token, model.class_token),
            text_prompt=prompt.render("", model.class_token),
            negative_prompt=combination.negative_prompt or "",
            phrases=prompt.phrases,
        )
        for prompt in shard.prompts
        for k in range(shard.images_per_prompt)
    ]


class PerImageScorer:
    """The per-image metrics of one model's images in a shard (its prompts, its subject)."""

    def __init__(self, shard: Shard, jobs: list[ImageJob], class_token: str, device: torch.device):
        self.context = TrialContext(
            shard.eval,
            class_token=class_token,
            reference_files=shard.reference_files,
            jobs=jobs,
            variants=[""],
            device=device,
        )
        chosen = chosen_metrics(shard.per_image_metrics)
        self.context.load_encoders(set().union(*(m.needs(self.context) for m in chosen)))
        self.metrics = [metric(self.context) for metric in chosen]

    def __call__(self, images: list[Image.Image]) -> dict[str, list[Any]]:
        """Column → one value per image (each metric's, and the columns metrics add)."""
        generated = GeneratedImages(self.context, images)
        columns: dict[str, list[Any]] = {}
        for metric in self.metrics:
            values = metric.per_image(generated)
            if values is not None:
                columns[metric.name] = values.tolist()
            columns |= metric.record_columns(generated)
        return columns


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def step_noise_generator(seed: int, prompt_index: int, image_index: int) -> torch.Generator:
    """Where ancestral and DDPM steps draw their fresh noise for one image: its own stream
    (`step_noise_seed`), apart from the initial latents'."""
    return torch.Generator("cpu").manual_seed(step_noise_seed(seed, prompt_index, image_index))


def _generate(
    pipeline: Any, combination: Combination, job: ImageJob, resolution: int
) -> tuple[Image.Image, float, int, float]:
    """The image, the pipeline call's seconds, the denoising steps and the denoising loop's
    seconds: from the denoiser's first call to the end of the last step (no text encoding,
    no VAE decode)."""
    steps = 0
    loop_started: float | None = None
    loop_ended = 0.0
    cuda = pipeline.device.type == "cuda"

    def first_denoiser_call(module: Any, args: Any) -> None:
        nonlocal loop_started
        if loop_started is None:
            if cuda:
                torch.cuda.synchronize(pipeline.device)
            loop_started = time.perf_counter()

    def count_step(pipe: Any, step: int, timestep: Any, outputs: dict[str, Any]) -> dict:
        nonlocal steps, loop_ended
        steps += 1
        if cuda:
            torch.cuda.synchronize(pipeline.device)
        loop_ended = time.perf_counter()
        return outputs

    latents = initial_latents(
        pipeline,
        seed=combination.seed,
        prompt_index=job.prompt_index,
        image_index=job.image_index,
        resolution=resolution,
    )
    hook = pipeline.unet.register_forward_pre_hook(first_denoiser_call)  # every family has one
    started = time.perf_counter()
    try:
        result = pipeline(
            prompt=job.prompt,
            negative_prompt=combination.negative_prompt,
            latents=latents,
            generator=step_noise_generator(combination.seed, job.prompt_index, job.image_index),
            num_inference_steps=combination.num_inference_steps,
            guidance_scale=combination.guidance_scale,
            height=resolution,
            width=resolution,
            output_type="pil",
            callback_on_step_end=count_step,
        )
    finally:
        hook.remove()
    if cuda:
        torch.cuda.synchronize(pipeline.device)
    seconds = time.perf_counter() - started
    return result.images[0], seconds, steps, loop_ended - (loop_started or started)


def _scored(sidecar: Path, scoring: str) -> bool:
    """Whether the image has its sidecar, scored with these settings (`image_scoring`)."""
    if not sidecar.is_file():
        return False
    return json.loads(sidecar.read_text(encoding="utf-8")).get(SCORING_KEY) == scoring


def _combination_pending(shard: Shard, combination: Combination) -> tuple[list[int], list[int]]:
    """Indices (into the shard's jobs) of images not generated, and of those not scored with
    the shard's per-image scoring (other metrics or settings: scored again, not generated)."""
    images = combination_folder(shard.study_dir, combination.combination_id) / IMAGES_DIR
    keys, scoring = shard.image_keys, shard.image_scoring_digest
    missing = [i for i, key in enumerate(keys) if not (images / f"{key}.png").is_file()]
    unscored = [i for i, key in enumerate(keys) if not _scored(images / f"{key}.json", scoring)]
    return missing, unscored


def run_shard(shard: Shard, *, device: torch.device, progress: Progress | None = None) -> int:
    """Generate and score whatever of the shard is not on disk yet; returns images generated."""
    total = shard.total_images
    pending = {c.combination_id: _combination_pending(shard, c) for c in shard.combinations}
    done = total - sum(len(missing) for missing, _ in pending.values())
    if progress is not None:
        progress(done, total)
    generated = 0
    by_model: dict[str, list[Combination]] = {}
    for combination in shard.combinations:
        if pending[combination.combination_id][1]:
            by_model.setdefault(combination.model.identity, []).append(combination)
    log_path = shard.folder / GENERATION_LOG
    for combinations in by_model.values():
        model = combinations[0].model
        pipeline, model_config = None, None
        if any(pending[c.combination_id][0] for c in combinations):
            pipeline, model_config = load_pipeline(
                model, dtype=combinations[0].dtype, device=device
            )
        scorer = PerImageScorer(
            shard, shard_jobs(shard, combinations[0]), model.class_token, device
        )
        for combination in combinations:
            cid = combination.combination_id
            folder = combination_folder(shard.study_dir, cid)
            images_dir = folder / IMAGES_DIR
            images_dir.mkdir(parents=True, exist_ok=True)
            jobs, keys = shard_jobs(shard, combination), shard.image_keys
            missing, unscored = pending[cid]
            if missing:
                assert pipeline is not None and model_config is not None
                pipeline.scheduler = make_scheduler(combination.scheduler, model_config)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                for position, index in enumerate(missing):
                    job = jobs[index]
                    image, seconds, steps, denoise_seconds = _generate(
                        pipeline, combination, job, combination.resolution
                    )
                    key = keys[index]
                    info = {
                        "combination_id": cid,
                        "prompt_index": job.prompt_index,
                        "image_index": job.image_index,
                        "seconds": seconds,
                        "denoiser_steps": steps,
                        "denoise_seconds": denoise_seconds,
                        "warmup": position == 0,
                    }
                    _save_png(image, images_dir / f"{key}.png", info)
                    with open(log_path, "a", encoding="utf-8") as log:
                        log.write(f"{cid} {key}\n")
                    generated += 1
                    done += 1
                    if progress is not None:
                        progress(done, total)
                peak, source = _peak_memory_mb(device)
                (folder / TIMING_DIR).mkdir(exist_ok=True)
                _atomic_write_text(
                    folder / TIMING_DIR / f"shard_{shard.index:04d}.json",
                    json.dumps({"peak_memory_mb": peak, "memory_source": source}),
                )
            if unscored:
                _score(shard, combination, jobs, scorer, set(unscored))
        # One model's weights and encoders at a time: freed before the next model loads.
        del scorer, pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_done(shard)
    return generated


def write_done(shard: Shard) -> None:
    """The shard's `done.json`: done for its combinations, images and scoring as they are now
    (`Shard.done_record`, which the driver compares with the shard it resolves)."""
    record = {"images": shard.total_images, **shard.done_record()}
    _atomic_write_text(shard.folder / SHARD_DONE, json.dumps(record))


def _score(
    shard: Shard,
    combination: Combination,
    jobs: list[ImageJob],
    scorer: PerImageScorer,
    unscored: set[int],
) -> None:
    """Score every image of (shard, combination) in one pass; write the missing or stale
    sidecars."""
    images_dir = combination_folder(shard.study_dir, combination.combination_id) / IMAGES_DIR
    keys = shard.image_keys
    loaded = [read_png(images_dir / f"{key}.png") for key in keys]
    columns = scorer([image for image, _ in loaded])
    scoring = shard.image_scoring_digest
    for index in sorted(unscored):
        job, (_, info) = jobs[index], loaded[index]
        sidecar = {
            **info,
            "prompt": job.prompt,
            "negative_prompt": combination.negative_prompt,
            "seed": job.seed,
            "phrases": job.phrases,
            "metrics": {name: values[index] for name, values in columns.items()},
            SCORING_KEY: scoring,
        }
        _atomic_write_text(images_dir / f"{keys[index]}.json", json.dumps(sidecar))
