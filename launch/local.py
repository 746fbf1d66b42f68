"""The local launcher: each trial in its own worker process on this machine.

A worker is `python -m cluster.trial`, forked from a server that imported the worker's code once
(importing torch, diffusers and MLflow costs each fresh process about 6 s of CPU), or torchrun
with several processes per trial, so multi-GPU runs the same way. A crashing trial is reported
with the end of its log and the sweep goes on; finished trials found in MLflow are skipped, and
so are trials another submission of the same sweep is training (their claim, `cluster.claims`,
is held).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.reduction import DupFd
from pathlib import Path
from typing import Any

from filelock import FileLock
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

from cluster import events
from cluster.claims import TrialClaimed, claim_trial
from cluster.cpu_threads import thread_environment
from cluster.forked_worker import PRELOAD, run_forked
from contract.spec import SweepSpec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from tracking.journal import JOURNAL_FILE, unreachable
from tracking.sweep import SweepTracking

LOG_TAIL_LINES = 20


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


def worker_arguments(trial_json: Path, parent_run_id: str) -> list[str]:
    """`cluster.trial`'s arguments."""
    return [str(trial_json), "--parent-run-id", parent_run_id]


def worker_command(trial_json: Path, parent_run_id: str, processes: int) -> list[str]:
    """The worker's command line: one process, or `processes` data-parallel ones.

    Several processes start under torchrun, as `accelerate launch --multi_gpu` does; the
    worker's Accelerator reads the rendezvous from its environment (NCCL on GPUs, gloo on CPUs).
    """
    entry = ["-m", "cluster.trial", *worker_arguments(trial_json, parent_run_id)]
    if processes == 1:
        return [sys.executable, *entry]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, "--nproc_per_node", str(processes), *entry]


def write_trial_json(trial: TrialConfig) -> Path:
    """The trial's config, where its worker (on any machine that shares the folder) reads it."""
    trial.output_dir.mkdir(parents=True, exist_ok=True)
    trial_json = trial.output_dir / "trial.json"
    trial_json.write_text(trial.model_dump_json(indent=2), encoding="utf-8")
    return trial_json


def prepare_sweep(
    spec: SweepSpec,
) -> tuple[list[TrialConfig], SweepTracking, str, list[TrialConfig], list[TrialConfig]]:
    """Every launcher's start: the trials, the sweep's parent run, and which trials are done
    (FINISHED in MLflow) or still to run."""
    trials = expand_grid(spec)
    output_dir = spec.resolved_output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    # Two submissions at once must find (or create) the same parent run, not one each.
    with FileLock(output_dir / ".sweep.lock"):
        tracking = SweepTracking(
            spec.tracking_uri, spec.experiment_name, artifact_root=output_dir / "mlartifacts"
        )
        parent_run_id = tracking.parent_run(
            spec.name, params={"trials": str(len(trials)), "base_model": spec.base_model}
        )
    done = tracking.finished_trials(parent_run_id)
    skipped = [t for t in trials if t.trial_id in done]
    pending = [t for t in trials if t.trial_id not in done]
    return trials, tracking, parent_run_id, skipped, pending


def close_parent_run(
    tracking: SweepTracking, parent_run_id: str, trials: list[TrialConfig], *, failed: bool
) -> bool:
    """End the sweep's parent run: FAILED when a trial failed here, FINISHED when every trial is
    done; otherwise another submission is still training some, and it closes the run. Returns
    False when the tracking store cannot be reached (`dreamsweep sync` closes it later)."""
    try:
        if failed:
            tracking.client.set_terminated(parent_run_id, "FAILED")
        elif {t.trial_id for t in trials} <= tracking.finished_trials(parent_run_id):
            tracking.client.set_terminated(parent_run_id, "FINISHED")
    except Exception as err:
        if not unreachable(err):
            raise
        return False
    return True


def _run_worker(
    trial: TrialConfig,
    tracking: SweepTracking,
    parent_run_id: str,
    processes: int,
    threads: dict[str, str],
    progress: Progress,
    task: TaskID,
) -> TrialOutcome:
    log_path = trial.output_dir / "worker.log"
    try:
        with claim_trial(trial.output_dir) as claim:
            # Claimed: nobody else trains it now, but another submission may have finished it
            # since this one listed the trials to run.
            if trial.trial_id in tracking.finished_trials(parent_run_id):
                return TrialOutcome(
                    trial, 0, log_path, [], not_run="finished by another submission"
                )
            return _train(trial, parent_run_id, processes, threads, progress, task, claim)
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
) -> TrialOutcome:
    trial_json = write_trial_json(trial)
    log_path = trial.output_dir / "worker.log"
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    env = {**os.environ, **threads, "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        worker = _started_process(worker_command(trial_json, parent_run_id, processes), env, claim)
    else:
        worker = _forked_worker(worker_arguments(trial_json, parent_run_id), env, claim)
    with open(log_path, "a", encoding="utf-8") as log:
        with worker as (output, wait):
            for line in output:
                event = events.parse(line)
                if event is None:
                    log.write(line)
                    tail.append(line.rstrip("\n"))
                elif event["event"] == "start":
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
                        f"  {trial.label}: stopped early at step {event['step']}: "
                        f"{event['reason']}",
                        markup=False,
                    )
            returncode = wait()
    return TrialOutcome(trial, returncode, log_path, list(tail))


