"""The Ray launcher on a real 2-node Ray cluster (a head and a second node on this machine, one
CPU each): the quickstart equals the local launcher, ASHA stops the weak trials, a killed trial
resumes from its checkpoint, and a killed driver's sweep is restored."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    assert_same_curves,
    dreamsweep,
    kill_when_ready,
    quickstart_slice,
    small_spec,
    trial_histories,
    write_spec,
)
from mlflow.tracking import MlflowClient

from contract.layout import TAG_EARLY_STOP_REASON, TAG_EARLY_STOP_STEP, TAG_TRIAL
from contract.spec import load_spec

pytestmark = pytest.mark.slow


def trial_runs(spec_path: Path) -> dict:
    spec = load_spec(spec_path)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
    )
    return {run.info.run_name: run for run in runs}


def steps_of(spec_path: Path, run, key: str = "loss") -> list[int]:
    client = MlflowClient(tracking_uri=load_spec(spec_path).tracking_uri)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def ray_nodes_of(root: Path) -> set[str]:
    """The Ray node each trial's worker log says it ran on."""
    nodes = set()
    for log in root.rglob("worker.log"):
        for line in log.read_text().splitlines():
            if line.startswith("Ray Tune trial on node "):
                nodes.add(line.split()[5])
    return nodes


def test_the_quickstart_on_two_ray_nodes_equals_the_local_launcher(
    ray_address: str, quickstart: dict, tmp_path: Path
) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    spec_path = tmp_path / "configs" / "tiny_quickstart.yaml"
    spec = quickstart_slice(yaml.safe_load(spec_path.read_text()))
    spec["launcher"] = {"kind": "ray", "address": ray_address, "cpus_per_trial": 1}
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))

    run = dreamsweep("run", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 trained, 0 stopped early by the fifo scheduler, 0 failed" in run.stdout

    on_ray = load_spec(spec_path)
    local = quickstart["root"] / "configs" / "tiny_quickstart.yaml"
    locally = load_spec(local)
    assert_same_curves(
        trial_histories(on_ray.tracking_uri, on_ray.experiment_name),
        trial_histories(locally.tracking_uri, locally.experiment_name),
        slice_of_b=True,
    )
    assert len(ray_nodes_of(on_ray.resolved_output_dir)) == 2  # trials landed on both nodes
    # `select` works unchanged on what the trials logged.
    select = dreamsweep("select", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert select.returncode == 0, select.stdout + select.stderr


def test_asha_stops_the_trials_that_score_below_the_best_and_runs_it_to_max_t(
    ray_address: str, tmp_path: Path
) -> None:
    """Weighted on similarity alone. On the tiny random models, training moves the generated
    images away from the references' CLIP embedding, so a trial with a vanishing learning rate
    keeps its baseline score and every trial that trains scores below it (asserted below, on
    the curves). Run one at a time, the frozen trial first: at the first rung each training
    trial is under the median of the scores recorded there, and ASHA stops it."""
    learning_rates = [1e-9, 1e-3]  # grid order: the frozen trial first
    spec = small_spec(
        tmp_path,
        methods={"lora": {"learning_rate": learning_rates}},
        grid={"num_images": [2], "max_steps": 8, "eval_every": 2},
        selection={"weights": {"similarity": 1.0}},
        launcher={
            "kind": "ray",
            "address": ray_address,
            "max_concurrent_trials": 1,
            "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
        },
    )
    path = write_spec(tmp_path, spec)
    run = dreamsweep("run", str(path), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 trained, 1 stopped early by the asha scheduler, 0 failed" in run.stdout

    runs = trial_runs(path)
    client = MlflowClient(tracking_uri=load_spec(path).tracking_uri)
    [frozen] = [r for name, r in runs.items() if "lr=1e-09" in name]
    baseline = client.get_metric_history(frozen.info.run_id, "similarity")
    assert sorted(m.step for m in baseline) == [0, 2, 4, 6, 8]  # ran to max_t
    assert TAG_EARLY_STOP_STEP not in frozen.data.tags
    for name, trained in runs.items():
        if trained is frozen:
            continue
        assert trained.info.status == "FINISHED"
        assert trained.data.tags[TAG_EARLY_STOP_STEP] == "2", name
        assert "asha" in trained.data.tags[TAG_EARLY_STOP_REASON]
        similarity = {
            m.step: m.value for m in client.get_metric_history(trained.info.run_id, "similarity")
        }
        assert sorted(similarity) == [0, 2]  # the curve ends where ASHA stopped it
        assert similarity[2] < next(m.value for m in baseline if m.step == 2)  # the premise
        assert steps_of(path, trained) == [1, 2]
    # `select` chooses among what was logged; the stopped trials count as done.
    select = dreamsweep("select", str(path), cwd=tmp_path)
    assert select.returncode == 0, select.stdout + select.stderr
    again = dreamsweep("run", str(path), cwd=tmp_path)
    assert "2 already done, 0 to run" in again.stdout, again.stdout


def kill_when_ready_glob(root: Path, pattern: str, cmdline_part: str) -> threading.Thread:
    """kill_when_ready on the first folder matching `root/*/pattern`. It kills only processes
    below this test process: the `ray_address` cluster's raylets are its children and start
    the trial actors, so no other Ray on the machine is touched."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = list(root.glob(f"*/{pattern}"))
            if found:
                kill_when_ready(found[0], cmdline_part, root_pid=os.getpid()).join()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_killed_trial_resumes_and_a_killed_driver_is_restored(
    ray_address: str, tmp_path: Path
) -> None:
    """Two trials, one at a time. SIGKILL to the first trial's Ray actor (its worker dies with
    it) once its step 4 is checkpointed: Tune retries it, and it resumes from that checkpoint
    into the same MLflow run. Then SIGKILL to the driver once the first trial finished and the
    second checkpointed step 4: a rerun restores the Tune experiment and finishes only the
    second, resumed from its checkpoint."""
    spec = small_spec(
        tmp_path,
        grid={"num_images": [2, 4], "max_steps": 12, "eval_every": 4},
        launcher={
            "kind": "ray",
            "address": ray_address,
            "max_concurrent_trials": 1,
            "max_failures": 1,
        },
    )
    path = write_spec(tmp_path, spec)
    output = load_spec(path).resolved_output_dir
    actor_killer = kill_when_ready_glob(
        output / "trials", "checkpoints/step_000004", "ray::ImplicitFunc"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "run", str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        # Kill the driver once the first trial finished and the second checkpointed step 4.
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "the sweep did not get far enough"
            # Trial folders appear once the driver has set up the store: read it from then on.
            runs = trial_runs(path) if (output / "trials").exists() else {}
            done = [r for r in runs.values() if r.info.status == "FINISHED"]
            if len(done) == 1:
                first_id = done[0].data.tags[TAG_TRIAL]
                checkpointed = (output / "trials").glob("*/checkpoints/step_000004")
                if any(first_id not in str(folder) for folder in checkpointed):
                    break
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    actor_killer.join()
    [first] = done
    # the first trial was killed once and resumed by Tune's retry
    assert int(first.data.tags["dreamsweep.resumed_from_step"]) >= 4
    assert steps_of(path, first, "similarity") == [0, 4, 8, 12]
    rerun = dreamsweep("run", str(path), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "2 trials, 1 already done, 1 to run" in rerun.stdout
    assert "Restoring the interrupted Ray Tune experiment" in rerun.stdout
    runs = trial_runs(path)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the rerun left the first trial alone
    unchanged = runs[first.info.run_name]
    assert unchanged.info.run_id == first.info.run_id
    assert (
        unchanged.data.tags["dreamsweep.resumed_from_step"]
        == (first.data.tags["dreamsweep.resumed_from_step"])
    )
    [second] = [r for name, r in runs.items() if name != first.info.run_name]
    assert int(second.data.tags["dreamsweep.resumed_from_step"]) >= 4
    for run in runs.values():
        assert steps_of(path, run) == list(range(1, 13))  # no gap, no duplicate
