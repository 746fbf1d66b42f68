"""The search section of the sweep spec: a full grid (the default) or Optuna-sampled trials.

With `kind: optuna` the fixed axes (subject × method × num_images × seed) stay a grid, and each
of those groups gets its own study of `n_trials` sampled trials over `space`: distributions
addressed by the spec path of the field they set (`methods.lora.learning_rate`,
`train.gradient_accumulation_steps`, `grid.max_steps`, …). `search_problems` is the check
across sections (paths that exist, values each field accepts, no axis both gridded and
searched); `searchable_fields` and `with_values` are what the driver samples into.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)

from contract.spec.base import _Strict
from contract.spec.train import EXECUTION_ONLY_FIELDS, GridSpec, MethodsSpec, TrainSpec

Choice = str | int | float | bool
FIXED_AXES = ("grid.num_images", "grid.seed")
"""The grid's axes that stay a grid under a search: one study per value of each."""
LIST_AXIS = "learning_rate"
"""A method's list of learning rates: a grid axis, searched as one value per trial."""
SEARCHED_GRID_FIELDS = ("max_steps",)
"""Of `grid`'s fields, those a search may sample (the others are axes or the step grid)."""


class Distribution(_Strict):
    """One searched field: `float` (uniform, or log-uniform with `log`), `int` (with `step`),
    or `categorical` (one of `choices`)."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample log-uniformly (float and int; `low` must then be > 0)."""
    step: float | None = Field(default=None, gt=0)
    """Spacing of the values from `low` (int: default 1; not with `log`)."""
    choices: list[Choice] | None = None

    def problems(self) -> list[str]:
        """What is wrong with it, every problem (checked with the rest of the spec's cross-
        section problems, so they are all reported at once)."""
        problems = []
        if self.type == "categorical":
            if not self.choices:
                problems.append("categorical needs a non-empty list of choices")
            elif len({repr(c) for c in self.choices}) < len(self.choices):
                problems.append(f"categorical choices must be distinct, got {self.choices}")
            if self.low is not None or self.high is not None or self.log or self.step:
                problems.append("categorical takes choices only (no low, high, log or step)")
        else:
            if self.choices is not None:
                problems.append(f"{self.type} takes low and high, not choices")
            if self.low is None or self.high is None:
                problems.append(f"{self.type} needs both low and high")
            else:
                if not self.low < self.high:
                    problems.append(f"low ({self.low:g}) must be below high ({self.high:g})")
                if self.log and self.low <= 0:
                    problems.append(f"log: true needs low > 0, got low {self.low:g}")
                if self.type == "int" and not (self.low.is_integer() and self.high.is_integer()):
                    problems.append(f"int needs whole low and high, got {self.low}, {self.high}")
            if self.log and self.step is not None:
                problems.append("step cannot be combined with log: true")
            if self.type == "int" and self.step is not None and not self.step.is_integer():
                problems.append(f"int needs a whole step, got {self.step}")
        return problems

    def bounds(self) -> list[Any]:
        """The values whose validity decides every value's: the ends (and the first step)."""
        if self.type == "categorical":
            return list(self.choices or [])
        assert self.low is not None and self.high is not None
        cast = int if self.type == "int" else float
        values = [cast(self.low), cast(self.high)]
        if self.step is not None:
            values.append(cast(self.low + self.step))
        return values


class PrunerSpec(_Strict):
    """Optuna's pruner, fed the weighted score at every evaluated step (`none`: never prune).

    A pruned trial stops at that evaluated step, after its checkpoint, like an early stop."""

    kind: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    n_startup_trials: int = Field(default=2, ge=0)
    """median: trials that finish before any is pruned."""
    n_warmup_steps: int = Field(default=0, ge=0)
    """median: steps of a trial before it may be pruned."""
    min_resource: int | None = Field(default=None, ge=1)
    """successive_halving, hyperband: steps before the first rung; unset: `grid.eval_every`."""
    reduction_factor: int = Field(default=3, ge=2)
    """successive_halving, hyperband: 1/reduction_factor of the trials go on at each rung."""


