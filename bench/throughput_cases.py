"""The in-process cases of bench/throughput.py: one trial (LoRA, textual inversion, DreamBooth),
packs of K trials, evaluation images/s, and a warm forked worker's time to its first step.

Each training case runs dreamsweep's own loop (`trainers.loop.train_trial`, or the pack loop
`trainers.pack_loop.train_pack`) on trials expanded from a small spec, under the Accelerator a
worker makes, and times it with a reporter that stamps every `on_train_step`. Steady-state
steps/s leaves out the first `warmup` steps (allocator, autograd graph and kernel caches warm
up there). Peak memory is CUDA's max allocated on a GPU, else the process's peak RSS (VmHWM,
reset before each case through /proc/self/clear_refs, so each case has its own peak).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from trainers.reporting import NullReporter

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "configs" / "subjects" / "robot"
INSTANCE_PROMPT = "a photo of sks toy"  # what dreamsweep's instance prompt reads for this subject
METHOD_OPTIONS = {
    "lora": {"learning_rate": [1.0e-4], "rank": 4},
    "textual_inversion": {"learning_rate": [5.0e-4]},
    "dreambooth": {"learning_rate": [5.0e-6], "prior_preservation": False},
}
CHEAP_EVAL = {
    # Training cases evaluate step 0 before training (the loop always does) and their last step:
    # as little as an evaluation can be, so the timed steps are the training's.
    "prompts": ["a photo of {token} {class}"],
    "images_per_prompt": 1,
    "num_inference_steps": 2,
    "metrics": ["similarity"],
    "clip_model": "tiny",
    "dino_model": "tiny",
    "aesthetics_head": "tiny",
}
EVAL_CASE = {
    # The evaluation case: the spec's default sampler, steps and guidance (dpm++, 25, 7.5), a
    # full default batch of 8 images, the quickstart's metrics on the tiny encoders.
    "prompts": ["a photo of {token} {class}", "a photo of {token} {class} on a table"],
    "images_per_prompt": 4,
    "metrics": ["similarity", "aesthetics", "diversity", "clip_t", "in_domain"],
    "clip_model": "tiny",
    "dino_model": "tiny",
    "aesthetics_head": "tiny",
}


@dataclass
class Settings:
    """What every case shares."""

    root: Path  # scratch folder for the specs and trial folders
    steps: int  # timed steps per training case (after warm-up)
    warmup: int
    base_model: str = "tiny"
    resolution: int = 64
    batch_size: int = 1
    mixed_precision: str = "no"
    train: dict[str, Any] = field(default_factory=dict)  # more `train:` fields for every case


def peak_memory_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets the peak RSS (VmHWM) of this process (Linux ≥ 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # then the peak is the process's since it started: said in the json


def peak_memory() -> tuple[float, str]:
    """(MiB, what was measured)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return rss_peak_mib(os.getpid()), "peak_rss"


def rss_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def steady_rate(stamps: list[float], warmup: int) -> float:
    """Steps per second after the first `warmup` steps (stamps[i]: when step i+1 ended)."""
    if len(stamps) <= warmup + 1:
        raise RuntimeError(f"{len(stamps)} steps timed: need more than warm-up ({warmup}) + 1")
    return (len(stamps) - 1 - warmup) / (stamps[-1] - stamps[warmup])


