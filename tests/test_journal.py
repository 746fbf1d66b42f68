"""The tracking server dies mid-trial: writes go to the trial's journal, and are replayed exactly
once when it answers again (at the next write, at the trial's end, or with `dreamsweep sync`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, MlflowServer, dreamsweep, small_spec, write_spec
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from cluster.cpu_threads import THREAD_VARIABLES
from cluster.journal import JOURNAL_FILE, JournaledWriter, pending_writes
from launch.grid import expand_grid
from launch.spec import load_spec

pytestmark = pytest.mark.slow


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_writes_while_the_server_is_down_are_journaled_and_replayed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # each failed write fails at once
    with MlflowServer(tmp_path / "store", tmp_path / "server.log") as server:
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.create_experiment("journal")
        run_id = client.create_run(experiment).info.run_id
        folder = tmp_path / "trial"
        folder.mkdir()
        writer = JournaledWriter(client, run_id, folder, retry_every=0)
        writer.log_metrics([Metric("loss", 1.0, 0, step) for step in (1, 2, 3)])
        assert not (folder / JOURNAL_FILE).exists()

        server.kill()
        writer.log_metrics([Metric("loss", 0.5, 0, step) for step in (4, 5)])
        writer.set_tags({"dreamsweep.checkpoint.step_000004": "/ckpt/4"})
        writer.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "samples/step_000004.png")
        writer.log_text('{"a": 1}', "records/step_000004.json")
        assert pending_writes(folder) == 4
        # a write that reached the server before it died, journaled all the same (its answer
        # was lost): replaying it must not log (loss, 3) twice
        with open(folder / JOURNAL_FILE, "a", encoding="utf-8") as journal:
            row = {"run_id": run_id, "op": "metrics", "rows": [["loss", 1.0, 0, 3]]}
            journal.write(json.dumps(row) + "\n")

        server.start()
        writer.log_metrics([Metric("loss", 0.25, 0, 6)])  # replays the journal first
        writer.set_terminated("FINISHED")

        assert not (folder / JOURNAL_FILE).exists()
        assert metric_steps(client, run_id, "loss") == [1, 2, 3, 4, 5, 6]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["dreamsweep.checkpoint.step_000004"] == "/ckpt/4"
        artifacts = {
            a.path for d in ("samples", "records") for a in client.list_artifacts(run_id, d)
        }
        assert artifacts == {"samples/step_000004.png", "records/step_000004.json"}


def test_a_trial_outlives_a_dead_server_and_sync_completes_its_run(tmp_path: Path) -> None:
    """The server is killed after the trial's first checkpoint and stays down to the trial's
    end: the trial trains to its last step, its writes wait in its journal, and `dreamsweep
    sync` replays them once the server is back: every curve whole, each point once."""
    with MlflowServer(tmp_path / "store", tmp_path / "server.log") as server:
        spec = small_spec(
            tmp_path,
            grid={"max_steps": 6, "eval_every": 2},
            tracking={"uri": server.uri, "experiment": "outage"},
        )
        path = write_spec(tmp_path, spec)
        [trial] = expand_grid(load_spec(path))
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        env |= {"COLUMNS": "200", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        run = subprocess.Popen(
            [sys.executable, "-m", "launch.cli", "run", str(path)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        first_checkpoint = trial.output_dir / "checkpoints" / "step_000002" / "COMPLETE"
        deadline = time.monotonic() + 300
        while not first_checkpoint.exists():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.05)
        server.kill()
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output
        assert "MLflow write(s) wait in" in output and "dreamsweep sync" in output, output
        assert pending_writes(trial.output_dir) > 0
        # training went on without the server, to the last step
        assert (trial.output_dir / "checkpoints" / "step_000006" / "COMPLETE").is_file()

        server.start()
        synced = dreamsweep("sync", str(path), cwd=tmp_path)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert "1 journal(s) replayed, 0 left" in synced.stdout
        assert not (trial.output_dir / JOURNAL_FILE).exists()

        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        [child] = [r for r in runs if r.data.tags.get("dreamsweep.role") == "trial"]
        [parent] = [r for r in runs if r.data.tags.get("dreamsweep.role") == "sweep"]
        assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
        run_id = child.info.run_id
        loss = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # none lost, none twice
        for metric in ("similarity", "aesthetics", "diversity"):
            assert metric_steps(client, run_id, metric) == [0, 2, 4, 6]
        samples = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
        assert samples == [f"samples/step_{s:06d}.png" for s in (0, 2, 4, 6)]
        assert "dreamsweep.checkpoint.step_000006" in child.data.tags
