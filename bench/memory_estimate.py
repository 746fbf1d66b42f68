"""Static training memory per method on Stable Diffusion 1.5, 2.1 and XL, from their
architectures.

Run: python bench/memory_estimate.py

The modules are built on the meta device from each model's published configs (no weights,
nothing downloaded), so the parameter counts are exact. Static memory = frozen weights + trained
weights (fp32) + their gradients (fp32) + AdamW's two moments (fp32, or 1 byte each with 8-bit
AdamW). Activations come on top (they depend on resolution, batch size and gradient
checkpointing) and are not counted here. Computed, not measured on a GPU: the README's memory
tables are this script's output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

GIB = 1024**3
VOCABULARY = 49408  # CLIP's BPE: every family's tokenizers


def _vae() -> AutoencoderKL:
    """The VAE every family shares (SDXL's has the same architecture)."""
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )


def _clip_text(hidden: int, layers: int, heads: int, **extra: object) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCABULARY,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        **extra,
    )


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
        text_encoder = CLIPTextModel(_clip_text(768, 12, 12))
        return {"unet": unet, "vae": _vae(), "text_encoder": text_encoder}


def sd21_modules() -> dict[str, torch.nn.Module]:
    """SD 2.1's UNet (linear projections) and OpenCLIP-H's text tower (23 layers: the
    penultimate of 24, as its config ships it)."""
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
        text_encoder = CLIPTextModel(_clip_text(1024, 23, 16, hidden_act="gelu"))
        return {"unet": unet, "vae": _vae(), "text_encoder": text_encoder}


def sdxl_modules() -> dict[str, torch.nn.Module]:
    """SDXL base 1.0's UNet, VAE, CLIP ViT-L and OpenCLIP-bigG (with projection) text towers."""
    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        text_encoder = CLIPTextModel(_clip_text(768, 12, 12))
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text(1280, 32, 20, hidden_act="gelu", projection_dim=1280)
        )
        return {
            "unet": unet,
            "vae": _vae(),
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
        }


FAMILIES: dict[str, Callable[[], dict[str, torch.nn.Module]]] = {
    "SD 1.5": sd15_modules,
    "SD 2.1": sd21_modules,
    "SDXL": sdxl_modules,
}


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


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def memory_rows(modules: dict[str, torch.nn.Module]) -> list[tuple[str, str, list[float]]]:
    """(method, trained parameters, static GiB: all fp32 + AdamW, low-precision frozen + AdamW,
    low-precision frozen + 8-bit AdamW) per method, as trainers/ holds the weights."""
    count = {name: _count(module) for name, module in modules.items()}
    encoders = [name for name in modules if name.startswith("text_encoder")]
    text = sum(count[name] for name in encoders)
    total = sum(count.values())
    unet = count["unet"]
    embeddings = sum(modules[n].get_input_embeddings().weight.numel() for n in encoders)
    rows = [modules[n].config.hidden_size for n in encoders]
    lora = lora_parameters(modules["unet"], 4)
    both = "both text encoders" if len(encoders) > 1 else "text encoder"
    token_rows = f"{sum(rows):,}" + (
        f" ({' + '.join(f'{r:,}' for r in rows)})" if len(rows) > 1 else ""
    )
    # method: (trained parameters shown, frozen, held in fp32, stepped by the optimizer).
    cases = {
        "dreambooth (UNet)": (f"{unet:,}", total - unet, unet, unet),
        f"dreambooth (UNet + {both})": (
            f"{unet + text:,}",
            total - unet - text,
            unet + text,
            unet + text,
        ),
        "lora rank 4 (UNet)": (f"{lora:,}", total, lora, lora),
        # TI keeps the text encoders in fp32 and AdamW steps each whole embedding matrix (every
        # row but the new token's is restored after each step).
        "textual_inversion": (token_rows, total - text, text, embeddings),
    }
    return [
        (
            method,
            trained,
            [
                static_gib(
                    frozen=frozen, fp32=fp32, stepped=stepped, frozen_bytes=fb, adam_bytes=ab
                )
                for fb, ab in ((4, 8), (2, 8), (2, 2))
            ],
        )
        for method, (trained, frozen, fp32, stepped) in cases.items()
    ]


def main() -> None:
    print(
        "| family | method | trained parameters | all fp32, AdamW | bf16/fp16 frozen, AdamW "
        "| bf16/fp16 frozen, 8-bit AdamW |"
    )
    print("|---|---|---:|---:|---:|---:|")
    counts = []
    for family, build in FAMILIES.items():
        modules = build()
        counts.append(
            f"{family}: " + ", ".join(f"{n} {_count(m) / 1e6:.1f} M" for n, m in modules.items())
        )
        for method, trained, sizes in memory_rows(modules):
            cells = " | ".join(f"{size:.1f} GiB" for size in sizes)
            print(f"| {family} | {method} | {trained} | {cells} |")
    print("\nparameters: " + "; ".join(counts))


if __name__ == "__main__":
    main()
