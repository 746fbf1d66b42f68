"""Services the tests and benchmarks start on this machine, on 127.0.0.1 only: the real tracking
server (`mlflow/server.sh`) and a throwaway PostgreSQL cluster from Debian's binaries to back it.
Each stops what it started (its own process group, its own data folder) and nothing else."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """The real tracking server (mlflow/server.sh) on 127.0.0.1, which a test can kill and start
    again on the same port and store; stopped whole (its workers too) on exit."""

    def __init__(self, store: Path, log: Path, *, env: dict[str, str] | None = None) -> None:
        self.store, self.log, self.env = store, log, env or {}
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env |= self.env
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [str(REPO / "mlflow" / "server.sh"), str(self.store), str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stopped whole
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill(signal.SIGTERM)


class PostgresServer:
    """A throwaway PostgreSQL cluster from Debian's binaries, on 127.0.0.1 only, run as the
    `postgres` user (PostgreSQL refuses root); `uri` names its `mlflow` database."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").iterdir(), key=lambda p: int(p.name))
        self.bin = versions[-1] / "bin"
        self.port = free_port()
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/mlflow"
        self.folder: Path | None = None

    def _as_postgres(self, *command: str | Path) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *map(str, command)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def __enter__(self) -> PostgresServer:
        # Not under pytest's tmp folder: its parents are closed to other users.
        self.folder = Path(tempfile.mkdtemp(prefix="dreamsweep-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        data = self.folder / "data"
        self._as_postgres(self.bin / "initdb", "-D", data, "--auth=trust", "-U", "postgres")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
        log = self.folder / "server.log"
        self._as_postgres(self.bin / "pg_ctl", "-D", data, "-l", log, "-w", "-o", options, "start")
        self._as_postgres(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "mlflow")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.folder is not None
        self._as_postgres(self.bin / "pg_ctl", "-D", self.folder / "data", "-m", "fast", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
