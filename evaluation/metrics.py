"""The curves, each a function from embeddings (or scores) to numbers.

Per-image values are returned where a metric has one, so the per-image records can carry them;
the curve is their mean. Embeddings are L2-normalised here; callers may pass any length.
"""

from __future__ import annotations

import torch


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.double(), dim=-1)


def similarity_per_image(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each generated image's mean cosine similarity to the subject's reference images."""
    return (_unit(generated) @ _unit(reference).T).mean(dim=1)


def similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated image, subject reference image) pair."""
    return similarity_per_image(generated, reference).mean().item()


def diversity_per_image(embeddings: torch.Tensor) -> torch.Tensor:
    """Each embedding's mean cosine distance to all the others."""
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"diversity needs at least 2 embeddings, got {count}")
    unit = _unit(embeddings)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(0.0)  # an image's distance to itself is not counted
    return distance.sum(dim=1) / (count - 1)


def diversity(embeddings: torch.Tensor) -> float:
    """The study's diversity: each embedding's mean cosine distance to the others, averaged."""
    return diversity_per_image(embeddings).mean().item()


def clip_t_per_image(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine between each image and its own prompt (row i with row i), unclamped.

    torchmetrics' CLIPScore is `100 × max(this, 0)`.
    """
    return (_unit(image_embeddings) * _unit(text_embeddings)).sum(dim=1)


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[N, D]`, `[M, D]`:
    ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), with unbiased covariances, in float64."""
    for name, rows in (("features", features), ("reference", reference)):
        if rows.shape[0] < 2:
            raise ValueError(f"FID needs at least 2 {name} rows, got {rows.shape[0]}")
    a, b = features.double(), reference.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    # atleast_2d: torch.cov of one feature is a scalar.
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    # Tr((Σ₁Σ₂)^½) is the sum of the square roots of Σ₁Σ₂'s eigenvalues (real and ≥ 0 in exact
    # arithmetic; rounding can make them slightly complex, whose real part is kept).
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    value = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace
    return value.item()
