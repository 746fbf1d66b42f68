"""A short profile of the LoRA step, alone and packed (K = 1 and K = 4), for bench/throughput.py
when packing falls short of its target: where a step's time goes (torch.profiler, the ops with
the most self time per step, on the CPU or CUDA), so the figure comes with what limits it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from throughput_cases import Settings, StepClock, trials_of, write_spec


class ProfilingClock(StepClock):
    """Profiles the steps after the warm-up, `steps` of them."""

    def __init__(self, warmup: int, steps: int) -> None:
        super().__init__()
        self.first, self.last = warmup, warmup + steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)

    def on_train_step(self, step: int, *, loss: float, lr: float) -> None:
        super().on_train_step(step, loss=loss, lr=lr)
        if step == self.first:
            self.profiler.start()
        elif step == self.last:
            self.profiler.stop()


def _top_ops(clock: ProfilingClock, steps: int, rows: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    averages = clock.profiler.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
    step_ms = 1000 * (clock.stamps[clock.last - 1] - clock.stamps[clock.first - 1]) / steps
    aten_calls = sum(e.count for e in averages if e.key.startswith("aten::"))
    return {
        "step_ms": step_ms,
        "aten_calls_per_step": aten_calls / steps,  # dispatched ops: what overhead scales with
        "time": "device (CUDA) self time" if cuda else "CPU self time",
        "ops": [
            {
                "op": e.key,
                "ms_per_step": getattr(e, key) / 1000 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in ranked[:rows]
        ],
    }


def profile_lora(settings: Settings, steps: int, rows: int = 8) -> dict[str, Any]:
    """The lone LoRA trial and packs of 1 and 4, each profiled over `steps` steady steps."""
    from cluster.accelerator import make_accelerator
    from trainers.loop import train_trial

    profiled = replace(settings, steps=steps + 1)
    out: dict[str, Any] = {}
    [trial] = trials_of(write_spec(profiled, "profile_lora", "lora"))
    clock = ProfilingClock(max(settings.warmup, 1), steps)
    train_trial(trial, clock, accelerator=make_accelerator(trial.train))
    out["lora"] = _top_ops(clock, steps, rows)
    from trainers.pack_loop import train_pack

    for members in (1, 4):
        name = f"profile_pack_lora_k{members}"
        trials = trials_of(write_spec(profiled, name, "lora", grid={"seed": list(range(members))}))
        clocks = [ProfilingClock(max(settings.warmup, 1), steps)]
        clocks += [StepClock() for _ in trials[1:]]
        train_pack(
            trials, clocks, accelerator=make_accelerator(trials[0].train), stoppers=[None] * members
        )
        out[f"pack_lora_k{members}"] = _top_ops(clocks[0], steps, rows)
    return out


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """The profile as Markdown: a table of the top ops per profiled run."""
    lines = []
    for run, found in profile.items():
        lines += [
            f"**{run}**: {found['step_ms']:.1f} ms a step (profiled, so slower than unprofiled), "
            f"{found['aten_calls_per_step']:.0f} aten calls a step; top ops by {found['time']}:",
            "",
            "| op | ms / step | calls / step |",
            "|---|---|---|",
        ]
        lines += [
            f"| `{op['op']}` | {op['ms_per_step']:.2f} | {op['calls_per_step']:.0f} |"
            for op in found["ops"]
        ]
        lines.append("")
    return lines
