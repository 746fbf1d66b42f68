"""The curves, each a function from embeddings to a number, as the portrait study defines them."""

from __future__ import annotations

import torch


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.double(), dim=-1)


def similarity(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated image, subject reference image) pair."""
    return (_unit(generated) @ _unit(reference).T).mean().item()


def diversity(embeddings: torch.Tensor) -> float:
    """Each embedding's mean cosine distance to all the others, then the mean over the set."""
    count = embeddings.shape[0]
    if count < 2:
        raise ValueError(f"diversity needs at least 2 embeddings, got {count}")
    unit = _unit(embeddings)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(0.0)  # an image's distance to itself is not counted
    per_image = distance.sum(dim=1) / (count - 1)
    return per_image.mean().item()
