"""`kill -9` of a trial's worker at random moments, 20 cases: every resumed trajectory ends with
the same weights (hash) and the same MLflow histories as an undisturbed one.

The moments are drawn from a seeded generator (DREAMSWEEP_KILL_SEED overrides the seed; a
failure prints the cases) in four phases, each aimed through the worker's own progress events and
the durations an undisturbed run of the same trial measured: during a training step, during an
evaluation (image generation), during the MLflow logging that ends an evaluation, and during a
checkpoint save. Two trajectories take 10 kills each, side by side; after its last kill, each
runs to the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import small_spec, write_spec
from mlflow.tracking import MlflowClient

from cluster.claims import claim_trial
from cluster.cpu_threads import THREAD_VARIABLES
from cluster.forked_worker import forked_worker
from cluster.worker import read_output, worker_arguments, write_trial_json
from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.sweep_run import prepare_sweep
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.resume import TRAINER_STATE

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("DREAMSWEEP_KILL_SEED", "20261123"))
KILLS_PER_TRAJECTORY = 10
MAX_STEPS, EVAL_EVERY = 8, 2
CURVES = ("loss", "lr", "similarity", "aesthetics", "diversity")


@dataclass
class Case:
    phase: str  # train | eval | log | save
    after: tuple[str, int]  # the event (kind, step) the kill is timed from
    delay: float  # seconds after that event


@dataclass
class Attempt:
    returncode: int
    seen: list[tuple[float, dict]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    """The last lines of its log."""


WORKER_ENV = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES} | {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}
"""One thread per worker, so that curves compare across runs (and two trajectories share the
machine's cores)."""


WORKER_TIMEOUT_S = 600


def run_worker(trial_json: Path, parent_run_id: str, case: Case | None = None) -> Attempt:
    """One worker of the trial, forked as the local launcher forks single-process workers
    (`cluster.forked_worker`: the imports are shared, the worker is still its own process, started
    fresh and killed for real); with a case, SIGKILLed `delay` s after the case's event."""
    log = trial_json.parent / f"attempt-{time.monotonic_ns()}.log"
    attempt = Attempt(returncode=0)
    # A kill lands only while the worker's output is open: once it ends the worker is gone (or
    # going), and its pid may soon be another process's.
    killing = threading.Lock()
    output_ended = False
    timed_out = threading.Event()
    with (
        claim_trial(trial_json.parent) as claim,
        open(log, "a", encoding="utf-8") as output,
        forked_worker(worker_arguments(trial_json, parent_run_id), WORKER_ENV, claim) as worker,
    ):

        def kill() -> None:
            with killing:
                if not output_ended:
                    os.kill(worker.pid, signal.SIGKILL)

        def give_up() -> None:
            timed_out.set()
            kill()

        def take(event: dict) -> None:
            attempt.seen.append((time.monotonic(), event))
            if case is not None and (event["event"], event.get("step")) == case.after:
                threading.Timer(case.delay, kill).start()

        watchdog = threading.Timer(WORKER_TIMEOUT_S, give_up)
        watchdog.start()
        try:
            attempt.log = read_output(worker.output, output, take)
        finally:
            watchdog.cancel()
        with killing:
            output_ended = True
        attempt.returncode = worker.wait()
    assert not timed_out.is_set(), "\n".join(attempt.log)
    return attempt


def durations(reference: Attempt) -> dict[str, float]:
    """How long each phase took in the undisturbed run (its shortest occurrence)."""
    at = {(e["event"], e.get("step")): t for t, e in reference.seen}
    evals = range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY)
    return {
        # a training step: from the previous step's last event (its checkpoint) to its own
        "train": min(at[("step", s + 1)] - at[("checkpoint", s)] for s in evals if s < MAX_STEPS),
        "eval": min(at[("evaluation", s)] - at[("step", s)] for s in evals),
        "save": min(at[("checkpoint", s)] - at[("evaluation", s)] for s in evals),
    }


