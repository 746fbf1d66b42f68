"""Bayesian search (`search.kind: optuna`): the spec's checks, the driver's sampling, resume and
pruning, and (slow) the search quickstart run for real, killed and rerun.

The fast tests drive real Optuna studies (journal files) and a real MLflow store; only the
training is scripted: each trial's curve is a function of its sampled values, logged to its
MLflow child run as a worker would, so what the driver reads back is what it would read."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from conftest import REPO, descendants, dreamsweep, small_spec, start_dreamsweep, write_spec
from mlflow.tracking import MlflowClient
from test_ray import ray_address  # noqa: F401 (the 2-node Ray cluster fixture)
from test_slurm import slurm_cluster  # noqa: F401 (the dev SLURM cluster fixture)

from cluster.optuna_trial import PruningStopper, StudyTrial
from contract.layout import TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_PRUNED, TAG_TRIAL
from contract.spec import SelectionSpec, SpecError, load_spec, parse_spec
from contract.spec.search import open_storage
from contract.trial import TrialConfig
from launch.local import TrialOutcome
from launch.search import drive_study
from launch.search_study import open_study, sampled_trial, search_groups, storage_url
from launch.sweep_run import prepare_sweep
from selection.search_report import search_section

SPACE = {
    "methods.lora.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "methods.lora.rank": {"type": "int", "low": 2, "high": 8},
}
ONE_METRIC = {"weights": {"similarity": 1.0}, "ranges": {"similarity": [0.0, 1.0]}}


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the driver tests (creating one costs seconds); each test's sweep
    has its own name, so its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def search_spec(tmp_path: Path, *, store: str | None = None, **search: object) -> dict:
    tracking = {"tracking": {"uri": store}, "name": f"search-{tmp_path.name}"} if store else {}
    return small_spec(
        tmp_path,
        **tracking,
        methods={"lora": {}},
        eval={"metrics": ["similarity"]},
        selection=ONE_METRIC,
        search={"kind": "optuna", "n_trials": 4, "space": SPACE, **search},
    )


def problems_of(tmp_path: Path, spec: dict) -> list[str]:
    with pytest.raises(SpecError) as refused:
        parse_spec(spec, source="search.yaml", base_dir=tmp_path)
    return refused.value.problems


def test_bad_search_specs_are_refused_with_every_problem_at_once(tmp_path: Path) -> None:
    spec = search_spec(tmp_path)
    spec["search"] = {
        "kind": "optuna",  # and no n_trials
        "space": {
            "methods.lora.rank": {"type": "int", "low": 8, "high": 4},
            "train.adam_weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": True},
            "train.lr_scheduler": {"type": "categorical", "choices": []},
            "train.weight_decay": {"type": "float", "low": 0.0, "high": 0.1},
        },
    }
    problems = problems_of(tmp_path, spec)
    assert problems[:4] == [
        "search.n_trials: kind: optuna needs n_trials (trials per group)",
        "search.space.methods.lora.rank: low (8) must be below high (4)",
        "search.space.train.adam_weight_decay: log: true needs low > 0, got low 0",
        "search.space.train.lr_scheduler: categorical needs a non-empty list of choices",
    ]
    assert len(problems) == 5 and problems[4].startswith(
        "search.space.train.weight_decay: unknown field path; searchable: "
    )

    spec = search_spec(tmp_path)
    spec["methods"] = {"lora": {"learning_rate": [1e-4, 3e-4]}}  # a grid axis, and searched
    spec["search"]["space"] = {
        **SPACE,
        "methods.lora.lr": {"type": "float", "low": 1e-5, "high": 1e-3},
        "grid.num_images": {"type": "int", "low": 1, "high": 3},
        "train.gradient_accumulation_steps": {"type": "int", "low": 0, "high": 4},
        "grid.max_steps": {"type": "int", "low": 3, "high": 8},
    }
    problems = problems_of(tmp_path, spec)
    assert len(problems) == 5, problems
    grid_axis, unknown, fixed, accumulation, max_steps = problems
    assert grid_axis.startswith(
        "search.space.methods.lora.learning_rate: methods.lora.learning_rate is also a grid axis"
    )
    assert unknown.startswith("search.space.methods.lora.lr: unknown field path; searchable: ")
    assert "methods.lora.learning_rate, methods.lora.rank" in unknown
    assert "train.gradient_accumulation_steps" in unknown and "grid.max_steps" in unknown
    assert fixed.startswith("search.space.grid.num_images: grid.num_images is a fixed axis")
    assert accumulation == (
        "search.space.train.gradient_accumulation_steps: 0 is not a valid value here: "
        "Input should be greater than or equal to 1"
    )
    assert max_steps.startswith("search.space.grid.max_steps: 3 is not a valid value here: ")
    assert "eval_every (2) must divide max_steps (3)" in max_steps


def test_a_search_refuses_what_its_launcher_or_methods_cannot_use(tmp_path: Path) -> None:
    spec = search_spec(tmp_path, pruner="median")
    spec["methods"] = {"lora": {}, "textual_inversion": {}}
    spec["launcher"] = {"kind": "ray", "scheduler": {"kind": "asha"}}
    problems = problems_of(tmp_path, spec)
    assert len(problems) == 2, problems
    assert problems[0].startswith("search.pruner: 'median' is not used on the Ray launcher")
    assert problems[1].startswith(
        "search.space: nothing in it applies to ['methods.textual_inversion']"
    )


def test_a_grid_search_takes_no_optuna_fields(tmp_path: Path) -> None:
    spec = search_spec(tmp_path)
    spec["search"] = {"n_trials": 3}
    assert problems_of(tmp_path, spec) == [
        "search: ['n_trials'] apply to kind: optuna only (kind is 'grid')"
    ]


def test_the_search_quickstart_spec_is_valid() -> None:
    spec = load_spec(REPO / "configs" / "search_quickstart.yaml")
    assert spec.search.kind == "optuna" and spec.search.n_trials == 8
    assert spec.search.max_parallel == 2
    assert spec.search.space["methods.lora.learning_rate"].log
    assert spec.search.space["methods.lora.rank"].type == "int"


def scripted_score(trial: TrialConfig, step: int) -> float:
    """A curve that rises with the step, best near lr 1e-3 and rank 4."""
    closeness = math.exp(
        -((math.log10(trial.learning_rate) + 3) ** 2) - (trial.options.rank - 4) ** 2 / 8
    )
    return closeness * step / trial.max_steps


class ScriptedLauncher:
    """Runs a sampled trial as a worker would be seen from MLflow (its child run, its curve,
    FINISHED), without training; `crash_at`: the start (1-based) that raises, as a killed
    driver stops."""

    def __init__(self, tracking, parent_run_id: str, crash_at: int | None = None) -> None:
        self.tracking, self.parent_run_id, self.crash_at = tracking, parent_run_id, crash_at
        self.started: list[str] = []
        self.sampled: list[tuple[float, int]] = []
        self.pool = ThreadPoolExecutor(max_workers=4)

    def __call__(self, trial: TrialConfig, optuna_trial: Path) -> Future[TrialOutcome]:
        if self.crash_at is not None and len(self.started) + 1 == self.crash_at:
            raise KeyboardInterrupt("the driver is killed")
        self.started.append(trial.trial_id)
        self.sampled.append((trial.learning_rate, trial.options.rank))
        return self.pool.submit(self._run, trial, optuna_trial)

    def _run(self, trial: TrialConfig, optuna_trial: Path) -> TrialOutcome:
        client = self.tracking.client
        run_id = self.tracking.trial_run(self.parent_run_id, trial)
        study_trial = StudyTrial.read(optuna_trial)
        client.set_tag(run_id, TAG_OPTUNA_TRIAL, str(study_trial.number))
        client.set_tag(run_id, TAG_OPTUNA_STUDY, study_trial.study)
        for step in trial.eval_steps:
            client.log_metric(run_id, "similarity", scripted_score(trial, step), step=step)
        client.set_terminated(run_id, "FINISHED")
        return TrialOutcome(trial, 0, trial.output_dir / "worker.log", [])


def drive(spec_path: Path, crash_at: int | None = None) -> tuple[ScriptedLauncher, object]:
    spec = load_spec(spec_path)
    sweep = prepare_sweep(spec, planned_trials=spec.search.n_trials)
    launcher = ScriptedLauncher(sweep.tracking, sweep.parent_run_id, crash_at)
    (group,) = search_groups(spec)
    outcome = drive_study(
        spec, group, sweep.tracking, sweep.parent_run_id, launcher, lambda o: None
    )
    return launcher, outcome


def test_same_seed_fresh_runs_sample_the_same_trials(tmp_path: Path, shared_store: str) -> None:
    runs = {}
    for name, seed in (("first", 0), ("second", 0), ("other_seed", 1)):
        folder = tmp_path / name
        folder.mkdir()
        spec = search_spec(folder, store=shared_store, seed=seed)
        launcher, outcome = drive(write_spec(folder, spec))
        runs[name] = launcher.sampled
        assert len(set(launcher.started)) == len(set(launcher.sampled)) == 4  # all distinct
        assert outcome.best is not None and outcome.best["trial_id"] in launcher.started
    assert runs["first"] == runs["second"]
    assert runs["other_seed"] != runs["first"]


def test_a_killed_driver_s_study_is_continued_without_sampling_twice(
    tmp_path: Path, shared_store: str
) -> None:
    spec_path = write_spec(tmp_path, search_spec(tmp_path, store=shared_store, n_trials=5))
    with pytest.raises(KeyboardInterrupt):
        drive(spec_path, crash_at=3)  # trial 2 asked, never run: left RUNNING
    spec = load_spec(spec_path)
    (group,) = search_groups(spec)
    study = open_study(spec, group)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"]
    orphan = study.trials[2].params

    drive(spec_path)
    study = open_study(spec, group)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert study.trials[2].params == orphan  # run as itself, not re-asked
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 5
    assert sorted(int(r.data.tags[TAG_OPTUNA_TRIAL]) for r in runs) == [0, 1, 2, 3, 4]
    assert {t.user_attrs["trial_id"] for t in study.trials} == set(ids)
    best = max(study.trials, key=lambda t: t.value)
    parent = client.get_run(prepare_sweep(spec).parent_run_id)
    assert (
        parent.data.tags[f"dreamsweep.search.{group.study}.best.trial_id"]
        == best.user_attrs["trial_id"]
    )
    assert parent.data.metrics[f"search.{group.study}.best_score"] == pytest.approx(best.value)


def test_the_report_section_shows_each_study_s_history_importances_and_values(
    tmp_path: Path, shared_store: str
) -> None:
    spec_path = write_spec(tmp_path, search_spec(tmp_path, store=shared_store, n_trials=6))
    assert search_section(load_spec(spec_path), tmp_path / "before") == ""  # no study yet
    drive(spec_path)
    spec = load_spec(spec_path)
    (group,) = search_groups(spec)
    study = open_study(spec, group)
    section = search_section(spec, tmp_path / "report")
    assert section.startswith('<section id="search"><h2>Bayesian search</h2>')
    assert f"<h3>{group.study}</h3>" in section and "6 trials (6 complete" in section
    assert section.count("data:image/png;base64,") == 2
    best = study.best_trial
    assert f"best: trial {best.number} ({best.user_attrs['trial_id']})" in section
    with (tmp_path / "report" / "search" / f"{group.study}.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert [float(r["score"]) for r in rows] == pytest.approx([t.value for t in study.trials])
    best_so_far = [float(r["best_so_far"]) for r in rows]
    assert best_so_far == sorted(best_so_far) and best_so_far[-1] == pytest.approx(best.value)
    assert {r["trial_id"] for r in rows} == {t.user_attrs["trial_id"] for t in study.trials}
    assert [float(r["methods.lora.learning_rate"]) for r in rows] == pytest.approx(
        [t.params["methods.lora.learning_rate"] for t in study.trials]
    )
    # fANOVA over both sampled fields, in the page
    assert "<td>methods.lora.learning_rate</td>" in section
    assert "<td>methods.lora.rank</td>" in section
    assert (tmp_path / "report" / "search" / f"{group.study}-history.png").stat().st_size > 1000


def pruning_stopper(storage: str, pruner: dict, stops: list[int]) -> PruningStopper:
    """A new trial of the study and its worker's stopper, recording the steps it prunes at."""
    study = optuna.load_study(study_name="scripted", storage=open_storage(storage))
    study_trial = StudyTrial(storage, "scripted", study.ask().number, pruner, 2, max_steps=8)
    selection = SelectionSpec(**ONE_METRIC)
    return PruningStopper(study_trial, selection, ["similarity"], on_prune=stops.append)


