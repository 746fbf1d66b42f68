"""`SweepSpec`, the root of the spec: its sections, the checks across them, and the values
derived from them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from contract.spec.base import TINY, _resolve, _Strict
from contract.spec.evaluation import EvalSpec
from contract.spec.launchers import (
    AshaSchedulerSpec,
    LocalLauncherSpec,
    MedianSchedulerSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    TrackingSpec,
)
from contract.spec.selection import SELECTABLE_METRICS, STUDY_WEIGHTS, SelectionSpec
from contract.spec.train import GridSpec, LoRASpec, MethodsSpec, SubjectSpec, TrainSpec


class SweepSpec(_Strict):
    """A sweep: subjects × methods × grid, trained, evaluated, tracked and selected."""

    name: str
    """Sweep name: letters, digits, `_`, `.`, `-`."""
    base_model: str
    """Diffusers Stable Diffusion weights: a hub id, a local folder, or `tiny` (built offline)."""
    output_dir: Path | None = None
    """Where checkpoints, logs and the default MLflow store go; unset means `runs/<name>` beside
    the spec file."""
    subjects: list[SubjectSpec] = Field(min_length=1)
    methods: MethodsSpec = MethodsSpec(lora=LoRASpec())
    """The methods to compare: a list of names, or a mapping of name → options."""
    grid: GridSpec
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    selection: SelectionSpec = SelectionSpec()
    launcher: Annotated[
        LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, Field(discriminator="kind")
    ] = LocalLauncherSpec()
    """Where trials run: `local` (worker processes here), `slurm` (a job array) or `ray` (a Ray
    Tune experiment)."""
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return SubjectSpec._safe_name(name)

    @model_validator(mode="before")
    @classmethod
    def _default_output_dir(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("output_dir") is None
            and isinstance(data.get("name"), str)
        ):
            return {**data, "output_dir": f"runs/{data['name']}"}
        return data

    @field_validator("launcher", mode="before")
    @classmethod
    def _launcher_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("base_model")
    @classmethod
    def _local_or_hub(cls, base_model: str, info: ValidationInfo) -> str:
        if base_model == TINY:
            return base_model
        if base_model.startswith((".", "/", "~")):
            path = _resolve(Path(base_model), info)
            if not path.is_dir():
                raise ValueError(f"local model folder {str(path)!r} does not exist")
            return str(path)
        return base_model

    @field_validator("output_dir")
    @classmethod
    def _resolve_output(cls, output_dir: Path | None, info: ValidationInfo) -> Path | None:
        return None if output_dir is None else _resolve(output_dir, info)

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepSpec:
        problems = []
        names = [s.name for s in self.subjects]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"subjects: names must be unique, repeated: {duplicates}")
        if self.selection.weights is not None:
            unmeasured = sorted(set(self.selection.weights) - set(self.eval.metrics))
            if unmeasured:
                problems.append(
                    f"selection.weights: {unmeasured} not in eval.metrics {self.eval.metrics}"
                )
            if "fid" in self.selection.weights:
                problems.append(
                    "selection.weights: 'fid' cannot be weighted (lower is better and it has no "
                    f"fixed range); weight any of {list(SELECTABLE_METRICS)}"
                )
            if not any(self.selection.weights.values()):
                problems.append("selection.weights: at least one weight must be > 0")
        elif not self.selection_weights:
            problems.append(
                f"selection.weights: the default weights {STUDY_WEIGHTS} cover none of "
                f"eval.metrics {self.eval.metrics}; set selection.weights"
            )
        if self.train.optimizer == "adamw8bit" and self.train.deepspeed is not None:
            problems.append(
                "train.optimizer: 'adamw8bit' cannot be combined with train.deepspeed (DeepSpeed "
                "runs its own optimizer); use optimizer: adamw with deepspeed, or drop deepspeed"
            )
        if self.train.deepspeed is not None:
            # Accelerate drives one DeepSpeed engine per trial: one trained module.
            both = [n for n, o in self.methods.enabled if getattr(o, "train_text_encoder", False)]
            if both:
                problems.append(
                    f"train.deepspeed: methods {both} train the UNet and the text encoder, and "
                    "DeepSpeed trains one model per trial; set train_text_encoder: false"
                )
        watched = {*self.selection_weights, *self.selection.collapse_metrics(self.eval.metrics)}
        missing_ranges = sorted(watched - set(self.selection.ranges))
        if missing_ranges:
            problems.append(
                f"selection.ranges: no range for weighted or watched metric(s) {missing_ranges}"
            )
        if self.launcher.kind == "ray" and self.launcher.scheduler.kind != "fifo":
            problems.extend(self._scheduler_problems(self.launcher.scheduler))
        if "fid" in self.selection.collapse.metrics:
            problems.append(
                "selection.collapse.metrics: 'fid' is lower-is-better; it cannot collapse"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _scheduler_problems(self, scheduler: AshaSchedulerSpec | MedianSchedulerSpec) -> list[str]:
        problems, field = [], "launcher.scheduler"
        max_t = getattr(scheduler, "max_t", None)
        if max_t is not None and max_t > self.grid.max_steps:
            problems.append(
                f"{field}.max_t: {max_t} is beyond grid.max_steps ({self.grid.max_steps})"
            )
        horizon = max_t or self.grid.max_steps
        if scheduler.grace_period is not None and scheduler.grace_period >= horizon:
            problems.append(
                f"{field}.grace_period: {scheduler.grace_period} must be below max_t or "
                f"grid.max_steps ({horizon}): no trial could be stopped"
            )
        return problems

    # Derived values: computed here so no caller re-implements a default.
    @property
    def resolved_output_dir(self) -> Path:
        assert self.output_dir is not None, "set by _default_output_dir"
        return self.output_dir

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri is not None:
            return self.tracking.uri
        return f"sqlite:///{self.resolved_output_dir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def selection_weights(self) -> dict[str, float]:
        return self.selection.weights_for(self.eval.metrics)
