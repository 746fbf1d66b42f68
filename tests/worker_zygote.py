"""Starts trial workers by forking one process that imported the worker's code once.

A worker spends about 8 s of CPU importing torch, diffusers, transformers and MLflow; a test that
starts dozens of them (test_kill_fuzz.py) forks them from here instead. Each child is a separate
process that runs `cluster.trial.main` from the start (reads trial.json, opens its MLflow run,
loads the model, trains) and can be killed for real; only the imports are shared. This process
never computes anything, so no thread pool is inherited half-used.

Protocol, one JSON object per line: requests on stdin {"argv": [...], "log": path}; answers on
stdout {"pid": N} for each request, and {"exit": N, "status": S} when child N ends (S as
subprocess reports it: the exit code, or minus the signal number).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import cluster.trial
from cluster.accelerator import make_accelerator  # noqa: F401  (what main imports late)
from contract.trial import TrialConfig  # noqa: F401
from selection.stopping import early_stopper  # noqa: F401
from tracking.reporter import MlflowReporter  # noqa: F401
from trainers.loop import train_trial  # noqa: F401

cluster.trial._quiet_libraries()
answers = threading.Lock()


def answer(message: dict) -> None:
    with answers:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def reap() -> None:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            threading.Event().wait(0.05)
            continue
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        answer({"exit": pid, "status": code})


def run_child(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        code = cluster.trial.main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    threading.Thread(target=reap, daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        with answers:  # no answer half-written in the child's copy of this process
            pid = os.fork()
        if pid == 0:
            run_child(request["argv"], request["log"])
        answer({"pid": pid})


if __name__ == "__main__":
    main()
