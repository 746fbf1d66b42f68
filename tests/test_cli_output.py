"""`dreamsweep select` and `dreamsweep status` piped or logged (every value whole, on one line)
and as CSV / JSON for scripts; `status` for a local sweep, from MLflow, claims and journals, and
from a machine that sees neither the trials' folders nor SLURM.

The sweep's MLflow runs are written here directly (no training): curves that choose known steps,
and trials left finished, running, killed, closed while the server was down, or never started.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import small_spec, write_spec
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from cluster.claims import claim_trial
from contract.layout import TAG_CHECKPOINT
from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.cli import main
from launch.grid import expand_grid
from launch.status import RUNNING_PER_MLFLOW, slurm_trial_state
from tracking.journal import HTTP_DEFAULTS, JOURNAL_FILE, JournaledWriter
from tracking.sweep import SweepTracking

# Long enough that a row passes 80 columns: rich cut such rows to "ro…" / "0…" when piped.
SUBJECT = "a_robot_with_a_name_long_enough_to_need_a_wide_table"
SEEDS = [0, 1, 2, 3, 4]
# seed → how its run was left: the states `status` must tell apart.
FINISHED, RUNNING, UNCLOSED, CLOSED_OFFLINE, NOT_STARTED = SEEDS
OFF_GRID = -1  # a trial of the sweep in MLflow that the spec's grid no longer holds


def curve(seed: int, step: int) -> dict[str, float]:
    """Every default eval metric at `step`; seed 0 peaks at step 2, the others at step 4."""
    rise = step / 4 if seed else (1 - abs(step - 2) / 2)
    return {
        "similarity": 0.5 + 0.3 * rise + 0.001 * seed,
        "aesthetics": 0.4 + 0.2 * rise,
        "diversity": 0.7 - 0.1 * rise,
        "clip_t": 0.3 - 0.05 * rise,
        "in_domain": 1.0,
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, TrialConfig]]:
    root = tmp_path_factory.mktemp("cli-output")
    spec_dict = small_spec(root, grid={"num_images": [2], "seed": SEEDS})
    spec_dict["subjects"][0]["name"] = SUBJECT
    path = write_spec(root, spec_dict)
    spec = load_spec(path)
    trials = {t.seed: t for t in expand_grid(spec)}
    tracking = SweepTracking(
        spec.tracking_uri, spec.experiment_name, artifact_root=root / "mlartifacts"
    )
    parent = tracking.parent_run(spec.name)
    for seed, trial in trials.items():
        if seed == NOT_STARTED:
            continue
        run_id = tracking.trial_run(parent, trial)
        metrics = [Metric("loss", 1 / step, 0, step) for step in range(1, 5)]
        for step in (0, 2, 4):
            metrics += [Metric(k, v, 0, step) for k, v in curve(seed, step).items()]
        tags = {}
        for step in (2, 4):
            folder = trial.output_dir / "checkpoints" / f"step_{step:06d}"
            folder.mkdir(parents=True)
            tags[TAG_CHECKPOINT.format(step=step)] = str(folder)
        tracking.client.log_batch(run_id, metrics=metrics)
        for key, value in tags.items():
            tracking.client.set_tag(run_id, key, value)
        if seed == FINISHED:
            tracking.client.set_terminated(run_id, "FINISHED")
        if seed == CLOSED_OFFLINE:
            # Its last steps and its end went to the journal: the server was down by then.
            offline = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens there
            writer = JournaledWriter(offline, run_id, trial.output_dir, retry_every=3600)
            with pytest.MonkeyPatch.context() as env:
                env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once
                writer.log_metrics([Metric("loss", 0.1, 0, 5), Metric("similarity", 0.83, 0, 6)])
            writer.log_metrics([Metric("loss", 0.1, 0, 6)])
            writer.set_terminated("FINISHED")
            assert writer.pending == 3
    # A trial the grid no longer holds (the spec's learning rates changed since; or a search's
    # sample): still the sweep's, `select` reads it, `status` lists it after the grid's.
    spec_dict["methods"] = {"lora": {"learning_rate": [2e-3]}}
    old_grid = expand_grid(load_spec(write_spec(root, spec_dict, "old.yaml")))
    [other] = [t for t in old_grid if t.seed == 0]
    tracking.client.set_terminated(tracking.trial_run(parent, other), "FAILED")
    trials[OFF_GRID] = other
    return path, trials


@pytest.fixture(autouse=True)
def piped(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout is pytest's capture (not a terminal) and no COLUMNS: rich's 80-column default."""
    monkeypatch.delenv("COLUMNS", raising=False)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def logged(path: Path, trial: TrialConfig, metric: str) -> float:
    spec = load_spec(path)
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    run = tracking.trial_runs(parent.info.run_id)[trial.trial_id]
    return run.data.metrics[metric]


