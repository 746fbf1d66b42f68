"""CLIP for the metrics: image embeddings (similarity, diversity, aesthetics, in-domain) and text
embeddings (CLIP-T, zero-shot in-domain), from a hub id, a local folder, or the offline `tiny`.

`tiny` is a random-init CLIP (vision and text towers at toy size, the real CLIP BPE tokenizer),
built once and saved with `save_pretrained`, then loaded through exactly the same code as real
weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,  # the PIL backend: torchvision is not a dependency of dreamsweep
    CLIPModel,
    CLIPTokenizer,
)

from contract.cache import build_once
from contract.spec import TINY
from contract.toy_models import TOY, toy_model_path
from evaluation.tokenizer import write_clip_tokenizer

TINY_CLIP_NAME = "tiny-clip-v1"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tiny_clip(directory: Path) -> None:
    """A random-init CLIP with ViT-L/14's layout at toy size: 64 px images, 64-d embeddings."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "hidden_act": "quick_gelu",
        },
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(directory)
    write_clip_tokenizer(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(directory)


def resolve_clip_source(name: str) -> str:
    """`tiny` → its cached folder (built on first use), `toy` → the toy world's committed CLIP;
    a hub id or folder is passed through."""
    if name == TOY:
        return str(toy_model_path("clip_model"))
    return str(build_once(TINY_CLIP_NAME, build_tiny_clip, isolate=True)) if name == TINY else name


class Clip:
    """A CLIP model: images and texts → L2-normalised projected embeddings `[N, D]` (float32,
    on the CPU)."""

    def __init__(self, name: str, *, device: torch.device | str = "cpu") -> None:
        self.source = resolve_clip_source(name)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.source).to(self.device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(self.source)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.source)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def embed_images(
        self, images: list[Image.Image], *, normalize: bool = True, batch_size: int = 32
    ) -> torch.Tensor:
        """Projected image embeddings (CLIP-I); `normalize=False` keeps their length (FID)."""
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images=images[start : start + batch_size], return_tensors="pt")
            pixels = batch["pixel_values"].to(self.device, self.model.dtype)
            chunks.append(self._features(self.model.get_image_features(pixel_values=pixels)))
        features = torch.cat(chunks)
        return torch.nn.functional.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def embed_texts(self, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(self._features(self.model.get_text_features(**tokens)))
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @staticmethod
    def _features(output: torch.Tensor | object) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected feature.
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        return features.float().cpu()

    def to(self, device: torch.device | str) -> Clip:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self
