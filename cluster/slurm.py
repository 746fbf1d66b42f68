"""Where a SLURM array task lands: one trial, on one or more nodes, or a pack of trials
(`PackTask`: `python -m cluster.pack`, one process on one node).

submitit runs `TrialTask` in every task of the job (one task per node). Each task starts the
trial's worker processes on its node (`cluster.worker.worker_command`): one
`python -m cluster.trial` for a single process, or torchrun with the node's rank and the job's
rendezvous for several processes or nodes:

- node rank: `SLURM_NODEID`, read inside the task (never at submission);
- rendezvous host: the address of the job's first node (`scontrol show hostnames`, then that
  node's `NodeAddr`), port derived from the job id so jobs sharing a node do not collide.

Time limits and preemption: SLURM signals the job `signal_delay_s` before its limit; submitit
calls `checkpoint()`, which asks the worker to checkpoint at its current step (SIGUSR1), waits
for it, and returns the same task to requeue. The requeued task resumes from that checkpoint
into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from cluster.claims import TrialClaimed, claim_trial
from cluster.cpu_threads import thread_environment
from cluster.pack import PACK_ENTRY, pack_arguments
from cluster.signals import CHECKPOINT_SIGNAL, REQUEUE_EXIT, SCHEDULER_SIGNALS
from cluster.worker import WORKER_LOG, Rendezvous, worker_command
from contract.packs import PackFile
from contract.trial import TrialConfig

RENDEZVOUS_PORT_BASE = 20000
CHECKPOINT_WAIT_S = 600
"""How long the job waits for its worker's checkpoint after a time-limit or preemption signal;
keep launcher.signal_delay_s above the time one checkpoint takes."""


def first_node_address(nodelist: str) -> str:
    """The address of the first node of a SLURM nodelist (`node[1-2]` → node1's NodeAddr)."""
    hostnames = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
    ).stdout.split()
    shown = subprocess.run(
        ["scontrol", "show", "node", hostnames[0], "--oneliner"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
    return fields.get("NodeAddr", hostnames[0])


def rendezvous_from_environment(environ: dict[str, str]) -> Rendezvous:
    """This task's place in a multi-node trial, from the variables SLURM sets in the task."""
    job_id = int(environ.get("SLURM_ARRAY_JOB_ID") or environ["SLURM_JOB_ID"])
    task = int(environ.get("SLURM_ARRAY_TASK_ID") or 0)
    return Rendezvous(
        nodes=int(environ["SLURM_JOB_NUM_NODES"]),
        node_rank=int(environ["SLURM_NODEID"]),
        host=first_node_address(environ["SLURM_JOB_NODELIST"]),
        port=RENDEZVOUS_PORT_BASE + (job_id * 97 + task) % 20000,
    )


def _ignore_scheduler_signals() -> None:
    for scheduler_signal in SCHEDULER_SIGNALS:
        signal.signal(scheduler_signal, signal.SIG_IGN)


class _WorkerTask(submitit.helpers.Checkpointable):
    """A submitit job that runs a worker on this node and requeues on a time limit: what a
    trial's task and a pack's share."""

    kind = "trial"
    """What the worker trains, for its error message."""
    _worker: subprocess.Popen | None = None

    def _run_worker(
        self, command: list[str], log: Path, *, processes: int, claims: list[int]
    ) -> int:
        """Run the worker (`command`, `processes` of it on this node) to its end, logging to
        `log` and holding `claims` too; REQUEUE_EXIT asks for a requeue."""
        with open(log, "a", encoding="utf-8") as output:
            # Its own process group, so checkpoint() signals the worker and nothing else. SLURM
            # signals every process of the step: torchrun and a worker still importing ignore
            # the scheduler's signals (inherited SIG_IGN) until the worker installs handlers.
            self._worker = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={
                    **os.environ,
                    **thread_environment(processes),
                    "PYTHONUNBUFFERED": "1",
                },
                start_new_session=True,
                preexec_fn=_ignore_scheduler_signals,
                pass_fds=tuple(claims),  # the worker holds the claims too
            )
            returncode = self._worker.wait()
        if returncode == REQUEUE_EXIT:
            raise RequeueRequested(f"the worker checkpointed to be requeued; log: {log}")
        if returncode != 0:
            raise RuntimeError(f"{self.kind} worker exited with status {returncode}; log: {log}")
        return returncode

    def _fresh(self) -> _WorkerTask:
        """The same task, to requeue."""
        raise NotImplementedError

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """Time limit or preemption: the worker checkpoints its current step, then requeue."""
        worker = self._worker
        if worker is not None and worker.returncode is None:
            os.killpg(worker.pid, CHECKPOINT_SIGNAL)
            # This runs in a signal handler while __call__ blocks in worker.wait(), which holds
            # the Popen's wait lock: reap the worker with waitpid directly.
            deadline = time.monotonic() + CHECKPOINT_WAIT_S
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(worker.pid, os.WNOHANG)[0] != 0:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.2)
            else:
                os.killpg(worker.pid, signal.SIGKILL)
        return submitit.helpers.DelayedSubmission(self._fresh())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_worker"] = None  # a process handle does not travel
        return state


