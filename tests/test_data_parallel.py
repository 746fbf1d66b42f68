"""processes_per_trial: N data-parallel processes train like one process with the global batch.

Here under DeepSpeed ZeRO-2, through the local launcher's torchrun, killed and resumed; plain DDP
over two processes (two SLURM nodes) is test_slurm.py's lost-node test, against the same
one-process reference."""

from __future__ import annotations

import io
import signal
from pathlib import Path

import pytest
import torch
from conftest import Recorder, kill_when_ready, run_trial, small_spec, write_spec
from mlflow.tracking import MlflowClient
from rich.console import Console

from contract.spec import load_spec
from launch.grid import expand_grid
from launch.local import run_local
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.resume import TRAINER_STATE

pytestmark = pytest.mark.slow


def test_deepspeed_zero2_trains_like_one_process_and_resumes_after_a_kill(tmp_path: Path) -> None:
    """ZeRO-2 over 2 processes (gloo on CPUs), killed by SIGKILL after its step-2 checkpoint
    and resumed, ends where one plain process with the same global batch ends."""
    folder = tmp_path / "zero2"
    folder.mkdir()
    spec_dict = small_spec(
        folder,
        grid={"num_images": [4], "max_steps": 6, "eval_every": 2},
        train={"batch_size": 1, "deepspeed": {"zero_stage": 2}},
        launcher={"kind": "local", "processes_per_trial": 2},
    )
    spec = load_spec(write_spec(folder, spec_dict))
    [trial] = expand_grid(spec)
    killer = kill_when_ready(
        checkpoints_root(trial) / "step_000002" / "COMPLETE", str(trial.output_dir / "trial.json")
    )
    first = run_local(spec, console=Console(file=io.StringIO()))
    killer.join()
    assert [o.returncode for o in first.outcomes] == [-signal.SIGKILL]
    rerun = run_local(spec, console=Console(file=io.StringIO()))
    assert not rerun.failed, "\n".join(rerun.failed[0].log_tail)

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    [run] = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
    )
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["dreamsweep.resumed_from_step"]) >= 2
    assert "DeepSpeedZeroOptimizer" in run.data.tags["dreamsweep.setup.optimizer_wrappers"]
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    _, newest = latest_checkpoint(checkpoints_root(trial))
    # Each rank saved its own partition of the optimizer state.
    assert sorted(p.name for p in newest.glob("optimizer.rank*.pt")) == [
        "optimizer.rank000.pt",
        "optimizer.rank001.pt",
    ]
    weights = torch.load(newest / TRAINER_STATE, weights_only=True)["trainable"]

    single_folder = tmp_path / "single"
    single_folder.mkdir()
    single_dict = small_spec(
        single_folder,
        grid={"num_images": [4], "max_steps": 6, "eval_every": 2},
        train={"batch_size": 2},
    )
    [single] = expand_grid(load_spec(write_spec(single_folder, single_dict)))
    recorder = Recorder()
    run_trial(single, recorder)
    assert [m.value for m in history] == pytest.approx(
        [recorder.losses[s] for s in range(1, 7)], rel=1e-4
    )
    _, single_newest = latest_checkpoint(checkpoints_root(single))
    expected = torch.load(single_newest / TRAINER_STATE, weights_only=True)["trainable"]
    assert weights.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-3, atol=1e-4)