class SearchSpec(_Strict):
    """How the trials of each subject × method × num_images × seed group are chosen."""

    kind: Literal["grid", "optuna"] = "grid"
    """`grid`: every combination of the lists (today's sweep); `optuna`: sampled trials."""
    sampler: Literal["tpe", "gp", "cmaes", "random"] = "tpe"
    """Optuna's sampler: multivariate TPE, Gaussian process, CMA-ES or random; seeded."""
    seed: int = 0
    """The sampler's seed: the same seed (and max_parallel 1) samples the same trials."""
    n_trials: int | None = Field(default=None, ge=1)
    """Trials per group (required with kind: optuna)."""
    max_parallel: int = Field(default=1, ge=1)
    """Trials of a group asked and running at once."""
    space: dict[str, Distribution] = Field(default_factory=dict)
    """Spec path → distribution, e.g. `methods.lora.learning_rate: {type: float, low: 1e-5,
    high: 1e-3, log: true}`."""
    pruner: PrunerSpec = PrunerSpec()
    storage: str | None = None
    """An Optuna RDB URL (e.g. `postgresql://…`); unset: a journal file in the sweep folder
    (`search/optuna.journal`), safe on shared file systems."""

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    def problems(self) -> list[str]:
        """What the section lacks or has too much of for its kind."""
        if self.kind == "grid":
            # Only fields that differ from their defaults: a resolved spec (what `validate`
            # prints) sets every field, and must load back.
            defaults = SearchSpec()
            given = sorted(
                name
                for name in self.model_fields_set - {"kind"}
                if getattr(self, name) != getattr(defaults, name)
            )
            return [f"search: {given} apply to kind: optuna only (kind is 'grid')"] if given else []
        problems = []
        if self.n_trials is None:
            problems.append("search.n_trials: kind: optuna needs n_trials (trials per group)")
        if not self.space:
            problems.append("search.space: kind: optuna needs at least one distribution")
        return problems


JOURNAL_FILE = Path("search") / "optuna.journal"
"""The studies' journal file in the sweep's output folder (unless `search.storage` is set)."""


def study_storage(search: SearchSpec, output_dir: Path) -> str:
    """Where a sweep's studies live: `search.storage` (an RDB URL), or its journal file."""
    return search.storage or str(output_dir / JOURNAL_FILE)


def open_storage(storage: str) -> Any:
    """The studies' Optuna storage: an RDB URL as Optuna opens it, or a journal file (Optuna's
    JournalFileBackend: appends under a file lock, safe on shared file systems). Optuna is
    imported here, not with the contract."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def _scalar_kind(annotation: Any) -> str | None:
    """'int', 'float', 'bool' or 'literal' for a field a distribution can set; else None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return "literal"
    for kind in (bool, int, float):  # bool first: it is an int
        if annotation is kind:
            return kind.__name__
    return None


def searchable_sections(
    methods: MethodsSpec, train: TrainSpec, grid: GridSpec
) -> dict[str, BaseModel]:
    """Spec path → the section a search may set fields of (each enabled method's options)."""
    sections: dict[str, BaseModel] = {f"methods.{n}": options for n, options in methods.enabled}
    return {**sections, "train": train, "train.prior": train.prior, "grid": grid}


def searchable_fields(methods: MethodsSpec, train: TrainSpec, grid: GridSpec) -> dict[str, str]:
    """Spec path → kind ('int', 'float', 'bool', 'literal') of every field a search may set."""
    found = {}
    for prefix, section in searchable_sections(methods, train, grid).items():
        for name, info in type(section).model_fields.items():
            if prefix == "grid" and name not in SEARCHED_GRID_FIELDS:
                continue
            if prefix == "train" and name in EXECUTION_ONLY_FIELDS:
                continue  # outside the trial id: every value would be the same trial
            kind = "float" if name == LIST_AXIS else _scalar_kind(info.annotation)
            if kind is not None:
                found[f"{prefix}.{name}"] = kind
    return found


