"""Bayesian search (`search.kind: optuna`): Optuna-sampled trials, run as ordinary trials.

**A sampled trial is an ordinary trial.** The driver asks the study, sets the sampled values at
their spec paths, validates that spec and expands it like any grid: the trial's id follows from
its resolved config (the same sample is the same trial), its folder, MLflow child run (tagged
with the study and trial number), checkpoints, `select`, registry and report are every trial's.
The objective is the trial's best weighted score (the selection weights and ranges), maximised;
the worker reports the score of each evaluated step to the study and stops where the pruner
says (cluster/optuna_trial.py). The driver tells the study each trial's end and logs each
group's best params and score to the sweep's parent run.

**Resume.** The studies live in `search/optuna.journal` in the sweep folder (Optuna's journal
file storage; `search.storage` for an RDB), one driver per study at a time (a file lock). A
rerun counts every trial the study holds toward `n_trials` (FAIL ones aside); trials it finds
RUNNING (their driver was killed, or their worker died before recording an error) are not
failed and re-asked but run again under their own number and params: the same config, so the
same trial id, resumed from its checkpoint into its MLflow run (or only told, when MLflow has
it finished): no Optuna trial or child run twice.
A trial is told from its MLflow run only once the run has ended: FINISHED (complete with its
score, or PRUNED; FAIL when it has no score) or FAILED with the worker's error (FAIL). A worker
that exits 0 while its run is still RUNNING (another submission holds the trial's claim) did not
run it: the driver waits and asks again. FAIL trials do not count toward `n_trials`, so the next
run samples their replacements. The sampler is seeded with `search.seed` plus the number of
trials the study already holds, so a fresh study samples the same configs with the same seed
(and `max_parallel: 1`), and a resumed one does not replay the draws of its first run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout
from mlflow.entities import Run
from rich.console import Console

from cluster.cpu_threads import thread_environment
from cluster.optuna_trial import StudyTrial
from contract.layout import TAG_ERROR, TAG_PRUNED
from contract.spec import SweepSpec
from contract.trial import TrialConfig
from launch.local import TrialOutcome, report_outcome, run_worker, trial_progress
from launch.search_study import (
    SearchGroup,
    log_best,
    open_study,
    optuna_distributions,
    run_score,
    sampled_trial,
    search_groups,
    storage_url,
)
from launch.sweep_run import close_parent_run, prepare_sweep
from tracking.sweep import SweepTracking

if TYPE_CHECKING:
    import optuna

CLAIMED_RETRY_S = 5.0
"""How long the driver waits before asking again for a trial another process holds."""

StartTrial = Callable[[TrialConfig, Path], "Future[TrialOutcome]"]
"""A launcher's way to run one sampled trial (its config, its Optuna trial's file)."""


@dataclass
class GroupOutcome:
    group: SearchGroup
    trials: list[TrialConfig] = field(default_factory=list)
    """The sampled trials this run told the study about (trained, pruned, or found done)."""
    failed: list[TrialOutcome] = field(default_factory=list)
    not_run: list[TrialOutcome] = field(default_factory=list)
    best: dict[str, Any] | None = None
    """The study's best trial: number, trial id, params, score."""
    skipped: str | None = None
    """Why this run left the group alone (another driver holds its study)."""
    ended: int = 0
    """The study's trials that completed or were pruned, this run or before."""


@dataclass
class SearchOutcome:
    groups: list[GroupOutcome]

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for g in self.groups for o in g.failed]


def _tell(study: optuna.Study, number: int, run: Run, score: float | None) -> bool:
    """Tell the study the end of a trial from its run; False while the run has not ended.

    FINISHED: pruned (its tag), complete with its score, or failed when it has no score (told
    FAIL, not asked again forever). FAILED with the worker's error (`dreamsweep.error`): FAIL,
    so it stops holding the study and the next run samples a replacement. Anything else
    (RUNNING: a worker still training it, or one killed with its driver) is not an end."""
    from optuna.trial import TrialState

    if run.info.status == "FINISHED":
        if TAG_PRUNED in run.data.tags:
            study.tell(number, state=TrialState.PRUNED)
        elif score is not None:
            study.tell(number, score)
        else:
            study.tell(number, state=TrialState.FAIL)
    elif run.info.status == "FAILED" and TAG_ERROR in run.data.tags:
        study.tell(number, state=TrialState.FAIL)
    else:
        return False
    return True


