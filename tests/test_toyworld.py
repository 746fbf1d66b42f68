"""The toy world: a deterministic generator whose captions tell the truth, subjects held out of
pretraining, an oracle that scores the truth high and artefacts or foreign classes low, and a
build whose stages resume from their checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from toyworld.corrupt import CORRUPTIONS, corrupt
from toyworld.oracle import Oracle, prompt_following, train_attribute_net
from toyworld.render import render
from toyworld.scene import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    SUBJECTS,
    is_held_out,
    parse_caption,
    pretraining_scene,
    with_context,
)
from toyworld.world import (
    pretraining_sample,
    pretraining_samples,
    subject_sample,
    write_subject_folder,
)


def test_same_seed_same_bytes_other_seed_other_images() -> None:
    first = pretraining_samples(7, 0, 12)
    again = pretraining_samples(7, 0, 12)
    other = pretraining_samples(8, 0, 12)
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in again]
    assert [s.caption for s in first] == [s.caption for s in again]
    # Random access: draw 5 alone is draw 5 of the batch.
    assert pretraining_sample(7, 5).image.tobytes() == first[5].image.tobytes()
    differ = [a.image.tobytes() != b.image.tobytes() for a, b in zip(first, other, strict=True)]
    assert sum(differ) >= 11
    assert len({s.image.tobytes() for s in first}) == 12


def test_captions_state_only_true_labels_and_name_the_class() -> None:
    stated = 0
    for sample in pretraining_samples(3, 0, 400):
        parsed = parse_caption(sample.caption)
        assert parsed["object_class"] == sample.labels["object_class"], sample.caption
        wrong = {k: v for k, v in parsed.items() if sample.labels[k] != v}
        assert not wrong, (sample.caption, wrong)
        stated += len(parsed)
    # Phrases are said with probability 0.75: on average far more than the class alone.
    assert stated / 400 > 6
    # A subject's captions say everything (mention 1.0).
    full = subject_sample("robot", 0, 0)
    parsed = parse_caption(full.caption)
    for key in (
        "object_class",
        "variant",
        "primary",
        "secondary",
        "pattern",
        "background",
        "position",
        "rotation",
        "lighting",
        "style",
        "scale",
    ):
        assert parsed[key] == full.labels[key], (key, full.caption)


def test_subjects_never_appear_in_pretraining_draws() -> None:
    assert all(is_held_out(instance) for instance in SUBJECTS.values())
    for seed in (0, 1):
        for index in range(3000):
            scene = pretraining_scene(seed, index)
            assert not is_held_out(scene.instance), (seed, index, scene.instance)
    # The subject's folder shows the subject, in varied contexts.
    contexts = {subject_sample("mug", 0, i).scene.context for i in range(6)}
    assert len(contexts) == 6
    assert {subject_sample("mug", 0, i).scene.instance for i in range(6)} == {SUBJECTS["mug"]}


def test_masks_say_where_the_parts_are(tmp_path: Path) -> None:
    sample = subject_sample("robot", 0, 1)
    shown = render(with_context(sample.scene, lighting="in daylight", style="a cartoon"))
    pixels = np.asarray(shown.image).astype(float)
    for part, colour in (("primary", "blue"), ("secondary", "red")):
        mask = shown.part_masks[part]
        assert mask.sum() > 40
        assert np.abs(pixels[mask] - OBJECT_COLOURS[colour]).max() < 1
    background = ~shown.object_mask
    base = np.array(BACKGROUND_COLOURS[shown.labels["background"]], dtype=float)
    assert np.abs(pixels[background] / base - 1).max() < 0.2
    paths = write_subject_folder("robot", tmp_path / "robot", count=3)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]


def test_corruptions_change_images_and_refuse_bad_arguments() -> None:
    image = pretraining_sample(0, 0).image
    rng = np.random.default_rng(0)
    for kind in CORRUPTIONS:
        changed = np.asarray(corrupt(image, kind, 0.8, rng)).astype(float)
        assert np.abs(changed - np.asarray(image)).mean() > 2, kind
    with pytest.raises(ValueError, match="unknown corruption 'smudge'"):
        corrupt(image, "smudge", 0.5, rng)
    with pytest.raises(ValueError, match=r"severity 0.0 is not in \(0, 1\]"):
        corrupt(image, "noise", 0.0, rng)


def test_prompt_following_reads_background_and_position_from_pixels() -> None:
    """Ground truth scores near 1; asking another background or position scores near 0."""
    right, wrong_background, wrong_position = [], [], []
    colours, positions = list(BACKGROUND_COLOURS), list(POSITIONS)
    for index in range(60):
        scene = pretraining_scene(5, index)
        image = render(scene).image
        context = scene.context
        asked = f"a photo of a toy on a {context.background} background, {context.position}"
        right.append(prompt_following(image, asked))
        other = colours[(colours.index(context.background) + 1) % len(colours)]
        asked_other = f"a photo of a toy on a {other} background"
        wrong_background.append(prompt_following(image, asked_other))
        moved = positions[(positions.index(context.position) + 1) % len(positions)]
        wrong_position.append(prompt_following(image, f"a photo of a toy, {moved}"))
    # Measured (seed 5, 60 draws): right 0.965 mean (0.53 at worst: a large object clipped by
    # the border); wrong background 0.001 mean (0.023 max), wrong position 0.0006 (0.027).
    assert np.mean(right) > 0.9 and np.median(right) > 0.95
    assert np.mean(wrong_background) < 0.1 and np.mean(wrong_position) < 0.1
    assert prompt_following(render(pretraining_scene(5, 0)).image, "a photo of a toy") == 1.0


@pytest.mark.slow
def test_build_stages_train_resume_and_load_through_the_usual_code(
    tmp_path: Path, one_thread: None
) -> None:
    """Every stage trains 2 steps and exports what the project's loaders read; rerun, each is
    skipped; asked for a third step, each resumes from its checkpoint, and the result equals an
    uninterrupted 3-step run; a UNet is never continued on another VAE."""
    from evaluation.aesthetics import load_aesthetic_head
    from evaluation.clip import Clip
    from toyworld.build import STAGES, build
    from toyworld.checkpoint import StageSettings
    from trainers.models import load_base_model

    # save_every = steps: one checkpoint, at the end, which is what the resumes below read.
    two = StageSettings(steps=2, batch_size=2, learning_rate=1e-3, save_every=2)
    three = replace(two, steps=3)
    out, lines = tmp_path / "toy", []
    options = {"seed": 0, "pool_size": 8, "preview_steps": 2, "log": lines.append}
    records = build(out, settings=dict.fromkeys(STAGES, two), **options)
    assert {s: records[s]["steps"] for s in STAGES} == dict.fromkeys(STAGES, 2)

    model = load_base_model(str(out / "toy-sd"))
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    assert model.vae.config.scaling_factor == pytest.approx(records["vae"]["scaling_factor"])
    clip = Clip(str(out / "clip"))
    sample = pretraining_sample(0, 0)
    embedding = clip.embed_images([sample.image])
    head = load_aesthetic_head(str(out / "aesthetic_head.pth"))
    assert head(embedding).shape == (1,)
    judged = Oracle.load(out / "oracle.safetensors").judge(
        [sample.image], [sample.caption], "robot"
    )
    assert 0.0 <= float(judged.score[0]) <= 1.0
    assert (out / "samples.png").is_file()
    assert "| unet | `toy-sd` |" in (out / "README.md").read_text()

    lines.clear()
    build(out, settings=dict.fromkeys(STAGES, two), **options)
    assert [line for line in lines if line.endswith("skipped")] == [
        f"{stage}: built (2 steps), skipped" for stage in STAGES
    ]

    # The UNet and the head continue on the same VAE and CLIP; then the VAE and CLIP.
    for stage in ("unet", "aesthetic", "vae", "clip"):
        records = build(out, (stage,), settings={stage: three}, **options)
        assert (records[stage]["resumed_from"], records[stage]["steps"]) == (2, 3), stage
    fresh = build(
        tmp_path / "fresh", ("vae", "clip"), settings=dict.fromkeys(STAGES, three), **options
    )
    assert fresh["vae"]["resumed_from"] == 0
    for stage in ("vae", "clip"):
        resumed = torch.load(out / "work" / "checkpoints" / f"{stage}.pt", weights_only=False)
        uninterrupted = torch.load(
            tmp_path / "fresh" / "work" / "checkpoints" / f"{stage}.pt", weights_only=False
        )
        assert resumed["losses"] == uninterrupted["losses"]
        for key, tensor in uninterrupted["modules"][stage].items():
            assert torch.equal(resumed["modules"][stage][key], tensor), (stage, key)

    with pytest.raises(RuntimeError, match="unet was trained on other inputs"):
        build(out, ("unet",), settings={"unet": replace(two, steps=4)}, **options)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    """The oracle's CNN trained small (400 steps × 32 of 800 renders: a quarter of the build's
    samples, about 15 s, on renders alone), on one thread: its weights, and so the scores below,
    do not depend on the load. The build's (1600 × 64 of 4000, half of them VAE round trips:
    module doc) is tested in tests/test_toy_models.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, record = train_attribute_net(
            seed=0, steps=400, batch_size=32, count=800, learning_rate=6e-3
        )
    finally:
        torch.set_num_threads(threads)
    return Oracle(net, record)


