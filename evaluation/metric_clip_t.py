"""`clip_t`: prompt fidelity, each image's CLIP cosine to its own prompt without the subject's
identifier (DreamBench's CLIP-T)."""

from __future__ import annotations

import torch

from evaluation.context import GeneratedImages, TrialContext
from evaluation.metric import EvalMetric
from evaluation.metrics import clip_t_per_image


class ClipT(EvalMetric):
    name = "clip_t"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return {"clip"}

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        # Each distinct prompt is embedded once, then lined up with the jobs (row i ↔ image i).
        texts = sorted({job.text_prompt for job in trial.jobs})
        embedded = dict(zip(texts, trial.clip.embed_texts(texts), strict=True))
        self.text_embeddings = torch.stack([embedded[job.text_prompt] for job in trial.jobs])

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        return clip_t_per_image(generated.clip_embeddings, self.text_embeddings)
