"""A killed trial resumes at its checkpoint, into the same MLflow run, with the same numbers."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
import torch
from conftest import Recorder, copy_subject, kill_when_ready, run_trial, small_spec, write_spec
from mlflow.tracking import MlflowClient
from rich.console import Console

from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from launch.local import run_local
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.resume import TRAINER_STATE

pytestmark = pytest.mark.slow


def trial_in(folder: Path, method: str, train: dict) -> TrialConfig:
    folder.mkdir()
    spec = small_spec(
        folder,
        methods={method: {"learning_rate": [1e-3]}},
        grid={"max_steps": 6, "eval_every": 2},
        train=train,
    )
    [trial] = expand_grid(load_spec(write_spec(folder, spec)))
    return trial


def final_weights(trial: TrialConfig) -> dict[str, torch.Tensor]:
    step, folder = latest_checkpoint(checkpoints_root(trial))
    assert step == trial.max_steps
    return torch.load(folder / TRAINER_STATE, weights_only=True)["trainable"]


@pytest.mark.parametrize(
    ("method", "train"),
    [
        ("lora", {}),
        ("textual_inversion", {}),
        # Full UNet with prior preservation, 8-bit AdamW states and 2 micro-batches per step.
        ("dreambooth", {"optimizer": "adamw8bit", "gradient_accumulation_steps": 2}),
    ],
)
def test_resumed_trial_equals_uninterrupted_trial(
    tmp_path: Path, method: str, train: dict, one_thread: None
) -> None:
    whole = trial_in(tmp_path / "whole", method, train)
    uninterrupted = Recorder()
    run_trial(whole, uninterrupted)

    broken = trial_in(tmp_path / "broken", method, train)
    first = Recorder(die_after_checkpoint=2)
    with pytest.raises(KeyboardInterrupt):
        run_trial(broken, first)
    assert latest_checkpoint(checkpoints_root(broken))[0] == 2
    second = Recorder()
    run_trial(broken, second)

    assert second.start_step == 2
    assert sorted(second.losses) == [3, 4, 5, 6]
    merged = {**first.losses, **second.losses}
    assert merged == pytest.approx(uninterrupted.losses, rel=1e-6)
    for step in (4, 6):
        assert second.metrics[step]["similarity"] == pytest.approx(
            uninterrupted.metrics[step]["similarity"], rel=1e-6
        )
    expected, resumed = final_weights(whole), final_weights(broken)
    assert expected.keys() == resumed.keys() and len(expected) > 0
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=1e-6, atol=1e-7)


def test_killed_worker_is_reported_and_the_rerun_resumes_into_the_same_run(
    tmp_path: Path,
) -> None:
    copy_subject("mug", tmp_path / "subjects" / "mug")
    spec_dict = small_spec(tmp_path, grid={"max_steps": 12, "eval_every": 2})
    spec_dict["subjects"].append({"name": "mug", "images": "subjects/mug", "class_token": "cup"})
    spec = load_spec(write_spec(tmp_path, spec_dict))
    robot, mug = expand_grid(spec)

    killer = kill_when_ready(
        checkpoints_root(mug) / "step_000004" / "COMPLETE", str(mug.output_dir / "trial.json")
    )
    output = io.StringIO()
    outcome = run_local(spec, console=Console(file=output, width=200))
    killer.join()

    assert [o.trial.subject.name for o in outcome.failed] == ["mug"]
    assert outcome.failed[0].returncode == -signal.SIGKILL
    assert "✓ robot/lora" in output.getvalue() and "✗ mug/lora" in output.getvalue()
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)

    def trial_runs() -> dict[str, object]:
        runs = client.search_runs([experiment.experiment_id])
        return {
            r.data.tags["dreamsweep.trial_id"]: r
            for r in runs
            if r.data.tags.get("dreamsweep.trial_id")
        }

    killed = trial_runs()[mug.trial_id]
    assert killed.info.status == "FAILED"
    assert "status -9" in killed.data.tags["dreamsweep.error"]

    rerun_output = io.StringIO()
    rerun = run_local(spec, console=Console(file=rerun_output, width=200))
    assert [o.trial.trial_id for o in rerun.outcomes] == [mug.trial_id]
    assert [t.trial_id for t in rerun.skipped] == [robot.trial_id]
    assert not rerun.failed

    resumed = trial_runs()[mug.trial_id]
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED"
    assert int(resumed.data.tags["dreamsweep.resumed_from_step"]) >= 4
    # the interrupted attempt's error is kept as history, no longer as the run's error
    assert "dreamsweep.error" not in resumed.data.tags
    assert "status -9" in resumed.data.tags["dreamsweep.resumed_after_error"]
    run_id = resumed.info.run_id
    for metric, steps in (("similarity", range(0, 13, 2)), ("loss", range(1, 13))):
        history = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(history) == list(steps)  # no gap, no duplicate