def drive_study(
    spec: SweepSpec,
    group: SearchGroup,
    tracking: SweepTracking,
    parent_run_id: str,
    start: StartTrial,
    on_outcome: Callable[[TrialOutcome], None],
) -> GroupOutcome:
    """Ask, run and tell the group's trials until its study holds `n_trials` finished ones."""
    from optuna.trial import TrialState

    outcome = GroupOutcome(group)
    lock_file = spec.resolved_output_dir / "search" / f"{group.study}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(lock_file, timeout=0)
        lock.acquire()
    except Timeout:
        outcome.skipped = "another driver of this sweep is running its study"
        return outcome
    try:
        study = open_study(spec, group)
        distributions = optuna_distributions(group.space)
        held = study.get_trials(deepcopy=False)
        # RUNNING ones were left by a killed driver or a failed worker: run them again as
        # themselves (same params, same trial id), never re-asked.
        queue = [(t.number, t.params) for t in held if t.state == TrialState.RUNNING]
        assert spec.search.n_trials is not None
        # Failed trials do not count: the budget samples their replacements (on the next run,
        # so a trial that cannot run fails a bounded number of times, not forever).
        budget = spec.search.n_trials - sum(t.state != TrialState.FAIL for t in held)
        waiting: list[tuple[int, dict[str, Any]]] = []
        inflight: dict[Future[TrialOutcome], tuple[int, TrialConfig]] = {}
        while queue or budget > 0 or inflight:
            while len(inflight) < spec.search.max_parallel and (queue or budget > 0):
                if queue:
                    number, params = queue.pop(0)
                    trial = sampled_trial(spec, group.base, params)
                else:
                    asked = study.ask(distributions)
                    number, params, budget = asked.number, asked.params, budget - 1
                    trial = sampled_trial(spec, group.base, params)
                    asked.set_user_attr("trial_id", trial.trial_id)  # for the report
                if trial.trial_id in {t.trial_id for _, t in inflight.values()}:
                    waiting.append((number, params))  # sampled again: told once it ends
                    continue
                run = tracking.trial_runs(parent_run_id).get(trial.trial_id)
                if run is not None and run.info.status == "FINISHED":
                    _tell(study, number, run, run_score(tracking, run, trial))
                    outcome.trials.append(trial)
                    continue
                study_trial = StudyTrial(
                    storage=storage_url(spec),
                    study=group.study,
                    number=number,
                    pruner=spec.search.pruner.model_dump(),
                    eval_every=trial.eval_every,
                    max_steps=trial.max_steps,
                )
                inflight[start(trial, study_trial.write(trial.output_dir))] = (number, trial)
            if not inflight:
                break
            done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for future in done:
                number, trial = inflight.pop(future)
                ended = future.result()
                on_outcome(ended)
                queue, waiting = waiting + queue, []
                run = tracking.trial_runs(parent_run_id).get(trial.trial_id)
                told = run is not None and _tell(
                    study, number, run, run_score(tracking, run, trial)
                )
                if ended.returncode != 0:
                    # Told FAIL when its run FAILED; left RUNNING (resumed by the next run)
                    # when the worker died before saying so.
                    outcome.failed.append(ended)
                    continue
                if not told and ended.not_run is None:
                    # Exit 0 without an ended run: the trial's claim is held elsewhere (a SLURM
                    # job returns 0 when another submission trains it).
                    ended.not_run = "its run has not finished: another process holds it"
                if not told:
                    # Held by a worker that outlived its driver (or by another submission):
                    # asked again until it ends, then told from its run like any other.
                    outcome.not_run.append(ended)
                    time.sleep(CLAIMED_RETRY_S)
                    queue.append((number, study.trials[number].params))
                    continue
                outcome.trials.append(trial)
        outcome.best = log_best(spec, tracking, parent_run_id, group, study)
        ended_states = (TrialState.COMPLETE, TrialState.PRUNED)
        outcome.ended = len(study.get_trials(deepcopy=False, states=ended_states))
    finally:
        lock.release()
    return outcome


