"""`fid`: the Fréchet distance between each variant's images and `eval.fid_reference`, on
`eval.fid_features`. A set-level metric: lower is better, and images have no value of their own.
"""

from __future__ import annotations

import torch

from contract.spec import subject_image_files
from evaluation.context import GeneratedImages, TrialContext
from evaluation.encoders import ImageEncoder, InceptionFeatures, reference_embeddings
from evaluation.metric import EvalMetric
from evaluation.metrics import frechet_distance


class Fid(EvalMetric):
    name = "fid"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        features = trial.spec.fid_features
        return {features} if features in ("clip", "dino") else set()

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        spec = trial.spec
        # Inception is FID's alone, so it is loaded here rather than shared.
        self.encoder: ImageEncoder = (
            InceptionFeatures(device=trial.device)
            if spec.fid_features == "inception"
            else trial.clip
            if spec.fid_features == "clip"
            else trial.dino
        )
        self.reference = reference_embeddings(
            self.encoder, subject_image_files(spec.fid_reference), normalize=False
        )

    def curve(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> float:
        # Un-normalised features of this variant's images only, encoded afresh per variant.
        images = [generated.images[i] for i in rows]
        features = self.encoder.embed_images(images, normalize=False)
        return frechet_distance(features, self.reference)