def test_piped_select_prints_every_value_whole_on_one_line(sweep, capsys) -> None:
    path, trials = sweep
    out, _ = run_cli(capsys, "select", str(path))
    assert "…" not in out
    lines = out.splitlines()
    assert lines[0].startswith("Stop steps of sweep small (weights {'similarity': 1.0")
    for seed, trial in trials.items():
        if seed in (NOT_STARTED, OFF_GRID):
            continue
        [row] = [line for line in lines if f"│ {trial.label} " in line]
        best = "2" if seed == FINISHED else "4"
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[:2] == [trial.label, best]
        assert cells[2] == f"{logged(path, trial, 'best_score'):.3f}"
        similarity = curve(seed, int(best))["similarity"]
        assert f"{similarity:.4f}" in cells


def test_select_as_json_and_csv_for_scripts(sweep, capsys) -> None:
    path, trials = sweep
    out, err = run_cli(capsys, "select", str(path), "--format", "json")
    rows = json.loads(out)  # stdout holds the JSON alone: the notes went to stderr
    assert "Checkpoints at the best steps:" in err
    by_label = {row["trial"]: row for row in rows}
    # Neither the trial not started nor the one off the grid (it never evaluated) is selected.
    assert set(by_label) == {t.label for s, t in trials.items() if s not in (NOT_STARTED, OFF_GRID)}
    finished = by_label[trials[FINISHED].label]
    assert finished["best_step"] == 2
    assert finished["score"] == logged(path, trials[FINISHED], "best_score")  # not rounded
    assert finished["similarity"] == curve(FINISHED, 2)["similarity"]
    assert finished["checkpoint"] == str(
        trials[FINISHED].output_dir / "checkpoints" / "step_000002"
    )
    # Its diversity falls by 0.4 of its range by step 2: collapsed there, as logged.
    assert finished["collapse_step"] == logged(path, trials[FINISHED], "collapse_step") == 2
    assert finished["collapse_metric"] == "diversity"
    assert list(finished) == [
        "trial",
        "run_id",
        "subject",
        "method",
        "num_images",
        "best_step",
        "score",
        "collapse_step",
        "collapse_metric",
        "similarity",
        "aesthetics",
        "diversity",
        "checkpoint",
        "registrable_step",
        "registrable_checkpoint",
        "registered_model",
        "registered_version",
    ]
    registered = [row for row in rows if row["registered_model"] is not None]
    assert [row["registered_model"] for row in registered] == [f"models:/small.{SUBJECT}.lora@best"]

    out, _ = run_cli(capsys, "select", str(path), "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == list(finished)
    for row in table:
        expected = by_label[row["trial"]]
        assert float(row["score"]) == expected["score"]
        assert row["best_step"] == str(expected["best_step"])
        collapse = expected["collapse_step"]
        assert row["collapse_step"] == ("" if collapse is None else str(collapse))


def test_status_tells_each_trials_state_for_a_local_sweep(sweep, capsys) -> None:
    path, trials = sweep
    with claim_trial(trials[RUNNING].output_dir):  # a worker trains it now
        out, _ = run_cli(capsys, "status", str(path), "--format", "json")
        piped, _ = run_cli(capsys, "status", str(path))
    rows = {row["trial"]: row for row in json.loads(out)}
    state = {seed: rows[t.label]["state"] for seed, t in trials.items()}
    assert state == {
        FINISHED: "FINISHED",
        RUNNING: "RUNNING",
        UNCLOSED: "ENDED UNFINISHED",  # its run never closed, and nobody holds its claim
        CLOSED_OFFLINE: "FINISHED",  # its journal closed it; MLflow has yet to hear
        NOT_STARTED: "NOT STARTED",
        OFF_GRID: "FAILED",
    }
    running = rows[trials[RUNNING].label]
    assert running["worker"].startswith("host ") and ", pid " in running["worker"]
    offline = rows[trials[CLOSED_OFFLINE].label]
    assert (offline["unsynced_writes"], offline["last_step"]) == (3, 6)
    assert offline["similarity"] == 0.83  # the journal's value is newer than MLflow's
    assert rows[trials[FINISHED].label]["unsynced_writes"] == 0
    assert rows[trials[FINISHED].label]["last_step"] == 4
    assert rows[trials[NOT_STARTED].label]["last_step"] is None
    assert "slurm_state" not in running and "job_id" not in running  # a local sweep

    assert "…" not in piped
    for seed, trial in trials.items():
        [row] = [line for line in piped.splitlines() if f"│ {trial.label} " in line]
        assert f" {trial.output_dir} " in row  # the whole folder, not folded over lines
        assert f" {state[seed]} " in row
    assert (trials[CLOSED_OFFLINE].output_dir / JOURNAL_FILE).exists()  # status only reads

    again, _ = run_cli(capsys, "status", str(path), "--format", "json")
    rows = {row["trial"]: row for row in json.loads(again)}
    assert rows[trials[RUNNING].label]["state"] == "ENDED UNFINISHED"  # its claim was let go


def test_status_csv_has_a_header_and_a_row_per_trial(sweep, capsys) -> None:
    path, trials = sweep
    out, _ = run_cli(capsys, "status", str(path), "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == [
        "trial",
        "trial_id",
        "state",
        "last_step",
        "similarity",
        "aesthetics",
        "diversity",
        "clip_t",
        "in_domain",
        "unsynced_writes",
        "worker",
        "folder",
    ]
    order = [*SEEDS, OFF_GRID]  # the grid's trials, then the sweep's others
    assert [row[0] for row in rows[1:]] == [trials[s].label for s in order]
    assert [row[1] for row in rows[1:]] == [trials[s].trial_id for s in order]
    assert rows[-1][-1] == str(trials[OFF_GRID].output_dir)  # its folder, from its run


def test_status_without_mlflow_tells_what_the_claims_and_journals_do(
    sweep, capsys, monkeypatch
) -> None:
    path, trials = sweep
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once
    spec_dict = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec_dict["tracking"] = {"uri": "http://127.0.0.1:9"}  # nothing listens there
    offline = write_spec(path.parent, spec_dict, "offline.yaml")
    with claim_trial(trials[RUNNING].output_dir):
        out, err = run_cli(capsys, "status", str(offline), "--format", "json")
    assert "warning: MLflow: http://127.0.0.1:9 did not answer" in err
    state = {row["trial"]: row["state"] for row in json.loads(out)}
    assert state == {
        trials[FINISHED].label: "UNKNOWN",
        trials[RUNNING].label: "RUNNING",
        trials[UNCLOSED].label: "UNKNOWN",
        trials[CLOSED_OFFLINE].label: "FINISHED",
        trials[NOT_STARTED].label: "UNKNOWN",
    }  # the grid's trials only: the others are known from MLflow


def spec_elsewhere(path: Path, output_dir: str) -> Path:
    """The sweep's spec as read on a machine without its trial folders (they are on a Ray
    cluster's or SLURM nodes' disks): the same MLflow, its output_dir a folder this one lacks."""
    spec_dict = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec_dict["tracking"] = {"uri": load_spec(path).tracking_uri}
    spec_dict["output_dir"] = str(path.parent / output_dir)
    return write_spec(path.parent, spec_dict, f"{output_dir}.yaml")


def test_status_takes_mlflows_word_for_open_runs_whose_folders_are_not_here(sweep, capsys) -> None:
    path, trials = sweep
    out, _ = run_cli(
        capsys, "status", str(spec_elsewhere(path, "on-the-ray-cluster")), "--format", "json"
    )
    rows = {row["trial"]: row for row in json.loads(out)}
    state = {seed: rows[t.label]["state"] for seed, t in trials.items()}
    assert state == {
        FINISHED: "FINISHED",
        # Their claims are out of sight: maybe trained now, maybe not; not "ENDED UNFINISHED".
        RUNNING: RUNNING_PER_MLFLOW,
        UNCLOSED: RUNNING_PER_MLFLOW,
        CLOSED_OFFLINE: RUNNING_PER_MLFLOW,  # the journal that closed it is out of sight too
        NOT_STARTED: "NOT STARTED",
        OFF_GRID: "FAILED",
    }
    unclosed = rows[trials[UNCLOSED].label]
    assert unclosed["last_step"] == 4  # from MLflow
    assert unclosed["unsynced_writes"] is None  # its journal cannot be read from here
    assert unclosed["folder"] == str(
        path.parent / "on-the-ray-cluster" / "trials" / f"{SUBJECT}-{trials[UNCLOSED].trial_id}"
    )


def test_status_without_squeue_warns_and_shows_the_jobs_from_mlflow(
    sweep, capsys, monkeypatch, tmp_path
) -> None:
    """A SLURM sweep read where SLURM's commands are not installed (a laptop with the shared
    MLflow): as with MLflow down, a warning and the rows from what can be read."""
    path, trials = sweep
    elsewhere = spec_elsewhere(path, "on-slurm-nodes")
    jobs = {
        t.trial_id: {"job_id": f"77_{seed}", "label": t.label, "submitit_folder": "/logs"}
        for seed, t in trials.items()
        if seed != OFF_GRID
    }
    (path.parent / "on-slurm-nodes" / "slurm").mkdir(parents=True)
    (path.parent / "on-slurm-nodes" / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no squeue on it
    out, err = run_cli(capsys, "status", str(elsewhere), "--format", "json")
    assert "warning: SLURM: `squeue` is not installed here" in err
    rows = {row["trial"]: row for row in json.loads(out)}
    assert {seed: rows[t.label]["job_id"] for seed, t in trials.items()} == {
        **{seed: f"77_{seed}" for seed in SEEDS},
        OFF_GRID: None,
    }
    assert all(row["slurm_state"] is None for row in rows.values())
    state = {seed: rows[t.label]["state"] for seed, t in trials.items()}
    assert state == {
        FINISHED: "FINISHED",
        RUNNING: RUNNING_PER_MLFLOW,
        UNCLOSED: RUNNING_PER_MLFLOW,
        CLOSED_OFFLINE: RUNNING_PER_MLFLOW,
        NOT_STARTED: "UNKNOWN",  # submitted, no run yet: queued or failed, SLURM would say
        OFF_GRID: "FAILED",
    }


@pytest.mark.parametrize(
    ("slurm_state", "trial_state"),
    [
        ("CONFIGURING", "RUNNING"),  # its nodes are allocated and booting
        ("RUNNING", "RUNNING"),
        ("COMPLETING", "RUNNING"),
        ("PENDING", "QUEUED"),
        ("REQUEUED", "QUEUED"),
        ("SUSPENDED", None),  # neither: its claim and MLflow tell
    ],
)
def test_slurm_job_states_read_as_trial_states(slurm_state: str, trial_state: str | None) -> None:
    assert slurm_trial_state(slurm_state) == trial_state


def test_validate_tells_a_search_s_groups_and_sampled_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in HTTP_DEFAULTS.items():  # main() sets them; undone after the test
        monkeypatch.setenv(key, value)
    spec_dict = small_spec(tmp_path, grid={"num_images": [2], "seed": [0, 1]})
    spec_dict["methods"] = {"lora": {}}
    spec_dict["search"] = {
        "kind": "optuna",
        "sampler": "random",
        "n_trials": 8,
        "space": {"methods.lora.rank": {"type": "int", "low": 2, "high": 8}},
    }
    assert main(["validate", str(write_spec(tmp_path, spec_dict))]) == 0
    out = capsys.readouterr().out
    summary = "2 groups × 8 sampled trials (search: optuna, random); each trains 4 steps"
    assert summary in out, out
    assert "Sampled over methods.lora.rank, one Optuna study per group." in out
    assert "1 trial;" not in out and "2 trials;" not in out
