"""A trial worker as whoever starts it sees it: its config file, its command line, its output.

Every launcher and every scheduler's task (the local launcher, the SLURM task, the Ray trainable)
starts the same worker, `python -m cluster.trial TRIAL_JSON --parent-run-id ID`: one process, or
torchrun with several (on one node, or across the nodes of a rendezvous). They write its
`trial.json` and build its command line here, and those that read its output (local, Ray) read
it with `read_output`: log lines go to the worker's log and its last lines are kept, event lines
(`cluster.events`) go to the reader's callback.
"""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cluster import events
from contract.packs import PACK_JSON, PackFile, pack_folder, pack_id
from contract.trial import TrialConfig

WORKER_ENTRY = ("-m", "cluster.trial")
"""How Python runs the worker: what follows the interpreter on its command line."""
LOG_TAIL_LINES = 20
"""How many of a worker's last log lines a failed trial is reported with."""
TRIAL_JSON = "trial.json"
WORKER_LOG = "worker.log"
"""The worker's log in its trial folder, for the launchers that read its output."""


@dataclass(frozen=True)
class Rendezvous:
    """Where the processes of a trial spread over several nodes meet (torchrun's static
    rendezvous): how many nodes, this one's rank, and the first node's address and port."""

    nodes: int
    node_rank: int
    host: str
    port: int


@dataclass(frozen=True)
class RunningWorker:
    """A started worker: its output (stdout and stderr, line by line), its process id, and its
    wait, which returns its exit status (minus the signal's number when a signal ended it)."""

    output: Iterable[str]
    pid: int
    wait: Callable[[], int]


def write_trial_json(trial: TrialConfig) -> Path:
    """The trial's config, where its worker (on any machine that shares the folder) reads it."""
    trial.output_dir.mkdir(parents=True, exist_ok=True)
    trial_json = trial.output_dir / TRIAL_JSON
    trial_json.write_text(trial.model_dump_json(indent=2), encoding="utf-8")
    return trial_json


def write_pack(members: list[TrialConfig], sweep_output_dir: Path) -> Path:
    """Each member's trial.json and the pack's `pack.json` (in `packs/<pack id>/`), where the
    pack's worker reads them."""
    folder = pack_folder(sweep_output_dir, members)
    folder.mkdir(parents=True, exist_ok=True)
    pack = PackFile(pack_id=pack_id(members), members=[write_trial_json(t) for t in members])
    path = folder / PACK_JSON
    path.write_text(pack.model_dump_json(indent=2), encoding="utf-8")
    return path


def worker_arguments(
    trial_json: Path, parent_run_id: str, optuna_trial: Path | None = None
) -> list[str]:
    """`cluster.trial`'s arguments (a sampled trial's also name its Optuna trial's file)."""
    arguments = [str(trial_json), "--parent-run-id", parent_run_id]
    return arguments + (["--optuna-trial", str(optuna_trial)] if optuna_trial else [])


def worker_command(
    trial_json: Path,
    parent_run_id: str,
    processes: int = 1,
    *,
    rendezvous: Rendezvous | None = None,
    optuna_trial: Path | None = None,
) -> list[str]:
    """The worker's command line: one process, or `processes` data-parallel ones (per node).

    Several processes start under torchrun, as `accelerate launch --multi_gpu` does; the
    worker's Accelerator reads the rendezvous from its environment (NCCL on GPUs, gloo on CPUs).
    Without a `rendezvous` they all run on this machine (torchrun's standalone rendezvous); with
    one, this node runs its share of a trial spread over `rendezvous.nodes` nodes.
    """
    entry = [*WORKER_ENTRY, *worker_arguments(trial_json, parent_run_id, optuna_trial)]
    if processes == 1 and (rendezvous is None or rendezvous.nodes == 1):
        return [sys.executable, *entry]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if rendezvous is None:
        return [*torchrun, "--standalone", "--nproc_per_node", str(processes), *entry]
    return [
        *torchrun,
        f"--nnodes={rendezvous.nodes}",
        f"--node_rank={rendezvous.node_rank}",
        f"--nproc_per_node={processes}",
        f"--master_addr={rendezvous.host}",
        f"--master_port={rendezvous.port}",
        *entry,
    ]


@contextmanager
def started_worker(
    command: list[str], env: dict[str, str], claim: int, **popen: Any
) -> Iterator[RunningWorker]:
    """A worker as a process of its own (`command`: one process, or torchrun and its ranks),
    holding the trial's `claim` too; `popen`: more of `subprocess.Popen`'s options. Leaving
    the block waits for it."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        pass_fds=(claim,),  # the worker holds the claim too: it lasts while either lives
        **popen,
    ) as worker:
        assert worker.stdout is not None
        yield RunningWorker(worker.stdout, worker.pid, worker.wait)


def read_output(
    lines: Iterable[str],
    log: TextIO,
    on_event: Callable[[dict[str, Any]], None],
    *,
    flush: bool = False,
) -> list[str]:
    """Read a worker's output to its end: each log line is written to `log` (flushed at once
    with `flush`), each event line is handed to `on_event`, which may raise to stop reading.
    Returns the last `LOG_TAIL_LINES` log lines, without their line ends."""
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    for line in lines:
        event = events.parse(line)
        if event is None:
            log.write(line)
            if flush:
                log.flush()
            tail.append(line.rstrip("\n"))
        else:
            on_event(event)
    return list(tail)