def _subject_prompt(sample, token: str = "sks") -> str:
    context = sample.scene.context
    return (
        f"a photo of {token} {sample.scene.instance.object_class} on a "
        f"{context.background} background, {context.position}"
    )


@pytest.mark.slow
def test_oracle_scores_the_truth_high_and_artefacts_or_other_classes_low(
    oracle: Oracle, one_thread: None
) -> None:
    rng = np.random.default_rng(0)
    truth, corrupted, foreign = {}, {}, {}
    names = sorted(SUBJECTS)
    for position, name in enumerate(names):
        samples = [subject_sample(name, 11, i) for i in range(12)]
        images = [s.image for s in samples]
        prompts = [_subject_prompt(s) for s in samples]
        truth[name] = oracle.judge(images, prompts, name)
        broken = [
            corrupt(i, CORRUPTIONS[k % len(CORRUPTIONS)], 0.8, rng) for k, i in enumerate(images)
        ]
        corrupted[name] = oracle.judge(broken, prompts, name)
        other = names[(position + 1) % len(names)]  # another subject: another class
        foreign[name] = oracle.judge(images, prompts, other)
    # Measured (the fixture's CNN; 12 renders per subject), mean per subject:
    #   truth: score 0.686-0.763 (subject 0.370-0.474, prompt >= 0.993, clean 0.852-0.978);
    #   corrupted at severity 0.8: clean 0.004-0.066, score 0.059-0.106;
    #   judged as the next subject (another class): subject 0.001-0.038, score 0.090-0.319.
    # (The score is a cube root: a subject match of 0.03 still scores 0.3.)
    for name in names:
        mean = {
            kind: {
                part: float(getattr(judged[name], part).mean())
                for part in ("score", "subject", "prompt", "clean")
            }
            for kind, judged in (("truth", truth), ("corrupted", corrupted), ("foreign", foreign))
        }
        assert mean["truth"]["score"] > 0.6, (name, mean)
        assert mean["truth"]["subject"] > 0.28, (name, mean)
        assert mean["truth"]["prompt"] > 0.9, (name, mean)
        assert mean["truth"]["clean"] > 0.75, (name, mean)
        assert mean["corrupted"]["clean"] < 0.15, (name, mean)
        assert mean["corrupted"]["score"] < 0.25, (name, mean)
        assert mean["foreign"]["subject"] < 0.1, (name, mean)
        assert mean["foreign"]["score"] < 0.42, (name, mean)
        # Clearly apart, subject by subject (measured gaps: >= 0.58 and >= 0.37; ratio >= 11).
        assert mean["truth"]["score"] - mean["corrupted"]["score"] > 0.4, (name, mean)
        assert mean["truth"]["score"] - mean["foreign"]["score"] > 0.25, (name, mean)
        assert mean["truth"]["subject"] > 5 * mean["foreign"]["subject"], (name, mean)
