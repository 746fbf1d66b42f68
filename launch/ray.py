"""The Ray launcher: the grid as one Ray Tune experiment, waited for by `dreamsweep run`.

Each unfinished trial is one grid point (`tune.grid_search` over trial ids, the same trials the
other launchers run); `cluster.ray_trial.ray_trial` runs it and reports the weighted score at
every evaluated step, which the spec's scheduler ranks. MLflow is written from inside the trials
(child runs of the sweep's parent run, as with every launcher); the driver only closes the runs
of trials the scheduler stopped (their actor is ended mid-run) or that died without saying so.

Fault tolerance: `max_failures` retries a trial from its last checkpoint; Tune saves the
experiment's state under OUTPUT_DIR/ray/, and `dreamsweep run` on an interrupted sweep restores
it (unfinished and errored trials resume, finished ones stay).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console

from contract.layout import TAG_EARLY_STOP_REASON, TAG_EARLY_STOP_STEP
from contract.spec import RayLauncherSpec, SweepSpec
from contract.trial import TrialConfig
from launch.sweep_run import close_parent_run, prepare_sweep
from tracking.sweep import SweepTracking

if TYPE_CHECKING:  # Ray is imported only when a sweep runs on it
    from ray.tune import Result, ResultGrid
    from ray.tune.schedulers import TrialScheduler


@dataclass
class RaySweepOutcome:
    trials: list[TrialConfig]
    skipped: list[TrialConfig]
    """Already finished in MLflow before this run."""
    finished: list[str]
    """Trial ids that ran to their last step."""
    stopped: dict[str, int]
    """Trial id → the step at which the scheduler stopped it."""
    failed: dict[str, str]
    """Trial id → the error, after every retry."""
    not_run: dict[str, str]
    """Trial id → why this submission left it (another submission is training it)."""
    restored: bool
    """Whether an interrupted experiment was restored rather than started."""


class TrialName:
    """Tune's name for a trial: the trial's label and id (not Tune's counter)."""

    def __init__(self, trials: list[TrialConfig]) -> None:
        self.labels = {t.trial_id: t.label.replace("/", "_") for t in trials}

    def __call__(self, trial: object) -> str:
        trial_id = trial.config["trial_id"]  # type: ignore[attr-defined]
        return f"{self.labels.get(trial_id, 'trial')}-{trial_id}"


def experiment_name(spec: SweepSpec, trials: list[TrialConfig]) -> str:
    """Tune's experiment name: the sweep's name and a digest of its grid, so a changed grid
    starts a new experiment instead of restoring one that holds other trials."""
    digest = hashlib.sha256(" ".join(sorted(t.trial_id for t in trials)).encode()).hexdigest()
    return f"{spec.name}-{digest[:10]}"


def make_scheduler(launcher: RayLauncherSpec, spec: SweepSpec, **ranking: str) -> TrialScheduler:
    """The spec's Tune scheduler (ASHA, median stopping or FIFO) on the reported `step`;
    `ranking`: its own metric and mode, when Tune's config names none (a search, whose searcher
    ranks on another metric)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from cluster.ray_trial import STEP

    chosen = launcher.scheduler
    grace = getattr(chosen, "grace_period", None) or spec.grid.eval_every
    if chosen.kind == "asha":
        return ASHAScheduler(
            time_attr=STEP,
            max_t=chosen.max_t or spec.grid.max_steps,
            grace_period=grace,
            reduction_factor=chosen.reduction_factor,
            **ranking,
        )
    if chosen.kind == "median":
        return MedianStoppingRule(
            time_attr=STEP,
            grace_period=grace,
            min_samples_required=chosen.min_samples_required,
            **ranking,
        )
    return FIFOScheduler()


def run_ray(spec: SweepSpec, *, console: Console | None = None) -> RaySweepOutcome:
    """Run (or restore) the sweep's Tune experiment and wait for it."""
    assert isinstance(spec.launcher, RayLauncherSpec)
    launcher = spec.launcher
    console = console or Console()
    sweep_run = prepare_sweep(spec)
    trials, tracking, parent_run_id = sweep_run.trials, sweep_run.tracking, sweep_run.parent_run_id
    skipped, pending = sweep_run.done, sweep_run.pending
    console.print(
        f"Sweep [bold]{spec.name}[/]: {len(trials)} trials, {len(skipped)} already done, "
        f"{len(pending)} to run on Ray. MLflow: {spec.tracking_uri}"
    )
    if not pending:
        console.print("All trials are already done: nothing to train.")
        return RaySweepOutcome(trials, skipped, [], {}, {}, {}, restored=False)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline clusters; no phoning home
    import ray
    from ray import tune

    from cluster.ray_trial import SCORE, ray_trial

    ray.init(
        address=launcher.address,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        tracking.client.update_run(parent_run_id, status="RUNNING")
        trainable = tune.with_resources(
            tune.with_parameters(
                ray_trial,
                trials={t.trial_id: t.model_dump_json() for t in trials},
                parent_run_id=parent_run_id,
                processes=launcher.processes_per_trial,
            ),
            {"cpu": launcher.cpus_per_trial, "gpu": launcher.gpus_per_trial},
        )
        storage = spec.resolved_output_dir / "ray"
        name = experiment_name(spec, trials)
        restored = tune.Tuner.can_restore(str(storage / name))
        if restored:
            console.print(f"Restoring the interrupted Ray Tune experiment {storage / name}")
            tuner = tune.Tuner.restore(
                str(storage / name), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial_id": tune.grid_search([t.trial_id for t in pending])},
                tune_config=tune.TuneConfig(
                    metric=SCORE,
                    mode="max",
                    scheduler=make_scheduler(launcher, spec),
                    max_concurrent_trials=launcher.max_concurrent_trials,
                    # A stopped trial's actor must end, so its worker ends with it.
                    reuse_actors=False,
                    trial_name_creator=TrialName(trials),
                    trial_dirname_creator=TrialName(trials),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(storage),
                    failure_config=tune.FailureConfig(max_failures=launcher.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=launcher.keep_checkpoints),
                    verbose=1,
                ),
            )
        results = tuner.fit()
    finally:
        ray.shutdown()
    outcome = close_runs(spec, tracking, parent_run_id, results, trials, skipped, restored)
    close_parent_run(tracking, parent_run_id, trials, failed=bool(outcome.failed))
    console.print(
        f"Sweep [bold]{spec.name}[/]: {len(outcome.finished)} trained, "
        f"{len(outcome.stopped)} stopped early by the {launcher.scheduler.kind} scheduler, "
        f"{len(outcome.failed)} failed, {len(skipped)} skipped (already done), "
        f"{len(outcome.not_run)} left to another submission."
    )
    for trial_id, reason in outcome.not_run.items():
        console.print(f"- trial {trial_id} not run here: {reason}", markup=False)
    for trial_id, error in outcome.failed.items():
        console.print(f"[red]✗ trial {trial_id} failed[/]: {error}", markup=True)
    return outcome


def close_runs(
    spec: SweepSpec,
    tracking: SweepTracking,
    parent_run_id: str,
    results: ResultGrid,
    trials: list[TrialConfig],
    skipped: list[TrialConfig],
    restored: bool,
    trial_id_of: Callable[[Result], str] = lambda result: result.config["trial_id"],
) -> RaySweepOutcome:
    """Read each trial's end from Tune and make its MLflow run say it.

    A trial the scheduler stopped had its actor ended mid-run: its run is closed FINISHED with
    the early-stop tags (as the spec's own early stopping does), so `select` and `report` treat
    it like any trial that stopped early. A trial that failed for good is marked FAILED."""
    from cluster.ray_trial import NOT_RUN, STEP

    runs = tracking.trial_runs(parent_run_id)
    by_id = {t.trial_id: t for t in trials}
    finished, stopped, failed, not_run = [], {}, {}, {}
    for result in results:
        trial_id = trial_id_of(result)
        run = runs.get(trial_id)
        if NOT_RUN in (result.metrics or {}):
            not_run[trial_id] = result.metrics[NOT_RUN]
            continue
        if result.error is not None:
            failed[trial_id] = str(result.error).strip().splitlines()[-1]
            tracking.mark_failed(parent_run_id, trial_id, f"Ray Tune: {failed[trial_id]}")
            continue
        last_step = int((result.metrics or {}).get(STEP, 0))
        if run is None or run.info.status != "RUNNING":
            finished.append(trial_id)  # the worker closed its run (maybe stopping early itself)
            continue
        if last_step >= by_id[trial_id].max_steps:
            # Stopped on its last report (ASHA stops at max_t): everything was logged and
            # checkpointed, only the closing of the run was cut off.
            tracking.client.set_terminated(run.info.run_id, "FINISHED")
            finished.append(trial_id)
            continue
        reason = f"stopped by the {spec.launcher.scheduler.kind} scheduler (Ray Tune)"
        tracking.client.set_tag(run.info.run_id, TAG_EARLY_STOP_STEP, str(last_step))
        tracking.client.set_tag(run.info.run_id, TAG_EARLY_STOP_REASON, reason)
        tracking.client.set_terminated(run.info.run_id, "FINISHED")
        stopped[trial_id] = last_step
    return RaySweepOutcome(trials, skipped, finished, stopped, failed, not_run, restored)
