"""The LAION aesthetic head file (`sac+logos+ava1-l14-linearMSE.pth`) from disk, and weights
downloads shared by concurrent trials (one download, under a lock) from a real HTTP server on
the loopback interface."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, small_spec, write_spec

from contract.spec import load_spec
from evaluation.aesthetics import head_file, load_aesthetic_head
from evaluation.downloads import cached_download, download_path, download_problem

# The improved-aesthetic-predictor's MLP as its file stores it: Linear layers at indices 0, 2,
# 4, 6 and 7 of `layers` (Dropout at 1, 3 and 5, which hold no weights); no activations.
LAION_LAYOUT = {0: (768, 1024), 2: (1024, 128), 4: (128, 64), 6: (64, 16), 7: (16, 1)}


def laion_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (fan_in, fan_out) in LAION_LAYOUT.items():
        bound = fan_in**-0.5
        weight = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        state[f"layers.{index}.weight"] = weight
        state[f"layers.{index}.bias"] = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return state


def test_the_laion_head_file_loads_and_scores_as_its_mlp(tmp_path: Path) -> None:
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    state = laion_state()
    torch.save(state, path)
    head = load_aesthetic_head(str(path))
    assert set(head.state_dict()) == set(state)

    embeddings = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    expected = embeddings
    for index in LAION_LAYOUT:  # the predictor: five affine maps in a row
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(head(embeddings), expected.squeeze(-1))


def test_a_head_file_of_another_layout_is_refused_naming_the_file(tmp_path: Path) -> None:
    state = laion_state()
    renamed = {key.replace("layers.", "mlp."): value for key, value in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(ValueError) as caught:
        load_aesthetic_head(str(tmp_path / "renamed.pth"))
    message = str(caught.value)
    assert f"eval.aesthetics_head: '{tmp_path / 'renamed.pth'}' is not the LAION" in message
    assert "'layers.0.weight'" in message and "'mlp.0.weight'" in message

    torch.save({**state, "layers.2.weight": torch.zeros(128, 512)}, tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="has the predictor's keys but not its layer sizes"):
        load_aesthetic_head(str(tmp_path / "narrow.pth"))
    with pytest.raises(FileNotFoundError, match=r"eval\.aesthetics_head: no file at"):
        head_file(str(tmp_path / "absent.pth"))


def test_a_relative_head_path_is_the_spec_folders(tmp_path: Path) -> None:
    (tmp_path / "heads").mkdir()
    torch.save(laion_state(), tmp_path / "heads" / "laion.pth")
    spec = small_spec(tmp_path, eval={"aesthetics_head": "heads/laion.pth"})
    loaded = load_spec(write_spec(tmp_path, spec))
    assert loaded.eval.aesthetics_head == str(tmp_path / "heads" / "laion.pth")


class WeightsServer:
    """Serves one file over HTTP on 127.0.0.1 and counts the requests for it.

    With `hold_for` set, the first download's body waits until that many marker files exist
    (each client writes one just before it asks for the file), so every client has started
    while the first download is still under way; bounded by `deadline_s`.
    """

    def __init__(self, body: bytes, *, markers: Path | None = None, hold_for: int = 0) -> None:
        self.body, self.markers, self.hold_for = body, markers, hold_for
        self.requests: list[str] = []
        self.held_until_all_arrived: bool | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.command)
                if len(server.requests) == 1 and server.hold_for:
                    server.held_until_all_arrived = server.wait_for_markers(deadline_s=30.0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                half = len(server.body) // 2
                self.wfile.write(server.body[:half])
                self.wfile.flush()
                self.wfile.write(server.body[half:])

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/sac+logos+ava1-l14-linearMSE.pth"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def wait_for_markers(self, *, deadline_s: float) -> bool:
        assert self.markers is not None
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if len(list(self.markers.iterdir())) >= self.hold_for:
                return True
            time.sleep(0.02)
        return False


@pytest.fixture
def serve() -> Iterator[type[WeightsServer]]:
    started: list[WeightsServer] = []

    def start(body: bytes, **options: object) -> WeightsServer:
        server = WeightsServer(body, **options)  # type: ignore[arg-type]
        server.thread.start()
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.http.shutdown()
        server.http.server_close()


DOWNLOAD = """
import sys
from pathlib import Path
from evaluation.downloads import cached_download
Path(sys.argv[2]).touch()  # the marker: this client is about to ask
print(cached_download(sys.argv[1]))
"""


def test_concurrent_trials_download_a_url_once(tmp_path: Path, serve) -> None:
    body = os.urandom(3 << 20)
    markers = tmp_path / "markers"
    markers.mkdir()
    server = serve(body, markers=markers, hold_for=2)
    cache = tmp_path / "cache"
    env = {**os.environ, "DREAMSWEEP_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", DOWNLOAD, server.url, str(markers / str(n))],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    outputs = [client.communicate(timeout=60) for client in clients]
    assert [client.returncode for client in clients] == [0, 0], outputs
    assert server.held_until_all_arrived  # the second client started during the download
    assert server.requests == ["GET"]  # one download; the other client waited for it
    paths = {Path(out.strip()) for out, _ in outputs}
    assert len(paths) == 1
    [path] = paths
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(body).digest()
    left = {p.name for p in path.parent.iterdir()} - {path.name, f"{path.name}.lock"}
    assert left == set()  # no partial download


def test_a_head_url_is_downloaded_once_and_loads(serve, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DREAMSWEEP_CACHE", str(tmp_path))
    checkpoint = tmp_path / "served.pth"
    torch.save(laion_state(seed=1), checkpoint)
    server = serve(checkpoint.read_bytes())
    head = load_aesthetic_head(server.url)
    assert head_file(server.url) == download_path(server.url)
    torch.testing.assert_close(head.layers[7].bias, laion_state(seed=1)["layers.7.bias"])
    load_aesthetic_head(server.url)
    assert server.requests == ["GET"]


def test_a_failed_download_says_why_and_leaves_no_file(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DREAMSWEEP_CACHE", str(tmp_path))
    url = f"http://127.0.0.1:{free_port()}/sac+logos+ava1-l14-linearMSE.pth"  # nothing listens
    with pytest.raises(OSError, match=r"cannot download .*refused.*give its path in the spec"):
        cached_download(url)
    left = {p.name for p in download_path(url).parent.iterdir()}
    assert left <= {f"{download_path(url).name}.lock"}  # no file that could pass for the weights


class AnsweringServer:
    """127.0.0.1 HTTP server that records each request's method and path, and answers by path:
    `/moved-<code>` redirects to `/weights.pth` with that status, `/weights.pth` is a 1 MiB
    file, `/cut-short.pth` promises 1 MiB and closes after half, `/not-http.pth` answers a line
    that is not HTTP."""

    SIZE = 1 << 20

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                server.requests.append((self.command, self.path))
                if self.path.startswith("/moved-"):
                    self.send_response(int(self.path.removeprefix("/moved-")))
                    self.send_header("Location", "/weights.pth")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/not-http.pth":
                    self.wfile.write(b"this is not an HTTP answer\r\n\r\n")
                    self.close_connection = True
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(server.SIZE))
                    self.end_headers()
                    if self.command == "GET":
                        cut = self.path == "/cut-short.pth"
                        self.wfile.write(b"\0" * (server.SIZE // 2 if cut else server.SIZE))
                        self.close_connection = True

            do_GET = do_HEAD = answer

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.http.server_port}"
        # A short poll: shutdown() waits up to one interval, at every test's teardown.
        serve = threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True)
        serve.start()


@pytest.fixture
def answering() -> Iterator[AnsweringServer]:
    server = AnsweringServer()
    yield server
    server.http.shutdown()
    server.http.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_validation_probes_a_redirected_url_with_head_only(
    answering: AnsweringServer, code: int, monkeypatch, tmp_path: Path
) -> None:
    # urllib's own redirect handler would follow with a GET: the whole file, at validation.
    monkeypatch.setenv("DREAMSWEEP_CACHE", str(tmp_path))
    assert download_problem(f"{answering.root}/moved-{code}", "eval.fid_weights") is None
    assert answering.requests == [("HEAD", f"/moved-{code}"), ("HEAD", "/weights.pth")]
    assert not download_path(f"{answering.root}/moved-{code}").exists()


def test_a_download_cut_short_says_why_and_leaves_no_file(
    answering: AnsweringServer, monkeypatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DREAMSWEEP_CACHE", str(tmp_path))
    url = f"{answering.root}/cut-short.pth"
    with pytest.raises(
        OSError, match=r"cannot download .*closed after 524,288 of 1,048,576 bytes.*give its path"
    ):
        cached_download(url)
    assert {p.name for p in download_path(url).parent.iterdir()} == {"cut-short.pth.lock"}
    url = f"{answering.root}/not-http.pth"
    with pytest.raises(OSError, match=r"cannot download .*this is not an HTTP answer"):
        cached_download(url)
    problem = download_problem(url, "eval.fid_weights")
    assert problem is not None
    assert problem.startswith(f"eval.fid_weights: {url} is not in the cache")
    assert "this is not an HTTP answer" in problem