def _section(data: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, name = path.split(".")
    for part in parents:
        data = data[part]
    return data, name


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the spec's data (`SweepSpec.model_dump()`) with each path set to its value (a
    learning rate as the one-element list the grid expands)."""
    import copy

    data = copy.deepcopy(data)
    for path, value in values.items():
        section, name = _section(data, path)
        section[name] = [value] if name == LIST_AXIS and path.startswith("methods.") else value
    return data


def search_problems(
    search: SearchSpec, methods: MethodsSpec, train: TrainSpec, grid: GridSpec, launcher: Any
) -> list[str]:
    """Every problem of the search section, alone and against the rest of the spec."""
    problems = search.problems()
    if search.kind != "optuna":
        return problems
    sections = searchable_sections(methods, train, grid)
    fields = searchable_fields(methods, train, grid)
    searchable = ", ".join(fields)
    for path, distribution in search.space.items():
        where = f"search.space.{path}"
        if path in FIXED_AXES:
            problems.append(
                f"{where}: {path} is a fixed axis of the grid (each of its values gets its own "
                f"study), it cannot be searched; searchable: {searchable}"
            )
            continue
        if path not in fields:
            problems.append(f"{where}: unknown field path; searchable: {searchable}")
            continue
        own = distribution.problems()
        if own:
            problems += [f"{where}: {problem}" for problem in own]
            continue
        problems += _kind_problems(where, fields[path], distribution)
        prefix, name = path.rsplit(".", 1)
        section = sections[prefix]
        # A list left at its default (as a resolved spec writes it) is no grid axis of the user's.
        default = type(section).model_fields[name].get_default(call_default_factory=True)
        if name == LIST_AXIS and getattr(section, name) != default:
            problems.append(
                f"{where}: {path} is also a grid axis in the spec "
                f"({getattr(section, name)}); a searched field takes its values from the "
                "space: remove one of the two"
            )
        problems += _value_problems(where, section, name, distribution)
    if launcher.kind == "ray" and search.pruner.kind != "none":
        problems.append(
            f"search.pruner: {search.pruner.kind!r} is not used on the Ray launcher, where "
            f"launcher.scheduler ({launcher.scheduler.kind}) stops trials; set search.pruner: "
            "none and launcher.scheduler: {kind: asha, …}"
        )
    unused = [
        f"methods.{name}"
        for name, _ in methods.enabled
        if not any(applies_to(path, name) for path in search.space)
    ]
    if unused:
        problems.append(
            f"search.space: nothing in it applies to {unused} (their groups would have nothing "
            "to sample); search one of their fields, or a train.* or grid.* field"
        )
    if search.pruner.min_resource is not None and search.pruner.min_resource > grid.max_steps:
        problems.append(
            f"search.pruner.min_resource: {search.pruner.min_resource} is beyond "
            f"grid.max_steps ({grid.max_steps}): no trial could be pruned"
        )
    return problems


def applies_to(path: str, method: str) -> bool:
    """Whether a searched path applies to the groups of a method."""
    return not path.startswith("methods.") or path.split(".")[1] == method


def _kind_problems(where: str, kind: str, distribution: Distribution) -> list[str]:
    if kind in ("bool", "literal") and distribution.type != "categorical":
        return [f"{where}: a {kind} field takes type: categorical, not {distribution.type}"]
    if kind == "int" and distribution.type == "float":
        return [f"{where}: an integer field takes type: int or categorical, not float"]
    return []


def _value_problems(
    where: str, section: BaseModel, name: str, distribution: Distribution
) -> list[str]:
    """Values the field itself refuses (its bounds; for max_steps, eval_every must divide it):
    each end of the distribution is set into the section, and the section validated."""
    problems = []
    for value in distribution.bounds():
        data = section.model_dump()
        data[name] = [value] if name == LIST_AXIS else value
        try:
            type(section).model_validate(data)
        except ValidationError as err:
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            problems.append(f"{where}: {value!r} is not a valid value here: {reasons}")
    return problems