class StepClock(NullReporter):
    """A reporter that stamps each training step (and keeps the losses, to show it trained)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.losses: list[float] = []

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None:
        self.setup = setup

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        self.stamps.append(time.perf_counter())
        self.losses.append(loss)


def write_spec(settings: Settings, name: str, method: str, **sections: Any) -> Path:
    """A one-subject sweep spec of `method` in its own folder; `sections` override (`grid`
    and `train` merged into the defaults; others, `eval` too, replace)."""
    folder = settings.root / name
    folder.mkdir(parents=True, exist_ok=True)
    steps = settings.warmup + settings.steps
    spec: dict[str, Any] = {
        "name": name,
        "base_model": settings.base_model,
        "output_dir": str(folder / "runs"),
        "subjects": [
            {"name": "robot", "images": str(SUBJECT), "class_token": "toy", "identifier": "sks"}
        ],
        "methods": {method: METHOD_OPTIONS[method]},
        "grid": {"num_images": [4], "seed": [0], "max_steps": steps, "eval_every": steps},
        "train": {
            "resolution": settings.resolution,
            "batch_size": settings.batch_size,
            "mixed_precision": settings.mixed_precision,
            **settings.train,
        },
        "eval": CHEAP_EVAL,
        "launcher": {"kind": "local", "max_parallel": 1},
    }
    for key, value in sections.items():
        merge = key in ("grid", "train") and isinstance(value, dict)
        spec[key] = {**spec[key], **value} if merge else value
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def trials_of(spec_path: Path) -> list:
    from contract.spec import load_spec
    from launch.grid import expand_grid

    return expand_grid(load_spec(spec_path))


def _result(
    name: str, clocks: list[StepClock], warmup: int, started: float, **extra: Any
) -> dict[str, Any]:
    rate = steady_rate(clocks[0].stamps, warmup)  # members step together: member 0's clock
    memory, source = peak_memory()
    return {
        "case": name,
        "status": "ok",
        "members": len(clocks),
        "steps": len(clocks[0].stamps),
        "warmup_steps": warmup,
        "steps_per_s": rate,
        "trial_steps_per_s": rate * len(clocks),
        "peak_memory_mib": memory,
        "peak_memory_source": source,
        "first_step_s": clocks[0].stamps[0] - started,
        "first_step_includes": "model load (cached), cached inputs, step-0 evaluation",
        "final_loss": clocks[0].losses[-1],
        **extra,
    }


def lone_case(settings: Settings, name: str, method: str, **train: Any) -> dict[str, Any]:
    """One trial through `train_trial`."""
    from cluster.accelerator import make_accelerator
    from trainers.loop import train_trial

    [trial] = trials_of(write_spec(settings, name, method, train=train))
    clock = StepClock()
    peak_memory_reset()
    started = time.perf_counter()
    train_trial(trial, clock, accelerator=make_accelerator(trial.train))
    optimizer = clock.setup.get("optimizer", "?")
    compiled = clock.setup.get("compiled", "?")
    return _result(
        name,
        [clock],
        settings.warmup,
        started,
        method=method,
        optimizer=optimizer,
        compiled=compiled,
    )


def compiled_lora_case(settings: Settings) -> dict[str, Any]:
    """LoRA with `train.compile: inductor`. Its first step includes the compilation: cold when
    TORCHINDUCTOR_CACHE_DIR is empty (bench/throughput.py gives each run its own), warm when an
    earlier trial of the same architecture filled it (a sweep's later trials)."""
    result = lone_case(settings, "lora_compiled", "lora", compile="inductor")
    if result["compiled"] != "unet":  # e.g. an earlier Accelerator in this process
        raise RuntimeError(f"the UNet did not run compiled (compiled: {result['compiled']!r})")
    return result | {
        "first_step_includes": result["first_step_includes"] + ", inductor's compilation",
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torch's default"),
    }


def dreambooth_case(settings: Settings) -> dict[str, Any]:
    """Full DreamBooth with 8-bit AdamW and gradient checkpointing; if bitsandbytes' 8-bit
    AdamW cannot run here, with AdamW instead, labelled with the reason."""
    try:
        import bitsandbytes  # noqa: F401

        result = lone_case(
            settings,
            "dreambooth_adamw8bit_gc",
            "dreambooth",
            optimizer="adamw8bit",
            gradient_checkpointing=True,
        )
        return result
    except Exception as err:
        reason = f"adamw8bit failed here: {type(err).__name__}: {err}"[:500]
    result = lone_case(
        settings,
        "dreambooth_adamw_gc",
        "dreambooth",
        optimizer="adamw",
        gradient_checkpointing=True,
    )
    return result | {"note": reason}


def pack_case(settings: Settings, method: str, members: int) -> dict[str, Any]:
    """K trials of one method (seeds 0..K-1, the same learning rate) packed in one loop."""
    name = f"pack_{method}_k{members}"
    from cluster.accelerator import make_accelerator
    from trainers.pack_loop import train_pack

    trials = trials_of(write_spec(settings, name, method, grid={"seed": list(range(members))}))
    clocks = [StepClock() for _ in trials]
    peak_memory_reset()
    started = time.perf_counter()
    train_pack(
        trials,
        clocks,
        accelerator=make_accelerator(trials[0].train),
        stoppers=[None] * len(trials),
    )
    return _result(name, clocks, settings.warmup, started, method=method)


def evaluation_case(settings: Settings, repeats: int) -> dict[str, Any]:
    """A LoRA trial's evaluation: its pipeline (its adapters on, B = 0), its sampler and steps,
    8 images a call; images/s of generation alone and of the whole evaluation (with metrics)."""
    from diffusers.utils import logging as diffusers_logging

    from evaluation.evaluator import Evaluator
    from evaluation.sampling import make_sampler
    from trainers.loop import PRECISION, on_device
    from trainers.methods import make_method
    from trainers.models import assemble_pipeline, load_base_model

    diffusers_logging.disable_progress_bar()
    spec = write_spec(settings, "evaluation", "lora", eval=EVAL_CASE)
    [trial] = trials_of(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_memory_reset()
    model = load_base_model(trial.base_model)
    method = make_method(trial.method, trial.options, trial.subject, trial.export)
    method.setup(model, frozen_dtype=PRECISION[trial.train.mixed_precision])
    evaluator = Evaluator(
        trial.eval,
        token=method.subject_token,
        class_token=trial.subject.class_token,
        reference_files=trial.image_files,
        resolution=trial.train.resolution,
        device=device,
    )
    pipeline = assemble_pipeline(
        model, make_sampler(trial.eval.scheduler, model.noise_scheduler.config)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with on_device(list(model.modules.values()), device), torch.no_grad(), autocast:
        evaluator(pipeline)  # warm-up: kernels, encoders' first calls
        generation, whole = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            evaluator.generate(pipeline)
            generation.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluator(pipeline)
            whole.append(time.perf_counter() - started)
    images = len(evaluator.jobs)
    memory, source = peak_memory()
    return {
        "case": "evaluation",
        "status": "ok",
        "images": images,
        "repeats": repeats,
        "scheduler": trial.eval.scheduler,
        "num_inference_steps": trial.eval.num_inference_steps,
        "guidance_scale": trial.eval.guidance_scale,
        "generation_images_per_s": images / statistics.median(generation),
        "evaluation_images_per_s": images / statistics.median(whole),
        "metrics": list(trial.eval.metrics),
        "peak_memory_mib": memory,
        "peak_memory_source": source,
    }


def forked_worker_case(settings: Settings) -> dict[str, Any]:
    """A one-trial-at-a-time LoRA sweep as the local launcher runs it: each trial claimed, its
    trial.json written, its worker forked from the fork server (`cluster.forked_worker`), its
    events read. The first fork starts the server (which imports the workers' code: cold); the
    second finds it running (warm). Time from the fork request to the worker's first `step`
    event, and to its `start` event (set up, before the step-0 evaluation)."""
    from cluster.claims import claim_trial
    from cluster.cpu_threads import thread_environment
    from cluster.forked_worker import forked_worker
    from cluster.worker import WORKER_LOG, read_output, worker_arguments, write_trial_json
    from contract.spec import load_spec
    from launch.sweep_run import prepare_sweep

    spec = load_spec(write_spec(settings, "forked_worker", "lora", grid={"seed": [0, 1]}))
    sweep = prepare_sweep(spec)
    threads = thread_environment(1)
    runs = []
    for trial in sweep.pending:
        marks: dict[str, Any] = {"steps": []}

        def on_event(event: dict[str, Any], marks: dict[str, Any] = marks) -> None:
            now = time.perf_counter()
            if event["event"] == "start":
                marks["start"] = now
            elif event["event"] == "step":
                marks["steps"].append(now)
            elif event["event"] == "finish":  # still alive: its peak RSS is readable
                marks["peak"] = rss_peak_mib(marks["pid"])

        with claim_trial(trial.output_dir) as claim:
            trial_json = write_trial_json(trial)
            env = {**os.environ, **threads, "PYTHONUNBUFFERED": "1"}
            arguments = worker_arguments(trial_json, sweep.parent_run_id)
            begun = time.perf_counter()
            with forked_worker(arguments, env, claim) as running:
                marks["pid"] = running.pid
                with open(trial.output_dir / WORKER_LOG, "a", encoding="utf-8") as log:
                    tail = read_output(running.output, log, on_event)
                code = running.wait()
        if code != 0 or not marks["steps"]:
            raise RuntimeError(f"forked worker exited {code}: " + "\n".join(tail))
        runs.append((begun, marks))
    (_, cold), (begun, warm) = runs[0], runs[1]
    rate = steady_rate(warm["steps"], settings.warmup)
    return {
        "case": "forked_worker_lora",
        "status": "ok",
        "members": 1,
        "steps": len(warm["steps"]),
        "warmup_steps": settings.warmup,
        "steps_per_s": rate,
        "trial_steps_per_s": rate,
        "peak_memory_mib": warm["peak"],
        "peak_memory_source": "peak_rss (the worker process)",
        "first_step_s": warm["steps"][0] - begun,
        "start_event_s": warm["start"] - begun,
        "cold_first_step_s": cold["steps"][0] - runs[0][0],
        "first_step_includes": (
            "fork, MLflow child run, model load (cached), cached inputs, step-0 evaluation; "
            "warm: the fork server already running (cold: the first fork, which starts it)"
        ),
    }
