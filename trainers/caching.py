"""Training inputs computed once: VAE posteriors of the images and embeddings of the prompts.

Both are cached on disk (`contract.cache`), one file per image or prompt, so every trial of a
subject (any num_images, learning rate, seed or method) and every trial that uses the same class
images reads them instead of running the VAE or the text encoder again. A cache entry is named by
the base model's id or folder, the resolution and the dtype, and the image's bytes or the
prompt's text; after changing the weights behind a model folder, delete the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from contract.cache import cache_key, cache_root
from trainers.conditioning import PromptEmbeddings, encode_prompts, tokenize
from trainers.data import load_subject_pixels
from trainers.models import BaseModel

CACHE_VERSION = "v2"  # bump when what is cached changes meaning


def _cached(kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict:
    """Load `cache_root()/kind/key.safetensors`, computing and writing it (atomically) if absent."""
    path = cache_root() / kind / f"{key}.safetensors"
    if path.is_file():
        return load_file(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, staging)
    os.replace(staging, path)  # concurrent writers write the same values; the last one wins
    return tensors


@dataclass
class ImageSet:
    """Training images, either as cached VAE posteriors or as pixels encoded at every step."""

    vae_scaling: float
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    pixels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.mean if self.mean is not None else self.pixels)

    def latents(
        self,
        model: BaseModel,
        index: torch.Tensor,
        sample_noise: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """Scaled latents of images `index`: posterior mean + std × `sample_noise`."""
        if self.mean is not None:
            mean, std = self.mean[index], self.std[index]
        else:
            with torch.no_grad():
                posterior = model.vae.encode(
                    self.pixels[index].to(device, model.vae.dtype)
                ).latent_dist
            mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        return ((mean + std * sample_noise) * self.vae_scaling).to(device)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_images(
    model: BaseModel,
    files: list[Path],
    *,
    resolution: int,
    cache: bool,
    device: torch.device,
) -> ImageSet:
    """The images as posteriors from the disk cache (`cache`), or as pixels to encode later."""
    scaling = model.vae.config.scaling_factor
    if not cache:
        return ImageSet(scaling, pixels=load_subject_pixels(files, resolution))
    means, stds = [], []
    for path in files:

        def encode(path: Path = path) -> dict[str, torch.Tensor]:
            pixels = load_subject_pixels([path], resolution).to(device, model.vae.dtype)
            with torch.no_grad():
                posterior = model.vae.encode(pixels).latent_dist
            return {"mean": posterior.mean[0].float(), "std": posterior.std[0].float()}

        key = cache_key(
            CACHE_VERSION, model.source, resolution, model.vae.dtype, _file_digest(path)
        )
        entry = _cached("latents", key, encode)
        means.append(entry["mean"])
        stds.append(entry["std"])
    return ImageSet(scaling, mean=torch.stack(means), std=torch.stack(stds))


def latent_shape(model: BaseModel, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of a latent at `resolution`."""
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    return (model.vae.config.latent_channels, resolution // factor, resolution // factor)


def cached_prompt_embeddings(
    model: BaseModel, prompts: list[str], device: torch.device
) -> PromptEmbeddings:
    """The frozen text encoders' embeddings of `prompts` (`trainers.conditioning`)."""
    hidden, pooled = [], []
    encoders = list(model.text_encoders.values())
    for prompt in prompts:

        def encode(prompt: str = prompt) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                ids = [tokens.to(device) for tokens in tokenize(model, [prompt])]
                embeddings = encode_prompts(model.family, encoders, ids)
            entry = {"embedding": embeddings.hidden[0]}
            if embeddings.pooled is not None:
                entry["pooled"] = embeddings.pooled[0]
            return entry

        # SD 1.x/2.x keys as before the families (their caches stay valid); SDXL's name both.
        dtypes = [encoder.dtype for encoder in encoders]
        key = cache_key(CACHE_VERSION, model.source, *dtypes, prompt)
        entry = _cached("prompt_embeddings", key, encode)
        hidden.append(entry["embedding"])
        if "pooled" in entry:
            pooled.append(entry["pooled"])
    return PromptEmbeddings(
        torch.stack(hidden).to(device), torch.stack(pooled).to(device) if pooled else None
    )
