"""A worker forked from a server that imported the workers' code once.

Importing torch, diffusers, transformers and MLflow costs a fresh worker process about 6 s of
CPU (20 s on a loaded machine), more than a small trial's training or a small inference shard.
The local launchers start their single-process workers from multiprocessing's fork server
instead (`forked_worker`), preloaded with `PRELOAD`: each fork runs its entry module's `main`
from the start (`cluster.trial`: reads trial.json, opens its MLflow run, loads the model,
trains; `cluster.inference_shard`: reads shard.json, claims the shard, generates) as a process
of its own, killed, reaped and reported by its exit status like any other. The server computes
nothing, so no thread pool is inherited half-used.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.reduction import DupFd
from typing import Any

from cluster.worker import WORKER_ENTRY, RunningWorker

PRELOAD = "cluster.worker_imports"
"""The module the fork server imports when it starts: everything the entries' `main` import."""
TRIAL_ENTRY = WORKER_ENTRY[-1]
"""`cluster.trial`: a training trial's worker (`cluster.pack`: a pack's, holding every
member's claim)."""

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
def forked_worker(
    argv: list[str],
    env: dict[str, str],
    claim: int | Sequence[int] | None,
    *,
    entry: str = TRIAL_ENTRY,
) -> Iterator[RunningWorker]:
    """A single-process worker (module `entry`'s `main` with arguments `argv`) forked from the
    fork server, holding the trial's `claim` too (a pack's worker: every member's claim; None:
    the worker claims for itself, as an inference shard does). The server (multiprocessing's,
    one per process that forks workers) imports `PRELOAD` when it starts, so each worker skips
    the imports; the fork is a process like any other (killed, reaped and reported by its exit
    status as one)."""
    claims = [] if claim is None else [claim] if isinstance(claim, int) else list(claim)
    read_end, write_end = os.pipe()
    try:
        worker = _FORK_SERVER.Process(
            target=run_forked,
            args=(
                argv,
                env,
                _PassedFd(write_end),
                [_PassedFd(fd) for fd in claims],
                entry,
            ),
            name=f"{entry} {argv[0]}",
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

    assert worker.pid is not None
    with open(read_end, encoding="utf-8", errors="replace") as output:
        try:
            yield RunningWorker(output, worker.pid, wait)
        finally:
            if worker.exitcode is None:  # the caller is leaving early (an error, Ctrl-C)
                wait()


def run_forked(
    argv: list[str],
    environment: dict[str, str],
    output: int,
    claim: list[int],
    entry: str = TRIAL_ENTRY,
) -> None:
    """`<entry>.main(argv)` in a forked process: it takes the launcher's environment of now
    (the server's is that of its start), writes stdout and stderr to `output`, and holds
    `claim` (the claims of its trials, cluster/claims.py) open while it lives. `ps` shows it
    under the command line it would have had as a process of its own."""
    import setproctitle
    import torch

    main = importlib.import_module(entry).main
    del claim  # held, not used: the claim lasts while this process or the launcher lives
    setproctitle.setproctitle(shlex.join([sys.executable, "-m", entry, *argv]))
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    sys.stdout.reconfigure(line_buffering=True)  # a log line reaches the launcher when written
    os.environ.clear()
    os.environ.update(environment)
    # The server loaded OpenMP under its own environment, which OpenMP reads once, at load.
    if "OMP_NUM_THREADS" in environment:
        torch.set_num_threads(int(environment["OMP_NUM_THREADS"]))
    sys.exit(main(argv))
