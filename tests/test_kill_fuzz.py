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
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import REPO, small_spec, write_spec
from mlflow.tracking import MlflowClient

from cluster import events
from cluster.cpu_threads import THREAD_VARIABLES
from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from launch.local import write_trial_json
from tracking.sweep import SweepTracking
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.loop import TRAINER_STATE

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


class Zygote:
    """tests/worker_zygote.py: forks trial workers that share its imports (seconds, not 8 s of
    CPU each); every worker is still its own process, started fresh and killed for real."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "worker_zygote.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.exits: dict[int, int] = {}
        self.ended = threading.Condition()
        self.pids: queue.Queue[int] = queue.Queue()
        self.starting = threading.Lock()
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if "pid" in message:
                self.pids.put(message["pid"])
            else:
                with self.ended:
                    self.exits[message["exit"]] = message["status"]
                    self.ended.notify_all()

    def start(self, argv: list[str], log: Path) -> int:
        assert self.process.stdin is not None
        with self.starting:
            self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
            self.process.stdin.flush()
            return self.pids.get(timeout=300)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def run_worker(
    zygote: Zygote, trial_json: Path, parent_run_id: str, case: Case | None = None
) -> Attempt:
    """One worker of the trial; with a case, SIGKILLed `delay` s after the case's event."""
    log = trial_json.parent / f"attempt-{time.monotonic_ns()}.log"
    log.touch()
    pid = zygote.start([str(trial_json), "--parent-run-id", parent_run_id], log)
    attempt = Attempt(returncode=0)

    def kill() -> None:
        with zygote.ended:
            if pid not in zygote.exits:
                os.kill(pid, signal.SIGKILL)

    def take(line: str) -> None:
        event = events.parse(line)
        if event is None:
            attempt.log.append(line)
            return
        attempt.seen.append((time.monotonic(), event))
        if case is not None and (event["event"], event.get("step")) == case.after:
            threading.Timer(case.delay, kill).start()

    deadline = time.monotonic() + 600
    partial = ""
    with open(log, encoding="utf-8") as output:
        while True:
            partial += output.readline()
            if partial.endswith("\n"):
                take(partial)
                partial = ""
                continue
            with zygote.ended:
                done = pid in zygote.exits
            if done:  # all it wrote is in the file now
                for line in (partial + output.read()).splitlines(keepends=True):
                    take(line)
                break
            assert time.monotonic() < deadline, "".join(attempt.log[-20:])
            time.sleep(0.005)
    attempt.returncode = zygote.exits[pid]
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
    [trial] = expand_grid(spec)
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    return trial, write_trial_json(trial), tracking.parent_run(spec.name)


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


def disturbed(
    zygote: Zygote, folder: Path, cases_seed: int, took: dict[str, float]
) -> tuple[TrialConfig, list]:
    """One trajectory: killed at KILLS_PER_TRAJECTORY drawn moments, then run to the end."""
    trial, trial_json, parent = prepared(folder)
    rng = random.Random(cases_seed)
    record = []
    for _ in range(KILLS_PER_TRAJECTORY):
        found = latest_checkpoint(checkpoints_root(trial))
        start = found[0] if found else 0
        case = draw_case(rng, start, took)
        attempt = run_worker(zygote, trial_json, parent, case)
        staged = any(p.name.startswith(".tmp-") for p in checkpoints_root(trial).glob(".*"))
        last = attempt.seen[-1][1] if attempt.seen else {}
        record.append((case, attempt.returncode, last.get("event"), last.get("step"), staged))
    final = run_worker(zygote, trial_json, parent)
    assert final.returncode == 0, "".join(final.log[-20:])
    return trial, record


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    started = Zygote()
    yield started
    started.close()


def test_kill_9_at_random_moments_changes_no_weight_and_no_curve(
    zygote: Zygote, tmp_path: Path
) -> None:
    reference_trial, reference_json, reference_parent = prepared(tmp_path / "undisturbed")
    reference = run_worker(zygote, reference_json, reference_parent)
    assert reference.returncode == 0, "".join(reference.log[-20:])
    took = durations(reference)

    seeds = [SEED + index for index in range(2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(
            pool.map(lambda s: disturbed(zygote, tmp_path / f"killed-{s}", s, took), seeds)
        )
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
