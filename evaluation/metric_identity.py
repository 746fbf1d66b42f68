"""`identity`: is the generated person the subject? Each image's best face is compared with the
subject's training faces on dlib's face-recognition ResNet (`evaluation.faces`).

Per image: the highest, over the faces found in it, of the face's mean similarity
max(0, 1 − distance) to the training faces (dlib's same-person threshold, distance 0.6, is 0.4).
An image without a face is a miss: it scores 0.0, the lowest value, so the curve (the mean) falls
with the share of images without a face. The records also carry each image's face count
(`identity.faces`) and whether a face was found (`identity.face_found`).
"""

from __future__ import annotations

import torch

from contract.layout import SETUP_FACE_DETECTOR
from evaluation.context import GeneratedImages, TrialContext
from evaluation.faces import identity_of_image, shared_face_models, subject_reference_faces
from evaluation.metric import EvalMetric

FACES_COLUMN = "identity.faces"
FACE_FOUND_COLUMN = "identity.face_found"


class Identity(EvalMetric):
    name = "identity"

    def __init__(self, trial: TrialContext) -> None:
        super().__init__(trial)
        self.faces = shared_face_models()
        files = trial.reference_files
        if not files:
            raise ValueError("identity: no training images of the subject to compare faces with")
        # The worker's own check (a launcher elsewhere skips `dreamsweep validate`'s).
        field = f"subject images {str(files[0].parent)!r}"
        self.reference = subject_reference_faces(field, files, self.faces)

    def setup(self) -> dict[str, str]:
        return {SETUP_FACE_DETECTOR: self.faces.name}

    def per_image(self, generated: GeneratedImages) -> torch.Tensor:
        found = self.faces.detect_all(generated.images)
        values = [
            identity_of_image(self.faces, image, faces, self.reference)
            for image, faces in zip(generated.images, found, strict=True)
        ]
        return torch.tensor(values, dtype=torch.float64)

    def record_columns(self, generated: GeneratedImages) -> dict[str, list[object]]:
        counts = self.faces.face_counts(generated.images)  # the detections per_image made
        return {FACES_COLUMN: counts, FACE_FOUND_COLUMN: [count > 0 for count in counts]}
