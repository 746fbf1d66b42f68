"""The peer side of bench/throughput.py: diffusers' example scripts doing the same work as
dreamsweep's cases, and dreamsweep's cases again, both in one venv of their own.

The scripts import torchvision, which does not load beside the project's torch 2.13 here, so
the peer venv holds torch 2.14.1 + torchvision 0.29.1 (this disk's package mirror has both) and
dreamsweep installed with the project's constraints (less the torch pins): both sides of each
ratio then run on the same torch. The venv is built once under ~/.cache/dreamsweep-bench and
reused while its versions match.

The scripts come from the diffusers sdist of the pinned version when it holds them; diffusers'
sdists ship src/ and tests/ only (0.42.1's does), so --examples names a diffusers checkout or
git directory instead, and the results say which scripts ran. They train the tiny model's
folder (the one `trainers.models.model_folder("tiny")` builds) at 64 px, batch 1, LoRA rank 4,
with no validation and checkpoints past the last step. Their steps/s is read from their tqdm
bar: each refresh is stamped as it arrives, and the rate is the steps between the first
refresh past the warm-up and the last one before the end, over the time between them (the
bar's own final figure, an exponential moving average, is kept beside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from throughput_cases import SUBJECT, Settings, rss_peak_mib

REPO = Path(__file__).resolve().parents[1]
PEER_PINS = ("torch==2.14.1", "torchvision==0.29.1")
SCRIPTS = {
    "lora": "examples/dreambooth/train_dreambooth_lora.py",
    "dreambooth": "examples/dreambooth/train_dreambooth.py",
    "textual_inversion": "examples/textual_inversion/textual_inversion.py",
}
MARKER = "dreamsweep-bench-peer-venv"
NEVER = "1000000000"  # checkpoint / save intervals past any run's last step
BAR = re.compile(r"Steps:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[^\]]*?,\s*([\d.]+|\?)(it/s|s/it)")


class PeerUnavailable(RuntimeError):
    """The peer side cannot run here; the message says why."""


def pinned_diffusers() -> str:
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("diffusers=="):
            return line.split("==", 1)[1].strip()
    raise PeerUnavailable("constraints.txt pins no diffusers version")


def _run(command: list[str], log: Path, **kwargs: Any) -> None:
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise PeerUnavailable(f"`{' '.join(command)}` failed ({log}):\n" + "\n".join(tail))


def venv_versions(venv: Path) -> dict[str, str] | None:
    """The peer venv's torch, torchvision and diffusers, or None when it is unusable."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    code = (
        "import json, torch, torchvision, diffusers, bitsandbytes, trainers.loop; "
        "print(json.dumps({'torch': torch.__version__, 'torchvision': torchvision.__version__, "
        "'diffusers': diffusers.__version__, 'bitsandbytes': bitsandbytes.__version__}))"
    )
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_peer_venv(venv: Path) -> dict[str, str]:
    """The peer venv, built when missing or when its versions are not the pinned ones."""
    wanted = {pin.split("==")[0]: pin.split("==")[1] for pin in PEER_PINS}
    wanted["diffusers"] = pinned_diffusers()
    versions = venv_versions(venv)
    if versions is not None and all(versions[k].startswith(v) for k, v in wanted.items()):
        return versions
    if venv.exists() and not (venv / MARKER).exists():
        raise PeerUnavailable(
            f"--peer-venv {venv}: exists, is no peer venv this bench built (no {MARKER}) and "
            f"does not hold {', '.join(f'{k} {v}' for k, v in wanted.items())}; name another"
        )
    print(f"building the peer venv {venv} (torch 2.14.1: several minutes)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "peer-venv-build.log"
    _run([sys.executable, "-m", "venv", str(venv)], log)
    (venv / MARKER).write_text("built by bench/throughput_peer.py\n", encoding="utf-8")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, *PEER_PINS], log)
    # The project's exact versions of everything else; its torch pin would undo the one above.
    constraints = venv.parent / "constraints-peer.txt"
    pins = (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()
    keep = [p for p in pins if not p.startswith(("torch==", "torchvision=="))]
    constraints.write_text("\n".join(keep) + "\n", encoding="utf-8")
    _run([*pip, "-c", str(constraints), "-e", f"{REPO}[adamw8bit]"], log)
    versions = venv_versions(venv)
    if versions is None:
        raise PeerUnavailable(f"the peer venv {venv} was built but does not import (see {log})")
    return versions


def example_scripts(scratch: Path, examples: Path | None, rev: str) -> tuple[dict[str, Path], str]:
    """The three scripts in `scratch`, and where they came from."""
    version = pinned_diffusers()
    sdist_dir = scratch / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    download += ["--no-binary", ":all:", "-d", str(sdist_dir), f"diffusers=={version}"]
    out: dict[str, Path] = {}
    try:
        _run(download, scratch / "pip-download.log")
    except PeerUnavailable as err:  # no registry here (a device machine): --examples may do
        why = f"the diffusers {version} sdist could not be downloaded ({err})"
    else:
        [sdist] = sdist_dir.glob("diffusers-*.tar.gz")
        with tarfile.open(sdist) as tar:
            names = set(tar.getnames())
            for case, path in SCRIPTS.items():
                member = f"diffusers-{version}/{path}"
                if member in names:
                    (scratch / Path(path).name).write_bytes(tar.extractfile(member).read())
                    out[case] = scratch / Path(path).name
        if len(out) == len(SCRIPTS):
            return out, f"the diffusers {version} sdist"
        why = f"the diffusers {version} sdist ({sdist.name}) holds no {', '.join(SCRIPTS.values())}"
    if examples is None:
        raise PeerUnavailable(f"{why}: pass --examples (a diffusers checkout or git directory)")
    if (examples / SCRIPTS["lora"]).exists():  # a checkout
        for case, path in SCRIPTS.items():
            out[case] = Path(shutil.copy(examples / path, scratch / Path(path).name))
        git = ["git", "-C", str(examples)]
    else:  # a git directory (a bare mirror)
        git = ["git", "--git-dir", str(examples)]
        for case, path in SCRIPTS.items():
            shown = subprocess.run([*git, "show", f"{rev}:{path}"], capture_output=True)
            if shown.returncode != 0:
                raise PeerUnavailable(f"{why}; and {examples} at {rev} has no {path}")
            (scratch / Path(path).name).write_bytes(shown.stdout)
            out[case] = scratch / Path(path).name
    commit = subprocess.run([*git, "rev-parse", rev], capture_output=True, text=True)
    setup = subprocess.run([*git, "show", f"{rev}:setup.py"], capture_output=True, text=True)
    found = re.search(r'version="([^"]+)"', setup.stdout)
    where = (
        f"{examples} at {commit.stdout.strip() or rev} (diffusers "
        f"{found.group(1) if found else 'version unknown'}), since {why}"
    )
    return out, where


def script_arguments(
    case: str,
    model: Path,
    output: Path,
    steps: int,
    *,
    resolution: int = 64,
    batch: int = 1,
    mixed_precision: str = "no",
) -> list[str]:
    common = [
        f"--pretrained_model_name_or_path={model}",
        f"--output_dir={output}",
        f"--resolution={resolution}",
        f"--train_batch_size={batch}",
        f"--mixed_precision={mixed_precision}",
        f"--max_train_steps={steps}",
        f"--checkpointing_steps={NEVER}",
        "--seed=0",
        "--lr_scheduler=constant",
    ]
    instance = [f"--instance_data_dir={SUBJECT}", "--instance_prompt=a photo of sks toy"]
    if case == "lora":
        return [*common, *instance, "--rank=4", "--learning_rate=1e-4"]
    if case == "dreambooth":
        eight_bit_and_checkpointing = ["--use_8bit_adam", "--gradient_checkpointing"]
        return [*common, *instance, "--learning_rate=5e-6", *eight_bit_and_checkpointing]
    return [  # textual inversion
        *common,
        f"--train_data_dir={SUBJECT}",
        "--learnable_property=object",
        "--placeholder_token=<robot>",
        "--initializer_token=toy",
        "--learning_rate=5e-4",
        f"--save_steps={NEVER}",
    ]


def run_script(
    python: Path, script: Path, arguments: list[str], warmup: int, log: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Run one script; its steady-state steps/s from its stamped tqdm refreshes."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(python), str(script), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=script.parent,
    )
    assert process.stdout is not None
    refreshes: list[tuple[float, int, int, str]] = []  # (when, step, total, rate text)
    pending = b""
    peak = 0.0
    with open(log, "wb") as out:
        while chunk := os.read(process.stdout.fileno(), 65536):
            now = time.perf_counter()
            # Its own peak RSS, read while it runs: wait4's ru_maxrss would be at least this
            # process's size when it forked the script (Linux keeps the pre-exec high-water).
            with contextlib.suppress(OSError, RuntimeError):
                peak = max(peak, rss_peak_mib(process.pid))
            out.write(chunk)
            pending += chunk
            *segments, pending = re.split(rb"[\r\n]", pending)
            for segment in segments:
                found = BAR.search(segment.decode("utf-8", errors="replace"))
                if found:
                    n, total = int(found.group(1)), int(found.group(2))
                    refreshes.append((now, n, total, found.group(3) + found.group(4)))
    if process.wait() != 0 or not refreshes:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
        raise RuntimeError(f"{script.name} failed ({log}):\n" + "\n".join(tail))
    total = refreshes[-1][2]
    # The bar's refresh at the last step may only come when it closes, after the script saved
    # its weights: the end point is the last refresh before the last step.
    inside = [r for r in refreshes if warmup <= r[1] < total]
    steady = None
    if len(inside) >= 2 and inside[-1][1] > inside[0][1]:
        steady = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
    tqdm_rate = refreshes[-1][3]
    rate = float(tqdm_rate[:-4]) if tqdm_rate.endswith("it/s") else 1 / float(tqdm_rate[:-4])
    first = next(r[0] for r in refreshes if r[1] >= 1)
    return {
        "status": "ok",
        "members": 1,
        "steps": total,
        "warmup_steps": warmup,
        "steps_per_s": steady if steady is not None else rate,
        "trial_steps_per_s": steady if steady is not None else rate,
        "source": "stamped tqdm refreshes" if steady is not None else "tqdm's own rate (EMA)",
        "tqdm_it_per_s": rate,
        "peak_memory_mib": peak,
        "peak_memory_source": "peak_rss (the script's process)",
        "first_step_s": first - started,
        "first_step_includes": "python start, imports, model load (first tqdm refresh ≥ 1)",
        "wall_s": time.perf_counter() - started,
    }


def run_scripts(
    python: Path,
    scripts: dict[str, Path],
    model: Path,
    scratch: Path,
    settings: Settings,
    env: dict[str, str],
    **options: Any,
) -> list[dict[str, Any]]:
    """Each script's case (`options`: resolution, batch, mixed precision)."""
    results = []
    suffix = f"_b{options['batch']}" if "batch" in options else ""
    for case, script in scripts.items():
        output = scratch / f"out-{case}{suffix}"
        steps = settings.warmup + settings.steps
        arguments = script_arguments(case, model, output, steps, **options)
        log = scratch / f"{case}{suffix}.log"
        try:
            result = run_script(python, script, arguments, settings.warmup, log, env)
        except RuntimeError as err:
            result = {"status": "failed", "reason": str(err)}
        results.append({"case": f"diffusers_{case}{suffix}", **result, "script": script.name})
        print(json.dumps(results[-1]), flush=True)
    return results


def peer_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def peer_section(settings: Settings, args: Namespace) -> dict[str, Any]:
    """Both sides in the peer venv: the scripts, then dreamsweep's one-trial cases."""
    scratch = settings.root / "peer"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        versions = ensure_peer_venv(args.peer_venv)
        scripts, source = example_scripts(scratch, args.examples, args.examples_rev)
    except PeerUnavailable as err:
        return {"status": "unavailable", "reason": str(err)}
    from trainers.models import model_folder

    python = args.peer_venv / "bin" / "python"
    env = peer_env() | {"TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor")}  # cold, its own
    cases = run_scripts(python, scripts, model_folder("tiny"), scratch, settings, env)
    ours = scratch / "dreamsweep.json"
    command = [str(python), str(REPO / "bench" / "throughput.py"), "--only", *SCRIPTS]
    command += ["--steps", str(settings.steps), "--warmup", str(settings.warmup)]
    command += ["--json-out", str(ours)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode == 0:
        for result in json.loads(ours.read_text(encoding="utf-8")):
            cases.append(result | {"case": f"dreamsweep_{result['case'].split('_adamw')[0]}"})
    else:
        reason = f"dreamsweep in the peer venv failed: {done.stderr[-2000:]}"
        cases += [
            {"case": f"dreamsweep_{n}", "status": "failed", "reason": reason} for n in SCRIPTS
        ]
    if not args.no_compile:  # beside diffusers_lora, in a process of its own (cold)
        from throughput import case_in_a_process, run_case

        compiled = run_case(
            "lora_compiled", case_in_a_process, "lora_compiled", settings, str(python), env
        )
        cases.append(compiled | {"case": "dreamsweep_lora_compiled"})
    return {
        "status": "ok",
        "venv": str(args.peer_venv),
        "versions": versions,
        "scripts": source,
        "about": (
            f"Both sides in the peer venv (torch {versions['torch']}, torchvision "
            f"{versions['torchvision']}, diffusers {versions['diffusers']}), same steps, "
            f"threads and subject. Scripts: {source}. Script steps/s: from their stamped "
            "tqdm refreshes past the warm-up (their own EMA figure in the json); first step: "
            "from the process start (imports included), against dreamsweep's in-process "
            "figure (imports done)."
        ),
        "cases": cases,
    }
