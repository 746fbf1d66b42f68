"""A search on SLURM: the driver asks and tells here, each asked trial runs as a SLURM job.

`dreamsweep run` stays in the foreground for a search (the study needs each trial's end to ask
the next): every trial the driver asks (`search.max_parallel` at a time) is submitted with the
spec's SLURM fields, as the grid's array tasks are (`cluster.slurm.TrialTask`: the same worker,
claims, requeue on time limits, multi-node rendezvous), and recorded in `slurm/jobs.json`, so
`dreamsweep status` and `cancel` see it. Its worker reports to the study from its node (the
journal file in the sweep folder, on the file system every node shares, or `search.storage`).
A job's end is read as the grid's are: `squeue` while SLURM holds it (a requeued job waits
again), then submitit's result file, never `sacct` (clusters without accounting have none).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from cluster.worker import write_trial_json
from contract.spec import SlurmLauncherSpec, SweepSpec
from contract.trial import TrialConfig
from launch.local import TrialOutcome, report_outcome
from launch.slurm import job_record, read_jobs, slurm_executor, slurm_states, write_jobs
from tracking.sweep import SweepTracking

POLL_S = 2.0
"""How often the driver asks `squeue` whether a trial's job still runs."""


@contextmanager
def slurm_trials(
    spec: SweepSpec, tracking: SweepTracking, parent_run_id: str, console: Console
) -> Iterator[tuple[Callable[[TrialConfig, Path], Future[TrialOutcome]], Callable]]:
    """Run sampled trials as SLURM jobs: `start` submits one and returns its end, waited for
    in a thread of the driver."""
    from cluster.slurm import TrialTask

    launcher = spec.launcher
    assert isinstance(launcher, SlurmLauncherSpec)
    executor = slurm_executor(spec)

    def start(trial: TrialConfig, optuna_trial: Path) -> Future[TrialOutcome]:
        live = live_job(read_jobs(spec).get(trial.trial_id))
        if live is not None:
            # A job of an earlier driver still runs (or waits for) this trial: its end is this
            # trial's end. A new job would only find the trial claimed.
            console.print(f"  {trial.label}: still job {live.job_id}", markup=False)
            return pool.submit(_wait, trial, live)
        task = TrialTask(
            write_trial_json(trial), parent_run_id, launcher.processes_per_node, optuna_trial
        )
        job = executor.submit(task)
        jobs = read_jobs(spec)
        jobs[trial.trial_id] = job_record(trial, job)
        write_jobs(spec, jobs)
        console.print(f"  {trial.label}: job {job.job_id}", markup=False)
        return pool.submit(_wait, trial, job)

    def on_outcome(outcome: TrialOutcome) -> None:
        if outcome.returncode != 0:
            tracking.mark_failed(
                parent_run_id, outcome.trial.trial_id, "; ".join(outcome.log_tail)[-4000:]
            )
        report_outcome(console, outcome)

    with ThreadPoolExecutor(max_workers=spec.search.max_parallel) as pool:
        yield start, on_outcome


def live_job(record: dict[str, str] | None) -> object | None:
    """The job of a jobs.json record (`launch.slurm.job_record`) while SLURM still holds it."""
    import submitit

    if record is None or not slurm_states([record["job_id"]]):
        return None
    return submitit.SlurmJob(record["submitit_folder"], record["job_id"])


def _wait(trial: TrialConfig, job: object) -> TrialOutcome:
    """The job's end: once SLURM no longer holds it, its result file says how it went."""
    job_id = job.job_id  # type: ignore[attr-defined]
    while slurm_states([job_id]):
        time.sleep(POLL_S)
    log = trial.output_dir / "worker-node0.log"
    result = job.paths.result_pickle  # type: ignore[attr-defined]
    if not result.exists():
        return TrialOutcome(trial, 1, log, [f"SLURM job {job_id} ended without a result"])
    try:
        job.result()  # type: ignore[attr-defined]
    except Exception as err:
        return TrialOutcome(trial, 1, log, [f"SLURM job {job_id}: {err}"[-2000:]])
    return TrialOutcome(trial, 0, log, [])
