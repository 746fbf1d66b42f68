"""Image encoders for the metrics: a CLIP vision model (hub id or folder) or the offline `tiny`.

`tiny` is a random-init CLIP ViT at toy size (same architecture family), built once and saved with
`save_pretrained`, then loaded through exactly the same code as real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,  # the PIL backend: torchvision is not a dependency of dreamsweep
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from launch.cache import build_once
from launch.spec import TINY

TINY_ENCODER_NAME = "tiny-clip-vision-v1"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_clip_vision(directory: Path) -> None:
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=64,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=64,
            hidden_act="quick_gelu",
        )
    )
    model.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(directory)


class ImageEncoder:
    """Images → L2-normalised embeddings `[N, D]` (float32, on the CPU)."""

    def __init__(self, name: str, *, device: torch.device | str = "cpu") -> None:
        source = (
            str(build_once(TINY_ENCODER_NAME, build_tiny_clip_vision)) if name == TINY else name
        )
        self.source = source
        self.device = torch.device(device)
        self.model = CLIPVisionModelWithProjection.from_pretrained(source).to(self.device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(source)

    @torch.no_grad()
    def embed(self, images: list[Image.Image], *, batch_size: int = 32) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images=images[start : start + batch_size], return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.model.dtype)
            chunks.append(self.model(pixel_values=pixels).image_embeds.float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    def to(self, device: torch.device | str) -> ImageEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self
