"""Bayesian search run for real (slow): a pruned trial, the search quickstart killed mid-study and
rerun, and the search on the SLURM dev cluster and on Ray."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
from conftest import REPO, descendants, dreamsweep, start_dreamsweep, write_spec
from mlflow.tracking import MlflowClient
from search_specs import search_spec

from contract.layout import TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_PRUNED, TAG_TRIAL
from contract.spec import load_spec
from contract.spec.search import open_storage
from launch.search_study import open_study, sampled_trial, search_groups, storage_url
from launch.sweep_run import prepare_sweep


@pytest.mark.slow
def test_a_pruned_trial_stops_at_its_evaluated_step_with_checkpoint_and_tag(
    tmp_path: Path,
) -> None:
    """A real trial in a study whose two earlier (scripted) trials scored 1.0 at every step:
    the median pruner, past its 1 warm-up step, stops it at step 2 through the loop's
    early-stop path."""
    from rich.console import Console

    from launch.search import run_search
    from launch.search_study import optuna_distributions

    spec_dict = search_spec(
        tmp_path,
        n_trials=3,
        pruner={"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
    )
    spec = load_spec(write_spec(tmp_path, spec_dict))
    (group,) = search_groups(spec)
    study = open_study(spec, group)
    for learning_rate, rank in ((1e-3, 4), (2e-3, 6)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"methods.lora.learning_rate": learning_rate, "methods.lora.rank": rank},
                distributions=optuna_distributions(group.space),
                value=1.0,
                intermediate_values={step: 1.0 for step in (0, 2, 4)},
            )
        )
    outcome = run_search(spec, console=Console(width=200, record=True))
    assert not outcome.failed, outcome.failed[0].log_tail
    (trial,) = outcome.groups[0].trials

    sweep = prepare_sweep(spec)
    client = sweep.tracking.client
    run = sweep.tracking.trial_runs(sweep.parent_run_id)[trial.trial_id]
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags[TAG_PRUNED] == "2" and tags["dreamsweep.early_stop.step"] == "2"
    assert "pruned by Optuna's median pruner at step 2" in tags["dreamsweep.early_stop.reason"]
    assert tags[TAG_OPTUNA_STUDY] == group.study and tags[TAG_OPTUNA_TRIAL] == "2"
    assert "dreamsweep.checkpoint.step_000002" in tags
    assert "dreamsweep.checkpoint.step_000004" not in tags
    assert (trial.output_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 2
    pruned = open_study(spec, group).trials[2]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [0, 2]


def study_states(journal: Path, study: str) -> list[str]:
    """The states of the study's trials, read from its journal while a driver writes it."""
    if not journal.exists():
        return []
    try:
        loaded = optuna.load_study(study_name=study, storage=open_storage(str(journal)))
    except KeyError:  # the driver has not created it yet
        return []
    return [t.state.name for t in loaded.get_trials(deepcopy=False)]


@pytest.mark.slow
def test_the_search_quickstart_killed_mid_study_and_rerun_ends_with_n_trials(
    tmp_path: Path,
) -> None:
    """configs/search_quickstart.yaml for real: the driver is killed (-9) once 3 trials are
    told and others run (its workers die of it, or finish on their own); the rerun finishes
    exactly the missing ones: 8 Optuna trials, 8 child runs with distinct ids and sampled
    values, and the parent has the best. (`select` and the report's search section on sampled
    trials: tests/test_search.py, in-process.)"""
    import signal
    import threading
    import time

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    relative = "configs/search_quickstart.yaml"
    spec = load_spec(tmp_path / relative)
    (group,) = search_groups(spec)
    journal = Path(storage_url(spec))

    driver = start_dreamsweep("run", relative, cwd=tmp_path)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(driver.stdout), daemon=True)
    reader.start()  # a full pipe would block the driver
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        states = study_states(journal, group.study)
        if len([s for s in states if s != "RUNNING"]) >= 3 and "RUNNING" in states:
            break
        time.sleep(0.5)
    assert driver.poll() is None, "".join(output)
    # The driver alone is killed; its workers are listed first (stopped, it starts none
    # meanwhile), so that whatever of them outlives the rerun is ended by the test.
    os.kill(driver.pid, signal.SIGSTOP)
    time.sleep(1)
    workers = descendants(driver.pid)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    left = study_states(journal, group.study)
    assert "RUNNING" in left and len(left) < 8, left
    try:
        rerun = dreamsweep("run", relative, cwd=tmp_path)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(study_name=group.study, storage=open_storage(str(journal)))
    assert len(study.trials) == 8
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 8
    assert {r.info.status for r in runs} == {"FINISHED"}
    sampled = {(r.data.params["learning_rate"], r.data.params["method.rank"]) for r in runs}
    assert len(sampled) == 8
    assert sorted(int(r.data.tags[TAG_OPTUNA_TRIAL]) for r in runs) == list(range(8))
    best = study.best_trial
    parent = client.get_run(prepare_sweep(spec).parent_run_id)
    assert parent.info.status == "FINISHED"
    tag = f"dreamsweep.search.{group.study}.best."
    assert parent.data.tags[tag + "trial_id"] == best.user_attrs["trial_id"]
    assert float(parent.data.tags[tag + "methods.lora.learning_rate"]) == pytest.approx(
        best.params["methods.lora.learning_rate"]
    )
    assert parent.data.metrics[f"search.{group.study}.best_score"] == pytest.approx(best.value)


