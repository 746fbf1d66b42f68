"""A disk that fills up during a checkpoint save: a clear error, the previous complete checkpoint
intact, and a rerun resuming from it. The output folder is a real, small tmpfs (needs root, as
the SLURM tests do)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import small_spec, write_spec
from mlflow.tracking import MlflowClient
from rich.console import Console

from contract.spec import load_spec
from launch.grid import expand_grid
from launch.local import run_local
from trainers.checkpoint import checkpoints_root, complete_checkpoints
from trainers.resume import TRAINER_STATE

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill `disk` to the last `leave` bytes with one file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):  # ENOSPC
        while True:
            handle.write(b"\0" * 65536)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_the_rerun_resumes(
    tmp_path: Path, small_disk: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # MLflow's images and records go elsewhere: only checkpoints and logs share the small disk
    client.create_experiment("full", artifact_location=(tmp_path / "artifacts").as_uri())
    spec = small_spec(
        tmp_path,
        output_dir=str(small_disk / "sweep"),
        grid={"max_steps": 6, "eval_every": 2},
        tracking={"uri": uri, "experiment": "full"},
    )
    path = write_spec(tmp_path, spec)
    [trial] = expand_grid(load_spec(path))
    root = checkpoints_root(trial)

    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(run_local, load_spec(path), console=Console(file=io.StringIO()))
        deadline = time.monotonic() + 300
        while not (root / "step_000002" / "COMPLETE").exists():
            assert not first.done() and time.monotonic() < deadline, first.result()
            time.sleep(0.01)
        filler = fill(small_disk, leave=64 * 1024)  # room for logs, not for a checkpoint
        outcome = first.result(timeout=600)
    assert [o.returncode for o in outcome.outcomes] == [1]
    log = (trial.output_dir / "worker.log").read_text()
    assert "CheckpointWriteError: could not write the checkpoint of step 4 in" in log, log
    assert "the last complete checkpoint (step 2) is intact and a rerun resumes from it" in log
    assert [step for step, _ in complete_checkpoints(root)] == [2]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())  # space given back
    kept = torch.load(root / "step_000002" / TRAINER_STATE, weights_only=True)
    assert kept["step"] == 2
    [failed] = [
        r
        for r in client.search_runs([client.get_experiment_by_name("full").experiment_id])
        if r.data.tags.get("dreamsweep.role") == "trial"
    ]
    assert failed.info.status == "FAILED"
    assert "could not write the checkpoint of step 4" in failed.data.tags["dreamsweep.error"]

    filler.unlink()
    rerun = run_local(load_spec(path), console=Console(file=io.StringIO()))
    assert not rerun.failed, rerun.failed[0].log_tail
    resumed = client.get_run(failed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["dreamsweep.resumed_from_step"] == "2"
    loss = client.get_metric_history(failed.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone, logged once
    assert [step for step, _ in complete_checkpoints(root)][-1] == 6
