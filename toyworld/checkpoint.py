"""A resumable training stage: checkpointed atomically every few steps, continued after a kill.

Each step's data and noise are drawn from (seed, step) alone, so a run resumed at step t trains
exactly what an uninterrupted run would (on the same thread count). A stage asked for more
steps than its checkpoint holds continues from it; one asked for no more is left as it is.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StageSettings:
    steps: int
    batch_size: int
    learning_rate: float
    save_every: int = 100


@dataclass
class StageResult:
    name: str
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    seconds_per_step: float


def atomic_save(payload: object, path: Path) -> None:
    """torch.save to a temporary file, then rename over `path`: a kill leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def write_json(payload: object, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The torch generator of one step (noise, timesteps, dropout draws)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream * 7_919 + step)


def run_stage(
    name: str,
    checkpoint: Path,
    settings: StageSettings,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    train_step: Callable[[int], float],
    *,
    inputs: dict[str, object] | None = None,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Train `modules` with `train_step(step) → loss` from the checkpoint's step (or 0) up to
    `settings.steps`, saving modules, optimizer and losses every `save_every` steps and at the
    end. `inputs` (e.g. the upstream stages' records) must match the checkpoint's: a stage is
    never continued on top of different upstream weights."""
    start, losses = 0, []
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("inputs") != inputs:
            raise RuntimeError(
                f"{checkpoint}: stage {name} was trained on other inputs ({state.get('inputs')}, "
                f"now {inputs}); delete it to retrain the stage"
            )
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
        log(f"{name}: resuming at step {start}")
    began = time.monotonic()

    def save(step: int) -> None:
        atomic_save(
            {
                "step": step,
                "modules": {key: module.state_dict() for key, module in modules.items()},
                "optimizer": optimizer.state_dict(),
                "losses": losses,
                "settings": asdict(settings),
                "inputs": inputs,
            },
            checkpoint,
        )

    for module in modules.values():
        module.train()
    for step in range(start, settings.steps):
        losses.append(train_step(step))
        done = step + 1
        if done % settings.save_every == 0 or done == settings.steps:
            save(done)
        if done % max(1, settings.save_every // 4) == 0 or done == settings.steps:
            recent = losses[-max(1, settings.save_every // 4) :]
            log(f"{name}: step {done}/{settings.steps} loss {sum(recent) / len(recent):.4f}")
    for module in modules.values():
        module.eval()
    trained = max(0, settings.steps - start)
    seconds = time.monotonic() - began
    tail = losses[-min(len(losses), 50) :] or [float("nan")]
    return StageResult(
        name=name,
        steps=max(start, settings.steps),
        resumed_from=start,
        final_loss=sum(tail) / len(tail),
        seconds=round(seconds, 2),
        seconds_per_step=round(seconds / trained, 4) if trained else float("nan"),
    )
