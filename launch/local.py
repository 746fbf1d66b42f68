"""The local launcher: each trial in its own worker process on this machine.

A worker is `python -m cluster.trial`, forked from a server that imported the worker's code once
(importing torch, diffusers and MLflow costs each fresh process about 6 s of CPU), or torchrun
with several processes per trial, so multi-GPU runs the same way. A crashing trial is reported
with the end of its log and the sweep goes on; finished trials found in MLflow are skipped, and
so are trials another submission of the same sweep is training (their claim, `cluster.claims`,
is held). With `launcher.pack` > 1 the LoRA and textual-inversion trials that can share a frozen
base model train K at a time in one worker (`python -m cluster.pack`, contract/packs.py); each
keeps its own bar, outcome, MLflow run and claim.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cluster.claims import TrialClaimed, claim_trial
from cluster.cpu_threads import thread_environment
from cluster.forked_worker import forked_worker
from cluster.pack import PACK_ENTRY, pack_arguments
from cluster.worker import (
    WORKER_LOG,
    read_output,
    started_worker,
    worker_arguments,
    worker_command,
    write_pack,
    write_trial_json,
)
from contract.packs import group_packs
from contract.spec import SweepSpec
from contract.trial import TrialConfig
from launch.sweep_run import close_parent_run, prepare_sweep
from tracking.journal import JOURNAL_FILE
from tracking.sweep import SweepTracking


@dataclass
class TrialOutcome:
    trial: TrialConfig
    returncode: int
    log: Path
    log_tail: list[str]
    not_run: str | None = None
    """Why this submission did not run the trial (another one holds it, or finished it)."""


@dataclass
class SweepOutcome:
    trials: list[TrialConfig]
    skipped: list[TrialConfig]
    outcomes: list[TrialOutcome]

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.returncode != 0]

    @property
    def not_run(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.not_run is not None]


def run_worker(
    trial: TrialConfig,
    tracking: SweepTracking,
    parent_run_id: str,
    processes: int,
    threads: dict[str, str],
    progress: Progress,
    task: TaskID,
    *,
    optuna_trial: Path | None = None,
) -> TrialOutcome:
    """Claim the trial and train it in a worker, unless it is finished or claimed elsewhere;
    `optuna_trial`: a sampled trial's Optuna trial file (launch/search.py)."""
    log_path = trial.output_dir / WORKER_LOG
    try:
        with claim_trial(trial.output_dir) as claim:
            # Claimed: nobody else trains it now, but another submission may have finished it
            # since this one listed the trials to run.
            if trial.trial_id in tracking.finished_trials(parent_run_id):
                return TrialOutcome(
                    trial, 0, log_path, [], not_run="finished by another submission"
                )
            return _train(
                trial, parent_run_id, processes, threads, progress, task, claim, optuna_trial
            )
    except TrialClaimed as claimed:
        return TrialOutcome(
            trial, 0, log_path, [], not_run=f"another submission is training it ({claimed.holder})"
        )


