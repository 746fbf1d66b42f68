"""An inference study on each launcher: the same small study run locally (shards forked from the
fork server), as a SLURM job array on the dev cluster (one array task per shard) and as a Ray
task on the two-node test cluster ends in the same metrics per combination and the same images,
pixel for pixel; a rerun on SLURM submits, generates and logs nothing."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import write_spec
from mlflow.tracking import MlflowClient
from PIL import Image
from rich.console import Console

from contract.layout import ROLE_COMBINATION, ROLE_INFERENCE_STUDY, TAG_COMBINATION, TAG_ROLE
from contract.spec import InferenceSpec, load_any_spec


def small_study(launcher: dict) -> dict:
    """2 combinations × 4 prompts in 2 shards of 2 prompts: `tiny`, 64 px, 2 steps."""
    return {
        "kind": "inference",
        "name": "study",
        "models": ["tiny"],
        "schedulers": ["ddim", "euler_a"],
        "num_inference_steps": [2],
        "guidance_scale": [7.5],
        "resolution": 64,
        "prompts": {"template": "object", "n": 4, "token": "sks", "class_token": "toy"},
        "metrics": {
            "names": ["aesthetics", "clip_t", "diversity"],
            "clip_model": "tiny",
            "aesthetics_head": "tiny",
        },
        "shards": {"prompts_per_shard": 2},
        "launcher": launcher,
    }


def run_study(folder: Path, launcher: dict, prompts_per_shard: int = 2) -> InferenceSpec:
    from launch.inference import run_inference

    folder.mkdir()
    study = {**small_study(launcher), "shards": {"prompts_per_shard": prompts_per_shard}}
    spec = load_any_spec(write_spec(folder, study, "study.yaml"))
    assert isinstance(spec, InferenceSpec)
    outcome = run_inference(spec, console=Console(width=200))
    assert outcome.failed_shards == []
    assert len(outcome.logged) == 2
    return spec


def quality_metrics(spec: InferenceSpec) -> dict[str, dict[str, float]]:
    """Combination id → its logged metrics other than timing (which differ run to run)."""
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_ROLE}` = '{ROLE_COMBINATION}'"
    )
    assert {r.info.status for r in runs} == {"FINISHED"}
    return {
        r.data.tags[TAG_COMBINATION]: {
            k: v for k, v in r.data.metrics.items() if not k.startswith("timing/")
        }
        for r in runs
    }


def images(spec: InferenceSpec) -> dict[Path, np.ndarray]:
    root = spec.resolved_output_dir
    return {
        p.relative_to(root): np.asarray(Image.open(p))
        for p in sorted(root.glob("combinations/*/images/*.png"))
    }


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_study_on_slurm_and_on_ray_equals_the_local_one(
    tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One thread per worker everywhere (sbatch passes the environment on; Ray gives a 1-CPU
    # task one thread): the same reductions, so the same bits.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Ray in one shard: a worker's imports cost more CPU than its images, and the 2 shards on
    # SLURM already show that shards split the work without changing an image.
    launchers = {
        "local": ({"kind": "local", "max_parallel": 2}, 2),
        "slurm": ({"kind": "slurm", "time_min": 10}, 2),
        "ray": ({"kind": "ray", "address": ray_address}, 4),
    }
    # At the same time: each driver mostly waits for its workers.
    with ThreadPoolExecutor(max_workers=len(launchers)) as pool:
        futures = {k: pool.submit(run_study, tmp_path / k, *v) for k, v in launchers.items()}
        local, slurm, ray = (futures[k].result() for k in launchers)

    expected = quality_metrics(local)
    assert len(expected) == 2
    assert all(set(m) == {"aesthetics", "clip_t", "diversity"} for m in expected.values())
    assert quality_metrics(slurm) == expected  # the same shards: the same bits
    # One shard scores its images in other batches than two: the last float digits move.
    on_ray = quality_metrics(ray)
    assert sorted(on_ray) == sorted(expected)
    for combination, metrics in expected.items():
        assert on_ray[combination] == pytest.approx(metrics, rel=1e-6)
    pictures = images(local)
    assert len(pictures) == 2 * 4
    for other in (slurm, ray):
        theirs = images(other)
        assert sorted(theirs) == sorted(pictures)
        assert all(np.array_equal(theirs[key], pictures[key]) for key in pictures)

    # One array of one task per shard, recorded where `status` and `cancel` read it.
    jobs = json.loads((slurm.resolved_output_dir / "slurm" / "jobs.json").read_text())
    assert sorted(jobs) == ["shard_0000", "shard_0001"]
    array_ids = {record["job_id"].split("_")[0] for record in jobs.values()}
    assert len(array_ids) == 1
    assert sorted(record["job_id"].split("_")[1] for record in jobs.values()) == ["0", "1"]

    # `status` sees both shards done and unclaimed; a rerun submits, generates and logs nothing.
    from launch.inference import prepare_study, run_inference, shard_rows

    rows = shard_rows(prepare_study(slurm, download=False))
    assert [(r["state"], r["images"], r["holder"]) for r in rows] == [("DONE", "4/4", "-")] * 2

    mtimes = {p: p.stat().st_mtime_ns for p in slurm.resolved_output_dir.rglob("*.png")}
    again = run_inference(slurm, console=Console(width=200))
    assert again.logged == [] and again.failed_shards == []
    assert json.loads((slurm.resolved_output_dir / "slurm" / "jobs.json").read_text()) == jobs
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_ray_address_without_a_cluster_is_an_error_naming_it_and_fails_the_study_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.cli import main

    path = write_spec(tmp_path, small_study({"kind": "ray", "address": "nowhere"}), "study.yaml")
    assert main(["run", str(path)]) == 2
    error = capsys.readouterr().err
    assert "error: launcher.address: 1 problem" in error
    assert "'nowhere': no Ray cluster could be joined" in error and "Traceback" not in error
    spec = load_any_spec(path)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    (parent,) = client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_ROLE}` = '{ROLE_INFERENCE_STUDY}'"
    )
    assert parent.info.status == "FAILED"  # not left RUNNING


def test_a_shard_another_submission_holds_is_left_untouched(tmp_path: Path) -> None:
    """What keeps a resubmitted array task (or Ray task) from generating a shard twice: its
    worker finds the claim taken, says who holds it and exits 0 at once, writing nothing."""
    from cluster import events
    from cluster.claims import claim_trial
    from launch.inference import prepare_study, shard_command

    spec = load_any_spec(write_spec(tmp_path, small_study({"kind": "slurm"}), "study.yaml"))
    assert isinstance(spec, InferenceSpec)
    shard = prepare_study(spec).shards[1]
    with claim_trial(shard.folder):
        done = subprocess.run(shard_command(shard.folder), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    found = [e for e in map(events.parse, done.stdout.splitlines()) if e is not None]
    assert [e["event"] for e in found] == ["claimed"]
    assert found[0]["shard"] == 1 and f"pid {os.getpid()}," in found[0]["holder"]
    assert not list(spec.resolved_output_dir.rglob("*.png"))
    assert sorted(p.name for p in shard.folder.iterdir()) == ["claim.lock", "shard.json"]