def draw_case(rng: random.Random, start: int, took: dict[str, float]) -> Case:
    """A kill somewhere after `start` (the checkpoint the worker resumes from)."""
    evals = [s for s in range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY) if s > start]
    # a training step right after an evaluated step the worker will log anew
    trains = [s + 1 for s in evals if s < MAX_STEPS]
    phase = rng.choice(["train", "eval", "log", "save"] if trains else ["eval", "log", "save"])
    if phase == "train":  # the step's forward, backward and optimizer step
        step = rng.choice(trains)
        return Case(phase, ("checkpoint", step - 1), rng.uniform(0.0, 0.8) * took["train"])
    step = rng.choice(evals)
    if phase == "eval":  # generating the evaluation images
        return Case(phase, ("step", step), rng.uniform(0.0, 0.6) * took["eval"])
    if phase == "log":  # the end of the evaluation: metrics, images, records to MLflow
        return Case(phase, ("step", step), rng.uniform(0.6, 0.8) * took["eval"])
    return Case(phase, ("evaluation", step), rng.uniform(0.0, 0.8) * took["save"])


def prepared(folder: Path) -> tuple[TrialConfig, Path, str]:
    folder.mkdir()
    spec = load_spec(
        write_spec(folder, small_spec(folder, grid={"max_steps": MAX_STEPS, "eval_every": 2}))
    )
    sweep = prepare_sweep(spec)  # as a launcher starts: the parent run, artifacts beside it
    [trial] = sweep.trials
    return trial, write_trial_json(trial), sweep.parent_run_id


def weights_hash(trial: TrialConfig) -> str:
    step, folder = latest_checkpoint(checkpoints_root(trial))
    assert step == MAX_STEPS
    trained = torch.load(folder / TRAINER_STATE, weights_only=True)["trainable"]
    digest = hashlib.sha256()
    for name in sorted(trained):
        digest.update(name.encode())
        digest.update(trained[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def histories(trial: TrialConfig) -> dict[str, dict[int, float]]:
    client = MlflowClient(tracking_uri=trial.tracking_uri)
    experiment = client.get_experiment_by_name(trial.experiment)
    [run] = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert run.info.status == "FINISHED"
    out = {}
    for key in CURVES:
        logged = client.get_metric_history(run.info.run_id, key)
        out[key] = {m.step: m.value for m in logged}
        assert len(out[key]) == len(logged), key  # one point per step
    return out


def disturbed(folder: Path, cases_seed: int, took: dict[str, float]) -> tuple[TrialConfig, list]:
    """One trajectory: killed at KILLS_PER_TRAJECTORY drawn moments, then run to the end."""
    trial, trial_json, parent = prepared(folder)
    rng = random.Random(cases_seed)
    record = []
    for _ in range(KILLS_PER_TRAJECTORY):
        found = latest_checkpoint(checkpoints_root(trial))
        start = found[0] if found else 0
        case = draw_case(rng, start, took)
        attempt = run_worker(trial_json, parent, case)
        staged = any(p.name.startswith(".tmp-") for p in checkpoints_root(trial).glob(".*"))
        last = attempt.seen[-1][1] if attempt.seen else {}
        record.append((case, attempt.returncode, last.get("event"), last.get("step"), staged))
    final = run_worker(trial_json, parent)
    assert final.returncode == 0, "\n".join(final.log)
    return trial, record


def test_kill_9_at_random_moments_changes_no_weight_and_no_curve(tmp_path: Path) -> None:
    reference_trial, reference_json, reference_parent = prepared(tmp_path / "undisturbed")
    reference = run_worker(reference_json, reference_parent)
    assert reference.returncode == 0, "\n".join(reference.log)
    took = durations(reference)

    seeds = [SEED + index for index in range(2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: disturbed(tmp_path / f"killed-{s}", s, took), seeds))
    cases = [row for _, record in results for row in record]
    report = "\n".join(
        f"{c.phase:5} after {c.after} +{c.delay:.3f}s → status {rc}, last event {ev} {st}, "
        f"staging left: {staged}"
        for c, rc, ev, st, staged in cases
    )
    print(report)  # shown with -s, and on a failure
    assert len(cases) == 20
    assert all(rc == -signal.SIGKILL for _, rc, *_ in cases), report  # each case was a real kill

    expected_hash, expected_curves = weights_hash(reference_trial), histories(reference_trial)
    for trial, _ in results:
        assert weights_hash(trial) == expected_hash, report
        curves = histories(trial)
        for key in CURVES:
            assert curves[key].keys() == expected_curves[key].keys(), (key, report)
            for step, value in expected_curves[key].items():
                assert curves[key][step] == pytest.approx(value, rel=1e-6, abs=1e-9), (
                    key,
                    step,
                    report,
                )