class TrialTask(_WorkerTask):
    """One trial as a submitit job: runs its worker(s) on this node, requeues on a time limit."""

    def __init__(
        self,
        trial_json: Path,
        parent_run_id: str,
        processes_per_node: int,
        optuna_trial: Path | None = None,
    ) -> None:
        self.trial_json = Path(trial_json)
        self.parent_run_id = parent_run_id
        self.processes_per_node = processes_per_node
        self.optuna_trial = optuna_trial
        """A sampled trial's Optuna trial file (launch/search.py)."""
        self._worker = None

    def __call__(self) -> int:
        rendezvous = rendezvous_from_environment(dict(os.environ))
        if rendezvous.node_rank != 0:  # the first node's task holds the trial's claim
            return self._run(rendezvous, claim=None)
        try:
            with claim_trial(self.trial_json.parent) as claim:
                return self._run(rendezvous, claim=claim)
        except TrialClaimed as claimed:
            print(f"Not run: another submission is training this trial ({claimed.holder})")
            return 0

    def _run(self, rendezvous: Rendezvous, *, claim: int | None) -> int:
        command = worker_command(
            self.trial_json,
            self.parent_run_id,
            self.processes_per_node,
            rendezvous=rendezvous,
            optuna_trial=self.optuna_trial,
        )
        log = self.trial_json.parent / f"worker-node{rendezvous.node_rank}.log"
        claims = [] if claim is None else [claim]
        return self._run_worker(command, log, processes=self.processes_per_node, claims=claims)

    def _fresh(self) -> TrialTask:
        return TrialTask(
            self.trial_json, self.parent_run_id, self.processes_per_node, self.optuna_trial
        )


class PackTask(_WorkerTask):
    """A pack (contract/packs.py) as a submitit job: one process on one node, holding every
    member's claim; a member another submission holds is left to it. Requeued on a time limit
    like a trial: the worker checkpoints every unfinished member, and the requeued task runs
    the pack again, each member resuming from its own checkpoint."""

    kind = "pack"

    def __init__(self, pack_json: Path, parent_run_id: str) -> None:
        self.pack_json = Path(pack_json)
        self.parent_run_id = parent_run_id
        self._worker = None

    def __call__(self) -> int:
        pack = PackFile.model_validate_json(self.pack_json.read_text(encoding="utf-8"))
        with contextlib.ExitStack() as held:
            claims, mine = [], []
            for trial_json in pack.members:
                try:
                    claims.append(held.enter_context(claim_trial(trial_json.parent)))
                except TrialClaimed as claimed:
                    print(
                        f"Not run: another submission is training {trial_json.parent.name} "
                        f"({claimed.holder})"
                    )
                    continue
                mine.append(
                    TrialConfig.model_validate_json(trial_json.read_text(encoding="utf-8")).trial_id
                )
            if not mine:
                return 0
            only = None if len(mine) == len(pack.members) else mine
            command = [
                sys.executable,
                "-m",
                PACK_ENTRY,
                *pack_arguments(self.pack_json, self.parent_run_id, only),
            ]
            log = self.pack_json.parent / WORKER_LOG
            return self._run_worker(command, log, processes=1, claims=claims)

    def _fresh(self) -> PackTask:
        return PackTask(self.pack_json, self.parent_run_id)


class RequeueRequested(RuntimeError):
    """The worker stopped to be requeued (it was signalled outside submitit's checkpoint)."""
