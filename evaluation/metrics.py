"""The curves, each a function from embeddings (or scores) to numbers.

Per-image values are returned where a metric has one, so the per-image records can carry them;
the curve is their mean. Embeddings are L2-normalised here; callers may pass any length.
"""

from __future__ import annotations

import math

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


def _at_least_two_rows(metric: str, **sets: torch.Tensor) -> None:
    for name, rows in sets.items():
        if rows.shape[0] < 2:
            raise ValueError(f"{metric} needs at least 2 {name} rows, got {rows.shape[0]}")


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets `[N, D]`, `[M, D]`:
    ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), with unbiased covariances, in float64.

    Tr((Σ₁Σ₂)^½) is the sum of the square roots of Σ₁Σ₂'s eigenvalues, found without the
    general (non-symmetric) eigensolver, which takes about 40 s on 2048-d features on a CPU:
    with fewer rows than dimensions, as the singular values of the small `[N, M]` product of the
    centred sets; otherwise as the eigenvalues of the symmetric Σ₁^½ Σ₂ Σ₁^½ (the same ones).
    """
    _at_least_two_rows("FID", features=features, reference=reference)
    a, b = features.double(), reference.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    centred_a, centred_b = a - mean_a, b - mean_b
    rows_a, rows_b, dim = a.shape[0], b.shape[0], a.shape[1]
    # Σ₁ = AᵀA/(N−1) and Σ₂ = BᵀB/(M−1), so the nonzero eigenvalues of Σ₁Σ₂ are the squared
    # singular values of A Bᵀ over (N−1)(M−1).
    if min(rows_a, rows_b) < dim:
        singular = torch.linalg.svdvals(centred_a @ centred_b.T)
        root_trace = singular.sum() / math.sqrt((rows_a - 1) * (rows_b - 1))
    else:
        cov_a = centred_a.T @ centred_a / (rows_a - 1)
        cov_b = centred_b.T @ centred_b / (rows_b - 1)
        values, vectors = torch.linalg.eigh(cov_a)
        root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        inner = torch.linalg.eigvalsh(root_a @ cov_b @ root_a)
        root_trace = inner.clamp(min=0).sqrt().sum()
    trace_a = centred_a.square().sum() / (rows_a - 1)
    trace_b = centred_b.square().sum() / (rows_b - 1)
    value = (mean_a - mean_b).square().sum() + trace_a + trace_b - 2 * root_trace
    return value.item()


def kernel_inception_distance(
    features: torch.Tensor, reference: torch.Tensor, *, subsets: int, subset_size: int, seed: int
) -> float:
    """KID (Bińkowski et al. 2018): the unbiased MMD² between two feature sets under the
    polynomial kernel k(x, y) = (x·y / D + 1)³, averaged over `subsets` random subsets of
    `subset_size` rows of each set (fewer if a set is smaller), as torchmetrics'
    `KernelInceptionDistance`: each subset draws the reference rows, then the generated rows,
    with `torch.randperm` from a generator seeded with `seed`.

    The kernels are computed once over the whole sets and indexed per subset.
    """
    _at_least_two_rows("KID", features=features, reference=reference)
    generated, real = features.double(), reference.double()
    size = min(subset_size, generated.shape[0], real.shape[0])
    dim = real.shape[1]

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / dim + 1) ** 3

    k_real, k_generated, k_cross = (
        kernel(real, real),
        kernel(generated, generated),
        kernel(real, generated),
    )
    random = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        r = torch.randperm(real.shape[0], generator=random)[:size]
        g = torch.randperm(generated.shape[0], generator=random)[:size]
        within_real = k_real[r][:, r]
        within_generated = k_generated[g][:, g]
        # Unbiased: an image's kernel with itself (the diagonal) is left out of within-set means.
        within = (
            within_real.sum()
            - within_real.diagonal().sum()
            + within_generated.sum()
            - within_generated.diagonal().sum()
        ) / (size * (size - 1))
        values.append(within - 2 * k_cross[r][:, g].sum() / size**2)
    return torch.stack(values).mean().item()
