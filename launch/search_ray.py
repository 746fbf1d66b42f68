"""A search on Ray: each group's study is a Ray Tune experiment driven by Tune's `OptunaSearch`.

Tune asks the searcher for each trial's sampled values and runs it with the spec's scheduler
(ASHA, median, FIFO) ranking the current weighted score (`score`), so the scheduler prunes and
the sampler learns from every trial it ran, stopped ones included: the searcher maximises the
trial's best score so far (`best_score`), the same objective as the other launchers'. The
searcher's study lives in the same storage as theirs (`search/optuna.journal`, or
`search.storage`), named as theirs (launch/search_study.py); Tune's concurrency limiter runs
`search.max_parallel` trials of a group at once. Each sampled trial is an ordinary trial: its
config built from the sampled values on the Ray worker (`search_trial`), run by the grid's
trainable code (`cluster.ray_trial.run_ray_trial`). A trial the scheduler stops is closed as
the grid's are (FINISHED, early-stop tags) and tagged `dreamsweep.pruned`. An interrupted
group's experiment (`runs/<name>/ray/<study>`) is restored by `Tuner.restore` on the next run.
"""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console

from contract.layout import TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_PRUNED
from contract.spec import RayLauncherSpec, SweepSpec
from contract.trial import TrialConfig
from launch.local import TrialOutcome
from launch.ray import TrialName, close_runs, make_scheduler
from launch.search import GroupOutcome, SearchOutcome, finish_search
from launch.search_study import (
    SearchGroup,
    log_best,
    make_sampler,
    optuna_distributions,
    sampled_trial,
    search_groups,
    storage_url,
)
from launch.sweep_run import prepare_sweep
from tracking.sweep import SweepTracking


def search_trial(
    config: dict[str, Any],
    *,
    spec: SweepSpec,
    base: str,
    parent_run_id: str,
    processes: int,
) -> None:
    """Tune's trainable of a sampled trial: `config` holds the sampled values by spec path."""
    from cluster.ray_trial import run_ray_trial

    trial = sampled_trial(spec, TrialConfig.model_validate_json(base), config)
    run_ray_trial(trial, parent_run_id, processes)


class SampledTrialName(TrialName):
    """Tune's name for a sampled trial: its label and id."""

    def __init__(self, spec: SweepSpec, base: TrialConfig) -> None:
        self.spec, self.base = spec, base

    def __call__(self, trial: object) -> str:
        sampled = sampled_trial(self.spec, self.base, trial.config)  # type: ignore[attr-defined]
        return f"{sampled.label.replace('/', '_')}-{sampled.trial_id}"


