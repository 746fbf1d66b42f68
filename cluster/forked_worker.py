"""A trial worker forked from a server that imported the worker's code once.

Importing torch, diffusers, transformers and MLflow costs a fresh worker process about 6 s of
CPU, more than a small trial's training. The local launcher starts its single-process workers
from multiprocessing's fork server instead, preloaded with `PRELOAD`: each fork runs
`cluster.trial.main` from the start (reads trial.json, opens its MLflow run, loads the model,
trains) as a process of its own, killed, reaped and reported by its exit status like any other.
The server computes nothing, so no thread pool is inherited half-used.
"""

from __future__ import annotations

import os
import shlex
import sys

PRELOAD = "cluster.worker_imports"
"""The module the fork server imports when it starts: everything `cluster.trial.main` imports."""


def run_forked(argv: list[str], environment: dict[str, str], output: int, claim: int) -> None:
    """`cluster.trial.main(argv)` in a forked process: it takes the launcher's environment of
    now (the server's is that of its start), writes stdout and stderr to `output`, and holds
    `claim` (the trial's claim, cluster/claims.py) open while it lives. `ps` shows it under the
    command line it would have had as a process of its own."""
    import setproctitle
    import torch

    from cluster.trial import main

    del claim  # held, not used: the claim lasts while this process or the launcher lives
    setproctitle.setproctitle(shlex.join([sys.executable, "-m", "cluster.trial", *argv]))
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
