"""`fid`: the Fréchet distance between each variant's images and `eval.fid_reference`, on
`eval.fid_features`. A set-level metric: lower is better, and images have no value of their own.

`SetFeatures` is what `fid` and `kid` share: the feature extractor (Inception-v3 from
`eval.fid_weights`, loaded once per trial for both), the reference images' features (cached on
disk) and each evaluation's features (encoded once for both).
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch

from contract.spec import subject_image_files
from evaluation.context import GeneratedImages, TrialContext
from evaluation.encoders import ImageEncoder, reference_embeddings
from evaluation.inception import InceptionFeatures
from evaluation.metric import EvalMetric
from evaluation.metrics import frechet_distance


class SetFeatures:
    """A trial's features for the set-level metrics; `set_features(trial)` gives the shared one."""

    def __init__(self, trial: TrialContext) -> None:
        spec = trial.spec
        if spec.fid_features == "inception":
            self.encoder: ImageEncoder = InceptionFeatures(spec.fid_weights, device=trial.device)
        else:
            self.encoder = trial.clip if spec.fid_features == "clip" else trial.dino
        assert spec.fid_reference is not None, "the spec requires it for fid and kid"
        self.reference = reference_embeddings(
            self.encoder, subject_image_files(spec.fid_reference), normalize=False
        )
        self._generated: WeakKeyDictionary[GeneratedImages, torch.Tensor] = WeakKeyDictionary()

    @staticmethod
    def needs(trial: TrialContext) -> set[str]:
        features = trial.spec.fid_features
        return {features} if features in ("clip", "dino") else set()

    def of(self, generated: GeneratedImages, rows: list[int]) -> torch.Tensor:
        """The un-normalised features of `generated.images[rows]`."""
        if generated not in self._generated:
            self._generated[generated] = self.encoder.embed_images(
                generated.images, normalize=False
            )
        return self._generated[generated][rows]


_SHARED: WeakKeyDictionary[TrialContext, SetFeatures] = WeakKeyDictionary()


def set_features(trial: TrialContext) -> SetFeatures:
    """The trial's `SetFeatures`, built by the first metric that asks."""
    if trial not in _SHARED:
        _SHARED[trial] = SetFeatures(trial)
    return _SHARED[trial]


class SetLevelMetric(EvalMetric):
    """A distance between the generated set and `eval.fid_reference` on the shared features:
    what `fid` and `kid` have in common (each says only how it measures the distance)."""

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return SetFeatures.needs(trial)

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        self.features = set_features(trial)


class Fid(SetLevelMetric):
    name = "fid"

    def curve(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> float:
        return frechet_distance(self.features.of(generated, rows), self.features.reference)
