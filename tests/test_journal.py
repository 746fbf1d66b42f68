"""The tracking server dies: a trial's writes go to its journal and are replayed exactly once
when it answers again (the whole sweep through an outage: test_mlflow_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import MlflowServer
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from PIL import Image

from tracking.journal import JOURNAL_FILE, JournaledWriter, pending_writes, read_journal

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


def test_the_journal_read_back_without_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `dreamsweep status` shows of a journal: its writes (a line still being appended
    counts, as `dreamsweep sync` has it to replay), the last loss step, each metric's latest
    value and the run's end."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert read_journal(tmp_path / "never-ran").writes == 0
    offline = MlflowClient(tracking_uri="http://127.0.0.1:9")  # nothing listens there
    writer = JournaledWriter(offline, "run-1", tmp_path, retry_every=3600)
    writer.log_metrics([Metric("loss", 0.5, 0, 7), Metric("similarity", 0.6, 0, 6)])
    writer.log_metrics([Metric("loss", 0.4, 0, 0), Metric("similarity", 0.7, 0, 8)])
    writer.log_metrics([Metric("similarity", 0.1, 0, 2)])  # an older step: not the latest
    writer.set_tags({"dreamsweep.checkpoint.step_000008": "/ckpt/8"})
    writer.set_terminated("FINISHED")
    with open(tmp_path / JOURNAL_FILE, "a", encoding="utf-8") as journal:
        journal.write('{"run_id": "run-1", "op": "metr')  # torn: its writer is mid-line
    summary = read_journal(tmp_path)
    assert summary.writes == pending_writes(tmp_path) == 6
    assert summary.last_loss_step == 7
    assert summary.metrics == {"similarity": (8, 0.7)}
    assert summary.terminated == "FINISHED"