def _train(
    trial: TrialConfig,
    parent_run_id: str,
    processes: int,
    threads: dict[str, str],
    progress: Progress,
    task: TaskID,
    claim: int,
    optuna_trial: Path | None,
) -> TrialOutcome:
    trial_json = write_trial_json(trial)
    log_path = trial.output_dir / WORKER_LOG
    env = {**os.environ, **threads, "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        command = worker_command(trial_json, parent_run_id, processes, optuna_trial=optuna_trial)
        worker = started_worker(command, env, claim)
    else:
        arguments = worker_arguments(trial_json, parent_run_id, optuna_trial)
        worker = forked_worker(arguments, env, claim)

    on_event = trial_events(trial, progress, task)
    with open(log_path, "a", encoding="utf-8") as log:
        with worker as running:
            tail = read_output(running.output, log, on_event)
            returncode = running.wait()
    return TrialOutcome(trial, returncode, log_path, tail)


def trial_events(
    trial: TrialConfig, progress: Progress, task: TaskID
) -> Callable[[dict[str, Any]], None]:
    """What the trial's worker events do: move its bar, say what the launcher must know."""

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "start":
            progress.update(task, completed=event["start_step"], visible=True)
            progress.start_task(task)
        elif event["event"] == "step":
            progress.update(task, completed=event["step"], loss=f"{event['loss']:.4f}")
        elif event["event"] == "journal_pending":
            progress.console.print(
                f"  {trial.label}: the tracking server did not answer; "
                f"{event['writes']} MLflow write(s) wait in "
                f"{trial.output_dir / JOURNAL_FILE}: `dreamsweep sync` replays them",
                markup=False,
            )
        elif event["event"] == "early_stop":
            progress.update(task, completed=trial.max_steps, loss="stopped early")
            progress.console.print(
                f"  {trial.label}: stopped early at step {event['step']}: {event['reason']}",
                markup=False,
            )

    return on_event


def run_pack(
    pack: list[TrialConfig],
    tracking: SweepTracking,
    parent_run_id: str,
    threads: dict[str, str],
    progress: Progress,
    tasks: dict[str, TaskID],
    sweep_output_dir: Path,
) -> list[TrialOutcome]:
    """Claim every member of the pack and train those left in one worker: a member another
    submission holds or has finished is not run here (said in its outcome, as for a trial
    alone); a single member left trains alone. One outcome per member, in the pack's order."""
    outcomes: dict[str, TrialOutcome] = {}
    with contextlib.ExitStack() as held:
        claims: dict[str, int] = {}
        for trial in pack:
            try:
                claims[trial.trial_id] = held.enter_context(claim_trial(trial.output_dir))
            except TrialClaimed as claimed:
                outcomes[trial.trial_id] = TrialOutcome(
                    trial,
                    0,
                    trial.output_dir / WORKER_LOG,
                    [],
                    not_run=f"another submission is training it ({claimed.holder})",
                )
        # Claimed: nobody else trains them now, but another submission may have finished some.
        finished = tracking.finished_trials(parent_run_id) if claims else set()
        members = []
        for trial in pack:
            if trial.trial_id in finished and trial.trial_id in claims:
                outcomes[trial.trial_id] = TrialOutcome(
                    trial,
                    0,
                    trial.output_dir / WORKER_LOG,
                    [],
                    not_run="finished by another submission",
                )
            elif trial.trial_id in claims:
                members.append(trial)
        if len(members) == 1:
            [trial] = members
            claim, task = claims[trial.trial_id], tasks[trial.trial_id]
            outcomes[trial.trial_id] = _train(
                trial, parent_run_id, 1, threads, progress, task, claim, None
            )
        elif members:
            for outcome in _train_pack(
                members, parent_run_id, threads, progress, tasks, claims, sweep_output_dir
            ):
                outcomes[outcome.trial.trial_id] = outcome
    return [outcomes[t.trial_id] for t in pack]


def _train_pack(
    members: list[TrialConfig],
    parent_run_id: str,
    threads: dict[str, str],
    progress: Progress,
    tasks: dict[str, TaskID],
    claims: dict[str, int],
    sweep_output_dir: Path,
) -> list[TrialOutcome]:
    pack_json = write_pack(members, sweep_output_dir)
    log_path = pack_json.parent / WORKER_LOG
    env = {**os.environ, **threads, "PYTHONUNBUFFERED": "1"}
    handlers = {t.trial_id: trial_events(t, progress, tasks[t.trial_id]) for t in members}
    ended: set[str] = set()  # members whose run the worker closed: finished, or stopped early

    def on_event(event: dict[str, Any]) -> None:
        trial_id = event.get("trial_id")
        if trial_id not in handlers:
            return
        handlers[trial_id](event)
        if event["event"] == "finish":
            ended.add(trial_id)
            progress.update(tasks[trial_id], visible=False)  # it left the pack; others go on

    worker = forked_worker(
        pack_arguments(pack_json, parent_run_id),
        env,
        [claims[t.trial_id] for t in members],
        entry=PACK_ENTRY,
    )
    with open(log_path, "a", encoding="utf-8") as log:
        with worker as running:
            tail = read_output(running.output, log, on_event)
            returncode = running.wait()
    # A member that finished before the pack failed keeps its finished run and outcome.
    return [
        TrialOutcome(t, 0 if t.trial_id in ended else returncode, log_path, tail) for t in members
    ]


def run_local(spec: SweepSpec, *, console: Console | None = None) -> SweepOutcome:
    """Run every unfinished trial of the spec; returns what ran, what was skipped, what failed."""
    console = console or Console()
    sweep_run = prepare_sweep(spec)
    trials, tracking, parent_run_id = sweep_run.trials, sweep_run.tracking, sweep_run.parent_run_id
    skipped, pending = sweep_run.done, sweep_run.pending
    # Each unit is one worker: a trial alone, or a pack (`launcher.pack` > 1).
    units = group_packs(pending, spec.launcher.pack)
    packed = f" in {len(units)} workers (launcher.pack {spec.launcher.pack})"
    packed = packed if spec.launcher.pack > 1 else ""
    console.print(
        f"Sweep [bold]{spec.name}[/]: {len(trials)} trials, {len(skipped)} already done, "
        f"{len(pending)} to run{packed}. MLflow: {spec.tracking_uri}"
    )
    if not pending:
        console.print("All trials are already done: nothing to train.")
        return SweepOutcome(trials, skipped, [])

    tracking.client.update_run(parent_run_id, status="RUNNING")
    outcomes: list[TrialOutcome] = []
    with trial_progress(console) as progress:
        sweep_task = progress.add_task(f"sweep {spec.name}: trials", total=len(pending), loss="-")
        tasks = {
            t.trial_id: progress.add_task(
                t.label, total=t.max_steps, loss="-", start=False, visible=False
            )
            for t in pending
        }
        processes = spec.launcher.processes_per_trial
        parallel = min(spec.launcher.max_parallel, len(units))
        threads = thread_environment(parallel * processes)
        with ThreadPoolExecutor(max_workers=spec.launcher.max_parallel) as pool:
            futures = [
                pool.submit(
                    run_pack,
                    unit,
                    tracking,
                    parent_run_id,
                    threads,
                    progress,
                    tasks,
                    spec.resolved_output_dir,
                )
                if len(unit) > 1
                else pool.submit(
                    run_worker,
                    unit[0],
                    tracking,
                    parent_run_id,
                    processes,
                    threads,
                    progress,
                    tasks[unit[0].trial_id],
                )
                for unit in units
            ]
            for future in futures:
                result = future.result()
                for outcome in result if isinstance(result, list) else [result]:
                    outcomes.append(outcome)
                    if outcome.returncode != 0:
                        tracking.mark_failed(
                            parent_run_id,
                            outcome.trial.trial_id,
                            f"worker exited with status {outcome.returncode}; log: {outcome.log}",
                        )
                    progress.advance(sweep_task)
                    progress.update(tasks[outcome.trial.trial_id], visible=False)
                    report_outcome(progress.console, outcome)

    sweep = SweepOutcome(trials, skipped, outcomes)
    if not close_parent_run(tracking, parent_run_id, trials, failed=bool(sweep.failed)):
        console.print(
            "The tracking store did not answer: `dreamsweep sync` closes the sweep's run."
        )
    trained = len(outcomes) - len(sweep.failed) - len(sweep.not_run)
    console.print(
        f"Sweep [bold]{spec.name}[/]: {trained} trained, {len(sweep.failed)} failed, "
        f"{len(skipped)} skipped (already done), {len(sweep.not_run)} left to another submission."
    )
    return sweep


def trial_progress(console: Console) -> Progress:
    """The progress display: a bar per running trial (step, loss, ETA) and the sweep's."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console)


def report_outcome(console: Console, outcome: TrialOutcome) -> None:
    """One line per trial's end; a failed one with the end of its log."""
    label = outcome.trial.label
    if outcome.not_run is not None:
        console.print(f"- {label} not run here: {outcome.not_run}", markup=False)
        return
    if outcome.returncode == 0:
        console.print(f"[green]✓[/] {label} finished ({outcome.trial.trial_id})")
        return
    console.print(
        f"[red]✗ {label} failed[/] with exit status {outcome.returncode}; "
        f"log: {outcome.log}; its last lines:"
    )
    for line in outcome.log_tail:
        console.print(f"    {line}", markup=False, highlight=False)
