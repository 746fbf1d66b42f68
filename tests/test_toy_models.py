"""The toy world's pretrained models in the product: `toy` loads through the same code as a hub
id, a missing folder is named for every field that needs it, the `oracle` metric logs its four
curves and judges the truth high, and a short fine-tune on the toy model really learns the
subject (its similarity and `oracle/subject` rise: real dynamics, not plumbing)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml
from conftest import REPO, Recorder, run_trial, write_spec
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from pydantic import ValidationError

from contract.spec import (
    ORACLE_CURVES,
    Curve,
    EvalSpec,
    Metric,
    SelectionSpec,
    SpecError,
    load_any_spec,
    load_spec,
    logged_curves,
)
from contract.toy_models import TOY_MODELS_ENV, toy_models_folder
from evaluation.aesthetics import load_aesthetic_head
from evaluation.clip import Clip
from evaluation.evaluator import Evaluator
from launch.grid import expand_grid
from launch.preflight import oracle_problems
from toyworld.corrupt import CORRUPTIONS, corrupt
from toyworld.render import render
from toyworld.scene import parse_context, prompt_template, with_context
from toyworld.world import Sample, subject_sample
from trainers.models import load_base_model, load_pipeline

TOY_SUBJECTS = REPO / "configs" / "subjects" / "toyworld"
TOY_EVAL = {
    "prompt_template": {"template": "toyworld", "n_validation": 4},
    "images_per_prompt": 4,
    "num_inference_steps": 10,
    "guidance_scale": 4.0,
    "scheduler": "ddim",
    "clip_model": "toy",
    "aesthetics_head": "toy",
}


def toy_spec(**sections: object) -> dict:
    spec = {
        "name": "toy",
        "base_model": "toy",
        "subjects": [
            {"name": "robot", "images": str(TOY_SUBJECTS / "robot"), "class_token": "toy"}
        ],
        "methods": {"lora": {"learning_rate": [5e-3]}},
        "grid": {"num_images": [4], "seed": [0], "max_steps": 2, "eval_every": 2},
        "train": {"resolution": 64},
        "eval": {**TOY_EVAL, "metrics": ["similarity", "aesthetics", "diversity", "oracle"]},
        "selection": {"weights": {"similarity": 1.0, "oracle/score": 0.0}},
    }
    return spec | sections


def test_toy_names_load_through_the_same_code_as_a_hub_id() -> None:
    folder = toy_models_folder()
    model = load_base_model("toy")
    assert model.family == "sd1" and model.source == str(folder / "toy-sd")
    assert isinstance(model.unet, UNet2DConditionModel)
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert len(model.tokenizer) == 49408  # the real CLIP BPE vocabulary
    pipeline = load_pipeline("toy")
    assert isinstance(pipeline, StableDiffusionPipeline)
    [image] = pipeline(
        "a photo of a toy", num_inference_steps=2, height=64, width=64, output_type="pil"
    ).images
    assert image.size == (64, 64)
    clip = Clip("toy")
    head = load_aesthetic_head("toy")
    assert head.layers[0].in_features == clip.dim
    # The trained head tells a clean render from a corrupted one (a random head would not).
    clean = [subject_sample("mug", 3, i).image for i in range(8)]
    broken = [corrupt(i, "noise", 0.8, np.random.default_rng(0)) for i in clean]
    assert head(clip.embed_images(clean)).mean() > head(clip.embed_images(broken)).mean() + 0.3


def test_a_missing_toy_folder_is_named_for_every_field_that_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = tmp_path / "nowhere"
    monkeypatch.setenv(TOY_MODELS_ENV, str(nowhere))
    with pytest.raises(SpecError) as raised:
        load_spec(write_spec(tmp_path, toy_spec()))
    text = str(raised.value)
    for field, part in (
        ("base_model", "toy-sd"),
        ("eval.clip_model", "clip"),
        ("eval.aesthetics_head", "aesthetic_head.pth"),
        ("eval.oracle_model", "oracle.safetensors"),
    ):
        assert f"{field}: 'toy' needs {str(nowhere / part)!r}" in text, text
    assert f"{TOY_MODELS_ENV}={str(nowhere)!r}" in text
    study = {
        "kind": "inference",
        "name": "toy_inference",
        "models": ["toy"],
        "prompts": ["a photo of sks toy"],
        "metrics": {"names": ["clip_t"], "clip_model": "toy"},
    }
    with pytest.raises(SpecError) as raised:
        load_any_spec(write_spec(tmp_path, study, "inference.yaml"))
    assert f"'toy' needs {str(nowhere / 'toy-sd')!r}" in str(raised.value)


def test_oracle_curves_are_weighted_only_when_measured_and_never_in_inference(
    tmp_path: Path,
) -> None:
    spec = toy_spec()
    spec["eval"] = {**spec["eval"], "metrics": ["similarity"]}
    with pytest.raises(SpecError, match=r"\['oracle/score'\] not in eval.metrics \['similarity'\]"):
        load_spec(write_spec(tmp_path, spec))
    measured = load_spec(write_spec(tmp_path, toy_spec()))
    assert measured.selection.weights == {"similarity": 1.0, "oracle/score": 0.0}
    inference = {
        "kind": "inference",
        "name": "toy_inference",
        "models": ["toy"],
        "prompts": ["a photo of sks toy"],
        "metrics": {"names": ["aesthetics", "oracle"], "clip_model": "toy"},
    }
    with pytest.raises(SpecError, match="'oracle' judges a training sweep"):
        load_any_spec(write_spec(tmp_path, inference, "inference.yaml"))


def test_the_curves_selection_can_name_are_the_metrics_curves() -> None:
    """Selection names curves: each metric's own, the oracle's four in its place."""
    assert set(get_args(Curve)) == set(get_args(Metric)) - {"oracle"} | set(ORACLE_CURVES)
    assert logged_curves(["similarity", "oracle"]) == ["similarity", *ORACLE_CURVES]
    assert SelectionSpec(weights={"oracle/score": 1.0}).weights == {"oracle/score": 1.0}
    with pytest.raises(ValidationError, match="oracle/score"):  # the allowed names are listed
        SelectionSpec(weights={"oracle": 1.0})


def test_an_oracle_file_that_is_not_there_is_named(tmp_path: Path) -> None:
    spec = toy_spec()
    spec["eval"] = {**spec["eval"], "oracle_model": "missing.safetensors"}
    with pytest.raises(SpecError) as raised:
        load_spec(write_spec(tmp_path, spec))
    assert f"eval.oracle_model: no file at {str(tmp_path / 'missing.safetensors')!r}" in str(
        raised.value
    )


def test_the_toyworld_prompt_template_is_the_worlds_grammar() -> None:
    shipped = yaml.safe_load((REPO / "configs" / "prompts" / "toyworld.yaml").read_text())
    assert shipped == prompt_template()


def _rendered_as_prompted(sample: Sample, prompt: str) -> Image.Image:
    """The subject rendered in the context its prompt asks for (ground truth for the prompt)."""
    asked = parse_context(prompt)
    return render(with_context(sample.scene, **asked)).image


def test_the_oracle_metric_logs_four_curves_scoring_the_truth_high_and_corruption_low() -> None:
    spec = EvalSpec(**TOY_EVAL, metrics=["oracle"])
    references = sorted((TOY_SUBJECTS / "robot").glob("*.png"))[:4]
    evaluator = Evaluator(
        spec, token="sks", class_token="toy", reference_files=references, resolution=64
    )
    assert evaluator.setup["oracle_subject"].startswith("robot (match ")
    truth = [
        _rendered_as_prompted(subject_sample("robot", 9, i), job.prompt)
        for i, job in enumerate(evaluator.jobs)
    ]
    rng = np.random.default_rng(1)
    broken = [corrupt(image, CORRUPTIONS[i % 5], 0.8, rng) for i, image in enumerate(truth)]
    foreign = [
        _rendered_as_prompted(subject_sample("cabin", 9, i), job.prompt)
        for i, job in enumerate(evaluator.jobs)
    ]
    curves = {
        name: evaluator.measure(images)[0]
        for name, images in (("truth", truth), ("broken", broken), ("foreign", foreign))
    }
    assert set(curves["truth"]) == {
        "oracle/subject",
        "oracle/prompt",
        "oracle/clean",
        "oracle/score",
    }
    assert curves["truth"]["oracle/prompt"] > 0.9, curves
    assert curves["truth"]["oracle/clean"] > 0.8, curves
    assert curves["truth"]["oracle/score"] > 0.6, curves
    assert curves["broken"]["oracle/clean"] < 0.2, curves
    assert curves["foreign"]["oracle/subject"] < 0.1, curves
    assert curves["truth"]["oracle/score"] > curves["broken"]["oracle/score"] + 0.3, curves
    assert curves["truth"]["oracle/score"] > curves["foreign"]["oracle/score"] + 0.2, curves
    # Per-image records carry each part.
    _, columns = evaluator.measure(truth)
    assert len(columns["oracle/subject"]) == len(evaluator.jobs)


def test_the_oracle_refuses_a_subject_that_is_not_the_toy_worlds(tmp_path: Path) -> None:
    spec = EvalSpec(**TOY_EVAL, metrics=["oracle"])
    drawn = sorted((REPO / "configs" / "subjects" / "robot").glob("*.png"))
    with pytest.raises(ValueError, match="show none of them"):
        Evaluator(spec, token="sks", class_token="toy", reference_files=drawn, resolution=64)
    # Before any trial starts: the preflight of `validate` and `run` names the subject.
    sweep = toy_spec()
    sweep["subjects"].append(
        {"name": "drawn", "images": str(drawn[0].parent), "class_token": "toy"}
    )
    assert oracle_problems(load_spec(write_spec(tmp_path, sweep))) == [
        f"subjects[1].images: metric 'oracle' judges images of the toy world's subjects, and the "
        f"images in {str(drawn[0].parent)!r} show none of them (best: 'cabin', match 0.20 < 0.4); "
        "use a toy-world subject folder (configs/subjects/toyworld/) or drop 'oracle'"
    ]


@pytest.mark.slow
def test_a_short_fine_tune_on_the_toy_model_learns_the_subject(
    tmp_path: Path, one_thread: None
) -> None:
    """Real dynamics: LoRA on the toy model for 160 steps moves the images towards the mug, on
    the toy CLIP (similarity) and on the world's truth (`oracle/subject`), and they grow alike.
    Measured (one thread): similarity 0.280 → 0.479, oracle/subject 0.194 → 0.549, diversity
    0.532 → 0.351; about 16 s."""
    mug = {"name": "mug", "images": str(TOY_SUBJECTS / "mug"), "class_token": "cup"}
    spec = toy_spec(
        subjects=[mug],
        methods={"lora": {"learning_rate": [2e-3]}},
        grid={"num_images": [2], "seed": [0], "max_steps": 160, "eval_every": 160},
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)
    before, after = recorder.metrics[0], recorder.metrics[160]
    assert after["similarity"] - before["similarity"] >= 0.1, (before, after)
    assert after["oracle/subject"] - before["oracle/subject"] >= 0.2, (before, after)
    assert after["diversity"] < before["diversity"] - 0.1, (before, after)
