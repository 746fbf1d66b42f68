"""`similarity`: subject fidelity, each image's mean cosine to the subject's reference images
on `eval.encoder` (CLIP-I with CLIP, DreamBench's DINO score with DINO)."""

from __future__ import annotations

import torch

from evaluation.context import GeneratedImages, TrialContext
from evaluation.metric import EvalMetric
from evaluation.metrics import similarity_per_image


class Similarity(EvalMetric):
    name = "similarity"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return {trial.spec.encoder}

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        self.reference = trial.subject_reference  # computed here: on disk before the first step

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        return similarity_per_image(generated.subject_embeddings, self.reference)
