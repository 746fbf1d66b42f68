"""Static training memory per method on Stable Diffusion 1.5, from its architecture.

Run: python bench/memory_estimate.py

The modules are built on the meta device from SD 1.5's published configs (no weights, nothing
downloaded), so the parameter counts are exact. Static memory = frozen weights + trained weights
(fp32) + their gradients (fp32) + AdamW's two moments (fp32, or 1 byte each with 8-bit AdamW).
Activations come on top (they depend on resolution, batch size and gradient checkpointing) and
are not counted here.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

GIB = 1024**3


def sd15_modules() -> dict[str, torch.nn.Module]:
    """SD 1.5's UNet, VAE and text encoder (CLIP ViT-L/14's text tower), as its configs say."""
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
            )
        )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def lora_parameters(unet: torch.nn.Module, rank: int) -> int:
    """Adapter parameters on to_q, to_k, to_v, to_out.0: rank × (in + out) per projection."""
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(
            ("to_q", "to_k", "to_v", "to_out.0")
        ):
            total += rank * (module.in_features + module.out_features)
    return total


def static_gib(
    *, frozen: int, fp32: int, stepped: int, frozen_bytes: int, adam_bytes: int
) -> float:
    """frozen weights + weights held in fp32 + gradients (fp32) and AdamW moments of the stepped
    ones."""
    return (frozen * frozen_bytes + fp32 * 4 + stepped * (4 + adam_bytes)) / GIB


def main() -> None:
    modules = sd15_modules()
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    total = sum(count.values())
    embedding = modules["text_encoder"].get_input_embeddings().weight.numel()
    lora = lora_parameters(modules["unet"], 4)
    # method: (frozen, held in fp32, stepped by the optimizer), as trainers/ holds them.
    cases = {
        "dreambooth (UNet)": (total - count["unet"], count["unet"], count["unet"]),
        "dreambooth (UNet + text encoder)": (
            count["vae"],
            count["unet"] + count["text_encoder"],
            count["unet"] + count["text_encoder"],
        ),
        "lora rank 4 (UNet)": (total, lora, lora),
        # TI keeps the text encoder in fp32 and AdamW steps the whole embedding matrix (every
        # row but the new token's is restored after each step).
        "textual_inversion": (total - count["text_encoder"], count["text_encoder"], embedding),
    }
    print(f"parameters: {count} (total {total:,})")
    print(
        "| method | trained parameters | fp32, AdamW | fp16 frozen, AdamW "
        "| fp16 frozen, 8-bit AdamW |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, (frozen, fp32, stepped) in cases.items():
        sizes = [
            static_gib(frozen=frozen, fp32=fp32, stepped=stepped, frozen_bytes=fb, adam_bytes=ab)
            for fb, ab in ((4, 8), (2, 8), (2, 2))
        ]
        cells = [f"{size:.1f} GiB" for size in sizes]
        trained = lora if "lora" in name else (embedding // 49408 if "textual" in name else stepped)
        print(f"| {name} | {trained:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