def feed(stopper: PruningStopper, curve: list[float]) -> dict[int, str | None]:
    """The curve's evaluations (steps 0, 2, …) to the stopper, up to the one it stops at."""
    reasons = {}
    for step, value in zip(range(0, 2 * len(curve), 2), curve, strict=True):
        reasons[step] = stopper(step, {"similarity": value})
        if reasons[step] is not None:
            break
    return reasons


@pytest.mark.parametrize(
    ("pruner", "curve", "stopped_at"),
    [
        # median of the others at step 2: 0.4 (beaten), at step 4: 0.5 (not beaten by 0.45)
        ({"kind": "median", "n_startup_trials": 2}, [0.1, 0.45, 0.3, 0.9, 0.9], 4),
        # the median pruner waits out its warm-up steps
        ({"kind": "median", "n_warmup_steps": 6}, [0.1, 0.0, 0.0, 0.0, 0.0], 6),
        # better than the others everywhere: runs to its last step
        ({"kind": "median"}, [0.2, 0.6, 0.7, 0.8, 0.9], None),
        # successive halving, first rung at step 2 (min_resource), 1/3 go on: its 0.35 there
        # is not the best of [0.5, 0.3, 0.35]
        ({"kind": "successive_halving", "min_resource": 2}, [0.1, 0.35, 0.9, 0.9, 0.9], 2),
        # a low score at step 0 (the base model) never prunes
        ({"kind": "median", "n_startup_trials": 0}, [0.0, 0.9, 0.9, 0.9, 0.9], None),
    ],
)
def test_the_pruner_stops_scripted_curves_at_the_step_it_should(
    tmp_path: Path, pruner: dict, curve: list[float], stopped_at: int | None
) -> None:
    storage = str(tmp_path / "optuna.journal")
    optuna.create_study(study_name="scripted", storage=open_storage(storage), direction="maximize")
    pruner = {"kind": "none", **pruner}
    # Two trials before it, through the same pruner (successive halving keeps its rungs' scores
    # in the trials), each told as the driver would.
    for other in ([0.1, 0.5, 0.6, 0.7, 0.8], [0.1, 0.3, 0.4, 0.5, 0.6]):
        stopper = pruning_stopper(storage, pruner, [])
        reasons = feed(stopper, other)
        study = optuna.load_study(study_name="scripted", storage=open_storage(storage))
        number = stopper.study_trial.number
        if reasons[max(reasons)] is None:
            study.tell(number, max(other))
        else:
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
    stops: list[int] = []
    reasons = feed(pruning_stopper(storage, pruner, stops), curve)
    stopped = [step for step, reason in reasons.items() if reason is not None]
    assert stopped == ([] if stopped_at is None else [stopped_at])
    assert stops == stopped  # the tag's callback, at that step only
    if stopped_at is not None:
        expected = f"pruned by Optuna's {pruner['kind']} pruner at step {stopped_at}"
        assert expected in reasons[stopped_at]
    study = optuna.load_study(study_name="scripted", storage=open_storage(storage))
    assert study.trials[-1].intermediate_values == dict(zip(reasons, curve, strict=False))


