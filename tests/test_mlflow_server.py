"""A sweep logging over HTTP to the real `mlflow server` started by mlflow/server.sh, through an
outage: the server bound to 127.0.0.1, killed mid-trial and started again later."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import MlflowServer, dreamsweep, small_spec, start_dreamsweep, write_spec
from mlflow.tracking import MlflowClient

from contract.spec import load_spec
from launch.grid import expand_grid
from selection.registry import Candidate, download_best, register_best
from tracking.journal import JOURNAL_FILE, pending_writes

pytestmark = pytest.mark.slow


def listens_on_loopback_only(port: int) -> bool:
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # LISTEN
    return f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_sweep_logs_over_http_outlives_a_dead_server_and_sync_completes_it(
    tmp_path: Path,
) -> None:
    """The server is killed after the trial's first checkpoint and stays down to the trial's
    end: the trial trains to its last step, its writes wait in its journal, and `dreamsweep
    sync` replays them once the server is back: every curve whole, each point once. Then
    `select`, the registry and `@best` work through the server."""
    with MlflowServer(tmp_path / "store", tmp_path / "server.log") as server:
        assert listens_on_loopback_only(server.port)
        spec = small_spec(
            tmp_path,
            grid={"max_steps": 6, "eval_every": 2},
            tracking={"uri": server.uri, "experiment": "outage"},
        )
        path = write_spec(tmp_path, spec)
        [trial] = expand_grid(load_spec(path))
        run = start_dreamsweep("run", str(path), cwd=tmp_path)
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

        # Artifacts went through the server into its store, the journaled ones too.
        stored = sorted(p.name for p in (server.store / "artifacts").rglob("step_*.png"))
        assert stored == [f"step_{s:06d}.png" for s in (0, 2, 4, 6)]
        assert not (tmp_path / "runs" / "small" / "mlartifacts").exists()
        assert dreamsweep("select", str(path), cwd=tmp_path).returncode == 0
        assert "best_step" in client.get_run(run_id).data.metrics
        # A checkpoint registers through the server, and `@best` downloads from it.
        candidate = Candidate(
            run_id=run_id,
            trial_id=trial.trial_id,
            label=trial.label,
            subject="robot",
            method="lora",
            step=6,
            score=0.5,
            checkpoint=child.data.tags["dreamsweep.checkpoint.step_000006"],
        )
        [registered] = register_best(client, "http", [candidate], weights={"similarity": 1.0})
        assert registered.name == "http.robot.lora"
        best = download_best(registered.name, tracking_uri=server.uri, destination=tmp_path / "b")
        assert (best / "pytorch_lora_weights.safetensors").is_file()
