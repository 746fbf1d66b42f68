"""A trial worker: `python -m cluster.trial TRIAL_JSON --parent-run-id ID`.

Every launcher ends here (directly, under torchrun for several processes, or forked by the local
launcher from a server that imported the worker's code once: cluster/forked_worker.py). The main
process opens (or reopens, on a retry) the trial's MLflow child run and trains into it; the run
is marked FAILED with the error if training raises, and the exit status is non-zero. A pack's
worker (cluster/pack.py) starts as this one does (`start_worker`) and records each member's run
the same way (`open_recording`, `TrialRecording`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState

from cluster.signals import DIE_WITH_PARENT, REQUEUE_EXIT, SCHEDULER_SIGNALS, die_with_parent
from contract.layout import TAG_ERROR, TAG_PAUSED
from contract.spec import logged_curves

if TYPE_CHECKING:
    from cluster.reporters import Reporters
    from contract.trial import TrialConfig
    from tracking.reporter import MlflowReporter
    from tracking.sweep import SweepTracking
    from trainers.reporting import Stopper


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def describe_error(err: BaseException, *, distributed: bool) -> str:
    """The error as the trial's run records it. A collective that fails in a multi-process trial
    names the likely cause, which gloo's and NCCL's own messages (a socket error) do not."""
    described = f"{type(err).__name__}: {err}"
    if distributed and _raised_by_a_collective(err):
        described = (
            "another process of this trial stopped answering (a lost node, or a killed or failed "
            "process: see the worker log of every node); run the sweep again to resume from the "
            f"last checkpoint. {described}"
        )
    return described


def _raised_by_a_collective(err: BaseException) -> bool:
    """Raised by torch.distributed or DDP, or by a backend's transport (which may surface in
    autograd's backward, where DDP's hooks reduce gradients)."""
    places = (f"torch{os.sep}distributed{os.sep}", f"torch{os.sep}nn{os.sep}parallel{os.sep}")
    frames = traceback.extract_tb(err.__traceback__)
    if any(place in frame.filename for frame in frames for place in places):
        return True
    return "gloo" in str(err) or "NCCL" in str(err)


def start_worker() -> threading.Event:
    """What a worker (a trial's, a pack's: cluster/pack.py) does first: die with its parent
    where asked, catch SLURM's time-limit or preemption signals (cluster/slurm.py) from the
    start, and quiet the libraries. Returns the event those signals set: the loop checkpoints
    at its next step and stops."""
    if os.environ.get(DIE_WITH_PARENT):
        die_with_parent()
    pause_requested = threading.Event()
    for scheduler_signal in SCHEDULER_SIGNALS:
        signal.signal(scheduler_signal, lambda *_: pause_requested.set())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    from tracking.journal import fail_fast_over_http

    fail_fast_over_http()
    return pause_requested


@dataclass
class TrialRecording:
    """A trial's MLflow child run as its worker writes it: the run's reporter, every reporter
    of the trial (MLflow's, then the launcher's progress events) and its early stopper."""

    config: TrialConfig
    run_id: str
    mlflow: MlflowReporter
    reporter: Reporters
    stopper: Stopper | None

    def paused(self, step: int) -> None:
        """It checkpointed `step` to be requeued: KILLED until it resumes, saying where."""
        self.mlflow.flush()
        self.mlflow.writer.set_tags({TAG_PAUSED: str(step)})
        self.mlflow.writer.set_terminated("KILLED")

    def failed(self, err: BaseException, *, distributed: bool) -> None:
        """Training raised `err`: the run is FAILED (KILLED for Ctrl-C) with the error."""
        # Recorded when the store takes it; a store that refuses it too must not hide `err`
        # (the launcher marks the run FAILED from the exit status all the same).
        with contextlib.suppress(Exception):
            self.mlflow.flush()
            error = describe_error(err, distributed=distributed)[:4000]
            self.mlflow.writer.set_tags({TAG_ERROR: error})
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            self.mlflow.writer.set_terminated(status)


def open_recording(
    tracking: SweepTracking, parent_run_id: str, config: TrialConfig, *, tag_events: bool = False
) -> TrialRecording:
    """Open (or reopen, on a retry) the trial's child run, with its reporters and its early
    stopper; `tag_events`: its progress events carry its trial id (a pack's member, which
    shares its worker's output with the other members)."""
    from cluster import events
    from cluster.reporters import ProgressReporter, Reporters
    from selection.stopping import early_stopper
    from tracking.reporter import MlflowReporter

    trial_id = config.trial_id if tag_events else None
    tagged = {} if trial_id is None else {"trial_id": trial_id}
    run_id = tracking.trial_run(parent_run_id, config)
    mlflow_reporter = MlflowReporter(
        tracking.client,
        run_id,
        config.output_dir,
        on_writes_pending=lambda writes: events.emit("journal_pending", writes=writes, **tagged),
    )
    # A resumed trial's stopper first reads what the run logged before the interruption.
    history = tracking.evaluations(run_id, logged_curves(config.eval.metrics))
    return TrialRecording(
        config=config,
        run_id=run_id,
        mlflow=mlflow_reporter,
        reporter=Reporters(mlflow_reporter, ProgressReporter(trial_id)),
        stopper=early_stopper(config.selection, config.eval.metrics, history),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.trial", description=__doc__)
    parser.add_argument("trial_json", type=Path, help="trial.json written by the launcher")
    parser.add_argument("--parent-run-id", required=True, help="the sweep's MLflow parent run")
    parser.add_argument(
        "--optuna-trial", type=Path, help="a sampled trial's Optuna trial (optuna_trial.json)"
    )
    args = parser.parse_args(argv)
    pause_requested = start_worker()
    from cluster.accelerator import make_accelerator, precision_problem
    from cluster.reporters import Reporters
    from contract.trial import TrialConfig
    from tracking.sweep import SweepTracking
    from trainers.loop import train_trial
    from trainers.reporting import TrialPaused

    config = TrialConfig.model_validate_json(args.trial_json.read_text(encoding="utf-8"))
    # The process group comes from the launcher's environment (torchrun, SLURM); across CPU
    # processes Accelerate forms a gloo group only when asked to run on the CPU.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=distributed and not torch.cuda.is_available())
    # Refused on the node itself (a SLURM or Ray node may have a GPU the launching machine
    # lacks), before the trial's MLflow run opens: nothing is recorded or trained.
    problem = precision_problem(
        config.train.mixed_precision,
        device_type=state.device.type,
        where=f"this trial's node ({socket.gethostname()})",
    )
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    recording = stopper = None
    reporter = Reporters()  # other ranks report nothing
    if state.is_main_process:
        recording = open_recording(
            SweepTracking(config.tracking_uri, config.experiment), args.parent_run_id, config
        )
        if args.optuna_trial is not None:
            from cluster.optuna_trial import sampled_trial_stopper

            set_tags = recording.mlflow.writer.set_tags
            recording.stopper = sampled_trial_stopper(
                args.optuna_trial, config, set_tags, recording.stopper
            )
        reporter, stopper = recording.reporter, recording.stopper
    try:
        accelerator = make_accelerator(config.train)
        train_trial(
            config,
            reporter,
            accelerator=accelerator,
            stopper=stopper,
            should_pause=pause_requested.is_set,
            can_stop=args.optuna_trial is not None,  # every rank joins the pruner's decision
        )
    except TrialPaused as paused:
        if recording is not None:
            recording.paused(paused.step)
        return REQUEUE_EXIT
    except BaseException as err:
        if recording is not None:
            recording.failed(err, distributed=distributed)
        raise
    if not state.is_main_process:
        # Other ranks log nothing and hold nothing to flush. In a 2-node SLURM test a non-main
        # rank once hung after its last collective, in process-group teardown at interpreter
        # exit, keeping its node's job alive to the time limit: leave without teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
