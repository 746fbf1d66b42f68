"""Bayesian search (`search.kind: optuna`): the spec's checks, the driver's sampling, resume and
pruning (the search run for real, on every launcher: test_search_launchers.py).

The tests drive real Optuna studies (journal files) and a real MLflow store; only the training
is scripted: each trial's curve is a function of its sampled values, logged to its MLflow child
run as a worker would, so what the driver reads back is what it would read."""

from __future__ import annotations

import csv
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
from conftest import REPO, write_spec
from mlflow.tracking import MlflowClient
from search_specs import ONE_METRIC, SPACE, search_spec

from cluster.optuna_trial import PruningStopper, StudyTrial
from cluster.ray_trial import tune_result
from contract.layout import TAG_ERROR, TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_PRUNED, TAG_TRIAL
from contract.spec import SelectionSpec, SpecError, load_spec, parse_spec
from contract.spec.kinds import load_any_spec, parse_any_spec
from contract.spec.search import open_storage
from contract.trial import TrialConfig
from launch.local import TrialOutcome
from launch.search import drive_study
from launch.search_study import open_study, run_score, search_groups
from launch.status import sweep_status
from launch.sweep_run import prepare_sweep
from selection.search_report import search_section
from selection.select import select_sweep


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow store for the driver tests (creating one costs seconds); each test's sweep
    has its own name, so its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


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


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_s_resolved_spec_loads_back(config: Path) -> None:
    """What `dreamsweep validate` prints (the resolved spec, every field set) is a valid spec."""
    spec = load_any_spec(config, check_files=False)  # a sweep or an inference study
    resolved = spec.model_dump(mode="json")
    again = parse_any_spec(
        resolved, source=f"{config.name} resolved", base_dir=config.parent, check_files=False
    )
    assert again.model_dump(mode="json") == resolved


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
    # `select` reads the sampled trials as any others (scripted: no checkpoint to register)
    selection = select_sweep(spec)
    assert len({s.run_id for s in selection.trials}) == 6
    assert max(s.best_score for s in selection.trials) == pytest.approx(best.value)


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


def test_status_lists_the_sampled_trials_not_the_grid_s_base_trials(
    tmp_path: Path, shared_store: str
) -> None:
    """A search never runs its grid's trials: `status` lists the sampled ones (a pruned one as
    PRUNED@<step>) and one row for a group whose study has not started."""
    spec_dict = search_spec(tmp_path, store=shared_store, n_trials=2)
    spec_dict["grid"]["seed"] = [0, 1]  # two groups; only the first is driven
    spec = load_spec(write_spec(tmp_path, spec_dict))
    sweep = prepare_sweep(spec, planned_trials=4)
    launcher = ScriptedLauncher(sweep.tracking, sweep.parent_run_id)
    first, second = search_groups(spec)
    drive_study(spec, first, sweep.tracking, sweep.parent_run_id, launcher, lambda o: None)
    pruned = sweep.tracking.trial_runs(sweep.parent_run_id)[launcher.started[0]]
    sweep.tracking.client.set_tag(pruned.info.run_id, TAG_PRUNED, "2")  # as the worker tags it

    rows = {row.trial_id: row for row in sweep_status(spec).trials}
    assert set(rows) == {*launcher.started, second.study}
    assert first.base.trial_id not in rows and second.base.trial_id not in rows
    assert [rows[t].state for t in launcher.started] == ["PRUNED@2", "FINISHED"]
    assert rows[second.study].state == "NOT STARTED (study)"
    assert rows[second.study].label == second.base.label


def test_the_objective_is_the_best_trained_step_not_the_base_model(
    tmp_path: Path, shared_store: str
) -> None:
    """Step 0 is the untrained base model, the same for every trial of a group: a curve whose
    step 0 is highest is told its best after step 0, by the driver (read from MLflow) and on
    Ray (the `best_score` Tune's OptunaSearch gets)."""
    spec = load_spec(write_spec(tmp_path, search_spec(tmp_path, store=shared_store)))
    sweep = prepare_sweep(spec, planned_trials=1)
    (group,) = search_groups(spec)
    trial = group.base
    assert trial.eval_steps == [0, 2, 4]
    curve = {0: 0.9, 2: 0.5, 4: 0.3}
    run_id = sweep.tracking.trial_run(sweep.parent_run_id, trial)
    for step, value in curve.items():
        sweep.tracking.client.log_metric(run_id, "similarity", value, step=step)
    run = sweep.tracking.client.get_run(run_id)
    assert run_score(sweep.tracking, run, trial) == pytest.approx(0.5)

    best, reported = None, []
    for step, value in curve.items():
        result, best = tune_result(trial, step, {"similarity": value}, best)
        reported += [result["step"], result["score"], result["best_score"]]
    # step 0's score stands in for best_score until a trained step is scored (Tune wants the
    # searcher's metric in every result); the score curve the schedulers rank is unchanged
    assert reported == pytest.approx([0, 0.9, 0.9, 2, 0.5, 0.5, 4, 0.3, 0.5])


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


