"""A sweep logging over HTTP to the real `mlflow server` started by mlflow/server.sh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MlflowServer, dreamsweep, small_spec, write_spec
from mlflow.tracking import MlflowClient

from selection.registry import Candidate, download_best, register_best

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with MlflowServer(tmp_path / "store", tmp_path / "server.log") as running:
        yield running.uri, running.store


def test_server_binds_loopback_only(server: tuple[str, Path]) -> None:
    uri, _ = server
    port = int(uri.rsplit(":", 1)[1])
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
    assert f"0100007F:{port:04X}" in local  # 127.0.0.1
    assert f"00000000:{port:04X}" not in local  # not 0.0.0.0


def test_sweep_logs_over_http(tmp_path: Path, server: tuple[str, Path]) -> None:
    uri, store = server
    spec = small_spec(tmp_path, tracking={"uri": uri, "experiment": "http-sweep"})
    path = write_spec(tmp_path, spec)
    result = dreamsweep("run", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert dreamsweep("select", str(path), cwd=tmp_path).returncode == 0

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("http-sweep")
    runs = client.search_runs([experiment.experiment_id])
    [trial] = [r for r in runs if r.data.tags.get("dreamsweep.role") == "trial"]
    assert sorted(m.step for m in client.get_metric_history(trial.info.run_id, "similarity")) == [
        0,
        2,
        4,
    ]
    assert "best_step" in trial.data.metrics
    # A checkpoint registers through the server, and `@best` downloads from it.
    candidate = Candidate(
        run_id=trial.info.run_id,
        trial_id=trial.data.tags["dreamsweep.trial_id"],
        label=trial.info.run_name,
        subject="robot",
        method="lora",
        step=4,
        score=0.5,
        checkpoint=trial.data.tags["dreamsweep.checkpoint.step_000004"],
    )
    [registered] = register_best(client, "http", [candidate], weights={"similarity": 1.0})
    assert registered.name == "http.robot.lora"
    folder = download_best(registered.name, tracking_uri=uri, destination=tmp_path / "best")
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    # Artifacts went through the server into its store, not onto the client's disk.
    stored = sorted(p.name for p in (store / "artifacts").rglob("step_*.png"))
    assert stored == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert not (tmp_path / "runs" / "small" / "mlartifacts").exists()
