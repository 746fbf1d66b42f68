"""Shared fixtures: a private model cache, and small sweep specs written to a temporary folder."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.cpu_threads import THREAD_VARIABLES
from cluster.dev_servers import MlflowServer, PostgresServer, free_port  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DEV_SLURM = REPO / "cluster" / "dev_slurm.sh"
QUICKSTART_SUBJECTS = REPO / "configs" / "subjects"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models are built once per test session into a private cache (not ~/.cache)."""
    cache = tmp_path_factory.mktemp("dreamsweep-cache")
    previous = os.environ.get("DREAMSWEEP_CACHE")
    os.environ["DREAMSWEEP_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("DREAMSWEEP_CACHE", None)
    else:
        os.environ["DREAMSWEEP_CACHE"] = previous


@pytest.fixture(scope="session", autouse=True)
def offline_names() -> Iterator[None]:
    """Tests run offline: in this process, a host name other than this machine's does not
    resolve (IP literals, as the loopback servers use, still do). A default weights URL that a
    test reaches by accident then fails the same way on every machine, instead of downloading
    where there is network (the probe of a spec's weights URLs would otherwise decide a fuzzed
    spec's fate). Subprocesses are not covered: their specs name local or `tiny` weights."""
    local = {"localhost", socket.gethostname(), socket.getfqdn()}
    resolve = socket.getaddrinfo

    def local_only(host: object, *args: object, **kwargs: object) -> object:
        name = host.decode() if isinstance(host, bytes) else host
        if isinstance(name, str) and name not in local:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                raise socket.gaierror(socket.EAI_NONAME, f"tests run offline: {name}") from None
        return resolve(host, *args, **kwargs)

    socket.getaddrinfo = local_only
    yield
    socket.getaddrinfo = resolve


def copy_subject(name: str, destination: Path) -> Path:
    shutil.copytree(QUICKSTART_SUBJECTS / name, destination)
    return destination


def small_spec(tmp_path: Path, **overrides: object) -> dict:
    """A spec small enough to train in seconds on a CPU: 4 steps, evaluated every 2."""
    images = tmp_path / "subjects" / "robot"
    if not images.exists():
        copy_subject("robot", images)
    spec = {
        "name": "small",
        "base_model": "tiny",
        "subjects": [{"name": "robot", "images": "subjects/robot", "class_token": "toy"}],
        "methods": {"lora": {"learning_rate": [1e-3]}},
        "grid": {"num_images": [2], "seed": [0], "max_steps": 4, "eval_every": 2},
        "train": {"resolution": 64, "prior": {"num_class_images": 3, "num_inference_steps": 2}},
        "eval": {
            "prompts": ["a photo of {token} {class}"],
            "images_per_prompt": 2,
            "num_inference_steps": 3,
            "clip_model": "tiny",
            "dino_model": "tiny",
            "aesthetics_head": "tiny",
        },
    }
    for key, value in overrides.items():  # sections are merged; `methods` is replaced
        if isinstance(value, dict) and isinstance(spec.get(key), dict) and key != "methods":
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def write_spec(tmp_path: Path, spec: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def dreamsweep(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would (who has not set OMP_NUM_THREADS);
    `env` adds variables."""
    inherited = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**inherited, "COLUMNS": "200", "PYTHONPATH": str(REPO), **(env or {})},
        timeout=900,
    )


def start_dreamsweep(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """Start the real CLI in the background (stdout and stderr as one text stream), on one
    thread per worker so its curves compare with other one-thread runs."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env |= {"COLUMNS": "200", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


# Credentials users keep in their environment; the quickstart runs with these fake ones set and
# test_quickstart checks that none of them surfaces in MLflow, the logs or the output folder.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_FAKEtoken0123456789abcdef",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEhubtoken9876543210",
    "MLFLOW_TRACKING_USERNAME": "fake-user-3141",
    "MLFLOW_TRACKING_PASSWORD": "fake-password-2718",
    "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-1618",
}


def descendants(root: int) -> set[int]:
    """Every live process below `root` (its children, their children, …), read from the parent
    ids in /proc/*/stat (this kernel may lack /proc/<pid>/task/*/children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The fields after the parenthesised command name: state, then the parent id.
            state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(parent), []).append(int(entry.name))
    found: set[int] = set()
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def kill_descendants(cmdline_part: str, root_pid: int | None = None) -> set[int]:
    """SIGKILL every process below `root_pid` (this test process by default) whose command line
    contains `cmdline_part`; returns their pids. Processes the test did not start are never
    touched. All are found before any is killed: a killed parent's children would otherwise be
    re-parented out of the tree, and escape."""
    root = os.getpid() if root_pid is None else root_pid
    doomed = set()
    for pid in descendants(root):
        try:
            cmdline = Path("/proc", str(pid), "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline_part.encode() in cmdline:
            doomed.add(pid)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return doomed


def kill_when_ready(
    marker: Path, cmdline_part: str, *, root_pid: int | None = None, timeout: float = 600
) -> threading.Thread:
    """A thread that, once `marker` exists, SIGKILLs the processes below `root_pid` (this test
    process by default: the workers, torchrun, Ray actors its launchers and clusters started)
    whose command line contains `cmdline_part` (a worker, or torchrun and its workers): a real
    crash, mid-trajectory."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker.exists():
                kill_descendants(cmdline_part, root_pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


@pytest.fixture
def one_thread():
    """The test's training on one CPU thread: with two, the machine's other load decides how
    some reductions split, and results then differ in their sixth digit between any two runs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_trial(trial, reporter, *, stopper=None) -> None:
    """Train a trial in this process under the Accelerator its worker would make.

    Accelerate keeps one process-wide state; tests train trials with different precisions and
    accumulation in one process, so it is reset first (a worker process trains one trial).
    """
    from accelerate.state import AcceleratorState

    from cluster.accelerator import make_accelerator
    from trainers.loop import train_trial

    AcceleratorState._reset_state(reset_partial_state=True)
    train_trial(trial, reporter, accelerator=make_accelerator(trial.train), stopper=stopper)


class Recorder:
    """A reporter that keeps what it is told, and can die after a given checkpoint."""

    def __init__(self, die_after_checkpoint: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.learning_rates: dict[int, float] = {}
        self.metrics: dict[int, dict[str, float]] = {}
        self.evaluations: dict[int, object] = {}
        self.checkpoints: list[int] = []
        self.removed: list[int] = []
        self.die_after_checkpoint = die_after_checkpoint

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        self.start_step = start_step
        self.setup = setup

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        self.losses[step] = loss
        self.learning_rates[step] = lr

    def on_evaluation(self, step: int, evaluation) -> None:
        self.metrics[step] = evaluation.metrics
        self.evaluations[step] = evaluation

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(step)
        if step == self.die_after_checkpoint:
            raise KeyboardInterrupt("killed for the test")

    def on_checkpoint_removed(self, step: int) -> None:
        self.removed.append(step)

    def on_early_stop(self, step: int, reason: str) -> None:
        self.early_stop = (step, reason)

    def on_finish(self) -> None:
        pass


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `dreamsweep run` + `select` on a copy of configs/ (outputs land in the copy); shared
    by the quickstart tests and the launchers' tests that compare against it."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(REPO / "configs", root / "configs")
    spec = "configs/tiny_quickstart.yaml"
    run = dreamsweep("run", spec, cwd=root, env=FAKE_SECRETS)
    assert run.returncode == 0, run.stdout + run.stderr
    select = dreamsweep("select", spec, cwd=root, env=FAKE_SECRETS)
    assert select.returncode == 0, select.stdout + select.stderr
    uri = f"sqlite:///{root / 'runs' / 'tiny_quickstart' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny_quickstart")
    runs = client.search_runs([experiment.experiment_id])
    return {
        "root": root,
        "spec": spec,
        "run": run,
        "select": select,
        "client": client,
        "runs": runs,
    }


CURVE_KEYS = ("loss", "similarity", "aesthetics", "diversity", "clip_t")


def trial_histories(
    tracking_uri: str, experiment_name: str
) -> dict[str, dict[str, dict[int, float]]]:
    """trial label → metric → step → value, from a sweep's MLflow store; every trial FINISHED
    and every curve with one point per step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
    )
    out = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("dreamsweep.error")
        out[run.info.run_name] = {}
        for key in CURVE_KEYS:
            logged = client.get_metric_history(run.info.run_id, key)
            history = {m.step: m.value for m in logged}
            assert len(logged) == len(history), (run.info.run_name, key)  # no duplicate step
            out[run.info.run_name][key] = history
    return out


def quickstart_slice(spec: dict) -> dict:
    """configs/tiny_quickstart.yaml cut to one subject, its smaller image count and two methods:
    DreamBooth (its class images, generated once and shared by trials on any node) and textual
    inversion; LoRA, `small_spec`'s method, runs on every launcher in their other tests. Two
    trials, the same (ids and labels follow content) as in the full quickstart: on two nodes they
    run at once, in a sixth of the full quickstart's time."""
    spec["subjects"] = [s for s in spec["subjects"] if s["name"] == "robot"]
    spec["grid"]["num_images"] = [2]
    del spec["methods"]["lora"]
    return spec


def assert_same_curves(a: dict, b: dict, *, slice_of_b: bool = False) -> None:
    """Same trials, same curves; with `slice_of_b`, `a`'s trials are some of `b`'s."""
    if slice_of_b:
        assert a.keys() <= b.keys(), sorted(a.keys() - b.keys())
        b = {label: b[label] for label in a}
    assert a.keys() == b.keys()
    for label in a:
        for key in a[label]:
            assert a[label][key].keys() == b[label][key].keys(), (label, key)
            for step, value in a[label][key].items():
                assert value == pytest.approx(b[label][key][step], rel=1e-5, abs=1e-7), (
                    label,
                    key,
                    step,
                )


def headless_chromium(profile: Path):
    """Debian's Chromium under chromedriver, offline: no background connections. An alert the
    page opens stays open for the test to find (it is not dismissed behind its back)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1300,2200",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.set_capability("unhandledPromptBehavior", "ignore")
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def shown_table(driver, table_id: str) -> list[list[str]]:
    """The text of every cell of the page's table `table_id`, row by row (the header first)."""
    return driver.execute_script(
        "return [...document.getElementById(arguments[0]).rows]"
        ".map(row => [...row.cells].map(cell => cell.textContent));",
        table_id,
    )


def assert_page_shows(shown: list[list[str]], table) -> None:
    """The page's table (`shown_table`) shows `table` (a selection.report.Table): the same
    header, and each cell's text as is, None as "–", an int exactly, a float rounded to the
    decimals the page shows (at least one)."""
    assert shown[0] == table.header
    assert len(shown) - 1 == len(table.rows), (shown, table.rows)
    for row, expected in zip(shown[1:], table.rows, strict=True):
        assert len(row) == len(expected), (row, expected)
        for text, value in zip(row, expected, strict=True):
            if value is None:
                assert text == "–", (row, expected)
            elif isinstance(value, str | int):
                assert text == str(value), (row, expected)
            else:
                decimals = len(text.partition(".")[2])
                assert decimals >= 1, (row, expected)
                assert abs(float(text) - value) <= 0.5 * 10**-decimals + 1e-9, (row, expected)


# --- real clusters, one per test session ---------------------------------------------------


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A head node and a second node joining it, each with one CPU: two trials run at once,
    one per node. One per test session: every module that
    needs it shares it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private dev cluster (cluster/dev_slurm.sh) in a temporary folder, which it yields. Its
    SLURM_CONF is exported to this process and so to every SLURM client the tests and the
    launcher's `dreamsweep` subprocesses run; dev_slurm.sh refuses to start next to a SLURM it
    did not start, and nothing outside the folder is touched. One per test session: every
    module that needs it shares it."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurmctld and slurmd run as root)")
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(DEV_SLURM), "up", str(folder)], capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield folder
    finally:
        cancel_test_jobs()
        stopped = subprocess.run(
            [str(DEV_SLURM), "down", str(folder)], capture_output=True, text=True
        )
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def cancel_test_jobs() -> None:
    """`scancel` the jobs the tests submitted (the launcher names them dreamsweep-<sweep>) that
    the private cluster still holds, by id."""
    listed = subprocess.run(
        ["squeue", "--noheader", "--array", "--format=%i %j"], capture_output=True, text=True
    )
    ids = [
        job
        for job, _, name in (line.partition(" ") for line in listed.stdout.splitlines())
        if name.startswith("dreamsweep-")
    ]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