@contextmanager
def local_trials(
    spec: SweepSpec, tracking: SweepTracking, parent_run_id: str, console: Console
) -> Iterator[tuple[StartTrial, Callable[[TrialOutcome], None]]]:
    """The local launcher's way to run sampled trials: its workers and progress bars."""
    processes = spec.launcher.processes_per_trial
    threads = thread_environment(spec.search.max_parallel * processes)
    with (
        trial_progress(console) as progress,
        ThreadPoolExecutor(max_workers=spec.search.max_parallel) as pool,
    ):

        def start(trial: TrialConfig, optuna_trial: Path) -> Future[TrialOutcome]:
            task = progress.add_task(
                trial.label, total=trial.max_steps, loss="-", start=False, visible=False
            )
            return pool.submit(
                run_worker,
                trial,
                tracking,
                parent_run_id,
                processes,
                threads,
                progress,
                task,
                optuna_trial=optuna_trial,
            )

        def on_outcome(outcome: TrialOutcome) -> None:
            if outcome.returncode != 0:
                tracking.mark_failed(
                    parent_run_id,
                    outcome.trial.trial_id,
                    f"worker exited with status {outcome.returncode}; log: {outcome.log}",
                )
            report_outcome(progress.console, outcome)

        yield start, on_outcome


def run_search(spec: SweepSpec, *, console: Console | None = None) -> SearchOutcome:
    """Run every group's study (groups one after another, up to `search.max_parallel` trials
    of a group at once) on the spec's launcher: here, or as SLURM jobs the driver waits for
    (Ray runs its own search: launch/search_ray.py)."""
    console = console or Console()
    if spec.launcher.kind == "ray":
        from launch.search_ray import run_search_ray

        return run_search_ray(spec, console=console)
    groups = search_groups(spec)
    assert spec.search.n_trials is not None
    planned = len(groups) * spec.search.n_trials
    sweep_run = prepare_sweep(spec, planned_trials=planned)
    tracking, parent_run_id = sweep_run.tracking, sweep_run.parent_run_id
    console.print(
        f"Search [bold]{spec.name}[/]: {len(groups)} group(s) × {spec.search.n_trials} "
        f"{spec.search.sampler} trials on the {spec.launcher.kind} launcher, studies in "
        f"{storage_url(spec)}. MLflow: {spec.tracking_uri}"
    )
    tracking.client.update_run(parent_run_id, status="RUNNING")
    trials = local_trials
    if spec.launcher.kind == "slurm":
        from launch.search_slurm import slurm_trials as trials
    outcomes = []
    with trials(spec, tracking, parent_run_id, console) as (start, on_outcome):
        for group in groups:
            outcomes.append(drive_study(spec, group, tracking, parent_run_id, start, on_outcome))
    return finish_search(spec, tracking, parent_run_id, outcomes, console)


def finish_search(
    spec: SweepSpec,
    tracking: SweepTracking,
    parent_run_id: str,
    outcomes: list[GroupOutcome],
    console: Console,
) -> SearchOutcome:
    """Close the parent run once every study holds its n_trials (otherwise it stays RUNNING,
    for the next run), and print each group's line."""
    search = SearchOutcome(outcomes)
    told = [t for g in outcomes for t in g.trials]
    if search.failed or all(g.ended >= spec.search.n_trials for g in outcomes):
        close_parent_run(tracking, parent_run_id, told, failed=bool(search.failed))
    print_summary(console, search)
    return search


def print_summary(console: Console, search: SearchOutcome) -> None:
    """Each group's line: what this run told its study, and its best trial."""
    for group in search.groups:
        if group.skipped:
            console.print(f"- {group.group.study}: not run here: {group.skipped}", markup=False)
            continue
        best = group.best
        shown = (
            f"best trial {best['number']} ({best['trial_id']}): score {best['score']:.4f} "
            f"with {json.dumps(best['params'])}"
            if best
            else "no trial completed yet"
        )
        console.print(
            f"{group.group.study}: {len(group.trials)} told this run, {len(group.failed)} "
            f"failed; {shown}",
            markup=False,
        )
