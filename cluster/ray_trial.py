"""Where a Ray Tune trial lands: a function trainable that runs the trial's worker.

The trainable starts the same worker as the local launcher (`python -m cluster.trial`, or
torchrun for several processes), so the training loop, its MLflow child run and its checkpoints
are the other launchers' own. It reads the worker's event lines and reports to Tune at every
evaluated step: the metrics, the weighted score the scheduler ranks on, and that step's
checkpoint. A retried trial (Tune's max_failures) finds its checkpoints on disk, or copies the
newest one back from Tune's storage when it lands on a node that does not share the folder.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import ray
import ray.util
from ray import tune

from cluster.claims import TrialClaimed, claim_trial
from cluster.signals import DIE_WITH_PARENT, die_with_parent
from cluster.worker import (
    WORKER_LOG,
    RunningWorker,
    read_output,
    started_worker,
    worker_command,
    write_trial_json,
)
from contract.scoring import weighted_scores
from contract.trial import TrialConfig
from trainers.checkpoint import (
    COMPLETE,
    begin_checkpoint,
    checkpoints_root,
    latest_checkpoint,
    publish_checkpoint,
)

SCORE = "score"
"""The reported metric the schedulers rank on: the weighted, min–max-scaled score."""
BEST_SCORE = "best_score"
"""The best `score` of the trial so far: what an Optuna search on Ray maximises."""
STEP = "step"
"""The reported training step: the schedulers' time axis."""
NOT_RUN = "not_run"
"""Reported alone when another submission holds the trial's claim: the driver leaves its run be."""


def step_score(trial: TrialConfig, metrics: dict[str, float]) -> float | None:
    """The weighted score of one evaluated step; None when a weighted metric is missing."""
    weights = trial.selection.weights_for(trial.eval.metrics)
    histories = {name: {0: value} for name, value in metrics.items()}
    return weighted_scores(histories, weights, trial.selection.ranges).get(0)


def tune_result(
    trial: TrialConfig, step: int, metrics: dict[str, float], best: float | None
) -> tuple[dict[str, Any], float | None]:
    """What Tune gets for an evaluated step, and the trial's best trained score after it.

    Step 0 (the base model, the same for every trial of a group) is reported with its `score`,
    where the schedulers' curves start, but is never the best: else every trial worse than the
    base would tie at its score. Until a trained step is scored, `best_score` holds step 0's
    score, since Tune wants the searcher's metric in every result; the trial's last result, a
    trained step, holds the best over its trained steps: what `OptunaSearch` is told."""
    score = step_score(trial, metrics)
    if score is None:
        return {STEP: step, **metrics}, best
    if step > 0:
        best = score if best is None else max(best, score)
    return {STEP: step, **metrics, SCORE: score, BEST_SCORE: score if best is None else best}, best


def copy_back(folder: Path, root: Path) -> int | None:
    """Publish the checkpoint in `folder` (a copy from Tune's storage) under `root` when `root`
    holds nothing as recent; returns the step published, or None."""
    step = int((folder / COMPLETE).read_text())
    local = latest_checkpoint(root)
    if local is not None and local[0] >= step:
        return None
    staging = begin_checkpoint(root, step)
    shutil.copytree(folder, staging, dirs_exist_ok=True)
    (staging / COMPLETE).unlink()  # publish_checkpoint marks it once every file is synced
    publish_checkpoint(root, step)
    return step


def restore_from_tune(trial: TrialConfig) -> int | None:
    """A retried trial on a node that does not see its folder: bring Tune's newest checkpoint
    of it back, so the worker resumes from there; returns the step copied, or None."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return copy_back(Path(folder), checkpoints_root(trial))


def ray_trial(
    config: dict[str, Any], *, trials: dict[str, str], parent_run_id: str, processes: int
) -> None:
    """Tune's function trainable: `config["trial_id"]` picks the trial from `trials` (JSON)."""
    run_ray_trial(
        TrialConfig.model_validate_json(trials[config["trial_id"]]), parent_run_id, processes
    )


def run_ray_trial(trial: TrialConfig, parent_run_id: str, processes: int) -> None:
    """Run one trial inside a Tune trainable (the grid's, or a search's sampled one)."""
    try:
        with claim_trial(trial.output_dir) as claim:
            _run(trial, parent_run_id, processes, claim)
    except TrialClaimed as claimed:
        tune.report({NOT_RUN: f"another submission is training it ({claimed.holder})"})


def _run(trial: TrialConfig, parent_run_id: str, processes: int, claim: int) -> None:
    restore_from_tune(trial)
    trial_json = write_trial_json(trial)
    log_path = trial.output_dir / WORKER_LOG
    pending: tuple[int, dict[str, float]] | None = None
    best: float | None = None

    def report(worker: RunningWorker, checkpoint_folder: str | None = None) -> None:
        """Report the pending evaluation to Tune, the worker held still meanwhile.

        `tune.report` returns once the scheduler has taken the result and lets the trial go on;
        holding the worker meanwhile keeps a stopped trial's curves ending at the step it was
        stopped on."""
        nonlocal pending, best
        assert pending is not None
        step, metrics = pending
        pending = None
        result, best = tune_result(trial, step, metrics, best)
        checkpoint = (
            tune.Checkpoint.from_directory(checkpoint_folder) if checkpoint_folder else None
        )
        os.killpg(worker.pid, signal.SIGSTOP)
        try:
            tune.report(result, checkpoint=checkpoint)
        except BaseException:
            # Tune stops a trial by raising SystemExit here: end the worker where it stands,
            # before it logs past the step the trial was stopped on.
            os.killpg(worker.pid, signal.SIGKILL)
            raise
        os.killpg(worker.pid, signal.SIGCONT)

    # Ray sets OMP_NUM_THREADS to the trial's CPUs; several processes share them.
    threads = str(max(1, int(os.environ.get("OMP_NUM_THREADS", "1")) // processes))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
        DIE_WITH_PARENT: "1",  # torchrun's ranks too, when torchrun dies with this actor
    }
    command = worker_command(trial_json, parent_run_id, processes)
    with open(log_path, "a", encoding="utf-8") as log:
        context = ray.get_runtime_context()
        address = ray.util.get_node_ip_address()
        log.write(f"Ray Tune trial on node {context.get_node_id()} ({address})\n")
        with started_worker(
            command,
            env,
            claim,
            start_new_session=True,  # its own process group, paused and resumed as one
            preexec_fn=die_with_parent,
        ) as worker:

            def on_event(event: dict[str, Any]) -> None:
                nonlocal pending
                kind = event["event"]
                if kind == "evaluation":
                    pending = (event["step"], event["metrics"])
                elif kind == "checkpoint" and pending is not None and pending[0] == event["step"]:
                    report(worker, event["path"])  # the evaluated step's own checkpoint
                elif pending is not None and kind in ("step", "early_stop", "finish"):
                    report(worker)  # step 0 (no checkpoint), or a step without one

            # Flushed line by line: Tune may end this actor at any report, mid-trial.
            tail = read_output(worker.output, log, on_event, flush=True)
            returncode = worker.wait()
    if returncode != 0:
        lines = "\n".join(tail)
        raise RuntimeError(
            f"trial {trial.label} ({trial.trial_id}): worker exited with status {returncode}; "
            f"log: {log_path}; its last lines:\n{lines}"
        )
