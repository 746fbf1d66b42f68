"""Loading the base model's components: a hub id, a local diffusers folder, or the offline `tiny`.

All three go through the same `from_pretrained` calls; `tiny` is first built (once, cached) as a
random-init pipeline with Stable Diffusion 1.x's architecture at toy size and the real CLIP
tokenizer, and saved as an ordinary diffusers folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from contract.cache import build_once
from contract.spec import TINY
from evaluation.tokenizer import write_clip_tokenizer

# Bump when the tiny architecture changes, so stale caches are not reused.
TINY_MODEL_NAME = "tiny-sd-v1"


@dataclass
class BaseModel:
    """The pipeline parts a trial trains against."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    """Where the weights came from (hub id or folder)."""


def build_tiny_pipeline(directory: Path) -> None:
    """Save a random-init SD-architecture pipeline (toy widths, 64 px) to `directory`."""
    torch.manual_seed(0)
    # SD 1.x: 3 cross-attention down blocks + 1 plain; 8 heads; text width = cross-attn width.
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=64,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tokenizer = write_clip_tokenizer(directory / "tokenizer")
    # SD 1.5's noise schedule, as its scheduler_config.json has it.
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)


def resolve_model_source(base_model: str) -> str:
    """`tiny` → its cached folder (built on first use); anything else is passed through."""
    if base_model == TINY:
        return str(build_once(TINY_MODEL_NAME, build_tiny_pipeline, isolate=True))
    return base_model


def load_base_model(base_model: str, *, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load UNet, VAE, text encoder, tokenizer and noise scheduler from a hub id or folder.

    Hub credentials, when needed, come from the environment (`HF_TOKEN`), never from the spec.
    """
    source = resolve_model_source(base_model)
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", torch_dtype=dtype
        ),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        source=source,
    )


def assemble_pipeline(model: BaseModel, sampler: object) -> StableDiffusionPipeline:
    """A pipeline over the model's own modules (shared, not copied), no safety checker."""
    pipeline = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
