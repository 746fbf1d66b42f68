"""The evaluator on the tiny pipeline: negative-prompt variants, per-image records, cached
reference embeddings, and encoders that do not fit together."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART_SUBJECTS
from PIL import Image

from contract.cache import cache_root
from contract.layout import NO_NEGATIVE
from contract.spec import EvalSpec
from evaluation.evaluator import Evaluator
from evaluation.metric_in_domain import in_domain_mode
from evaluation.sampling import make_sampler
from trainers.models import assemble_pipeline, load_base_model

TINY_ENCODERS = {"clip_model": "tiny", "dino_model": "tiny", "aesthetics_head": "tiny"}
ALL_CURVES = ["similarity", "aesthetics", "diversity", "clip_t", "in_domain"]


@pytest.fixture(scope="module")
def pipeline():
    model = load_base_model("tiny")
    return assemble_pipeline(model, make_sampler("dpm++", model.noise_scheduler.config))


def robot_files(count: int = 2) -> list[Path]:
    return sorted((QUICKSTART_SUBJECTS / "robot").glob("*.png"))[:count]


def evaluator(**eval_options) -> Evaluator:
    options = {
        "prompts": ["a photo of {token} {class}", "a {token} {class} on the beach"],
        "images_per_prompt": 2,
        "num_inference_steps": 2,
        "batch_size": 3,  # not a multiple of anything: batches cross prompts and variants
        **TINY_ENCODERS,
        **eval_options,
    }
    if "prompt_template" in eval_options:
        del options["prompts"]
    return Evaluator(
        EvalSpec(**options),
        token="sks",
        class_token="toy",
        reference_files=robot_files(),
        resolution=64,
    )


def pixels(images) -> list[bytes]:
    return [image.tobytes() for image in images]


def test_compare_negative_logs_both_variants_and_the_plain_one_matches_no_negative(
    pipeline,
) -> None:
    plain = evaluator()(pipeline)
    both = evaluator(negative_prompt="blurry, low quality", compare_negative=True)(pipeline)

    assert set(plain.metrics) == {*ALL_CURVES, "eval_seconds"}
    assert set(both.metrics) == {
        *ALL_CURVES,
        *(f"{m}/{NO_NEGATIVE}" for m in ALL_CURVES),
        "eval_seconds",
    }
    main, without = both.images[:4], both.images[4:]
    # Same seeds, no negative prompt: the same images as an evaluator that never had one.
    assert pixels(without) == pixels(plain.images)
    assert pixels(main) != pixels(plain.images)
    for metric in ALL_CURVES:
        assert both.metrics[f"{metric}/{NO_NEGATIVE}"] == pytest.approx(plain.metrics[metric])


def test_records_hold_prompt_phrases_seed_and_every_per_image_metric(pipeline) -> None:
    template = {"template": "object", "n_validation": 3, "seed": 5}
    evaluation = evaluator(prompt_template=template)(pipeline)
    records = evaluation.records
    assert len(records) == 6 == len(evaluation.images)
    assert [r["seed"] for r in records] == [0, 1, 2, 3, 4, 5]
    for record in records:
        phrases = {k.removeprefix("phrase."): v for k, v in record.items() if "phrase." in k}
        assert set(phrases) == {"style", "context", "viewpoint", "lighting"}
        assert all(phrase in record["prompt"] for phrase in phrases.values())
        assert " sks toy " in record["prompt"]
    for metric in ALL_CURVES:  # each curve is the mean of its images' values
        mean = sum(r[metric] for r in records) / len(records)
        assert evaluation.metrics[metric] == pytest.approx(mean)
    assert {r["in_domain"] for r in records} <= {0.0, 1.0}


def test_eval_spec_without_explicit_prompts_accepts_a_template() -> None:
    spec = EvalSpec(prompt_template={"template": "portrait", "n_validation": 4}, **TINY_ENCODERS)
    assert spec.images_per_step == 16
    assert in_domain_mode(spec, "woman") == "face"
    assert in_domain_mode(spec, "dog") == "zero_shot"
    assert in_domain_mode(spec.model_copy(update={"in_domain": "face"}), "dog") == "face"


def test_reference_embeddings_are_computed_once_and_follow_the_files(tmp_path: Path) -> None:
    folder = cache_root() / "embeddings"
    shutil.rmtree(folder, ignore_errors=True)
    first = evaluator(metrics=["similarity"])
    cached = sorted(folder.glob("*.pt"))
    assert len(cached) == 1
    second = evaluator(metrics=["similarity"])
    assert sorted(folder.glob("*.pt")) == cached
    assert second.reference.equal(first.reference)

    # An edited reference image is a different set: encoded again, under a new key.
    edited = tmp_path / "00.png"
    shutil.copy(robot_files(1)[0], edited)
    Image.open(edited).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited)
    third = Evaluator(
        EvalSpec(metrics=["similarity"], prompts=["a {token} {class}"], **TINY_ENCODERS),
        token="sks",
        class_token="toy",
        reference_files=[edited, robot_files()[1]],
        resolution=64,
    )
    assert len(list(folder.glob("*.pt"))) == 2
    assert not third.reference.equal(first.reference)


def test_an_aesthetic_head_for_another_clip_width_is_refused(tmp_path: Path) -> None:
    import torch

    from evaluation.aesthetics import AestheticHead

    head = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticHead(768).state_dict(), head)
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but eval\.clip_model 'tiny'"):
        evaluator(metrics=["aesthetics"], aesthetics_head=str(head))


def test_dino_similarity_differs_from_clip_and_fid_is_logged(pipeline) -> None:
    dino = evaluator(
        encoder="dino",
        metrics=["similarity", "diversity", "fid"],
        fid_reference=QUICKSTART_SUBJECTS / "mug",
        fid_features="dino",
    )(pipeline)
    clip = evaluator(metrics=["similarity", "diversity"])(pipeline)
    assert set(dino.metrics) == {"similarity", "diversity", "fid", "eval_seconds"}
    assert dino.metrics["similarity"] != pytest.approx(clip.metrics["similarity"])
    assert dino.metrics["fid"] > 0
    assert "fid" not in dino.records[0]  # a set-level metric has no per-image value
