"""`aesthetics`: the LAION aesthetic head's rating of each image's CLIP embedding, on 0–1."""

from __future__ import annotations

import torch

from evaluation.aesthetics import load_aesthetic_head
from evaluation.context import GeneratedImages, TrialContext
from evaluation.metric import EvalMetric

AESTHETIC_SCALE = 10.0
"""The LAION predictor rates 1–10; dividing by 10 gives the study's 0–1 scale (0.3–0.7)."""


class Aesthetics(EvalMetric):
    name = "aesthetics"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return {"clip"}

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        spec, clip = trial.spec, trial.clip
        self.head = load_aesthetic_head(spec.aesthetics_head, device=trial.device)
        width = self.head.layers[0].in_features
        if width != clip.dim:
            raise ValueError(
                f"eval.aesthetics_head {spec.aesthetics_head!r} takes {width}-d embeddings "
                f"but eval.clip_model {spec.clip_model!r} gives {clip.dim}-d ones; the "
                "LAION head needs CLIP ViT-L/14 (openai/clip-vit-large-patch14)"
            )

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        embeddings = generated.clip_embeddings
        with torch.no_grad():
            scores = self.head(embeddings.to(self.trial.device)).double().cpu()
        return scores / AESTHETIC_SCALE
