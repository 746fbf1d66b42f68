"""The `toy` models' architectures: Stable Diffusion 1.x's and CLIP's, at toy size.

- VAE: `AutoencoderKL`, factor 8 (64 px → 8×8×4 latents), as SD's.
- CLIP: `transformers.CLIPModel`, ViT (patch 8, 64 px) and text tower of width 96, the real
  CLIP BPE tokenizer; the text tower is also the UNet's (frozen) text encoder, as in SD.
- UNet: `UNet2DConditionModel` with cross-attention on the text tower's hidden states.
- Aesthetic head: the LAION predictor's MLP on the toy CLIP's projection width.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

CLIP_WIDTH = 96  # with the 49408-token embedding twice (CLIP, text encoder): the 40 MB budget
PROJECTION_DIM = 96
LATENT_CHANNELS = 4


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=64,
        # 4 levels: 3 downsamplings, factor 8. Narrow at full resolution, where a CPU step
        # spends most of its time (32 channels there cost 3.4× the step time of 16).
        block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=16,
        scaling_factor=1.0,  # set from the trained latents' spread, as SD's 0.18215 was
    )


def make_clip() -> CLIPModel:
    text = {
        "vocab_size": 49408,
        "hidden_size": CLIP_WIDTH,
        "intermediate_size": 4 * CLIP_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "image_size": 64,
        "patch_size": 8,
        "hidden_size": CLIP_WIDTH,
        "intermediate_size": 4 * CLIP_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
    }
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)
    )


def text_encoder_of(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP model's text tower as the `CLIPTextModel` a diffusers pipeline holds."""
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 96, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CLIP_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_noise_scheduler() -> DDPMScheduler:
    """SD 1.5's noise schedule, as its scheduler_config.json has it."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )


def parameter_count(module: object) -> int:
    return sum(p.numel() for p in module.parameters())  # type: ignore[attr-defined]
