"""Class images for prior preservation: generated once by the base model, cached on disk.

The cache key is (base model, class prompt, resolution, count, seed, sampler settings), so every
trial and subject of the same class, in this sweep or a later one, shares one set. Image i is
drawn with seed `seed + i` (on a CPU generator), so the set does not depend on the batch size or
the device beyond float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from contract.cache import build_once, cache_key
from contract.spec import PriorPreservationSpec
from evaluation.sampling import make_sampler
from trainers.models import BaseModel, assemble_pipeline

CLASS_IMAGES_VERSION = "v2"
CLASS_SAMPLER = "dpm++"


def class_prompt(prior: PriorPreservationSpec, class_token: str) -> str:
    return prior.class_prompt.format(**{"class": class_token})


def class_images(
    model: BaseModel,
    prior: PriorPreservationSpec,
    *,
    class_token: str,
    resolution: int,
    device: torch.device,
) -> list[Path]:
    """The class images' files, generating them first if no trial has yet."""
    prompt = class_prompt(prior, class_token)
    # Everything the set depends on; written beside the images, and hashed into its key.
    settings = {
        "prompt": prompt,
        "num_class_images": prior.num_class_images,
        "seed": prior.seed,
        "num_inference_steps": prior.num_inference_steps,
        "guidance_scale": prior.guidance_scale,
        "resolution": resolution,
        "sampler": CLASS_SAMPLER,
    }
    key = cache_key(CLASS_IMAGES_VERSION, model.source, json.dumps(settings, sort_keys=True))

    def generate(folder: Path) -> None:
        pipeline = assemble_pipeline(
            model, make_sampler(CLASS_SAMPLER, model.noise_scheduler.config)
        )
        modules = list(model.modules.values())
        previous = [m.device for m in modules]
        pipeline.to(device)
        count = prior.num_class_images
        for start in range(0, count, prior.batch_size):
            seeds = range(prior.seed + start, prior.seed + min(start + prior.batch_size, count))
            with torch.no_grad():
                images = pipeline(
                    [prompt] * len(seeds),
                    height=resolution,
                    width=resolution,
                    num_inference_steps=prior.num_inference_steps,
                    guidance_scale=prior.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                ).images
            for offset, image in enumerate(images):
                image.save(folder / f"class_{start + offset:05d}.png")
        (folder / "settings.json").write_text(json.dumps(settings, sort_keys=True), "utf-8")
        for module, where in zip(modules, previous, strict=True):
            module.to(where)

    folder = build_once(f"class_images/{key}", generate)
    return sorted(folder.glob("class_*.png"))