@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_search_on_slurm_submits_each_asked_trial_as_a_job(tmp_path: Path) -> None:
    """The driver asks and tells, the asked trials run as SLURM jobs (2 at a time on the
    2-node dev cluster), each worker reporting to the study from its node."""
    spec_dict = search_spec(tmp_path, n_trials=2, max_parallel=2, pruner="median")
    spec_dict["launcher"] = {"kind": "slurm", "time_min": 30}
    spec_path = write_spec(tmp_path, spec_dict)
    done = dreamsweep("run", spec_path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    spec = load_spec(spec_path)
    (group,) = search_groups(spec)
    study = optuna.load_study(study_name=group.study, storage=open_storage(storage_url(spec)))
    assert len(study.trials) == 2
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert all(0 in t.intermediate_values for t in study.trials)  # reported from the nodes
    jobs = json.loads((spec.resolved_output_dir / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 2 and done.stdout.count(": job ") == 2
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert {r.data.tags[TAG_TRIAL] for r in runs} == set(jobs)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.tags[TAG_OPTUNA_TRIAL]) for r in runs) == [0, 1]
    for trial_id in jobs:
        assert (Path(jobs[trial_id]["output_dir"]) / "worker-node0.log").is_file()


@pytest.mark.slow
def test_a_search_on_ray_runs_through_optuna_search_with_asha(
    ray_address: str,
    tmp_path: Path,
) -> None:
    """Tune's OptunaSearch asks, ASHA ranks the current score; the searcher's study is the
    journal one the other launchers use, and each sampled trial is an ordinary child run."""
    from rich.console import Console

    from launch.search import run_search

    spec_dict = search_spec(tmp_path, n_trials=2, max_parallel=2)
    spec_dict["launcher"] = {
        "kind": "ray",
        "address": ray_address,
        "cpus_per_trial": 1,
        "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
    }
    spec = load_spec(write_spec(tmp_path, spec_dict))
    outcome = run_search(spec, console=Console(width=200))
    assert not outcome.failed, outcome.failed[0].log_tail
    (group,) = search_groups(spec)
    study = optuna.load_study(study_name=group.study, storage=open_storage(storage_url(spec)))
    assert len(study.trials) == 2 and {t.state.name for t in study.trials} == {"COMPLETE"}
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[TAG_TRIAL] for r in runs} == {
        sampled_trial(spec, group.base, t.params).trial_id for t in study.trials
    }
    assert sorted(int(r.data.tags[TAG_OPTUNA_TRIAL]) for r in runs) == [0, 1]
    assert {r.data.tags[TAG_OPTUNA_STUDY] for r in runs} == {group.study}
    parent = client.get_run(prepare_sweep(spec).parent_run_id)
    best = study.best_trial
    best_id = sampled_trial(spec, group.base, best.params).trial_id
    assert parent.data.tags[f"dreamsweep.search.{group.study}.best.trial_id"] == best_id
    assert parent.info.status == "FINISHED"
