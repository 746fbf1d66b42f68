"""An inference study on SLURM: its unfinished shards as one job array, waited for by the driver.

Each array task runs the shard's worker command (`launch.inference.shard_command`, through
submitit's `CommandFunction`) on a node that shares the study folder. The jobs go to
`<output_dir>/slurm/jobs.json` (shard folder name → job, the training launcher's record), so
`dreamsweep status`/`cancel` and a later `dreamsweep run` find them: a rerun waits for a shard
whose job SLURM still holds instead of submitting it again, and a shard's worker claims it
(`cluster.claims`), so two submissions never generate it twice. `dreamsweep run` stays in the
foreground until SLURM holds none of the study's jobs, then `finish_study` logs what is done;
a driver killed meanwhile loses nothing: the next `dreamsweep run` waits and finishes. A job's
end is read as the training launcher's are: `squeue` while SLURM holds it, then submitit's
result file (clusters without accounting have no `sacct`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console

from launch.inference import Study, shard_command, shard_is_done
from launch.slurm import (
    job_record,
    queued_job_ids,
    read_jobs,
    slurm_executor,
    slurm_states,
    write_jobs,
)

if TYPE_CHECKING:
    from contract.inference import Shard

POLL_S = 2.0
"""How often the driver asks `squeue` whether the study's jobs still run."""


def run_shards_slurm(study: Study, console: Console) -> list[int]:
    """Submit the shards that are neither done nor held by a queued job, wait for every one of
    the study's jobs to leave SLURM; returns the indices of the shards whose job failed."""
    import submitit

    spec = study.spec
    pending = [s for s in study.shards if not shard_is_done(s)]
    if not pending:
        return []
    in_queue = queued_job_ids()
    # The training launcher's helpers read only the spec's name, launcher and output folder, and
    # a record's shard its label and output_dir: an inference spec and a Shard have them.
    jobs = read_jobs(spec)
    waiting: dict[int, Any] = {}
    for shard in pending:
        record = jobs.get(shard.label)
        if record is not None and record["job_id"] in in_queue:
            waiting[shard.index] = submitit.SlurmJob(record["submitit_folder"], record["job_id"])
            console.print(f"  {shard.label}: still job {record['job_id']}", markup=False)
    to_submit = [s for s in pending if s.index not in waiting]
    if to_submit:
        executor = slurm_executor(spec)
        with executor.batch():
            handles = [
                executor.submit(submitit.helpers.CommandFunction(shard_command(s.folder)))
                for s in to_submit
            ]
        for shard, job in zip(to_submit, handles, strict=True):
            jobs[shard.label] = job_record(shard, job)
            waiting[shard.index] = job
        write_jobs(spec, jobs)
        ids = ", ".join(job.job_id for job in handles)
        console.print(f"Submitted {len(to_submit)} shards as jobs {ids}", markup=False)
    console.print(
        f"Waiting for {len(waiting)} SLURM jobs (stop them with `dreamsweep cancel SPEC`); "
        f"logs: {spec.resolved_output_dir / 'slurm'}",
        markup=False,
    )
    by_index = {s.index: s for s in pending}
    return [i for i, job in sorted(waiting.items()) if not _ended_well(by_index[i], job, console)]


def _ended_well(shard: Shard, job: Any, console: Console) -> bool:
    """Wait until SLURM no longer holds the job; whether its result says it succeeded."""
    while slurm_states([job.job_id]):
        time.sleep(POLL_S)
    if not job.paths.result_pickle.exists():
        console.print(f"[red]✗ {shard.label}[/]: job {job.job_id} ended without a result")
        return False
    try:
        job.result()
    except Exception as err:  # submitit re-raises the task's error (its stderr's tail)
        console.print(f"[red]✗ {shard.label}[/]: job {job.job_id} failed:", str(err)[-2000:])
        return False
    return True
