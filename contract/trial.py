"""A trial: ONE training trajectory, evaluated on the step grid, and its id.

A trial is (subject, method, num_images, learning_rate, seed). Its id is a stable hash of
everything that determines what it trains and measures (not of paths, launcher or selection, but
of the launcher's world size: it sets the global batch), so re-running a spec finds finished
trials, and editing a subject's images or the number of training processes makes new ones.
The launcher writes it to `trial.json`; the worker reads it back.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contract.spec import (
    METHOD_OPTIONS,
    EvalSpec,
    ExportSpec,
    Method,
    MethodOptions,
    SelectionSpec,
    SubjectSpec,
    TrainSpec,
    subject_image_files,
)
from contract.spec.train import EXECUTION_ONLY_FIELDS

METRIC_SETTINGS: dict[str, set[str]] = {
    "fid_weights": {"fid", "kid"},
    "kid_subsets": {"kid"},
    "kid_subset_size": {"kid"},
    "oracle_model": {"oracle"},
}
"""`eval.` settings that only the named metrics read (and only then belong to a trial's id)."""


class TrialConfig(BaseModel):
    """Everything a worker needs to run one trial; written to `trial.json` by the launcher."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sweep: str
    base_model: str
    """The base model's id (hub id, resolved folder, or a toy model's name); its own resolution
    and precision are in `train`."""
    model_name: str | None = None
    """The base model's short name when the sweep compares several (it is then in the label);
    None for a one-model sweep. Not identity: `base_model` is."""
    subject: SubjectSpec
    method: Method
    options: MethodOptions
    """The method's options from the spec (its `learning_rate` list is not part of the trial)."""
    num_images: int
    learning_rate: float
    seed: int
    max_steps: int
    eval_every: int
    train: TrainSpec
    world_size: int = Field(default=1, ge=1)
    """Training processes of the trial (`launcher.processes_per_trial`; on SLURM `launcher.nodes`
    × `launcher.processes_per_node`). Each optimizer step trains on `train.batch_size` ×
    world_size × `train.gradient_accumulation_steps` images, so it is part of the trial's id.
    Its default reads a `trial.json` written before it existed (a requeued job's)."""
    export: ExportSpec = ExportSpec()
    """The formats its weights are saved in; not identity (the trajectory is the same). Its
    default reads a `trial.json` written before it existed."""
    eval: EvalSpec
    selection: SelectionSpec
    """How stop steps are chosen; the trial reads it for early stopping only (not identity)."""
    image_files: list[Path]
    """The subject's first `num_images` files, in name order."""
    image_digest: str
    """sha256 over those files' bytes: the trial id follows the images, not their location."""
    output_dir: Path
    """This trial's folder: checkpoints, logs."""
    tracking_uri: str
    experiment: str

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_method(cls, data: Any) -> Any:
        """trial.json holds the options as a mapping: parse them as the named method's."""
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            options_type = METHOD_OPTIONS.get(data.get("method"))
            if options_type is not None:
                return {**data, "options": options_type.model_validate(data["options"])}
        return data

    @property
    def trial_id(self) -> str:
        # Not identity: where things are, where they are logged, how stop steps are chosen, and
        # settings that do not change the trajectory (other learning rates of the list, which
        # checkpoints are kept, whether the steps are compiled: the same trajectory up to float
        # rounding, as packing is). Prior-preservation settings matter only to a method that
        # uses them.
        unused = {"checkpoints"} if self.uses_prior else {"checkpoints", "prior"}
        unused |= set(EXECUTION_ONLY_FIELDS)
        exclude: dict[str, Any] = {
            "image_files": True,
            "output_dir": True,
            "subject": {"images"},
            "options": {"learning_rate"},
            "train": unused,
            "tracking_uri": True,
            "experiment": True,
            "selection": True,
            "export": True,
            "model_name": True,
        }
        if self.world_size == 1:
            # A one-process trial hashes as before the world size was part of its identity, so
            # the single-process trials of sweeps already run are still found.
            exclude["world_size"] = True
        # A setting that only some metrics read counts only when one of them is measured, so a
        # new metric's settings leave the ids of trials that do not measure it as they were.
        loaded = self.eval.weights_sources
        exclude["eval"] = {
            setting
            for setting, readers in METRIC_SETTINGS.items()
            if not readers & set(self.eval.metrics)
        }
        if "eval.fid_weights" not in loaded:  # FID on CLIP or DINO features: no Inception
            exclude["eval"].add("fid_weights")
        identity = self.model_dump(mode="json", exclude=exclude)
        # Evaluation inputs count by content, like the subject's images, not by location. (The
        # aesthetic head counts by its name, as it always has: hashing its file now would give
        # every sweep that names one a new id.)
        evaluation = identity["eval"]
        inception = loaded.get("eval.fid_weights")
        if inception is not None and Path(inception).is_absolute():  # a file, checked to exist
            evaluation["fid_weights"] = _weights_digest(Path(inception))
        if self.eval.prompt_template is not None:
            template = self.eval.prompt_template.template
            evaluation["prompt_template"]["template"] = file_digest([template])
        if self.eval.fid_reference is not None:
            evaluation["fid_reference"] = file_digest(subject_image_files(self.eval.fid_reference))
        blob = json.dumps(identity, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Short human name: subject/method/n=…/lr=…/seed=…, with the base model's name after
        the method when the sweep compares several (subject/method/model/n=…)."""
        model = "" if self.model_name is None else f"/{self.model_name}"
        return (
            f"{self.subject.name}/{self.method}{model}/n={self.num_images}"
            f"/lr={self.learning_rate:g}/seed={self.seed}"
        )

    @property
    def uses_prior(self) -> bool:
        """True when the method adds the prior-preservation loss on class images."""
        return bool(getattr(self.options, "prior_preservation", False))

    @property
    def eval_steps(self) -> list[int]:
        return list(range(0, self.max_steps + 1, self.eval_every))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Every evaluated step after 0, and every `train.checkpoints.every` steps."""
        every = self.train.checkpoints.every
        extra = range(every, self.max_steps + 1, every) if every else []
        return sorted({*self.eval_steps[1:], *extra})


def file_digest(files: list[Path]) -> str:
    """sha256 over the files' contents, in order: identity by content, not location."""
    sha = hashlib.sha256()
    for path in files:
        sha.update(hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()


@functools.lru_cache(maxsize=16)
def _file_digest_once(path: Path, size: int, mtime_ns: int) -> str:
    return file_digest([path])


def _weights_digest(path: Path) -> str:
    """A weights file's digest, read once per version of the file: an Inception file is ~100 MB
    and a trial's id is asked for often."""
    stat = path.stat()
    return _file_digest_once(path.resolve(), stat.st_size, stat.st_mtime_ns)
