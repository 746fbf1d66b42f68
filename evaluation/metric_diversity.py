"""`diversity`: each image's mean cosine distance on `eval.encoder` to the other images of its
variant (the two variants are separate sets: one does not diversify the other)."""

from __future__ import annotations

import torch

from evaluation.context import GeneratedImages, TrialContext
from evaluation.metric import EvalMetric
from evaluation.metrics import diversity_per_image


class Diversity(EvalMetric):
    name = "diversity"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return {trial.spec.encoder}

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        values = torch.zeros(len(generated), dtype=torch.float64)
        for _, rows in self.trial.variant_rows():
            values[rows] = diversity_per_image(generated.subject_embeddings[rows])
        return values
