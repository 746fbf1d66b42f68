"""How a scheduler's job tells its trial worker to checkpoint and stop, and how the worker says
it did (shared by the worker and the SLURM task, which must not import each other)."""

from __future__ import annotations

import signal

CHECKPOINT_SIGNAL = signal.SIGUSR1
"""Sent to the worker processes: checkpoint the current step, then exit with REQUEUE_EXIT."""
SCHEDULER_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
"""Either one asks the worker to checkpoint and stop: SIGUSR1 from the job's own task, SIGUSR2
straight from SLURM (submitit's `--signal=USR2@…` reaches every process of the job step)."""
REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped to be resumed, not failed

DIE_WITH_PARENT = "DREAMSWEEP_DIE_WITH_PARENT"
"""Set in a worker's environment when it must not outlive its parent (a Ray trial's actor,
which Tune ends to stop the trial; torchrun, for its ranks)."""


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent thread exits (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
