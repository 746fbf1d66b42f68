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