class UnendedRunsLauncher(ScriptedLauncher):
    """A ScriptedLauncher whose first start of each trial sees the trial as a worker that did
    not run it sees it: another submission holds its claim and is still training (its run
    RUNNING with a partial curve) and the worker exits 0. The next start trains it."""

    def __init__(self, tracking, parent_run_id: str) -> None:
        super().__init__(tracking, parent_run_id)
        self.trials: dict[str, TrialConfig] = {}

    def _run(self, trial: TrialConfig, optuna_trial: Path) -> TrialOutcome:
        if trial.trial_id in self.trials:
            return super()._run(trial, optuna_trial)
        self.trials[trial.trial_id] = trial
        run_id = self.tracking.trial_run(self.parent_run_id, trial)
        step = trial.eval_steps[1]
        self.tracking.client.log_metric(
            run_id, "similarity", scripted_score(trial, step), step=step
        )
        return TrialOutcome(trial, 0, trial.output_dir / "worker.log", [])


def drive_with(launcher_class, spec_path: Path) -> tuple[ScriptedLauncher, object]:
    spec = load_spec(spec_path)
    sweep = prepare_sweep(spec, planned_trials=spec.search.n_trials)
    launcher = launcher_class(sweep.tracking, sweep.parent_run_id)
    (group,) = search_groups(spec)
    outcome = drive_study(
        spec, group, sweep.tracking, sweep.parent_run_id, launcher, lambda o: None
    )
    return launcher, outcome


def test_a_trial_whose_run_is_still_running_after_exit_0_is_run_again_not_told(
    tmp_path: Path, shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("launch.search.CLAIMED_RETRY_S", 0.0)
    spec_path = write_spec(tmp_path, search_spec(tmp_path, store=shared_store, n_trials=2))
    launcher, outcome = drive_with(UnendedRunsLauncher, spec_path)
    assert len(outcome.not_run) == 2 and len(launcher.started) == 4  # each started twice
    spec = load_spec(spec_path)
    study = open_study(spec, search_groups(spec)[0])
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for optuna_trial in study.trials:  # told the full curve's best, not the partial one's
        trial = launcher.trials[optuna_trial.user_attrs["trial_id"]]
        assert optuna_trial.value == pytest.approx(scripted_score(trial, trial.max_steps))


class FailingLauncher(ScriptedLauncher):
    """Its first trial's worker fails (run FAILED with the worker's error), its second is
    killed (exit 137, run left RUNNING, no error), its third finishes without a score; the
    rest train."""

    def _run(self, trial: TrialConfig, optuna_trial: Path) -> TrialOutcome:
        start = self.started.index(trial.trial_id)
        if start > 2 or self.started.count(trial.trial_id) > 1:
            return super()._run(trial, optuna_trial)
        client = self.tracking.client
        run_id = self.tracking.trial_run(self.parent_run_id, trial)
        if start == 0:
            client.set_tag(run_id, TAG_ERROR, "CUDA out of memory")
            client.set_terminated(run_id, "FAILED")
            return TrialOutcome(trial, 1, trial.output_dir / "worker.log", ["OOM"])
        if start == 1:
            return TrialOutcome(trial, 137, trial.output_dir / "worker.log", ["killed"])
        client.set_terminated(run_id, "FINISHED")  # no metric logged: no score
        return TrialOutcome(trial, 0, trial.output_dir / "worker.log", [])


def test_failed_and_scoreless_trials_are_told_fail_and_replaced_killed_ones_resumed(
    tmp_path: Path, shared_store: str
) -> None:
    spec_path = write_spec(tmp_path, search_spec(tmp_path, store=shared_store, n_trials=4))
    first, outcome = drive_with(FailingLauncher, spec_path)
    assert len(outcome.failed) == 2
    spec = load_spec(spec_path)
    (group,) = search_groups(spec)
    study = open_study(spec, group)
    assert [t.state.name for t in study.trials] == ["FAIL", "RUNNING", "FAIL", "COMPLETE"]

    second, _ = drive(spec_path)  # trains the killed one and two replacements
    assert second.started[0] == first.started[1]
    assert not {first.started[0], first.started[2]} & set(second.started)
    assert len(second.started) == 3
    study = open_study(spec, group)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL"] + ["COMPLETE"] * 3


def test_a_ray_experiment_re_attached_to_its_study_samples_only_the_missing_trials(
    tmp_path: Path,
) -> None:
    from launch.search_ray import samples_left

    spec = load_spec(write_spec(tmp_path, search_spec(tmp_path, n_trials=5)))
    (group,) = search_groups(spec)
    assert samples_left(spec, group) == 5  # no study yet
    study = open_study(spec, group)
    for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "COMPLETE"):
        number = study.ask().number
        if state == "COMPLETE":
            study.tell(number, 0.5)
        elif state != "RUNNING":
            study.tell(number, state=optuna.trial.TrialState[state])
    assert samples_left(spec, group) == 2  # three ended: COMPLETE, PRUNED, COMPLETE
    study.tell(study.ask().number, 0.7)
    study.tell(study.ask().number, 0.8)
    assert samples_left(spec, group) == 0
