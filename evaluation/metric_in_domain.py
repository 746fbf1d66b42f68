"""`in_domain`: whether each image stays in the subject's domain, by face detection for people
(dlib's HOG detector when installed, else OpenCV's Haar cascade) and CLIP zero-shot against
distractor classes otherwise (`eval.in_domain`)."""

from __future__ import annotations

import torch

from contract.layout import SETUP_FACE_DETECTOR
from contract.spec import FACE_CLASSES, EvalSpec
from evaluation.context import GeneratedImages, TrialContext
from evaluation.in_domain import face_detector, zero_shot_in_domain
from evaluation.metric import EvalMetric


def in_domain_mode(spec: EvalSpec, class_token: str) -> str:
    """`face` or `zero_shot`: the spec's choice, or by the subject's class when `auto`."""
    if spec.in_domain != "auto":
        return spec.in_domain
    return "face" if class_token.lower() in FACE_CLASSES else "zero_shot"


class InDomain(EvalMetric):
    name = "in_domain"

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        return {"clip"} if in_domain_mode(trial.spec, trial.class_token) == "zero_shot" else set()

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        class_token = trial.class_token
        self.mode = in_domain_mode(trial.spec, class_token)
        if self.mode == "face":
            self.face_detector = face_detector()
        else:
            # The subject's own class is never its own distractor.
            distractors = [
                c for c in trial.spec.distractor_classes if c.lower() != class_token.lower()
            ]
            self.class_text = trial.clip.embed_texts([f"a photo of a {class_token}"])[0]
            self.distractor_texts = trial.clip.embed_texts(
                [f"a photo of a {c}" for c in distractors]
            )

    def setup(self) -> dict[str, str]:
        return {SETUP_FACE_DETECTOR: self.face_detector.name} if self.mode == "face" else {}

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        if self.mode == "face":
            counts = self.face_detector.face_counts(generated.images)
            return torch.tensor([count > 0 for count in counts], dtype=torch.float64)
        return zero_shot_in_domain(
            generated.clip_embeddings, self.class_text, self.distractor_texts
        ).double()
