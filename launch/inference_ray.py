"""An inference study on Ray: each unfinished shard as one Ray task, waited for by the driver.

A task runs the shard's worker command (`launch.inference.shard_command`) on a node that shares
the study folder, with `launcher.cpus_per_trial` CPUs and `gpus_per_trial` GPUs, appending its
output to the shard's `shard.log`. Shards need no Tune scheduler (nothing is ranked or stopped
early) and resume from the images on disk, so plain tasks do: Ray retries a task whose node died
(`launcher.max_failures` times), and the worker's claim keeps two submissions from generating
the same shard. A task Ray still cannot run fails its shard (as a worker's exit status does);
an address with no cluster to join is an error naming `launcher.address`.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rich.console import Console

from contract.inference import SHARD_LOG
from contract.spec import RayLauncherSpec, SpecError
from launch.inference import Study, shard_command, shard_is_done

LOG_TAIL_LINES = 20


def run_shard_task(shard_dir: str) -> tuple[int, list[str]]:
    """One shard's worker, run where Ray placed the task: its exit status and last log lines."""
    folder = Path(shard_dir)
    log_path = folder / SHARD_LOG
    with open(log_path, "a", encoding="utf-8") as log:
        start = log.tell()
        returncode = subprocess.run(
            shard_command(folder),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        ).returncode
    with open(log_path, encoding="utf-8", errors="replace") as log:
        log.seek(start)
        tail = log.read().splitlines()[-LOG_TAIL_LINES:]
    return returncode, tail


def run_shards_ray(study: Study, console: Console) -> list[int]:
    """Every shard not done as a Ray task on `launcher.address`; the indices of failed ones."""
    launcher = study.spec.launcher
    assert isinstance(launcher, RayLauncherSpec)
    pending = [s for s in study.shards if not shard_is_done(s)]
    if not pending:
        return []
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline clusters; no phoning home
    import ray

    try:
        ray.init(
            address=launcher.address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
        )
    except Exception as err:  # ConnectionError, or ValueError/RuntimeError from Ray's lookup
        ray.shutdown()  # whatever the failed start left, so a later ray.init starts clean
        first_line = f"{type(err).__name__}: {err}".splitlines()[0]
        raise SpecError(
            "launcher.address",
            [
                f"{launcher.address!r}: no Ray cluster could be joined ({first_line}); start "
                "one (`ray start --head`) or give a running cluster's address (`auto` on one "
                "of its nodes, `host:6379`, `ray://host:10001`)"
            ],
        ) from err
    failed = []
    try:
        task = ray.remote(run_shard_task).options(
            num_cpus=launcher.cpus_per_trial,
            num_gpus=launcher.gpus_per_trial,
            max_retries=launcher.max_failures,
        )
        console.print(f"Running {len(pending)} shards as Ray tasks", markup=False)
        refs = [(shard, task.remote(str(shard.folder))) for shard in pending]
        # One shard at a time: a task Ray could not run (its node died past max_retries, the
        # cluster went away) fails that shard, as a worker's exit status does, not the study.
        for shard, ref in refs:
            try:
                returncode, tail = ray.get(ref)
            except Exception as err:
                returncode, tail = None, [f"Ray: {type(err).__name__}: {err}".splitlines()[0]]
            if returncode != 0:
                failed.append(shard.index)
                said = "Ray could not run it" if returncode is None else f"exit status {returncode}"
                console.print(
                    f"[red]✗ shard {shard.index} failed[/] ({said}); log: "
                    f"{shard.folder / SHARD_LOG}; its last lines:"
                )
                for line in tail:
                    console.print(f"    {line}", markup=False, highlight=False)
    finally:
        ray.shutdown()
    return failed
