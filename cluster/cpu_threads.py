"""CPU threads per worker process, so workers that share a machine do not oversubscribe it.

PyTorch sizes its intra-op pool to the whole machine in every process. Two trials side by side
on 2 cores then run 4 spinning OpenMP threads, and a CPU sweep takes about twice as long as with
one thread each (measured on the tiny quickstart). A user's own OMP_NUM_THREADS always wins.
"""

from __future__ import annotations

import os

# Inductor's compile pool (train.compile) is sized to the machine too.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS")


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, and inside a SLURM job no more than
    the CPUs SLURM gave the task (clusters without CPU binding, TaskPlugin=task/none, leave the
    mask at the whole node, which other jobs share)."""
    cores = len(os.sched_getaffinity(0))
    allocated = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    return min(cores, int(allocated)) if allocated else cores


def thread_environment(processes_sharing_cores: int, *, cores: int | None = None) -> dict[str, str]:
    """Variables to add to a worker's environment: an equal share of the cores per process.

    Empty when the user has set OMP_NUM_THREADS (their choice stands)."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    share = max(1, (cores or usable_cores()) // max(1, processes_sharing_cores))
    return dict.fromkeys(THREAD_VARIABLES, str(share))
