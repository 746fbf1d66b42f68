"""The SLURM launcher: the sweep's unfinished trials as one job array, through submitit.

`dreamsweep run` submits and returns; the trials log to MLflow from the compute nodes. Job ids
are kept in `<output_dir>/slurm/jobs.json`, so `dreamsweep status` and `dreamsweep cancel` find
them. Job states come from `squeue` (queued, running) and trial outcomes from MLflow: clusters
without accounting have no `sacct`. With `launcher.pack` > 1 a pack of trials (contract/packs.py)
is one array task, and jobs.json records each member with its pack's job.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cluster.worker import write_pack, write_trial_json
from contract.packs import group_packs, pack_id
from contract.spec import SlurmLauncherSpec, SweepSpec
from contract.trial import TrialConfig
from launch.sweep_run import prepare_sweep

if TYPE_CHECKING:
    import submitit


def jobs_file(spec: SweepSpec) -> Path:
    return spec.resolved_output_dir / "slurm" / "jobs.json"


def job_record(trial: TrialConfig, job: submitit.Job) -> dict[str, str]:
    """What jobs.json keeps of a trial's job (a packed trial's: its pack's, and `pack`: the
    pack's id): `status` and `cancel` read it back."""
    return {
        "job_id": job.job_id,
        "label": trial.label,
        "output_dir": str(trial.output_dir),
        "submitit_folder": str(job.paths.folder),
    }


def write_jobs(spec: SweepSpec, jobs: dict[str, dict[str, str]]) -> None:
    """`slurm/jobs.json`, replaced atomically: trial id → its job, label and folders."""
    path = jobs_file(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".part")
    staging.write_text(json.dumps(jobs, indent=2), encoding="utf-8")
    staging.replace(path)


def slurm_executor(spec: SweepSpec) -> Any:
    """A submitit executor with the spec's SLURM fields; its pickles in `slurm/` (0700)."""
    import submitit

    launcher = spec.launcher
    assert isinstance(launcher, SlurmLauncherSpec)
    folder = spec.resolved_output_dir / "slurm"
    # submitit's pickles (the jobs the nodes unpickle and run) live here: this user's only.
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    executor = submitit.AutoExecutor(
        folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=launcher.max_requeues
    )
    executor.update_parameters(**submitit_parameters(launcher, name=f"dreamsweep-{spec.name}"))
    return executor


def submitit_parameters(launcher: SlurmLauncherSpec, *, name: str) -> dict[str, Any]:
    """The spec's SLURM fields as submitit AutoExecutor parameters (one task per node)."""
    parameters: dict[str, Any] = {
        "name": name,
        "timeout_min": launcher.time_min,
        "nodes": launcher.nodes,
        "tasks_per_node": 1,
        "cpus_per_task": launcher.cpus_per_task,
        "slurm_array_parallelism": launcher.array_parallelism,
        "slurm_signal_delay_s": launcher.signal_delay_s,
        "slurm_setup": list(launcher.setup),
        "slurm_additional_parameters": {
            **launcher.sbatch,
            ("requeue" if launcher.requeue else "no-requeue"): True,
        },
    }
    if launcher.gpus_per_node:
        parameters["gpus_per_node"] = launcher.gpus_per_node
    if launcher.mem_gb is not None:
        parameters["mem_gb"] = launcher.mem_gb
    for field in ("partition", "account", "qos"):
        value = getattr(launcher, field)
        if value is not None:
            parameters[f"slurm_{field}"] = value
    return parameters


@dataclass
class Submission:
    trials: list[TrialConfig]
    skipped: list[TrialConfig]
    """Already finished in MLflow."""
    active: list[TrialConfig]
    """Still queued or running from an earlier submission: not submitted again."""
    submitted: dict[str, str]
    """trial id → SLURM job id."""


def queued_job_ids() -> set[str]:
    """Job ids SLURM still holds (pending, running, requeued), array tasks as `<job>_<task>`."""
    listed = _slurm_command(["squeue", "--noheader", "--array", "--format=%i"])
    return {line.strip() for line in listed.splitlines() if line.strip()}


