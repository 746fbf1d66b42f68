"""Training throughput on this machine: dreamsweep's cases beside diffusers' example scripts.

Run: python bench/throughput.py [--quick] [--steps 200] [--warmup 20] [--no-peer]
     [--examples DIR_OR_GIT_DIR] [--output bench/results]

Writes `throughput.json` and `throughput.md` to --output: the machine, then per case steady-state
steps/s (the first --warmup steps left out), trial-steps/s (steps/s × members of a pack), peak
memory and the time from the worker's start to its first step. Cases (tiny model, 64 px, rank
4, batch 1, on the CPU): LoRA, textual inversion, full DreamBooth (8-bit AdamW + gradient
checkpointing), LoRA with `train.compile: inductor` (cold, then warm from the inductor cache
the cold case filled; --no-compile skips both), packs of K = 1, 2, 4, 8 LoRA and TI trials,
evaluation images/s, and a warm forked worker's time to its first step
(bench/throughput_cases.py). Beside them (unless
--no-peer) diffusers' example scripts doing the same work, in a venv of their own with torch
2.14.1 and torchvision, where dreamsweep's one-trial cases run again so the ratios share a torch
(bench/throughput_peer.py). With CUDA, a GPU section on SD 1.5's architecture at 512 px with
random weights (bench/throughput_gpu.py). --quick: a smoke run of a few steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# Run as a script: its folder is on sys.path, so the bench's modules beside it import by name.
import throughput_cases as cases
import torch
from throughput_report import figures, write_markdown

from cluster.cpu_threads import THREAD_VARIABLES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")
LONE = {
    "lora": lambda s: cases.lone_case(s, "lora", "lora"),
    "textual_inversion": lambda s: cases.lone_case(s, "textual_inversion", "textual_inversion"),
    "dreambooth": cases.dreambooth_case,
    "lora_compiled": cases.compiled_lora_case,
}
"""The one-trial cases by name (`--only` runs some of them: the peer venv's dreamsweep side, and
`lora_compiled`, cold then warm, each in a process of its own)."""


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "device": "cpu",
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"device": properties.name, "device_memory_gib": properties.total_memory / 2**30}
    return info


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_case(name: str, run: Any, *args: Any) -> dict[str, Any]:
    """A case's result; a case that raises is recorded as failed (the others still run)."""
    started = time.perf_counter()
    try:
        result = run(*args)
    except Exception as err:  # the reason goes into the results
        result = {"case": name, "status": "failed", "reason": f"{type(err).__name__}: {err}"}
    result["case_wall_s"] = time.perf_counter() - started  # setup, evaluations and saving too
    print(json.dumps(result), flush=True)
    return result


