"""The LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, into an
MLP head (768 → 1024 → 128 → 64 → 16 → 1) trained on SAC + LOGOS + AVA ratings (1–10).

The head's weights (`sac+logos+ava1-l14-linearMSE.pth`, from the
christophschuhmann/improved-aesthetic-predictor repository, the default `eval.aesthetics_head`
URL) come from a path or URL in the spec;
`tiny` builds a random-init head sized for the tiny CLIP, saved and loaded the same way.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import torch
from torch import nn

from contract.cache import build_once, cache_key, cache_root
from contract.spec import TINY

TINY_HEAD_NAME = "tiny-aesthetic-head-v1"
TINY_HEAD_FILE = "head.pth"
TINY_HEAD_DIM = 64  # the tiny CLIP's projection width


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
    """The weights file: `tiny` (built), a local path, or a URL (downloaded once to the cache)."""
    if source == TINY:
        return build_once(TINY_HEAD_NAME, _build_tiny_head) / TINY_HEAD_FILE
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        target = cache_root() / "aesthetic_heads" / cache_key(source) / Path(source).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.with_suffix(".part")
            torch.hub.download_url_to_file(source, str(staging), progress=False)
            staging.replace(target)
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.aesthetics_head: no file at {str(path)!r}")
    return path


def load_aesthetic_head(source: str, *, device: torch.device | str = "cpu") -> AestheticHead:
    state = torch.load(head_file(source), map_location="cpu", weights_only=True)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.to(device).eval()
