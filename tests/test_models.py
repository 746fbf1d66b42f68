"""The offline tiny model: SD's architecture at toy size, the real CLIP tokenizer, real loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from evaluation.tokenizer import write_clip_tokenizer
from trainers.models import load_base_model, resolve_model_source


def test_clip_tokenizer_matches_stable_diffusion_1_5(tmp_path: Path) -> None:
    tokenizer = write_clip_tokenizer(tmp_path)
    assert tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tokenizer) == 49408
    padded = tokenizer("a photo", padding="max_length", max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == 77 and padded.input_ids[-1] == 49407


def test_tiny_model_has_stable_diffusion_architecture() -> None:
    model = load_base_model("tiny")
    unet = model.unet.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet.in_channels == 4 and unet.cross_attention_dim == 64
    assert model.text_encoder.config.hidden_size == unet.cross_attention_dim
    assert model.vae.config.latent_channels == 4 and model.vae.config.scaling_factor == 0.18215
    assert model.noise_scheduler.config.prediction_type == "epsilon"


def test_local_folder_loads_through_the_same_code(tmp_path: Path) -> None:
    """A diffusers folder elsewhere on disk (as real weights would be) loads unchanged."""
    folder = tmp_path / "my-model"
    shutil.copytree(resolve_model_source("tiny"), folder)
    tiny, copy = load_base_model("tiny"), load_base_model(str(folder))
    assert copy.source == str(folder)
    for a, b in zip(tiny.unet.parameters(), copy.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
