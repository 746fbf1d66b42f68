"""A trial's claim: however many times a sweep is submitted, one worker at a time trains a trial.

The claim is an exclusive `flock` on `<trial folder>/claim.lock`, taken by the process that starts
the trial's worker, before the worker starts, and inherited by the worker (`pass_fds`). The kernel
holds it while either process lives and drops it when both are gone, so a killed submission never
leaves a stale claim behind and a resubmission resumes the trial. The file names the holder, for
the submission that finds the trial taken and for `dreamsweep status` (`claim_holder`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLAIM_FILE = "claim.lock"


class TrialClaimed(RuntimeError):
    """Another process holds the trial's claim (it is training in another submission)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


@contextmanager
def claim_trial(folder: Path) -> Iterator[int]:
    """Hold the trial's claim for the duration; yields the lock's file descriptor, to pass to
    the worker so the claim lasts as long as it does. Raises `TrialClaimed` when taken."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CLAIM_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrialClaimed(path, path.read_text(encoding="utf-8").strip()) from None
        holder = (
            f"host {socket.gethostname()}, pid {os.getpid()}, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield fd
    finally:
        os.close(fd)


def claim_holder(folder: Path) -> str | None:
    """Who holds the trial's claim (the holder line `claim_trial` wrote), or None when no
    process does. Raises FileNotFoundError when `folder` itself does not exist here (on another
    machine's disk, say): whether a worker holds its claim cannot be told from here.

    Probed with a non-blocking shared flock, which sees the claim across the hosts of a shared
    filesystem as the claim itself does. The probe holds the lock for two system calls; a
    launcher claiming the trial in that instant finds it taken and says it left it to another
    submission (the next `dreamsweep run` trains it)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"trial folder {folder} does not exist here")
    try:
        fd = os.open(folder / CLAIM_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None  # never claimed
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
