"""A trial's checkpoints as the loop uses them: resume from the newest complete one, save on the
checkpoint steps, and apply the retention policy (`trainers.checkpoint` writes them atomically).

A checkpoint holds the method's weights (as diffusers' pipelines load them) and the resume state:
the trained parameters, the optimizer, the schedule, both RNG streams (the batch generator and
the global torch RNG) and the world size it trained with, which a resume must match. Under
DeepSpeed ZeRO every rank holds its own partition of the optimizer state, so every rank saves and
loads its own file; otherwise the main process saves the one state. Only the newest checkpoint
keeps the resume state: older ones keep just the weights.
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
    checkpoint_scores,
    checkpoints_root,
    clean_leftovers,
    complete_checkpoints,
    latest_checkpoint,
    publish_checkpoint,
    remove_checkpoint,
    staging_dir,
    steps_to_remove,
    write_evaluation,
)
from trainers.models import BaseModel

if TYPE_CHECKING:
    from contract.trial import TrialConfig
    from trainers.methods import TrainingMethod
    from trainers.reporting import Reporter

TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_SHARD = "optimizer.rank{rank:03d}.pt"  # one per rank under DeepSpeed ZeRO
OPTIMIZER_SHARDS = "optimizer.rank*.pt"


class WorldSizeMismatch(RuntimeError):
    """A trial would train with another number of processes than its trajectory (or its
    config) says: each step's batch depends on it."""


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


def trained_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    """Every parameter that trains, by a stable name: what a checkpoint must restore."""
    named = {}
    for prefix, module in (("unet", model.unet), *model.text_encoders.items()):
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
    named_trainable: dict[str, torch.nn.Parameter] | None = None
    """What the checkpoint restores, by name; default: every parameter of the model that
    trains (a pack's member names only its own, as a lone trial names them)."""
    root: Path = field(init=False)
    sharded_optimizer: bool = field(init=False)

    def __post_init__(self) -> None:
        self.root = checkpoints_root(self.config)
        if self.named_trainable is None:
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
        self._refuse_another_world_size(folder, state.get("world_size"))
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
        if self.accelerator.scaler is not None and state.get("grad_scaler") is not None:
            # fp16's loss scale: restarting it at 65536 would skip steps the run never skipped
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        return step

    def _refuse_another_world_size(self, folder: Path, saved: int | None) -> None:
        """Each step trains on batch × processes × micro-batches images: a trajectory continued
        with another process count is another trajectory. Every process reads the same state and
        raises here, before any step. A checkpoint older than the stored world size (None) is
        not checked."""
        wanted = self.config.world_size
        if saved is None or saved == wanted:
            return
        raise WorldSizeMismatch(
            f"{folder} was saved by a run of trial {self.config.label} on {_processes(saved)}, "
            f"and this run has {_processes(wanted)}: each step trains on "
            "train.batch_size × processes × train.gradient_accumulation_steps images, so it "
            f"cannot continue that trajectory. To continue it, run it with {_processes(saved)} "
            "(launcher.processes_per_trial; on SLURM launcher.nodes × "
            f"launcher.processes_per_node). To train with {_processes(wanted)}, start a new trial: "
            "a spec with that process count gives the trial a new id and folder."
        )

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

    def save(self, step: int, evaluation: dict[str, float] | None = None) -> None:
        """Stage every rank's part, then the main process publishes the step atomically (with
        the metrics `evaluation` measured there, when it was evaluated), reports it and applies
        the retention policy."""
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
                if evaluation:
                    write_evaluation(staging, evaluation)
                published = publish_checkpoint(self.root, step)
            except Exception as err:  # torch and safetensors report a full disk in their own types
                shutil.rmtree(staging, ignore_errors=True)  # give the space back
                raise CheckpointWriteError(self.root, step, err) from err
            self.reporter.on_checkpoint(step, published)
            self._retain(step)
        accelerator.wait_for_everyone()

    def _resume_state(self, step: int) -> dict[str, Any]:
        """What `resume` restores, read now (the main process's optimizer state unless sharded)."""
        scaler = self.accelerator.scaler  # fp16 on a GPU only
        return {
            "step": step,
            "trainable": {k: p.detach().cpu().clone() for k, p in self.named_trainable.items()},
            "optimizer": None if self.sharded_optimizer else self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "world_size": self.accelerator.num_processes,
            "grad_scaler": None if scaler is None else scaler.state_dict(),
        }

    def _retain(self, newest: int) -> None:
        """Apply the retention policy; only the newest checkpoint keeps the resume state. The
        best-scoring kept checkpoint under the spec's weights stays whatever `keep_last` says."""
        policy, selection = self.config.train.checkpoints, self.config.selection
        existing = complete_checkpoints(self.root)
        protected = set(self.config.eval_steps) if policy.keep_eval_steps else set()
        weights = selection.weights_for(self.config.eval.metrics)
        doomed = set(
            steps_to_remove(
                [s for s, _ in existing],
                keep_last=policy.keep_last,
                protected=protected,
                scores=checkpoint_scores(existing, weights, selection.ranges),
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
