"""The offline toy models, one per family: random-init pipelines with each family's architecture
at toy size (64 px) and the real CLIP tokenizer, saved as ordinary diffusers folders and built
once into the cache (`contract.cache.build_once`). They load through the same `from_pretrained`
calls as real weights, so every code path a real model takes runs offline in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from evaluation.tokenizer import write_clip_tokenizer

# Cache names: bump one when its architecture changes, so a stale cache is not reused. `tiny`'s
# name and weights are pinned: the tiny quickstart's trial ids and the reference tests depend
# on them.
TINY_MODEL_NAME = "tiny-sd-v1"
TINY_SD2_MODEL_NAME = "tiny-sd2-v1"
TINY_SDXL_MODEL_NAME = "tiny-sdxl-v1"

# Stable Diffusion's noise schedule, as its scheduler_config.json has it (1.x, 2.x and XL).
_SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
}


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # 4 blocks: the 8× downsampling of every Stable Diffusion VAE.
    return AutoencoderKL(
        sample_size=64,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
    )


def _text_config(hidden_size: int, hidden_act: str, **extra: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def _tokenizer_padding_with_exclamation(directory: Path) -> CLIPTokenizer:
    """The CLIP BPE tokenizer padding with "!" (id 0), as SD 2.x's and SDXL's second one do."""
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory, pad_token="!")
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_tiny_pipeline(directory: Path) -> None:
    """Save a random-init SD 1.x-architecture pipeline (toy widths, 64 px) to `directory`."""
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
    vae = _tiny_vae(0.18215)
    text_encoder = CLIPTextModel(_text_config(64, "quick_gelu"))
    tokenizer = write_clip_tokenizer(directory / "tokenizer")
    scheduler = DDPMScheduler(**_SD_SCHEDULE)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)


def build_tiny_sd2_pipeline(directory: Path) -> None:
    """SD 2.x (768-v) at toy size: linear projections in the transformers, heads per block as
    SD 2's `attention_head_dim` list, an OpenCLIP-style (gelu) text encoder whose saved config
    stops one layer short of the trained tower (SD 2 saves 23 of OpenCLIP-H's 24 layers, so
    `last_hidden_state` is the penultimate layer), "!" padding, v-prediction."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=(2, 2, 4, 4),  # SD 2: (5, 10, 20, 20), 64-wide heads
        use_linear_projection=True,
        norm_num_groups=8,
    )
    StableDiffusionPipeline(
        vae=_tiny_vae(0.18215),
        text_encoder=CLIPTextModel(_text_config(64, "gelu")),
        tokenizer=_tokenizer_padding_with_exclamation(directory / "tokenizer"),
        unet=unet,
        scheduler=DDPMScheduler(**_SD_SCHEDULE, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(directory)


def build_tiny_sdxl_pipeline(directory: Path) -> None:
    """SDXL at toy size: a plain down block then cross-attention ones with more transformer
    layers deeper down, linear projections, two text encoders (CLIP-L-style, then a projected
    OpenCLIP-bigG-style one; their penultimate layers concatenated are the cross-attention
    input, the second's pooled projection joins the size/crop embedding: `text_time`), the
    second tokenizer padding with "!", SDXL's VAE scaling and Euler scheduler config."""
    torch.manual_seed(0)
    text_width = 32
    time_embed_dim = 8  # SDXL: 256 per size/crop number, 6 numbers
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
        attention_head_dim=(2, 2, 4),  # SDXL: (5, 10, 20)
        use_linear_projection=True,
        cross_attention_dim=2 * text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_width,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_text_config(text_width, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(text_width, "gelu", projection_dim=text_width)
    )
    StableDiffusionXLPipeline(
        vae=_tiny_vae(0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=write_clip_tokenizer(directory / "tokenizer"),
        tokenizer_2=_tokenizer_padding_with_exclamation(directory / "tokenizer_2"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            **{k: v for k, v in _SD_SCHEDULE.items() if k != "clip_sample"},
            timestep_spacing="leading",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    ).save_pretrained(directory)


BUILDERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "tiny": (TINY_MODEL_NAME, build_tiny_pipeline),
    "tiny-sd2": (TINY_SD2_MODEL_NAME, build_tiny_sd2_pipeline),
    "tiny-sdxl": (TINY_SDXL_MODEL_NAME, build_tiny_sdxl_pipeline),
}
"""Built-in model name → (cache name, builder); the names are `contract.families.BUILTIN_MODELS`."""
