"""16 trials (separate processes) logging at once to one real `mlflow server` on 127.0.0.1, on a
SQLite and on a PostgreSQL backend: every metric step of every trial arrives exactly once.
bench/tracking_load.py ramps the same load further and records what each backend held."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
from conftest import MlflowServer, PostgresServer, small_spec, write_spec

from contract.spec import load_spec
from launch.grid import expand_grid
from tracking.load import run_load

pytestmark = pytest.mark.slow
WRITERS = 16


@pytest.fixture(scope="module")
def sixteen_trials(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("load")
    spec = small_spec(folder, grid={"seed": list(range(WRITERS))})
    return [t.model_dump_json() for t in expand_grid(load_spec(write_spec(folder, spec)))]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sixteen_concurrent_trials_lose_and_double_nothing(
    backend: str, sixteen_trials: list[str], tmp_path: Path
) -> None:
    with PostgresServer() if backend == "postgresql" else nullcontext() as postgres:
        env = {"MLFLOW_BACKEND_STORE_URI": postgres.uri} if postgres else {}
        with MlflowServer(tmp_path / "store", tmp_path / "server.log", env=env) as server:
            result = run_load(server.uri, sixteen_trials, tmp_path, steps=20)
    assert result.writers == WRITERS
    assert result.problems == []  # 16 child runs, each FINISHED, each (key, step) once
    print(f"{backend}: {WRITERS} writers in {result.seconds:.1f} s, {result.journaled} journaled")
