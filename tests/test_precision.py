"""Mixed precision. bf16 trains as diffusers' LoRA script does (frozen weights in bf16, adapters
in fp32, forward passes under autocast): the loop against hand-written steps. fp16 needs a GPU
(on the CPU Accelerate neither autocasts nor scales fp16), so a machine without one refuses it
before any work: in the CLI where trials train on this machine, and in the worker (on its node)
where they train elsewhere."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, dreamsweep, small_spec, write_spec
from reference_steps import (
    assert_same_losses,
    diffusers_lora_weights,
    reference_lora_steps,
    saved_unet_lora_weights,
    train_with_the_loop,
)

from cluster.accelerator import precision_problem
from cluster.worker import worker_command, write_trial_json
from contract.spec import load_spec
from launch.preflight import missing_device
from launch.sweep_run import prepare_sweep
from tracking.sweep import SweepTracking
from trainers.checkpoint import checkpoints_root

FP16 = {"mixed_precision": "fp16"}
NO_GPU = "train.mixed_precision: 'fp16' needs a GPU"
INSTEAD = "use 'bf16' (which runs on the CPU too) or 'no'"

NO_GPU_HERE = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="checks the refusal on a machine without a GPU"
)


@pytest.mark.slow
def test_bf16_lora_loop_equals_hand_written_steps(tmp_path: Path, one_thread: None) -> None:
    trial, recorder = train_with_the_loop(tmp_path, train={"mixed_precision": "bf16"})
    # train_dreambooth_lora.py under `--mixed_precision bf16`, by hand
    expected_losses, model = reference_lora_steps(trial, dtype=torch.bfloat16)
    expected_weights = diffusers_lora_weights(model.unet)

    assert_same_losses(recorder, expected_losses)
    saved = saved_unet_lora_weights(trial)
    assert saved.keys() == expected_weights.keys()
    for key, expected in expected_weights.items():
        assert saved[key].dtype == torch.float32  # fp32 master weights, saved as trained
        torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6)
    assert any("lora.up" in key and w.abs().sum() > 0 for key, w in saved.items())


@NO_GPU_HERE
@pytest.mark.slow
def test_fp16_run_without_a_gpu_is_refused_before_anything_starts(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, small_spec(tmp_path, train=FP16))
    for command in ("validate", "run"):
        result = dreamsweep(command, str(spec), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert f"error: {spec}" in result.stderr
        assert f"{NO_GPU} (this machine has none" in result.stderr
        assert INSTEAD in result.stderr
        assert "Traceback" not in result.stderr
    # Nothing started: no output folder, so no MLflow store, sweep run, trial folder or log.
    assert not (tmp_path / "runs").exists()


@NO_GPU_HERE
def test_fp16_is_checked_here_only_where_the_trials_train_here(tmp_path: Path) -> None:
    """SLURM nodes and a Ray cluster elsewhere may have GPUs this machine lacks."""
    cases = [
        ({"kind": "local"}, True),
        ({"kind": "ray"}, True),  # Ray started on this machine
        ({"kind": "ray", "address": "10.0.0.1:6379"}, False),
        ({"kind": "slurm"}, False),
    ]
    for launcher, refused_here in cases:
        for precision, refused in (("fp16", refused_here), ("bf16", False), ("no", False)):
            spec = small_spec(tmp_path, launcher=launcher, train={"mixed_precision": precision})
            problems = [
                p for p in missing_device(load_spec(write_spec(tmp_path, spec))) if NO_GPU in p
            ]
            assert len(problems) == refused, (launcher, precision, problems)
    assert precision_problem("fp16", device_type="cuda", where="a GPU node") is None


@NO_GPU_HERE
@pytest.mark.slow
def test_fp16_worker_on_a_node_without_a_gpu_refuses_before_its_run_opens(
    tmp_path: Path,
) -> None:
    spec = load_spec(write_spec(tmp_path, small_spec(tmp_path, train=FP16)))
    sweep = prepare_sweep(spec)  # as a launcher starts: the sweep's parent run
    [trial] = sweep.trials
    worker = subprocess.run(
        worker_command(write_trial_json(trial), sweep.parent_run_id),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert worker.returncode == 2, worker.stderr
    assert f"error: {NO_GPU} (this trial's node ({socket.gethostname()}) has none" in (
        worker.stderr
    )
    assert INSTEAD in worker.stderr
    assert "Traceback" not in worker.stderr
    # No trial run under the sweep's run, and nothing trained or checkpointed.
    tracking = SweepTracking(trial.tracking_uri, trial.experiment)
    assert tracking.trial_runs(sweep.parent_run_id) == {}
    assert not checkpoints_root(trial).exists()
