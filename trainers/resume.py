"""A trial's checkpoints as the loop uses them: resume from the newest complete one, save on the
checkpoint steps, and apply the retention policy (`trainers.checkpoint` writes them atomically).

A checkpoint holds the method's weights (as diffusers' pipelines load them) and the resume state:
the trained parameters, the optimizer, the schedule and both RNG streams (the batch generator and
the global torch RNG). Under DeepSpeed ZeRO every rank holds its own partition of the optimizer
state, so every rank saves and loads its own file; otherwise the main process saves the one
state. Only the newest checkpoint keeps the resume state: older ones keep just the weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType

from trainers.checkpoint import (
    CheckpointWriteError,
    begin_checkpoint,
    checkpoints_root,
    clean_leftovers,
    complete_checkpoints,
    latest_checkpoint,
    publish_checkpoint,
    remove_checkpoint,
    staging_dir,
    steps_to_remove,
)
from trainers.models import BaseModel

if TYPE_CHECKING:
    from contract.trial import TrialConfig
    from trainers.methods import TrainingMethod
    from trainers.reporting import Reporter

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_SHARD = "optimizer.rank{rank:03d}.pt"  # one per rank under DeepSpeed ZeRO
OPTIMIZER_SHARDS = "optimizer.rank*.pt"


def trained_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    """Every parameter that trains, by a stable name: what a checkpoint must restore."""
    named = {}
    for prefix, module in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                named[f"{prefix}.{name}"] = parameter
    return named


@dataclass
class TrialCheckpoints:
    """Resume, save and retention for one trial: every process holds one and calls `resume` and
    `save` together (both wait for every process)."""

    config: TrialConfig
    accelerator: Accelerator
    reporter: Reporter
    method: TrainingMethod
    model: BaseModel
    optimizer: AcceleratedOptimizer
    lr_scheduler: AcceleratedScheduler
    generator: torch.Generator
    root: Path = field(init=False)
    named_trainable: dict[str, torch.nn.Parameter] = field(init=False)
    sharded_optimizer: bool = field(init=False)

    def __post_init__(self) -> None:
        self.root = checkpoints_root(self.config)
        self.named_trainable = trained_parameters(self.model)
        self.sharded_optimizer = self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def resume(self) -> int:
        """Drop what killed saves left, then restore the newest COMPLETE checkpoint: weights,
        optimizer, schedule, RNG. Returns its step, or 0 when there is none."""
        if self.accelerator.is_main_process:
            clean_leftovers(self.root)
        self.accelerator.wait_for_everyone()
        resumed = latest_checkpoint(self.root)
        if resumed is None:
            return 0
        step, folder = resumed
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, parameter in self.named_trainable.items():
                parameter.copy_(state["trainable"][name])
        if self.sharded_optimizer:
            self._load_optimizer_shards(folder)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return step

    def _load_optimizer_shards(self, folder: Path) -> None:
        shard_files = sorted(folder.glob(OPTIMIZER_SHARDS))
        if len(shard_files) != self.accelerator.num_processes:
            raise RuntimeError(
                f"{folder} holds the optimizer state of {len(shard_files)} DeepSpeed "
                f"processes, and this trial runs {self.accelerator.num_processes}: resume it with "
                "the same launcher.processes_per_trial"
            )
        # ZeRO reads every rank's shard and takes its own; the fp32 master partitions come
        # from the shards, not from the (possibly low-precision) module weights.
        shards = [torch.load(f, map_location="cpu", weights_only=False) for f in shard_files]
        self.optimizer.optimizer.load_state_dict(shards, load_from_fp32_weights=True)

    def save(self, step: int) -> None:
        """Stage every rank's part, then the main process publishes the step atomically, reports
        it and applies the retention policy."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            begin_checkpoint(self.root, step)
        accelerator.wait_for_everyone()
        staging = staging_dir(self.root, step)
        if self.sharded_optimizer:
            shard = OPTIMIZER_SHARD.format(rank=accelerator.process_index)
            torch.save(self.optimizer.state_dict(), staging / shard)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                self.method.save_weights(self.model, staging)
                torch.save(self._resume_state(step), staging / TRAINER_STATE)
                published = publish_checkpoint(self.root, step)
            except Exception as err:  # torch and safetensors report a full disk in their own types
                shutil.rmtree(staging, ignore_errors=True)  # give the space back
                raise CheckpointWriteError(self.root, step, err) from err
            self.reporter.on_checkpoint(step, published)
            self._retain(step)
        accelerator.wait_for_everyone()

    def _resume_state(self, step: int) -> dict[str, Any]:
        """What `resume` restores, read now (the main process's optimizer state unless sharded)."""
        return {
            "step": step,
            "trainable": {k: p.detach().cpu().clone() for k, p in self.named_trainable.items()},
            "optimizer": None if self.sharded_optimizer else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def _retain(self, newest: int) -> None:
        """Apply the retention policy; only the newest checkpoint keeps the resume state."""
        policy = self.config.train.checkpoints
        existing = complete_checkpoints(self.root)
        protected = set(self.config.eval_steps) if policy.keep_eval_steps else set()
        doomed = set(
            steps_to_remove(
                [s for s, _ in existing], keep_last=policy.keep_last, protected=protected
            )
        )
        for step, folder in existing:
            if step in doomed:
                remove_checkpoint(folder)
                self.reporter.on_checkpoint_removed(step)
            elif step != newest:
                for resume_file in (TRAINER_STATE, OPTIMIZER_SHARDS):
                    for path in folder.glob(resume_file):
                        path.unlink()
