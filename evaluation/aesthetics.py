"""The LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, into an
MLP head (768 → 1024 → 128 → 64 → 16 → 1) trained on SAC + LOGOS + AVA ratings (1–10).

The head's weights (`sac+logos+ava1-l14-linearMSE.pth`, from the
christophschuhmann/improved-aesthetic-predictor repository, the default `eval.aesthetics_head`
URL) come from a file or a URL in the spec (downloaded once, under a lock: see
`evaluation.downloads`); `tiny` builds a random-init head sized for the tiny CLIP, saved and
loaded the same way; `toy` is the head trained on the toy world's CLIP (committed). The file is
the predictor's `state_dict()`: exactly the keys of `HEAD_KEYS` (its Dropout layers hold none).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from contract.cache import build_once
from contract.spec import TINY
from contract.spec.evaluation import LAION_AESTHETIC_HEAD, is_url
from contract.toy_models import TOY, toy_model_path
from evaluation.downloads import cached_download

TINY_HEAD_NAME = "tiny-aesthetic-head-v1"
TINY_HEAD_FILE = "head.pth"
TINY_HEAD_DIM = 64  # the tiny CLIP's projection width
LINEAR_LAYERS = (0, 2, 4, 6, 7)
"""Indices of the Linear layers in the predictor's `nn.Sequential` (1, 3, 5 are Dropout)."""
HEAD_KEYS = frozenset(f"layers.{i}.{p}" for i in LINEAR_LAYERS for p in ("weight", "bias"))


class AestheticHead(nn.Module):
    """The predictor's MLP, with its state-dict layout (`layers.0.weight`, …, `layers.7.bias`)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (about 1–10) of L2-normalised image embeddings `[N, input_size]` → `[N]`."""
        return self.layers(embeddings).squeeze(-1)


def _build_tiny_head(directory: Path) -> None:
    torch.manual_seed(0)
    torch.save(AestheticHead(TINY_HEAD_DIM).state_dict(), directory / TINY_HEAD_FILE)


def head_file(source: str) -> Path:
    """The weights file: `tiny` (built), `toy` (committed), a local path, or a URL (downloaded
    once to the cache)."""
    if source == TOY:
        return toy_model_path("aesthetics_head")
    if source == TINY:
        return build_once(TINY_HEAD_NAME, _build_tiny_head) / TINY_HEAD_FILE
    if is_url(source):
        return cached_download(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.aesthetics_head: no file at {str(path)!r}; the released head is "
            f"{LAION_AESTHETIC_HEAD}"
        )
    return path


def load_aesthetic_head(source: str, *, device: torch.device | str = "cpu") -> AestheticHead:
    """The head of `eval.aesthetics_head` in eval mode; a file of another layout is refused."""
    path = head_file(source)
    # map_location: a head saved on a GPU holds CUDA tensors.
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(state) if isinstance(state, dict) else set()
    if keys != HEAD_KEYS:
        raise ValueError(
            f"eval.aesthetics_head: {str(path)!r} is not the LAION aesthetic predictor's state "
            f"dict: it lacks {sorted(HEAD_KEYS - keys)} and has unknown keys "
            f"{sorted(keys - HEAD_KEYS)[:5]}; expected the layout of {LAION_AESTHETIC_HEAD}"
        )
    head = AestheticHead(state["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as err:  # a layer of another width
        raise ValueError(
            f"eval.aesthetics_head: {str(path)!r} has the predictor's keys but not its layer "
            f"sizes (768 or any input → 1024 → 128 → 64 → 16 → 1): {str(err).splitlines()[-1]}"
        ) from None
    return head.to(device).eval()