class SlurmError(RuntimeError):
    """SLURM cannot be reached from here (no client commands, or no controller answering)."""


def _slurm_command(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(
            f"`{command[0]}` is not installed here: run dreamsweep on a SLURM login node "
            '(or bring up a local cluster: eval "$(sudo cluster/dev_slurm.sh up)", which '
            "exports SLURM_CONF)"
        ) from None
    if done.returncode != 0:
        raise SlurmError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")
    return done.stdout


def read_jobs(spec: SweepSpec) -> dict[str, dict[str, str]]:
    path = jobs_file(spec)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def submit_slurm(spec: SweepSpec, *, console: Console | None = None) -> Submission:
    """Submit every trial that is neither finished nor still in SLURM's queue."""

    from cluster.slurm import PackTask, TrialTask

    console = console or Console()
    launcher = spec.launcher
    assert isinstance(launcher, SlurmLauncherSpec)
    in_queue = queued_job_ids()  # first: an unreachable SLURM fails before MLflow is touched
    sweep_run = prepare_sweep(spec)
    trials, tracking, parent_run_id = sweep_run.trials, sweep_run.tracking, sweep_run.parent_run_id
    skipped, pending = sweep_run.done, sweep_run.pending
    jobs = read_jobs(spec)
    active = [t for t in pending if jobs.get(t.trial_id, {}).get("job_id") in in_queue]
    to_submit = [t for t in pending if t not in active]
    console.print(
        f"Sweep [bold]{spec.name}[/]: {len(trials)} trials, {len(skipped)} already done, "
        f"{len(active)} still in SLURM, {len(to_submit)} to submit. MLflow: {spec.tracking_uri}"
    )
    submitted: dict[str, str] = {}
    if to_submit:
        executor = slurm_executor(spec)
        # One array task per unit: a trial alone (as without packing), or a pack of trials.
        units = group_packs(to_submit, launcher.pack)
        tasks = [
            TrialTask(write_trial_json(unit[0]), parent_run_id, launcher.processes_per_node)
            if len(unit) == 1
            else PackTask(write_pack(unit, spec.resolved_output_dir), parent_run_id)
            for unit in units
        ]
        with executor.batch():
            handles = [executor.submit(task) for task in tasks]
        for unit, job in zip(units, handles, strict=True):
            for trial in unit:  # each member with its pack's job: status and reruns read it
                submitted[trial.trial_id] = job.job_id
                jobs[trial.trial_id] = job_record(trial, job)
                if len(unit) > 1:
                    jobs[trial.trial_id]["pack"] = pack_id(unit)
        write_jobs(spec, jobs)
        tracking.client.update_run(parent_run_id, status="RUNNING")
        for unit in units:
            for trial in unit:
                packed = f"pack {pack_id(unit)}, " if len(unit) > 1 else ""
                console.print(
                    f"  {trial.label}: {packed}job {submitted[trial.trial_id]}", markup=False
                )
    console.print(
        f"Follow it with `dreamsweep status SPEC`; stop it with `dreamsweep cancel SPEC`. "
        f"Logs: {spec.resolved_output_dir / 'slurm'}",
        markup=False,
    )
    return Submission(trials, skipped, active, submitted)


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id → SLURM state, for the jobs SLURM still holds (queued, running, completing).

    All jobs are listed and filtered here: `squeue --jobs` fails outright when one id has left
    SLURM's memory. A failing squeue raises SlurmError rather than reading as "nothing held"."""
    if not job_ids:
        return {}
    listed = _slurm_command(["squeue", "--noheader", "--array", "--format=%i %T"])
    states = dict(line.split(maxsplit=1) for line in listed.splitlines() if line.strip())
    return {job: state for job, state in states.items() if job in job_ids}


def cancel_sweep(spec: SweepSpec) -> list[str]:
    """`scancel` every job of the sweep that SLURM still holds; returns their ids."""
    jobs = read_jobs(spec)
    held = queued_job_ids()
    ids = sorted({j["job_id"] for j in jobs.values() if j["job_id"] in held})
    if ids:
        subprocess.run(["scancel", *ids], check=True)
    return ids