@pytest.mark.slow
def test_a_pruned_trial_stops_at_its_evaluated_step_with_checkpoint_and_tag(
    tmp_path: Path,
) -> None:
    """A real trial in a study whose two earlier (scripted) trials scored 1.0 at every step:
    the median pruner, past its 3 warm-up steps, stops it at step 4 through the loop's
    early-stop path."""
    from rich.console import Console

    from launch.search import run_search
    from launch.search_study import optuna_distributions

    spec_dict = search_spec(
        tmp_path,
        n_trials=3,
        pruner={"kind": "median", "n_startup_trials": 2, "n_warmup_steps": 3},
    )
    spec_dict["grid"]["max_steps"] = 6
    spec = load_spec(write_spec(tmp_path, spec_dict))
    (group,) = search_groups(spec)
    study = open_study(spec, group)
    for learning_rate, rank in ((1e-3, 4), (2e-3, 6)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"methods.lora.learning_rate": learning_rate, "methods.lora.rank": rank},
                distributions=optuna_distributions(group.space),
                value=1.0,
                intermediate_values={step: 1.0 for step in (0, 2, 4, 6)},
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
    assert tags[TAG_PRUNED] == "4" and tags["dreamsweep.early_stop.step"] == "4"
    assert "pruned by Optuna's median pruner at step 4" in tags["dreamsweep.early_stop.reason"]
    assert tags[TAG_OPTUNA_STUDY] == group.study and tags[TAG_OPTUNA_TRIAL] == "2"
    assert "dreamsweep.checkpoint.step_000004" in tags
    assert "dreamsweep.checkpoint.step_000006" not in tags
    assert (trial.output_dir / "checkpoints" / "step_000004" / "COMPLETE").is_file()
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 4
    pruned = open_study(spec, group).trials[2]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [0, 2, 4]


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
    values, the parent has the best, and `select` and `report` work on them (the report with
    its search section)."""
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

    select = dreamsweep("select", relative, cwd=tmp_path)
    assert select.returncode == 0, select.stdout + select.stderr
    report = dreamsweep("report", relative, cwd=tmp_path)
    assert report.returncode == 0, report.stdout + report.stderr
    page = (spec.resolved_output_dir / "report" / "report.html").read_text(encoding="utf-8")
    assert '<section id="search">' in page and f"<h3>{group.study}</h3>" in page


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
    ray_address: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """Tune's OptunaSearch asks, ASHA ranks the current score; the searcher's study is the
    journal one the other launchers use, and each sampled trial is an ordinary child run."""
    from rich.console import Console

    from launch.search import run_search

    spec_dict = search_spec(tmp_path, n_trials=3, max_parallel=2)
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
    assert len(study.trials) == 3 and {t.state.name for t in study.trials} == {"COMPLETE"}
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags[TAG_TRIAL] for r in runs} == {
        sampled_trial(spec, group.base, t.params).trial_id for t in study.trials
    }
    assert sorted(int(r.data.tags[TAG_OPTUNA_TRIAL]) for r in runs) == [0, 1, 2]
    assert {r.data.tags[TAG_OPTUNA_STUDY] for r in runs} == {group.study}
    parent = client.get_run(prepare_sweep(spec).parent_run_id)
    best = study.best_trial
    best_id = sampled_trial(spec, group.base, best.params).trial_id
    assert parent.data.tags[f"dreamsweep.search.{group.study}.best.trial_id"] == best_id
    assert parent.info.status == "FINISHED"
