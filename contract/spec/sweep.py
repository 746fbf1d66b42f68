"""`SweepSpec`, the root of the spec: its sections, the checks across them, and the values
derived from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from contract.spec.base import TINY, _folder_problem, _resolve, _Strict
from contract.spec.evaluation import EvalSpec
from contract.spec.launchers import (
    AshaSchedulerSpec,
    LocalLauncherSpec,
    MedianSchedulerSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    TrackingSpec,
)
from contract.spec.search import SearchSpec, search_problems
from contract.spec.selection import SELECTABLE_METRICS, STUDY_WEIGHTS, SelectionSpec
from contract.spec.train import GridSpec, LoRASpec, MethodsSpec, SubjectSpec, TrainSpec

# Validation-context key: a dict that `SweepSpec` fills with each section that validated, and
# whose presence tells it that the caller (the loader) runs the checks across sections itself.
PARSED_SECTIONS = "parsed_sections"

_CrossCheck = Callable[..., list[str]]
_CROSS_CHECKS: list[tuple[tuple[str, ...], _CrossCheck]] = []


def _across(*sections: str) -> Callable[[_CrossCheck], _CrossCheck]:
    """Register a check of the named sections (passed in this order); it runs whenever all of
    them validated, whatever failed elsewhere in the spec."""

    def register(check: _CrossCheck) -> _CrossCheck:
        _CROSS_CHECKS.append((sections, check))
        return check

    return register


def cross_section_problems(sections: Mapping[str, Any]) -> list[str]:
    """Problems across the spec's sections (name → validated value), from every check whose
    sections are all present; each problem starts with the field it is about."""
    problems: list[str] = []
    for needed, check in _CROSS_CHECKS:
        if all(name in sections for name in needed):
            problems.extend(check(*(sections[name] for name in needed)))
    return problems


@_across("subjects")
def _unique_subject_names(subjects: list[SubjectSpec]) -> list[str]:
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    return [f"subjects: names must be unique, repeated: {duplicates}"] if duplicates else []


@_across("selection", "eval")
def _weights_are_measured(selection: SelectionSpec, evaluation: EvalSpec) -> list[str]:
    problems = []
    if selection.weights is not None:
        unmeasured = sorted(set(selection.weights) - set(evaluation.metrics))
        if unmeasured:
            problems.append(
                f"selection.weights: {unmeasured} not in eval.metrics {evaluation.metrics}"
            )
        for distance in sorted({"fid", "kid"} & set(selection.weights)):
            problems.append(
                f"selection.weights: {distance!r} cannot be weighted (lower is better and it has "
                f"no fixed range); weight any of {list(SELECTABLE_METRICS)}"
            )
        if not any(selection.weights.values()):
            problems.append("selection.weights: at least one weight must be > 0")
    elif not selection.weights_for(evaluation.metrics):
        problems.append(
            f"selection.weights: the default weights {STUDY_WEIGHTS} cover none of "
            f"eval.metrics {evaluation.metrics}; set selection.weights"
        )
    return problems


@_across("train")
def _optimizer_fits_deepspeed(train: TrainSpec) -> list[str]:
    if train.optimizer == "adamw8bit" and train.deepspeed is not None:
        return [
            "train.optimizer: 'adamw8bit' cannot be combined with train.deepspeed (DeepSpeed "
            "runs its own optimizer); use optimizer: adamw with deepspeed, or drop deepspeed"
        ]
    return []


@_across("train", "methods")
def _deepspeed_trains_one_module(train: TrainSpec, methods: MethodsSpec) -> list[str]:
    if train.deepspeed is None:
        return []
    # Accelerate drives one DeepSpeed engine per trial: one trained module.
    both = [n for n, o in methods.enabled if getattr(o, "train_text_encoder", False)]
    if both:
        return [
            f"train.deepspeed: methods {both} train the UNet and the text encoder, and "
            "DeepSpeed trains one model per trial; set train_text_encoder: false"
        ]
    return []


@_across("selection", "eval")
def _ranges_cover_scored_metrics(selection: SelectionSpec, evaluation: EvalSpec) -> list[str]:
    measured = evaluation.metrics
    watched = {*selection.weights_for(measured), *selection.collapse_metrics(measured)}
    missing_ranges = sorted(watched - set(selection.ranges))
    if missing_ranges:
        return [f"selection.ranges: no range for weighted or watched metric(s) {missing_ranges}"]
    return []


@_across("launcher", "grid")
def _scheduler_fits_grid(
    launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, grid: GridSpec
) -> list[str]:
    if launcher.kind != "ray" or launcher.scheduler.kind == "fifo":
        return []
    scheduler: AshaSchedulerSpec | MedianSchedulerSpec = launcher.scheduler
    problems, field = [], "launcher.scheduler"
    max_t = getattr(scheduler, "max_t", None)
    if max_t is not None and max_t > grid.max_steps:
        problems.append(f"{field}.max_t: {max_t} is beyond grid.max_steps ({grid.max_steps})")
    horizon = max_t or grid.max_steps
    if scheduler.grace_period is not None and scheduler.grace_period >= horizon:
        problems.append(
            f"{field}.grace_period: {scheduler.grace_period} must be below max_t or "
            f"grid.max_steps ({horizon}): no trial could be stopped"
        )
    return problems


@_across("selection")
def _fid_cannot_collapse(selection: SelectionSpec) -> list[str]:
    return [
        f"selection.collapse.metrics: {distance!r} is lower-is-better; it cannot collapse"
        for distance in sorted({"fid", "kid"} & set(selection.collapse.metrics))
    ]


@_across("selection", "eval")
def _early_stop_can_fire(selection: SelectionSpec, evaluation: EvalSpec) -> list[str]:
    # The rule stops only on no improvement AND a collapse of a watched, measured curve: with
    # none watched it would be on in the spec and never stop a trial.
    if selection.early_stop is None or selection.collapse_metrics(evaluation.metrics):
        return []
    collapse, measured = selection.collapse.metrics, evaluation.metrics
    candidates = [m for m in measured if m in SELECTABLE_METRICS]
    watch_measured = (
        f"set selection.collapse.metrics to some of {candidates}, " if candidates else ""
    )
    if collapse:
        why = f"eval.metrics {measured} measures none of selection.collapse.metrics {collapse}"
        fixes = f"add one of {collapse} to eval.metrics, {watch_measured}"
    else:
        why = "selection.collapse.metrics is empty"
        fixes = watch_measured
    return [
        "selection.early_stop: stops a trial only when a watched curve collapses, but "
        f"{why}, so it would never stop one; {fixes}or remove selection.early_stop"
    ]


_across("search", "methods", "train", "grid", "launcher")(search_problems)


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
    search: SearchSpec = SearchSpec()
    """`grid` (every combination of the lists) or `optuna` (sampled trials per group)."""

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
            problem = _folder_problem(path)
            if problem:
                raise ValueError(f"local model {problem}")
            return str(path)
        return base_model

    @field_validator("output_dir")
    @classmethod
    def _resolve_output(cls, output_dir: Path | None, info: ValidationInfo) -> Path | None:
        if output_dir is None:
            return None
        resolved = _resolve(output_dir, info)
        if resolved.exists() and not resolved.is_dir():  # a missing folder is made by `run`
            raise ValueError(_folder_problem(resolved))
        return resolved

    # Defined after every other field validator, so it runs last and keeps the finished value.
    # pydantic keeps nothing of a model that failed; this lets the loader check the sections
    # that did validate (across sections and on disk) beside the schema errors of the others.
    @field_validator("*")
    @classmethod
    def _keep_parsed_section(cls, value: Any, info: ValidationInfo) -> Any:
        parsed = (info.context or {}).get(PARSED_SECTIONS)
        if parsed is not None:
            parsed[info.field_name] = value
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> SweepSpec:
        if PARSED_SECTIONS in (info.context or {}):
            return self  # the loader runs them, on these sections or on those that validated
        problems = cross_section_problems(dict(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

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
