"""In-domain rate: the share of generated images that stay in the subject's domain.

For people (the portrait study's case) it is the face-detection rate: with dlib's HOG frontal-face
detector when `dreamsweep[faces]` is installed (`evaluation.faces`: real weights, offline, the
detector identity uses), else with OpenCV's Haar cascade (its XML ships inside
opencv-python-headless, so it runs offline too). Which one ran is recorded with the trial
(`dreamsweep.setup.face_detector`). For any other class it is CLIP zero-shot: the image is in the
domain when "a photo of a {class}" beats every distractor.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image

HAAR_CASCADE = "haarcascade_frontalface_default.xml"


class FaceCounter(Protocol):
    name: str
    """What ran, as recorded with the trial."""

    def face_counts(self, images: list[Image.Image]) -> list[int]: ...


def face_detector() -> FaceCounter:
    """dlib's HOG detector when installed (shared with identity), else the Haar cascade."""
    from evaluation.faces import faces_installed, shared_face_models

    return shared_face_models() if faces_installed() else HaarFaceDetector()


class HaarFaceDetector:
    """Frontal faces with OpenCV's Viola–Jones cascade: the fallback without dlib."""

    name = "opencv_haar"

    def __init__(self) -> None:
        import cv2

        self._cv2 = cv2
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_CASCADE)
        if self.cascade.empty():
            raise RuntimeError(f"OpenCV could not load its {HAAR_CASCADE}")

    def count(self, image: Image.Image) -> int:
        gray = self._cv2.cvtColor(np.asarray(image.convert("RGB")), self._cv2.COLOR_RGB2GRAY)
        side = min(gray.shape)
        faces = self.cascade.detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=4, minSize=(max(16, side // 8),) * 2
        )
        return len(faces)

    def has_face(self, image: Image.Image) -> bool:
        return self.count(image) > 0

    def face_counts(self, images: list[Image.Image]) -> list[int]:
        return [self.count(image) for image in images]


def zero_shot_in_domain(
    image_embeddings: torch.Tensor, class_embedding: torch.Tensor, distractors: torch.Tensor
) -> torch.Tensor:
    """Per image: True when its cosine to the class prompt beats every distractor prompt's.

    All embeddings L2-normalised: images `[N, D]`, class `[D]`, distractors `[K, D]`.
    """
    to_class = image_embeddings @ class_embedding
    to_distractors = image_embeddings @ distractors.T
    return to_class > to_distractors.max(dim=1).values
