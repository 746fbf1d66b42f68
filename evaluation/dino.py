"""DINO ViT image embeddings, as DreamBench's DINO score: the class token of the last layer of
DINO ViT-S/16 (`facebook/dino-vits16`), from a hub id, a local folder, or the offline `tiny`.

DINO is trained to tell images apart, so unlike CLIP it separates two subjects of the same
class; DreamBench prefers it for subject fidelity for that reason.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

from contract.cache import build_once
from contract.spec import TINY

TINY_DINO_NAME = "tiny-dino-v1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_dino(directory: Path) -> None:
    """A random-init ViT with DINO ViT-S/16's layout at toy size: 64 px images, 48-d tokens."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        qkv_bias=True,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(directory)


class Dino:
    """Images → DINO class-token embeddings `[N, D]` (float32, on the CPU)."""

    def __init__(self, name: str, *, device: torch.device | str = "cpu") -> None:
        self.source = (
            str(build_once(TINY_DINO_NAME, build_tiny_dino, isolate=True)) if name == TINY else name
        )
        self.device = torch.device(device)
        # DINO checkpoints have no pooler: the class token is the embedding.
        self.model = ViTModel.from_pretrained(self.source, add_pooling_layer=False)
        self.model.to(self.device).eval()
        self.processor = ViTImageProcessorPil.from_pretrained(self.source)

    @torch.no_grad()
    def embed_images(
        self, images: list[Image.Image], *, normalize: bool = True, batch_size: int = 32
    ) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images=images[start : start + batch_size], return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.model.dtype)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            chunks.append(hidden[:, 0].float().cpu())
        features = torch.cat(chunks)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features