def run_search_ray(spec: SweepSpec, *, console: Console) -> SearchOutcome:
    """Run (or restore) each group's Tune experiment, one after another, and wait for it."""
    assert isinstance(spec.launcher, RayLauncherSpec) and spec.search.n_trials is not None
    groups = search_groups(spec)
    sweep_run = prepare_sweep(spec, planned_trials=len(groups) * spec.search.n_trials)
    tracking, parent_run_id = sweep_run.tracking, sweep_run.parent_run_id
    console.print(
        f"Search [bold]{spec.name}[/]: {len(groups)} group(s) × {spec.search.n_trials} "
        f"{spec.search.sampler} trials on Ray (OptunaSearch, {spec.launcher.scheduler.kind} "
        f"scheduler), studies in {storage_url(spec)}. MLflow: {spec.tracking_uri}"
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(
        address=spec.launcher.address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        tracking.client.update_run(parent_run_id, status="RUNNING")
        outcomes = [_run_group(spec, group, tracking, parent_run_id) for group in groups]
    finally:
        ray.shutdown()
    return finish_search(spec, tracking, parent_run_id, outcomes, console)


def samples_left(spec: SweepSpec, group: SearchGroup) -> int:
    """How many trials a new Tune experiment of the group samples: `n_trials` less those its
    study already ended (COMPLETE or PRUNED: by an earlier experiment whose folder is gone, or
    by another launcher). RUNNING ones are not counted (Tune cannot resume another process's
    Optuna trial), nor FAIL ones (they are replaced), so the study ends with `n_trials`."""
    import optuna

    from contract.spec.search import open_storage

    assert spec.search.n_trials is not None
    storage = open_storage(storage_url(spec))
    if group.study not in optuna.get_all_study_names(storage):
        return spec.search.n_trials
    study = optuna.load_study(study_name=group.study, storage=storage)
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return max(0, spec.search.n_trials - len(study.get_trials(deepcopy=False, states=ended)))


def _run_group(
    spec: SweepSpec, group: SearchGroup, tracking: SweepTracking, parent_run_id: str
) -> GroupOutcome:
    import optuna
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from cluster.ray_trial import BEST_SCORE, SCORE
    from contract.spec.search import open_storage

    launcher = spec.launcher
    assert isinstance(launcher, RayLauncherSpec) and spec.search.n_trials is not None
    trainable = tune.with_resources(
        tune.with_parameters(
            search_trial,
            spec=spec,
            base=group.base.model_dump_json(),
            parent_run_id=parent_run_id,
            processes=launcher.processes_per_trial,
        ),
        {"cpu": launcher.cpus_per_trial, "gpu": launcher.gpus_per_trial},
    )
    path = spec.resolved_output_dir / "ray" / group.study
    restored = tune.Tuner.can_restore(str(path))
    left = samples_left(spec, group)
    if not restored and left == 0:  # its study is done: nothing to run, only its best to log
        study = optuna.load_study(study_name=group.study, storage=open_storage(storage_url(spec)))
        outcome = GroupOutcome(group)
        outcome.best = log_best(spec, tracking, parent_run_id, group, study)
        ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        outcome.ended = len(study.get_trials(deepcopy=False, states=ended))
        return outcome
    if restored:
        tuner = tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        searcher = OptunaSearch(
            space=optuna_distributions(group.space),
            metric=BEST_SCORE,
            mode="max",
            sampler=make_sampler(spec.search, seed=spec.search.seed),
            study_name=group.study,
            storage=open_storage(storage_url(spec)),
        )
        name = SampledTrialName(spec, group.base)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_parallel),
                scheduler=make_scheduler(launcher, spec, metric=SCORE, mode="max"),
                num_samples=left,  # a study re-attached by name keeps what it holds
                reuse_actors=False,  # a stopped trial's actor must end, so its worker ends too
                trial_name_creator=name,
                trial_dirname_creator=name,
            ),
            run_config=tune.RunConfig(
                name=group.study,
                storage_path=str(path.parent),
                failure_config=tune.FailureConfig(max_failures=launcher.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=launcher.keep_checkpoints),
                verbose=1,
            ),
        )
    results = tuner.fit()
    trials = [sampled_trial(spec, group.base, result.config) for result in results]
    ray_outcome = close_runs(
        spec,
        tracking,
        parent_run_id,
        results,
        trials,
        [],
        restored,
        trial_id_of=lambda result: sampled_trial(spec, group.base, result.config).trial_id,
    )
    storage = open_storage(storage_url(spec))
    study = optuna.load_study(study_name=group.study, storage=storage)
    numbers = {sampled_trial(spec, group.base, t.params).trial_id: t.number for t in study.trials}
    runs = tracking.trial_runs(parent_run_id)
    outcome = GroupOutcome(group, trials=trials)
    for trial in trials:
        number = numbers.get(trial.trial_id)
        if trial.trial_id in ray_outcome.failed:
            error = ray_outcome.failed[trial.trial_id]
            outcome.failed.append(TrialOutcome(trial, 1, trial.output_dir / "worker.log", [error]))
        run = runs.get(trial.trial_id)
        if run is None:
            continue
        tags = {TAG_OPTUNA_STUDY: group.study, TAG_OPTUNA_TRIAL: str(number)}
        if trial.trial_id in ray_outcome.stopped:
            tags[TAG_PRUNED] = str(ray_outcome.stopped[trial.trial_id])
        for key, value in tags.items():
            tracking.client.set_tag(run.info.run_id, key, value)
    outcome.best = log_best(spec, tracking, parent_run_id, group, study)
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    outcome.ended = len(study.get_trials(deepcopy=False, states=ended))
    return outcome
