"""Packed trials: which trials may train together in one worker on one frozen base model, how
they are grouped, and the pack's file (`pack.json`) that the launcher writes and the pack worker
(`python -m cluster.pack`) reads.

A pack is placement, not identity: every member keeps the id, folder, MLflow run and trajectory
it has alone (`launcher.pack` is not part of a trial's id). Members share what the frozen base
sees in one forward pass, so they must agree on the method, the base model and the training
settings; they may differ in subject, number of images, learning rate, seed and steps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from contract.trial import TrialConfig

PACKABLE_METHODS = ("lora", "textual_inversion")
"""Methods whose trained weights sit beside a frozen base each sample can be routed through (a
member's own LoRA adapter, its own token embedding). DreamBooth changes the base itself."""
PACK_JSON = "pack.json"
PACKS_FOLDER = "packs"
"""`<sweep output dir>/packs/<pack id>/`: a pack's `pack.json` and its worker's log."""


def unpackable_reason(trial: TrialConfig) -> str | None:
    """Why `trial` must train alone, or None when it may join a pack."""
    if trial.method not in PACKABLE_METHODS:
        return (
            f"{trial.method} fine-tunes the base model itself, which a pack's members share; "
            f"packable methods: {', '.join(PACKABLE_METHODS)}"
        )
    if trial.world_size > 1:
        return f"it trains on {trial.world_size} processes; a pack trains in one process"
    if trial.train.deepspeed is not None:
        return "DeepSpeed partitions one model's optimizer state across processes"
    if trial.train.mixed_precision == "fp16":
        # fp16 training needs a loss scaler, and one scaler for K members would skip a step for
        # all when one member overflows: the members would no longer train as they do alone.
        return "fp16 needs a loss scaler per trial (use bf16 or no mixed precision)"
    return None


def pack_key(trial: TrialConfig) -> str:
    """Trials with the same key may share a pack: same method, method options (all but the
    learning rate), base model and training settings."""
    shared = trial.model_dump(
        mode="json", include={"method", "options", "base_model", "train", "world_size"}
    )
    shared["options"].pop("learning_rate", None)
    return json.dumps(shared, sort_keys=True)


def group_packs(trials: Sequence[TrialConfig], size: int) -> list[list[TrialConfig]]:
    """The trials in packs of at most `size`, in the trials' order: each unpackable trial alone,
    the packable ones grouped by `pack_key` (a pack is formed when its first member comes)."""
    if size < 1:
        raise ValueError(f"pack size {size}: must be at least 1")
    packs: list[list[TrialConfig]] = []
    open_packs: dict[str, list[TrialConfig]] = {}
    for trial in trials:
        if size == 1 or unpackable_reason(trial) is not None:
            packs.append([trial])
            continue
        key = pack_key(trial)
        pack = open_packs.get(key)
        if pack is None or len(pack) == size:
            pack = open_packs[key] = []
            packs.append(pack)
        pack.append(trial)
    return packs


def pack_id(members: Sequence[TrialConfig]) -> str:
    """A stable name for a pack: its members' ids, in order."""
    blob = json.dumps([m.trial_id for m in members]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def pack_folder(sweep_output_dir: Path, members: Sequence[TrialConfig]) -> Path:
    """Where a pack's `pack.json` and worker log live, in the sweep's output folder."""
    return sweep_output_dir / PACKS_FOLDER / pack_id(members)


def packing_notes(trials: Sequence[TrialConfig], size: int) -> list[str]:
    """What `dreamsweep validate` says of a packed sweep: how many workers its trials train in,
    and which trials train alone, and why (one line per reason)."""
    if size == 1:
        return []
    packs = group_packs(trials, size)
    packed = [p for p in packs if len(p) > 1]
    notes = [
        f"launcher.pack {size}: {len(trials)} trial(s) train in {len(packs)} worker(s): "
        f"{len(packed)} pack(s) of {sum(len(p) for p in packed)} trial(s), "
        f"{len(packs) - len(packed)} trial(s) alone."
    ]
    alone: dict[str, list[TrialConfig]] = {}
    for trial in trials:
        reason = unpackable_reason(trial)
        if reason is not None:
            alone.setdefault(reason, []).append(trial)
    for reason, members in alone.items():
        methods = sorted({t.method for t in members})
        notes.append(
            f"launcher.pack {size}: {len(members)} {'/'.join(methods)} trial(s) train alone "
            f"({reason})."
        )
    return notes


class PackFile(BaseModel):
    """`pack.json`: the members' `trial.json` files, in the pack's order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pack_id: str
    members: list[Path]
