"""The same sweep submitted twice at once: each trial trains once, and the submission that did
not train a trial says so (its claim, `cluster.claims`, was held, or the trial was done)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_spec, start_dreamsweep, write_spec
from mlflow.tracking import MlflowClient

from cluster.claims import TrialClaimed, claim_trial
from contract.spec import load_spec
from launch.grid import expand_grid

pytestmark = pytest.mark.slow


def test_a_claim_is_exclusive_names_its_holder_and_ends_with_its_processes(tmp_path: Path) -> None:
    with claim_trial(tmp_path) as claim:
        with pytest.raises(TrialClaimed) as raised:
            with claim_trial(tmp_path):
                pass
        assert f"pid {os.getpid()}" in raised.value.holder
        # a child that inherits the claim keeps it after this process lets go
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"],
            stdin=subprocess.PIPE,
            pass_fds=(claim,),
        )
    with pytest.raises(TrialClaimed):
        with claim_trial(tmp_path):
            pass
    child.kill()  # a kill -9 leaves no stale claim behind
    child.wait()
    with claim_trial(tmp_path):
        pass


def test_the_same_sweep_submitted_twice_at_once_trains_each_trial_once(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, grid={"seed": [0, 1], "max_steps": 4, "eval_every": 2})
    path = write_spec(tmp_path, spec)
    trials = expand_grid(load_spec(path))
    submissions = [start_dreamsweep("run", str(path), cwd=tmp_path) for _ in range(2)]
    outputs = [s.communicate(timeout=600)[0] for s in submissions]
    assert [s.returncode for s in submissions] == [0, 0], outputs
    combined = "\n".join(outputs)
    for trial in trials:
        # trained by exactly one submission; the other one reported that it did not run it
        assert combined.count(f"{trial.label} finished ({trial.trial_id})") == 1, outputs
    left = sum(o.count("not run here") for o in outputs)
    done = sum(int(o.split(" skipped (already done)")[0].rsplit(", ", 1)[-1]) for o in outputs)
    assert left + done == len(trials), outputs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'small' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("small")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dreamsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("dreamsweep.role") == "trial"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"  # closed by the submission that ended last
    assert sorted(r.data.tags["dreamsweep.trial_id"] for r in children) == sorted(
        t.trial_id for t in trials
    )
    for run in children:
        assert run.info.status == "FINISHED"
        assert "dreamsweep.resumed_from_step" not in run.data.tags  # one uninterrupted run
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == [1, 2, 3, 4]
        similarity = [m.step for m in client.get_metric_history(run.info.run_id, "similarity")]
        assert sorted(similarity) == [0, 2, 4]