def case_in_a_process(
    name: str,
    settings: cases.Settings,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The one-trial case `name` in a fresh process, as a worker trains a trial: Accelerate
    keeps its first settings (e.g. no compilation) for the rest of a process."""
    out = settings.root / f"{name}-{time.time_ns()}.json"
    command = [python, str(Path(__file__).resolve()), "--only", name]
    command += ["--steps", str(settings.steps), "--warmup", str(settings.warmup)]
    command += ["--json-out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} in a process of its own failed: {done.stderr[-2000:]}")
    [result] = json.loads(out.read_text(encoding="utf-8"))
    if result.get("status") != "ok":
        raise RuntimeError(f"{name} in a process of its own failed: {result.get('reason')}")
    return result


def cpu_cases(settings: cases.Settings, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = [run_case(name, LONE[name], settings) for name in LONE if name != "lora_compiled"]
    if not args.no_compile:
        # Cold (this run's empty inductor cache), then warm: a sweep's next trial of the same
        # architecture, which finds the kernels the first one compiled.
        results.append(run_case("lora_compiled", case_in_a_process, "lora_compiled", settings))
        warm = run_case("lora_compiled_warm", case_in_a_process, "lora_compiled", settings)
        results.append(warm | {"case": "lora_compiled_warm"})
    for method in ("lora", "textual_inversion"):
        for k in args.pack_sizes:
            results.append(run_case(f"pack_{method}_k{k}", cases.pack_case, settings, method, k))
    results.append(run_case("evaluation", cases.evaluation_case, settings, args.eval_repeats))
    if not args.no_forked:
        results.append(run_case("forked_worker_lora", cases.forked_worker_case, settings))
    return results


def gpu_in_a_process(scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The GPU section in a process of its own: Accelerate keeps one mixed precision per
    process (the tiny cases' "no"; the GPU's bf16), and the GPU's peak memory is its own."""
    out = scratch / "gpu.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--gpu-only", "--json-out", str(out)]
    command += ["--quick"] if args.quick else []
    command += ["--peer-venv", str(args.peer_venv), "--examples-rev", args.examples_rev]
    command += ["--examples", str(args.examples)] if args.examples else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"status": "failed", "reason": done.stderr[-3000:], "cases": []}
    return json.loads(out.read_text(encoding="utf-8"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 6 steps, 2 warm-up")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 200)")
    parser.add_argument("--warmup", type=int, help="warm-up steps left out (default 20)")
    parser.add_argument("--pack-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--eval-repeats", type=int, help="timed evaluation calls (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for every case and subprocess (OMP_NUM_THREADS; default: torch's, "
        "all cores; on a busy machine 1 avoids OpenMP's oversubscription)",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="profile the LoRA step alone and packed: auto (default) when K = 4 misses its "
        "target (a minute or two more: the profiler's trace takes long to read on the CPU)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip diffusers' scripts")
    parser.add_argument("--no-forked", action="store_true", help="skip the forked worker")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the `train.compile: inductor` cases (a cold compilation takes minutes on a CPU)",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        help="where diffusers' example scripts are when the sdist lacks them: a diffusers "
        "checkout, or its git directory (read at --examples-rev)",
    )
    parser.add_argument("--examples-rev", default="HEAD")
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=Path.home() / ".cache" / "dreamsweep-bench" / "peer-venv",
        help="the peer venv (torch 2.14.1 + torchvision + dreamsweep), built when missing",
    )
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    # Internal: the peer venv runs dreamsweep's own cases through this script.
    parser.add_argument("--only", nargs="+", choices=sorted(LONE), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gpu-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = {"steps": 6, "warmup": 2, "eval_repeats": 1}
    full = {"steps": 200, "warmup": 20, "eval_repeats": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [
        f"--{name.replace('_', '-')} {value}: must be at least {least}"
        for name, value, least in (
            ("steps", args.steps, 2),
            ("warmup", args.warmup, 0),
            ("eval_repeats", args.eval_repeats, 1),
        )
        if value < least
    ]
    problems += [f"--pack-sizes {k}: must be at least 1" for k in args.pack_sizes if k < 1]
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: must be at least 1")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the benchmark
    args = parse_args(argv)
    if args.threads is not None:  # this process now, its subprocesses by their environment
        os.environ.update(dict.fromkeys(THREAD_VARIABLES, str(args.threads)))
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "bench/throughput.py", *(argv or sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="dreamsweep-throughput-") as scratch:
        if not args.only:  # (an --only run is told its cache by its environment)
            # The compiled cases start cold, from an inductor cache of this run's own.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")
        settings = cases.Settings(root=Path(scratch), steps=args.steps, warmup=args.warmup)
        if args.only:
            results = [run_case(name, LONE[name], settings) for name in args.only]
            args.json_out.write_text(json.dumps(results, indent=2), encoding="utf-8")
            return 0
        if args.gpu_only:
            from throughput_gpu import gpu_section

            section = gpu_section(Path(scratch) / "gpu", args)
            args.json_out.write_text(json.dumps(section, indent=2), encoding="utf-8")
            return 0
        report: dict[str, Any] = {
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": {
                "base_model": "tiny",
                "resolution": 64,
                "rank": 4,
                "batch_size": 1,
                "steps": args.steps,
                "warmup_steps": args.warmup,
                "pack_sizes": args.pack_sizes,
                "threads": args.threads or "torch's default",
            },
            "cases": cpu_cases(settings, args),
        }
        packing = figures(report)["lora_k4_over_k1"]
        if args.profile == "always" or (args.profile == "auto" and packing.get("met") is False):
            from throughput_profile import profile_lora

            try:
                report["profile"] = profile_lora(settings, steps=3 if args.quick else 10)
            except Exception as err:  # the figures stand without it
                report["profile_error"] = f"{type(err).__name__}: {err}"
        if not args.no_peer:
            from throughput_peer import peer_section

            report["peer"] = peer_section(settings, args)
        if torch.cuda.is_available() and not args.no_gpu:
            report["gpu"] = gpu_in_a_process(Path(scratch), args)
    report["figures"] = figures(report)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.output / "throughput.md")
    print(f"wrote {args.output / 'throughput.json'} and throughput.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
