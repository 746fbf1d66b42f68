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