@contextmanager
def _started_process(
    command: list[str], env: dict[str, str], claim: int
) -> Iterator[tuple[Iterator[str], Callable[[], int]]]:
    """A worker as a process of its own (torchrun and its ranks): its output, and its wait."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        pass_fds=(claim,),  # the worker holds the claim too: it lasts while either lives
    ) as worker:
        assert worker.stdout is not None
        yield worker.stdout, worker.wait


_FORK_SERVER = multiprocessing.get_context("forkserver")
# Trials start and end on several threads, and multiprocessing's Process is not thread-safe:
# start() polls every other child, reading its exit status from the fork server's pipe once; a
# join of that child at the same moment then reads the pipe's end and reports status 255.
_FORK_SERVER_LOCK = threading.Lock()


class _PassedFd:
    """A file descriptor a forked worker receives (over the fork server's Unix socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _received_fd, (DupFd(self.fd),)


def _received_fd(passed: Any) -> int:
    return passed.detach()


@contextmanager
def _forked_worker(
    argv: list[str], env: dict[str, str], claim: int
) -> Iterator[tuple[Iterator[str], Callable[[], int]]]:
    """A single-process worker forked from the fork server: its output, and its wait. The
    server (multiprocessing's, one per launcher process) imports `PRELOAD` when it starts,
    so each trial skips the imports; the fork is a process like any other (killed, reaped and
    reported by its exit status as one)."""
    read_end, write_end = os.pipe()
    try:
        worker = _FORK_SERVER.Process(
            target=run_forked,
            args=(argv, env, _PassedFd(write_end), _PassedFd(claim)),
            name=f"trial {argv[0]}",
        )
        with _FORK_SERVER_LOCK:
            # Process-wide, and read when the server starts (at the first trial): set here
            # rather than on import, which would preload another user's fork server.
            _FORK_SERVER.set_forkserver_preload([PRELOAD])
            worker.start()
    finally:
        os.close(write_end)  # the worker holds the only write end: EOF when it exits

    def wait() -> int:
        multiprocessing.connection.wait([worker.sentinel])  # ended: its status is in the pipe
        with _FORK_SERVER_LOCK:
            worker.join()
        assert worker.exitcode is not None
        return worker.exitcode

    with open(read_end, encoding="utf-8", errors="replace") as output:
        try:
            yield output, wait
        finally:
            if worker.exitcode is None:  # the launcher is leaving early (an error, Ctrl-C)
                wait()


def run_local(spec: SweepSpec, *, console: Console | None = None) -> SweepOutcome:
    """Run every unfinished trial of the spec; returns what ran, what was skipped, what failed."""
    console = console or Console()
    trials, tracking, parent_run_id, skipped, pending = prepare_sweep(spec)
    console.print(
        f"Sweep [bold]{spec.name}[/]: {len(trials)} trials, {len(skipped)} already done, "
        f"{len(pending)} to run. MLflow: {spec.tracking_uri}"
    )
    if not pending:
        console.print("All trials are already done: nothing to train.")
        return SweepOutcome(trials, skipped, [])

    tracking.client.update_run(parent_run_id, status="RUNNING")
    outcomes: list[TrialOutcome] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        sweep_task = progress.add_task(f"sweep {spec.name}: trials", total=len(pending), loss="-")
        tasks = {
            t.trial_id: progress.add_task(
                t.label, total=t.max_steps, loss="-", start=False, visible=False
            )
            for t in pending
        }
        processes = spec.launcher.processes_per_trial
        parallel = min(spec.launcher.max_parallel, len(pending))
        threads = thread_environment(parallel * processes)
        with ThreadPoolExecutor(max_workers=spec.launcher.max_parallel) as pool:
            futures = [
                pool.submit(
                    _run_worker,
                    t,
                    tracking,
                    parent_run_id,
                    processes,
                    threads,
                    progress,
                    tasks[t.trial_id],
                )
                for t in pending
            ]
            for future in futures:
                outcome = future.result()
                outcomes.append(outcome)
                if outcome.returncode != 0:
                    tracking.mark_failed(
                        parent_run_id,
                        outcome.trial.trial_id,
                        f"worker exited with status {outcome.returncode}; log: {outcome.log}",
                    )
                progress.advance(sweep_task)
                progress.update(tasks[outcome.trial.trial_id], visible=False)
                _report(progress.console, outcome)

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


def _report(console: Console, outcome: TrialOutcome) -> None:
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
