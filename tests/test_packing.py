"""Packed trials train as they do alone: per member the same losses, curves, checkpoints and
weights (fp32 on CPU), when a member stops early, and after a kill and a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import Recorder, copy_subject, run_trial, small_spec, write_spec
from safetensors.torch import load_file

from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from trainers.checkpoint import checkpoint_dir, checkpoints_root, latest_checkpoint
from trainers.resume import TRAINER_STATE

RELATIVE = 1e-5
"""fp32 on CPU: a member's rows go through the same weights as alone; only the frozen base's
matrix products run over K× the rows, which may round differently in the last bits."""
METRIC_ABSOLUTE = 1e-5
"""Metrics are cosines (and 1 − cosines) of fp32 embeddings of images sampled through weights
that agree to ~1e-6: the rounding comes through the sampler and the encoders (seen: up to 2e-6,
e.g. diversity 0.010868 vs 0.010867), where the metrics' own differences between steps are in
the 1e-3 to 1e-1 range."""
WEIGHT_RELATIVE_NORM = 2e-4
"""Adam divides each update by the root of its gradient's second moment: an element whose
gradient is near zero (where rounding is a large part of it) may move by a visible fraction of
the learning rate on rounding alone (seen here: one element of 128 off by 2.6e-6 at lr 1e-3,
where the loss agreed to 1e-6). So a weight tensor is held to its norm: ‖packed − alone‖ ≤ 2e-4
‖alone‖ (seen: ≤ 7e-5), and no element off by a tenth of a learning-rate step."""


def assert_weights_match(got: torch.Tensor, expected: torch.Tensor, learning_rate: float) -> None:
    difference = (got.double() - expected.double()).norm().item()
    norm = expected.double().norm().item()
    # A tensor alone left at zero (an adapter's B in a layer the loss never reached) stays zero.
    if norm == 0:
        assert difference == 0
    elif norm >= learning_rate:
        assert difference <= WEIGHT_RELATIVE_NORM * norm, (difference, norm)
        assert (got - expected).abs().max().item() < learning_rate / 10
    else:
        # It moved less than one learning-rate step in all: its gradient is near zero, so its
        # steps are rounding through Adam's division (seen on a second CPU type: norm 6e-5 at
        # lr 1e-3, 100% apart, elements 1.1e-4 apart). Held to what that can add up to.
        assert difference <= learning_rate, (difference, norm)


WEIGHT_FILES = {
    "lora": "pytorch_lora_weights.safetensors",
    "textual_inversion": "learned_embeds.safetensors",
}


def trials_in(
    folder: Path,
    method: str,
    learning_rates: list[float],
    options: dict | None = None,
    base_model: str = "tiny",
    **grid: object,
) -> list[TrialConfig]:
    folder.mkdir()
    copy_subject("mug", folder / "subjects" / "mug")
    method_options = dict(options or {})
    train = method_options.pop("train", {})  # `train:` settings, beside the method's options
    spec = small_spec(
        folder,
        subjects=[
            {"name": "robot", "images": "subjects/robot", "class_token": "toy"},
            {"name": "mug", "images": "subjects/mug", "class_token": "cup"},
        ],
        base_model=base_model,
        methods={method: {"learning_rate": learning_rates, **method_options}},
        train={
            "resolution": 64,
            "prior": {"num_class_images": 3, "num_inference_steps": 2},
            **train,
        },
        grid={"max_steps": 6, "eval_every": 2, **grid},
        selection={"early_stop": {"patience": 10}},
    )
    return expand_grid(load_spec(write_spec(folder, spec)))


def run_pack(trials: list[TrialConfig], recorders: list[Recorder], stoppers=None) -> None:
    from accelerate.state import AcceleratorState

    from cluster.accelerator import make_accelerator
    from trainers.pack_loop import train_pack

    AcceleratorState._reset_state(reset_partial_state=True)
    train_pack(
        trials,
        recorders,
        accelerator=make_accelerator(trials[0].train),
        stoppers=stoppers or [None] * len(trials),
    )


def final_state(trial: TrialConfig) -> dict[str, torch.Tensor]:
    _, folder = latest_checkpoint(checkpoints_root(trial))
    return torch.load(folder / TRAINER_STATE, weights_only=True)["trainable"]


def assert_member_equals_alone(
    member: Recorder, alone: Recorder, packed: TrialConfig, lone: TrialConfig
) -> None:
    assert packed.trial_id == lone.trial_id
    counts = {k: v for k, v in alone.setup.items() if k.endswith(".trained_parameters")}
    assert counts and {k: member.setup[k] for k in counts} == counts  # its own weights only
    assert sorted(member.losses) == sorted(alone.losses) and member.losses
    assert member.losses == pytest.approx(alone.losses, rel=RELATIVE)
    assert sorted(member.metrics) == sorted(alone.metrics)
    for step, metrics in alone.metrics.items():
        measured = {k: v for k, v in metrics.items() if not k.endswith("_seconds")}  # timings
        assert measured, step
        assert member.metrics[step] == pytest.approx(
            {**member.metrics[step], **measured}, rel=RELATIVE, abs=METRIC_ABSOLUTE
        ), step
    assert member.checkpoints == alone.checkpoints
    expected, got = final_state(lone), final_state(packed)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        assert_weights_match(got[key], expected[key], lone.learning_rate)
    step = member.checkpoints[-1]
    name = WEIGHT_FILES[lone.method]
    saved = load_file(checkpoint_dir(checkpoints_root(packed), step) / name)
    reference = load_file(checkpoint_dir(checkpoints_root(lone), step) / name)
    assert saved.keys() == reference.keys()
    for key in reference:
        assert_weights_match(saved[key], reference[key], lone.learning_rate)


def lone_runs(trials: list[TrialConfig], stoppers=None) -> list[Recorder]:
    recorders = []
    for index, trial in enumerate(trials):
        recorder = Recorder()
        run_trial(trial, recorder, stopper=None if stoppers is None else stoppers[index])
        recorders.append(recorder)
    return recorders


def stop_at(step: int):
    def stopper(at: int, metrics: dict[str, float]) -> str | None:
        return "scripted stop" if at == step else None

    return stopper


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "size", "options", "base_model"),
    [
        ("lora", 3, {}, "tiny"),
        ("textual_inversion", 2, {}, "tiny"),
        # Adapters on the text encoder too (its rows routed), and class images per subject.
        ("lora", 2, {"train_text_encoder": True, "prior_preservation": True}, "tiny"),
        # ... and with gradient checkpointing: the recomputed forward passes are routed too.
        (
            "lora",
            2,
            {"train_text_encoder": True, "train": {"gradient_checkpointing": True}},
            "tiny",
        ),
        # SDXL: two text encoders, each with a routed embedding per member.
        ("textual_inversion", 2, {}, "tiny-sdxl"),
    ],
    ids=[
        "lora",
        "textual_inversion",
        "lora-text-encoder-prior",
        "lora-text-encoder-checkpointing",
        "textual_inversion-sdxl",
    ],
)
def test_packed_members_train_as_alone(
    tmp_path: Path, method: str, size: int, options: dict, base_model: str, one_thread: None
) -> None:
    # Two subjects (two tokens for textual inversion), two learning rates, two image counts.
    learning_rates = [1e-3, 3e-4] if method == "lora" else [5e-3]
    grid = {"num_images": [1, 2]}
    alone_trials = trials_in(
        tmp_path / "alone", method, learning_rates, options, base_model, **grid
    )
    chosen = [alone_trials[i] for i in (0, -1, 1)][:size]
    packed_trials = {
        t.trial_id: t
        for t in trials_in(tmp_path / "packed", method, learning_rates, options, base_model, **grid)
    }
    packed = [packed_trials[t.trial_id] for t in chosen]
    assert len({t.subject.name for t in packed}) == 2

    # The second member stops early at step 4 (a scripted rule, alone and packed): it leaves
    # the pack, and the others go on to step 6 as alone.
    stoppers = [None, stop_at(4), None][:size]
    alone = lone_runs(chosen, stoppers)
    members = [Recorder() for _ in packed]
    run_pack(packed, members, [None, stop_at(4), None][:size])
    assert members[1].early_stop == (4, "scripted stop") == alone[1].early_stop
    assert max(members[1].losses) == 4 and max(members[0].losses) == 6
    for member, lone_recorder, packed_trial, lone_trial in zip(
        members, alone, packed, chosen, strict=True
    ):
        assert member.setup["pack_members"] == str(size)
        assert_member_equals_alone(member, lone_recorder, packed_trial, lone_trial)

    # A packed member's checkpoint loads the diffusers way.
    from trainers.methods import load_trained_pipeline

    _, folder = latest_checkpoint(checkpoints_root(packed[0]))
    pipeline = load_trained_pipeline(packed[0].base_model, method, folder)
    word = "sks"
    if method == "textual_inversion":
        word = f"<{packed[0].subject.name}>"
        assert pipeline.tokenizer.convert_tokens_to_ids(word) == len(pipeline.tokenizer) - 1
    prompt = f"a photo of {word} {packed[0].subject.class_token}"
    image = pipeline(prompt, num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_a_compiled_pack_trains_as_its_members_alone_eager(
    tmp_path: Path, one_thread: None
) -> None:
    # The routed layers trace under dynamo (aot_eager: see test_memory_features); the compiled
    # pack's members equal the same trials alone and eager, which share their ids; the second
    # stops at step 4, and the pack's rows change under the compiled modules.
    torch.compiler.reset()
    options = {"train_text_encoder": True}
    compiled = {**options, "train": {"compile": "aot_eager"}}
    alone_trials = trials_in(tmp_path / "alone", "lora", [1e-3, 3e-4], options)[:2]
    packed = trials_in(tmp_path / "packed", "lora", [1e-3, 3e-4], compiled)[:2]
    assert [t.trial_id for t in packed] == [t.trial_id for t in alone_trials]
    assert {t.train.compile for t in packed} == {"aot_eager"}
    alone = lone_runs(alone_trials, [None, stop_at(4)])
    members = [Recorder() for _ in packed]
    run_pack(packed, members, [None, stop_at(4)])
    assert max(members[1].losses) == 4 and max(members[0].losses) == 6
    for member, lone_recorder, packed_trial, lone_trial in zip(
        members, alone, packed, alone_trials, strict=True
    ):
        assert member.setup["compiled"] == "unet,text_encoder"
        assert lone_recorder.setup["compiled"] == "-"
        assert_member_equals_alone(member, lone_recorder, packed_trial, lone_trial)


@pytest.mark.slow
def test_a_killed_pack_resumes_each_member_from_its_own_checkpoint(
    tmp_path: Path, one_thread: None
) -> None:
    whole = trials_in(tmp_path / "whole", "lora", [1e-3, 3e-4])[:3]
    uninterrupted = [Recorder() for _ in whole]
    run_pack(whole, uninterrupted)

    broken = trials_in(tmp_path / "broken", "lora", [1e-3, 3e-4])[:3]
    # Killed while the second member reports its step-4 checkpoint: the first and second have
    # step 4, the third only step 2.
    first = [Recorder(), Recorder(die_after_checkpoint=4), Recorder()]
    with pytest.raises(KeyboardInterrupt):
        run_pack(broken, first)
    assert [latest_checkpoint(checkpoints_root(t))[0] for t in broken] == [4, 4, 2]
    second = [Recorder() for _ in broken]
    run_pack(broken, second)
    assert [r.start_step for r in second] == [4, 4, 2]
    for index, trial in enumerate(broken):
        merged = {**first[index].losses, **second[index].losses}
        assert merged == pytest.approx(uninterrupted[index].losses, rel=RELATIVE)
        expected, got = final_state(whole[index]), final_state(trial)
        for key in expected:
            assert_weights_match(got[key], expected[key], trial.learning_rate)


def test_a_pack_refuses_members_that_cannot_share_a_base(tmp_path: Path) -> None:
    from trainers.pack_loop import check_pack

    lora = trials_in(tmp_path / "lora", "lora", [1e-3])
    inversion = trials_in(tmp_path / "ti", "textual_inversion", [5e-3])
    dreambooth = trials_in(tmp_path / "db", "dreambooth", [1e-5])
    check_pack(lora)  # two subjects, one method: fine
    with pytest.raises(ValueError) as refused:
        check_pack([lora[0], inversion[0], dreambooth[0], lora[0]])
    message = str(refused.value)
    assert "dreambooth fine-tunes the base model itself" in message
    assert "members differ in method" in message
    assert "a trial appears twice" in message
    fp16 = lora[0].model_copy(
        update={"train": lora[0].train.model_copy(update={"mixed_precision": "fp16"})}
    )
    with pytest.raises(ValueError, match="fp16 needs a loss scaler"):
        check_pack([fp16])


def test_a_routed_layer_refuses_rows_nobody_owns() -> None:
    from trainers.packing import UNET, Router

    router = Router()
    with router.routing(unet=["member0", "member1"]):
        assert router.rows(UNET, 2) == ["member0", "member1"]
        assert router.rows(UNET, 4) == ["member0", "member1"] * 2  # classifier-free guidance
        with pytest.raises(RuntimeError, match="2 routed rows for a batch of 3"):
            router.rows(UNET, 3)
    with router.routing(unet="member1"):
        assert router.rows(UNET, 3) == ["member1"] * 3
    with pytest.raises(RuntimeError, match="ran without routing"):
        router.rows(UNET, 1)
