"""Similarity and diversity against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.metrics import diversity, similarity

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
E3 = torch.tensor([1.0, 1.0])  # 45° from both: cosine 1/√2


def test_diversity_is_the_mean_of_each_images_mean_cosine_distance() -> None:
    # Distances: d(1,2) = 1, d(1,3) = d(2,3) = 1 - 1/√2 =: a.
    # Per image: (1 + a)/2, (1 + a)/2, (a + a)/2  →  mean = (1 + 2a)/3 = (3 - √2)/3.
    embeddings = torch.stack([E1, 5 * E2, E3])  # scale must not matter: cosine
    assert diversity(embeddings) == pytest.approx((3 - math.sqrt(2)) / 3, abs=1e-12)


def test_diversity_extremes() -> None:
    assert diversity(torch.stack([E1, E1, 2 * E1])) == pytest.approx(0.0, abs=1e-12)
    assert diversity(torch.stack([E1, -E1])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        diversity(E1[None])


def test_similarity_is_the_mean_cosine_over_generated_reference_pairs() -> None:
    generated = torch.stack([E1, E2, E3])
    reference = torch.stack([E1, 3 * E3])
    # cos(E1,E1)=1, cos(E1,E3)=c, cos(E2,E1)=0, cos(E2,E3)=c, cos(E3,E1)=c, cos(E3,E3)=1
    c = 1 / math.sqrt(2)
    assert similarity(generated, reference) == pytest.approx((2 + 3 * c) / 6, abs=1e-12)


# --- cross-checks against reference implementations ------------------------------------------

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from evaluation.clip import Clip, resolve_clip_source  # noqa: E402
from evaluation.dino import Dino  # noqa: E402
from evaluation.metrics import clip_t_per_image, frechet_distance  # noqa: E402


def random_images(count: int, seed: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def as_uint8_tensors(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])


class TransformersFiveClip(torch.nn.Module):
    """torchmetrics 1.9 expects `get_*_features` to return tensors; transformers 5 returns an
    output whose `pooler_output` is that tensor. Nothing else changes."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_t_equals_torchmetrics_clip_score_on_the_same_weights() -> None:
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = resolve_clip_source("tiny")  # a CLIP saved with save_pretrained, loaded offline
    images = random_images(4, seed=0)
    texts = ["a photo of a dog", "a red cube on a table", "a cat in the snow", "a toy robot"]

    ours = clip_t_per_image(Clip(folder).embed_images(images), Clip(folder).embed_texts(texts))

    model = TransformersFiveClip(CLIPModel.from_pretrained(folder).eval())
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(folder),
        tokenizer=CLIPTokenizer.from_pretrained(folder),
    )
    with torch.no_grad():
        reference, count = _clip_score_update(as_uint8_tensors(images), texts, model, processor)
    assert count == 4
    torch.testing.assert_close(ours, reference.double() / 100, atol=1e-5, rtol=1e-5)

    metric = CLIPScore(model_name_or_path=lambda: (model, processor))
    metric.update(as_uint8_tensors(images), texts)
    clamped = max(ours.mean().item(), 0.0)  # CLIPScore clamps the mean at 0
    assert metric.compute().item() / 100 == pytest.approx(clamped, abs=1e-5)


class EncoderFeatures(torch.nn.Module):
    """Our encoder as a torchmetrics feature extractor: uint8 `[N, 3, H, W]` → features."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pil = [Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images]
        return self.encoder.embed_images(pil, normalize=False)


@pytest.mark.parametrize("encoder", ["dino", "clip"])
def test_fid_equals_torchmetrics_given_the_same_feature_extractor(encoder: str) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    model = Dino("tiny") if encoder == "dino" else Clip("tiny")
    generated, reference = random_images(24, seed=1), random_images(30, seed=2, size=80)
    ours = frechet_distance(
        model.embed_images(generated, normalize=False),
        model.embed_images(reference, normalize=False),
    )
    fid = FrechetInceptionDistance(feature=EncoderFeatures(model), input_img_size=(3, 64, 64))
    fid.update(as_uint8_tensors(reference), real=True)
    fid.update(as_uint8_tensors(generated), real=False)
    assert ours == pytest.approx(fid.compute().item(), rel=1e-3)
    assert ours > 0


def test_frechet_distance_of_one_dimensional_gaussians_by_hand() -> None:
    # 1-D: (μ₁ − μ₂)² + σ₁² + σ₂² − 2σ₁σ₂ = (μ₁ − μ₂)² + (σ₁ − σ₂)².
    a = torch.tensor([[0.0], [2.0]])  # μ = 1, unbiased σ² = 2
    b = torch.tensor([[3.0], [5.0], [7.0]])  # μ = 5, σ² = 4
    expected = (1 - 5) ** 2 + (math.sqrt(2) - 2) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, b) == pytest.approx(0.0, abs=1e-9)
