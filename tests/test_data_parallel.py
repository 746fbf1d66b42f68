"""processes_per_trial: N data-parallel processes train like one process with the global batch."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from conftest import small_spec, write_spec
from mlflow.tracking import MlflowClient
from rich.console import Console

from launch.local import run_local
from launch.spec import load_spec
from trainers.checkpoint import latest_checkpoint
from trainers.loop import TRAINER_STATE, checkpoints_root

pytestmark = pytest.mark.slow


def run_one_trial(folder: Path, *, batch_size: int, processes: int) -> tuple[list[float], dict]:
    folder.mkdir()
    spec_dict = small_spec(
        folder,
        grid={"num_images": [4]},
        train={"batch_size": batch_size},
        launcher={"kind": "local", "processes_per_trial": processes},
    )
    spec = load_spec(write_spec(folder, spec_dict))
    outcome = run_local(spec, console=Console(file=io.StringIO()))
    assert not outcome.failed, "\n".join(outcome.failed[0].log_tail)
    [trial] = outcome.trials
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    [run] = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
    )
    losses = [
        m.value
        for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    ]
    _, checkpoint = latest_checkpoint(checkpoints_root(trial))
    weights = torch.load(checkpoint / TRAINER_STATE, weights_only=True)["trainable"]
    return losses, weights


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    parallel_losses, parallel = run_one_trial(tmp_path / "two", batch_size=1, processes=2)
    single_losses, single = run_one_trial(tmp_path / "one", batch_size=2, processes=1)
    assert len(parallel_losses) == 4  # the main process alone logs: one point per step
    assert parallel_losses == pytest.approx(single_losses, rel=1e-5)
    assert parallel.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-3, atol=1e-4)
