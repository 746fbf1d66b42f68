"""Retention keeps each trial's best evaluated checkpoint, and `dreamsweep select` says when the
step it chose has no checkpoint: it registers the best step that still has one, scored as that
step, and never calls a trained step the base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Recorder, run_trial, small_spec, write_spec
from mlflow.tracking import MlflowClient

from contract.layout import TAG_BEST_CHECKPOINT, TAG_CHECKPOINT
from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.cli import main
from launch.grid import expand_grid
from tracking.journal import HTTP_DEFAULTS
from tracking.sweep import SweepTracking
from trainers.checkpoint import (
    EVALUATION,
    checkpoint_scores,
    checkpoints_root,
    complete_checkpoints,
    remove_checkpoint,
    steps_to_remove,
    write_checkpoint,
    write_evaluation,
)

WEIGHTS = {"similarity": 1.0, "diversity": 1.0}
RANGES = {"similarity": (0.0, 1.0), "diversity": (0.0, 1.0)}


def test_retention_keeps_the_best_evaluated_checkpoint_so_far(tmp_path: Path) -> None:
    """keep_last: 1 over a scripted sequence of evaluations: the best so far (score in the
    comments) stays beside the newest, and goes only once a later step beats it."""
    sequence = {
        1: {"similarity": 0.5, "diversity": 0.5},  # 0.5
        2: {"similarity": 0.7, "diversity": 0.5},  # 0.6: the new best
        3: {"similarity": 0.6, "diversity": 0.4},  # 0.5
        4: None,  # a checkpoint for resuming only (train.checkpoints.every): not evaluated
        5: {"similarity": 0.9, "diversity": 0.6},  # 0.75: the new best
        6: {"similarity": 0.3, "diversity": 0.2},  # 0.25
        7: {"similarity": 0.8, "diversity": 0.7},  # 0.75: a tie goes to the earlier step
    }
    root = tmp_path / "checkpoints"
    removed, kept = [], []
    for step, metrics in sequence.items():

        def write(folder: Path, metrics: dict[str, float] | None = metrics) -> None:
            (folder / "weights.safetensors").write_bytes(b"weights")
            if metrics is not None:
                write_evaluation(folder, metrics)

        write_checkpoint(root, step, write)
        existing = complete_checkpoints(root)
        doomed = steps_to_remove(
            [s for s, _ in existing],
            keep_last=1,
            protected=set(),
            scores=checkpoint_scores(existing, WEIGHTS, RANGES),
        )
        for doomed_step, folder in existing:
            if doomed_step in doomed:
                remove_checkpoint(folder)
        removed.append(doomed)
        kept.append([s for s, _ in complete_checkpoints(root)])
    assert removed == [[], [1], [], [3], [2, 4], [], [6]]
    assert kept == [[1], [2], [2, 3], [2, 4], [5], [5, 6], [5, 7]]


@pytest.mark.slow
def test_a_trained_trial_keeps_its_best_checkpoint_beside_the_newest(tmp_path: Path) -> None:
    """The loop records each evaluation in its checkpoint and retention ranks by it. Every step
    scores 1 here (the range lies below any similarity), so the best is the earliest trained
    step, which `keep_last: 1` alone would remove."""
    spec = small_spec(
        tmp_path,
        grid={"num_images": [2], "seed": [0], "max_steps": 3, "eval_every": 1},
        train={"resolution": 32, "checkpoints": {"keep_last": 1, "keep_eval_steps": False}},
        # The least evaluation that scores a step: one image of one denoising step, unguided.
        eval={
            "metrics": ["similarity"],
            "images_per_prompt": 1,
            "num_inference_steps": 1,
            "guidance_scale": 1.0,
        },
        selection={"weights": {"similarity": 1.0}, "ranges": {"similarity": [-3.0, -2.0]}},
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)
    assert recorder.checkpoints == [1, 2, 3]
    assert recorder.removed == [2]
    kept = complete_checkpoints(checkpoints_root(trial))
    assert [step for step, _ in kept] == [1, 3]
    for step, folder in kept:
        recorded = json.loads((folder / EVALUATION).read_text(encoding="utf-8"))
        assert recorded == recorder.metrics[step]


def log_trial(
    tracking: SweepTracking,
    parent: str,
    trial: TrialConfig,
    diversity: dict[int, float],
    *,
    removed_by_retention: int | None = None,
    removed_by_hand: int | None = None,
) -> str:
    """A trial's run as its worker leaves it: curves, and a checkpoint (folder and tag) at every
    trained step; retention deletes a folder and its tag, a hand deletes only the folder."""
    run_id = tracking.trial_run(parent, trial)
    client = tracking.client
    for step, value in diversity.items():
        client.log_metric(run_id, "diversity", value, step=step)
        client.log_metric(run_id, "similarity", 0.1 + 0.2 * step, step=step)
        if step == 0:
            continue
        folder = write_checkpoint(
            checkpoints_root(trial),
            step,
            lambda f: (f / "weights.safetensors").write_bytes(b"weights"),
        )
        client.set_tag(run_id, TAG_CHECKPOINT.format(step=step), str(folder))
        if step == removed_by_retention:
            remove_checkpoint(folder)
            client.delete_tag(run_id, TAG_CHECKPOINT.format(step=step))
        if step == removed_by_hand:
            shutil.rmtree(folder)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_select_registers_the_best_step_left_when_the_chosen_checkpoint_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--weights diversity=1` prefers steps the spec's weights (similarity) did not: trial A's
    step 1 (0.9), whose checkpoint retention removed, and trial C's base model. A competes with
    its step 2 (0.8) and beats B's step 2 (0.75); C registers its best step left on disk."""
    spec = small_spec(
        tmp_path,
        name="retention",
        methods={
            "lora": {"learning_rate": [1e-3, 1e-4]},
            "dreambooth": {"learning_rate": [1e-5], "prior_preservation": False},
        },
        grid={"num_images": [2], "seed": [0], "max_steps": 3, "eval_every": 1},
        eval={"metrics": ["similarity", "diversity"]},
        selection={
            "weights": {"similarity": 1.0},
            "ranges": {"similarity": [0.0, 1.0], "diversity": [0.0, 1.0]},
        },
    )
    path = write_spec(tmp_path, spec)
    loaded = load_spec(path)
    trials = {(t.method, t.learning_rate): t for t in expand_grid(loaded)}
    tracking = SweepTracking(loaded.tracking_uri, loaded.experiment_name)
    parent = tracking.parent_run(loaded.name)
    a_trial, b_trial = trials["lora", 1e-3], trials["lora", 1e-4]
    c_trial = trials["dreambooth", 1e-5]
    a = log_trial(
        tracking, parent, a_trial, {0: 0.1, 1: 0.9, 2: 0.8, 3: 0.3}, removed_by_retention=1
    )
    log_trial(tracking, parent, b_trial, {0: 0.1, 1: 0.5, 2: 0.75, 3: 0.4})
    c = log_trial(tracking, parent, c_trial, {0: 0.95, 1: 0.5, 2: 0.6, 3: 0.2}, removed_by_hand=2)

    for variable, value in HTTP_DEFAULTS.items():  # what the CLI sets, undone after the test
        monkeypatch.setenv(variable, value)
    capsys.readouterr()
    # The CLI in this process (a subprocess would add seconds of imports to a fast test).
    assert main(["select", str(path), "--weights", "diversity=1"]) == 0
    out = capsys.readouterr().out
    a_step2 = checkpoints_root(a_trial) / "step_000002"
    c_step1 = checkpoints_root(c_trial) / "step_000001"
    assert (
        f"  {a_trial.label}: step 1 (score 0.9000) has no checkpoint on disk; the best step with "
        f"a checkpoint on disk is step 2 (score 0.8000): {a_step2}\n"
    ) in out
    assert f"  {b_trial.label}: {checkpoints_root(b_trial) / 'step_000002'}\n" in out
    assert (
        f"  {c_trial.label}: step 0 (score 0.9500) is the base model; the best step with a "
        f"checkpoint on disk is step 1 (score 0.5000): {c_step1}\n"
    ) in out
    assert out.count("base model") == 1  # C's step 0 only: no trained step is called that
    assert f"version 1: {a_trial.label}, step 2 (score 0.8000)" in out
    assert f"{c_trial.label}, step 1 (score 0.5000)" in out

    client = MlflowClient(tracking_uri=loaded.tracking_uri, registry_uri=loaded.tracking_uri)
    for name, run_id, step in (
        ("retention.robot.lora", a, "2"),
        ("retention.robot.dreambooth", c, "1"),
    ):
        version = client.get_model_version_by_alias(name, "best")
        assert (version.run_id, version.tags["step"]) == (run_id, step)
    lora = client.get_model_version_by_alias("retention.robot.lora", "best")
    assert lora.source == a_step2.resolve().as_uri()
    # The run keeps the chosen step (it is the best under these weights) and says what is gone.
    run = client.get_run(a)
    assert run.data.metrics["best_step"] == 1
    assert run.data.tags[TAG_BEST_CHECKPOINT].startswith("step 1 (score 0.9000) has no checkpoint")
