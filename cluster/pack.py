"""A pack's worker: `python -m cluster.pack PACK_JSON --parent-run-id ID [--only TRIAL_ID …]`.

A pack (contract/packs.py) is several LoRA or textual-inversion trials trained in one process on
one frozen base model (`trainers.pack_loop.train_pack`). Started as `cluster.trial` is (forked by
the local launcher, by a SLURM array task), it does for each member what that worker does for
its trial: opens (or reopens, on a retry) the member's MLflow child run, reports into it and to
the launcher (progress events carrying the member's trial id), and stops it early as alone. A
member already FINISHED in MLflow (another submission's, or before a requeue) is not trained
again. On the scheduler's signal every unfinished member checkpoints and the worker exits with
`REQUEUE_EXIT`; when training raises, every member still in the pack is FAILED with the error
(members that already finished stay FINISHED) and the exit status is non-zero.

The module imports nothing heavy until `main` runs, so launchers and SLURM tasks can build the
worker's command line from here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.signals import REQUEUE_EXIT
from trainers.reporting import NullReporter  # the standard library only

PACK_ENTRY = "cluster.pack"
"""The pack worker's module, as `python -m` runs it."""


def pack_arguments(pack_json: Path, parent_run_id: str, only: list[str] | None = None) -> list[str]:
    """`cluster.pack`'s arguments; `only`: the members this submission claimed (all: None)."""
    arguments = [str(pack_json), "--parent-run-id", parent_run_id]
    for trial_id in only or []:
        arguments += ["--only", trial_id]
    return arguments


class _Ended(NullReporter):
    """Records which members `train_pack` ended (finished or stopped early): their runs were
    closed FINISHED by the MLflow reporter just before this one is told."""

    def __init__(self, ended: set[str], trial_id: str) -> None:
        self.ended = ended
        self.trial_id = trial_id

    def on_finish(self) -> None:
        self.ended.add(self.trial_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.pack", description=__doc__)
    parser.add_argument("pack_json", type=Path, help="pack.json written by the launcher")
    parser.add_argument("--parent-run-id", required=True, help="the sweep's MLflow parent run")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TRIAL_ID",
        help="train only these members (the ones this submission holds the claims of)",
    )
    args = parser.parse_args(argv)
    from cluster.trial import open_recording, start_worker

    pause_requested = start_worker()
    import socket

    from accelerate import PartialState

    from cluster.accelerator import make_accelerator, precision_problem
    from cluster.reporters import Reporters
    from contract.packs import PackFile
    from contract.trial import TrialConfig
    from tracking.sweep import SweepTracking
    from trainers.pack_loop import PackPaused, train_pack

    pack = PackFile.model_validate_json(args.pack_json.read_text(encoding="utf-8"))
    configs = [
        TrialConfig.model_validate_json(path.read_text(encoding="utf-8")) for path in pack.members
    ]
    if args.only is not None:
        configs = [c for c in configs if c.trial_id in set(args.only)]
        if not configs:
            print(f"pack {pack.pack_id}: none of {args.only} is a member; nothing to train")
            return 0
    # Every member shares the training settings (the pack's key): one precision, one device.
    problem = precision_problem(
        configs[0].train.mixed_precision,
        device_type=PartialState().device.type,
        where=f"this pack's node ({socket.gethostname()})",
    )
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    tracking = SweepTracking(configs[0].tracking_uri, configs[0].experiment)
    finished = tracking.finished_trials(args.parent_run_id)
    for config in configs:
        if config.trial_id in finished:
            print(f"{config.label} ({config.trial_id}): already finished; not trained again")
    configs = [c for c in configs if c.trial_id not in finished]
    if not configs:
        return 0
    print(
        f"pack {pack.pack_id}: training {len(configs)} trial(s) together: "
        + ", ".join(f"{c.label} ({c.trial_id})" for c in configs)
    )
    recordings = []
    ended: set[str] = set()
    try:
        for config in configs:
            recordings.append(open_recording(tracking, args.parent_run_id, config, tag_events=True))
        train_pack(
            configs,
            [Reporters(r.reporter, _Ended(ended, r.config.trial_id)) for r in recordings],
            accelerator=make_accelerator(configs[0].train),
            stoppers=[r.stopper for r in recordings],
            should_pause=pause_requested.is_set,
        )
    except PackPaused as paused:
        for recording in recordings:
            step = paused.steps.get(recording.config.trial_id)
            if step is not None:
                recording.paused(step)
        return REQUEUE_EXIT
    except BaseException as err:
        for recording in recordings:
            if recording.config.trial_id not in ended:
                recording.failed(err, distributed=False)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
