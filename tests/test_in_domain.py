"""In-domain rate: dlib's detector for people when installed (the Haar cascade otherwise), the
Haar cascade on a drawn face and on noise, CLIP zero-shot by hand."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from contract.layout import SETUP_FACE_DETECTOR
from contract.spec import EvalSpec
from evaluation.evaluator import Evaluator
from evaluation.in_domain import HaarFaceDetector, zero_shot_in_domain


def drawn_face(size: int) -> Image.Image:
    """A frontal face drawn the way Viola–Jones sees one: a light oval, darker brows and eyes
    above lighter cheeks, a nose ridge and a mouth, softened like a photo."""
    s = size / 256
    canvas = np.full((size, size), 90, np.uint8)

    def point(x: float, y: float) -> tuple[int, int]:
        return round(x * s), round(y * s)

    def axes(a: float, b: float) -> tuple[int, int]:
        return max(1, round(a * s)), max(1, round(b * s))

    cv2.ellipse(canvas, point(128, 128), axes(80, 105), 0, 0, 360, 200, -1)
    for x in (95, 161):
        cv2.ellipse(canvas, point(x, 100), axes(24, 7), 0, 0, 360, 60, -1)  # brows
        cv2.ellipse(canvas, point(x, 120), axes(16, 9), 0, 0, 360, 40, -1)  # eyes
    cv2.ellipse(canvas, point(128, 150), axes(8, 22), 0, 0, 360, 170, -1)  # nose
    cv2.ellipse(canvas, point(128, 190), axes(30, 9), 0, 0, 360, 70, -1)  # mouth
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=3 * s)
    return Image.fromarray(canvas).convert("RGB")


@pytest.mark.parametrize("size", [64, 128, 256])
def test_haar_finds_the_drawn_face_and_nothing_in_noise(size: int) -> None:
    detector = HaarFaceDetector()
    assert detector.has_face(drawn_face(size))
    rng = np.random.default_rng(size)
    noise = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    assert not detector.has_face(noise)
    assert not detector.has_face(Image.new("RGB", (size, size), (128, 128, 128)))


def test_zero_shot_counts_an_image_in_domain_when_its_class_beats_every_distractor() -> None:
    unit = torch.nn.functional.normalize
    class_text = unit(torch.tensor([1.0, 0.0, 0.0]), dim=0)
    distractors = unit(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    images = unit(
        torch.tensor([[0.9, 0.1, 0.1], [0.2, 0.9, 0.0], [0.5, 0.1, 0.6], [0.6, 0.5, 0.5]]), dim=-1
    )
    decided = zero_shot_in_domain(images, class_text, distractors)
    assert decided.tolist() == [True, False, False, True]


def face_rate_evaluator() -> Evaluator:
    return Evaluator(
        EvalSpec(
            prompts=["a photo of {token} {class}"], images_per_prompt=2, metrics=["in_domain"]
        ),
        token="sks",
        class_token="man",
        reference_files=[],
        resolution=64,
    )


@pytest.mark.parametrize(
    ("dlib_installed", "detector"), [(True, "dlib_hog"), (False, "opencv_haar")]
)
def test_people_are_counted_by_dlib_when_installed_else_haar_and_the_detector_is_said(
    dlib_installed: bool, detector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("evaluation.faces.faces_installed", lambda: dlib_installed)
    evaluator = face_rate_evaluator()
    assert evaluator.setup == {SETUP_FACE_DETECTOR: detector}  # the trial's setup tag
    photo = Image.fromarray(data.astronaut())  # a real face, which both detectors find
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8))
    curves, per_image = evaluator.measure([photo, noise])
    assert per_image["in_domain"] == [1.0, 0.0] and curves["in_domain"] == 0.5
