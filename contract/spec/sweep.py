"""`SweepSpec`, the root of the spec: its sections, the checks across them, and the values
derived from them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from contract.families import (
    BUILTIN_DEFAULT_RESOLUTIONS,
    BUILTIN_MODELS,
    BUILTIN_RESOLUTION_MULTIPLES,
    FAMILIES,
    prediction_type,
    resolution_multiple,
)
from contract.layout import model_short_name
from contract.spec.base import _folder_problem, _resolve, _Study, logged_curves
from contract.spec.evaluation import EvalSpec
from contract.spec.launchers import (
    AshaSchedulerSpec,
    LocalLauncherSpec,
    MedianSchedulerSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    TrackingSpec,
    compile_problems,
    pack_problems,
    pack_search_problems,
)
from contract.spec.search import SearchSpec, search_problems
from contract.spec.selection import SELECTABLE_METRICS, STUDY_WEIGHTS, SelectionSpec
from contract.spec.train import (
    BaseModelSpec,
    ExportSpec,
    GridSpec,
    LoRASpec,
    MethodsSpec,
    SubjectSpec,
    TrainSpec,
)

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
        curves = logged_curves(evaluation.metrics)
        unmeasured = sorted(set(selection.weights) - set(curves))
        if unmeasured:
            logs = f" (its curves: {curves})" if curves != evaluation.metrics else ""
            problems.append(
                f"selection.weights: {unmeasured} not in eval.metrics {evaluation.metrics}{logs}"
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


@_across("train")
def _compile_settings_agree(train: TrainSpec) -> list[str]:
    problems = []
    if train.compile_mode != "default" and train.compile != "inductor":
        problems.append(
            f"train.compile_mode: {train.compile_mode!r} is a mode of the inductor backend, and "
            f"train.compile is {train.compile!r}; set compile: inductor, or drop compile_mode"
        )
    if train.compile != "no" and train.deepspeed is not None:
        problems.append(
            f"train.compile: {train.compile!r} cannot be combined with train.deepspeed (its "
            "engine compiles through DeepSpeed's own path, not tested here); drop one of them"
        )
    return problems


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
    candidates = [m for m in logged_curves(measured) if m in SELECTABLE_METRICS]
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


@_across("base_model")
def _each_model_once(models: list[BaseModelSpec]) -> list[str]:
    return duplicate_model_problems(dict(enumerate(models)))


@_across("base_model", "train")
def _resolution_fits_model(models: list[BaseModelSpec], train: TrainSpec) -> list[str]:
    return resolution_problems(dict(enumerate(models)), train)


def duplicate_model_problems(models: Mapping[int, BaseModelSpec]) -> list[str]:
    """`base_model` entries (index → entry) naming a model an earlier one names: it would
    train the same trials twice, or compare a model with itself under other overrides. Or
    two models with one short name (`/a/sd15` and `/b/sd15`; hub `a/b` and folder `a--b`): their
    labels and registered models would be one."""
    first: dict[str, int] = {}
    first_by_name: dict[str, int] = {}
    problems = []
    for index, model in models.items():
        name = model_short_name(model.id)
        if model.id in first:
            problems.append(
                f"base_model[{index}]: {model.id!r} is the same model as base_model"
                f"[{first[model.id]}]; list each model once"
            )
        elif name in first_by_name:
            other = first_by_name[name]
            problems.append(
                f"base_model[{index}]: {model.id!r} has the short name {name!r} of base_model"
                f"[{other}] ({models[other].id!r}), which names its trials' labels and "
                "registered models; rename one of the folders"
            )
        first.setdefault(model.id, index)
        first_by_name.setdefault(name, index)
    return problems


def _resolution_multiple(model: BaseModelSpec) -> int | None:
    """The pixel multiple a folder or toy model takes; None for a hub id (no configs to read
    before it is fetched)."""
    if model.id in BUILTIN_MODELS:
        return BUILTIN_RESOLUTION_MULTIPLES[model.id]
    return resolution_multiple(Path(model.id)) if model.is_folder else None


def resolution_problems(models: Mapping[int, BaseModelSpec], train: TrainSpec) -> list[str]:
    """Folders and toy models (index → entry) whose training resolution is not a pixel multiple
    the model can take; a repeated entry (a duplicate problem already) is not checked again."""
    problems = []
    checked: set[str] = set()
    for index, model in models.items():
        multiple = _resolution_multiple(model)
        if multiple is None or model.id in checked:
            continue
        checked.add(model.id)
        resolution = effective_resolution(model, train)
        if resolution % multiple:
            field = (
                f"base_model[{index}].resolution"
                if model.resolution is not None
                else "train.resolution"
            )
            problems.append(
                f"{field}: {resolution} px is not a multiple of {multiple}, the pixel multiple "
                f"{model.id!r} ({model.family}) can take; use e.g. "
                f"{max(multiple, resolution // multiple * multiple)}"
            )
    return problems


def effective_resolution(model: BaseModelSpec, train: TrainSpec) -> int:
    """The resolution `model`'s trials train at: its own, else `train.resolution` when the spec
    sets it, else a folder's family's native one (read from its scheduler's prediction type),
    a toy model's own (`BUILTIN_DEFAULT_RESOLUTIONS`), else `train.resolution`'s default."""
    if model.resolution is not None:
        return model.resolution
    if "resolution" in train.model_fields_set:
        return train.resolution
    if model.is_folder:
        family = model.family
        assert family is not None, "a folder's family is read when it validates"
        return FAMILIES[family].default_resolution(prediction_type(Path(model.id)))
    # A toy model's own (not its family's 768 or 1024); a hub id's family is not known
    # offline (`launch.preflight.model_warnings` says so).
    return BUILTIN_DEFAULT_RESOLUTIONS.get(model.id, train.resolution)


_across("search", "methods", "train", "grid", "launcher")(search_problems)
_across("launcher", "train", "base_model")(pack_problems)
_across("launcher", "train")(compile_problems)
_across("launcher", "search")(pack_search_problems)


class SweepSpec(_Study):
    """A sweep: subjects × methods × grid, trained, evaluated, tracked and selected."""

    name: str
    """Sweep name: letters, digits, `_`, `.`, `-`."""
    base_model: list[BaseModelSpec] = Field(min_length=1)
    """The weights to fine-tune: one model (an id, a folder, `tiny`, or a mapping with
    per-model overrides) or a list of them, each a grid axis like `seed`."""
    output_dir: Path | None = None
    """Where checkpoints, logs and the default MLflow store go; unset means `runs/<name>` beside
    the spec file."""
    subjects: list[SubjectSpec] = Field(min_length=1)
    methods: MethodsSpec = MethodsSpec(lora=LoRASpec())
    """The methods to compare: a list of names, or a mapping of name → options."""
    grid: GridSpec
    train: TrainSpec = TrainSpec()
    export: ExportSpec = ExportSpec()
    """The formats trained weights are saved in (LoRA: diffusers and/or kohya)."""
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
    # Last, so the allowed keys listed for a misspelt one start with the sections users set.
    kind: Literal["train"] = "train"
    """`train` (the default); an inference study is `kind: inference` (`InferenceSpec`)."""

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

    @field_validator("base_model", mode="before")
    @classmethod
    def _one_or_a_list(cls, value: Any) -> Any:
        return value if isinstance(value, list) else [value]

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

    @model_serializer(mode="wrap")
    def _compact_base_models(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written as given where it can be (an id alone; one model as a value, not a list), each
        # model's resolution and precision where they differ from `train`'s: the written spec
        # (every default filled in) loads back to the same trials.
        data = handler(self)
        if "base_model" not in data:  # left out by the caller (`exclude`, `include`)
            return data
        entries: list[Any] = []
        for model in self.base_models:
            overrides = {
                field: getattr(model, field)
                for field in ("resolution", "mixed_precision")
                if getattr(model, field) != getattr(self.train, field)
            }
            entries.append({"id": model.id, **overrides} if overrides else model.id)
        data["base_model"] = entries[0] if len(entries) == 1 else entries
        return data

    # Derived values: computed here so no caller re-implements a default.
    @property
    def base_models(self) -> list[BaseModelSpec]:
        """Each base model with its resolution and precision resolved (its own, else
        `train`'s, else its family's native resolution), in the spec's order."""
        return [
            model.model_copy(
                update={
                    "resolution": effective_resolution(model, self.train),
                    "mixed_precision": model.mixed_precision or self.train.mixed_precision,
                }
            )
            for model in self.base_model
        ]

    @property
    def compares_models(self) -> bool:
        """True when the sweep trains more than one base model (labels and registered model
        names then name the model)."""
        return len(self.base_model) > 1

    @property
    def selection_weights(self) -> dict[str, float]:
        return self.selection.weights_for(self.eval.metrics)
