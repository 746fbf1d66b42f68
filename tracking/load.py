"""Many trials writing to one tracking store at once, and a check that nothing was lost or doubled.

Each writer is a separate process that does what a trial worker does, through the same code: it
opens its child run under the sweep's parent run (`SweepTracking.trial_run`, concurrently with the
others), then logs `loss`/`lr` every step, three curves and a checkpoint tag every 10 steps, and
closes the run, all through `JournaledWriter`. A write the server refuses or drops is journaled and
replayed, so the final history is checked for every (key, step) exactly once, and the number of
journaled writes says how many the backend did not take at first. The tracking load test and
`bench/tracking_load.py` (which ramps it further) both run it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import time
from dataclasses import dataclass
from pathlib import Path

from contract.layout import TAG_CHECKPOINT

STEPS_PER_EVAL = 10
CURVES = ("similarity", "aesthetics", "diversity")


@dataclass
class LoadResult:
    writers: int
    seconds: float
    journaled: int
    """Writes the backend did not take at first (journaled, then replayed)."""
    problems: list[str]
    """Runs whose history is not exactly one point per (key, step), or that did not finish."""


def write_trial(
    uri: str,
    experiment: str,
    parent_run_id: str,
    trial_json: str,
    folder: str,
    steps: int,
    start: multiprocessing.synchronize.Barrier,
) -> tuple[str, int]:
    """One writer: a trial's MLflow writes, through the trial's own code; → (run id, journaled)."""
    from mlflow.entities import Metric

    from contract.trial import TrialConfig
    from tracking.journal import JournaledWriter
    from tracking.sweep import SweepTracking

    trial = TrialConfig.model_validate_json(trial_json)
    start.wait()
    tracking = SweepTracking(uri, experiment)
    run_id = tracking.trial_run(parent_run_id, trial)
    writer = JournaledWriter(tracking.client, run_id, Path(folder), retry_every=1.0)
    for step in range(1, steps + 1):
        now = int(time.time() * 1000)
        writer.log_metrics([Metric("loss", 1.0 / step, now, step), Metric("lr", 1e-4, now, step)])
        if step % STEPS_PER_EVAL == 0:
            writer.log_metrics([Metric(name, step / steps, now, step) for name in CURVES])
            writer.set_tags({TAG_CHECKPOINT.format(step=step): f"{folder}/{step}"})
    writer.set_terminated("FINISHED")
    while not writer.sync():  # replay whatever was journaled
        time.sleep(1.0)
    return run_id, writer.journaled


def _writer_entry(queue: multiprocessing.Queue, *args: object) -> None:
    try:
        queue.put(write_trial(*args))
    except BaseException as err:  # reported, not lost in a child's stderr
        queue.put(("error", f"{type(err).__name__}: {err}"))


def check_histories(uri: str, run_ids: list[str], steps: int) -> list[str]:
    """Every run FINISHED with exactly one point per (key, step)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    evaluated = list(range(STEPS_PER_EVAL, steps + 1, STEPS_PER_EVAL))
    problems = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            problems.append(f"{run_id}: {run.info.status}")
        for key, expected in [("loss", list(range(1, steps + 1)))] + [
            (c, evaluated) for c in CURVES
        ]:
            logged = sorted(m.step for m in client.get_metric_history(run_id, key))
            if logged != expected:
                problems.append(f"{run_id}: {key} steps {logged} != {expected}")
    return problems


def run_load(
    uri: str, trials_json: list[str], folder: Path, *, steps: int, experiment: str = "load"
) -> LoadResult:
    """Start one writer process per trial at once (forked from a server that imported MLflow
    once, so 64 writers do not pay 64 imports), and check what arrived."""
    from tracking.sweep import SweepTracking

    tracking = SweepTracking(uri, experiment)
    parent_run_id = tracking.parent_run(f"load-{len(trials_json)}")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["mlflow.tracking", "tracking.journal", "tracking.sweep"])
    start = context.Barrier(len(trials_json))
    queue = context.Queue()
    began = time.monotonic()
    processes = [
        context.Process(
            target=_writer_entry,
            args=(
                queue,
                uri,
                experiment,
                parent_run_id,
                trial,
                str(folder / f"w{i}"),
                steps,
                start,
            ),
        )
        for i, trial in enumerate(trials_json)
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=900) for _ in processes]
    for process in processes:
        process.join()
    seconds = time.monotonic() - began
    errors = [message for kind, message in results if kind == "error"]
    run_ids = [run_id for run_id, _ in results if run_id != "error"]
    journaled = sum(count for run_id, count in results if run_id != "error")
    problems = errors + check_histories(uri, run_ids, steps)
    runs = tracking.trial_runs(parent_run_id)
    if len(runs) != len(trials_json):
        problems.append(f"{len(runs)} child runs for {len(trials_json)} trials")
    return LoadResult(len(trials_json), seconds, journaled, problems)
