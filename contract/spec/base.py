"""What every part of the sweep spec shares: `SpecError`, the strict base model, the slot and path
helpers of the validators, and the names and vocabularies used across sections."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationInfo

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROMPT_SLOTS = ("token", "class")
TINY = "tiny"
# The metrics evaluation can measure; here because the eval and selection sections both name them.
METRICS = (
    "similarity",
    "aesthetics",
    "diversity",
    "clip_t",
    "in_domain",
    "identity",
    "fid",
    "kid",
    "oracle",
)
Metric = Literal[METRICS]
ORACLE_CURVES = ("oracle/subject", "oracle/prompt", "oracle/clean", "oracle/score")
"""The toy world's oracle logs four curves (`evaluation.metric_oracle`); every other metric one,
under its own name."""
CURVES_OF: dict[str, tuple[str, ...]] = {"oracle": ORACLE_CURVES}
CURVES = tuple(curve for metric in METRICS for curve in CURVES_OF.get(metric, (metric,)))
# What selection can name (weights, ranges, collapse): the logged curves, not the metrics.
Curve = Literal[CURVES]


def logged_curves(metrics: list[str]) -> list[str]:
    """The curves `eval.metrics` logs, in its order (`oracle` → its four)."""
    return [curve for metric in metrics for curve in CURVES_OF.get(metric, (metric,))]


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists every reason, each naming its field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the sweep spec:\n{lines}")


class _Strict(BaseModel):
    # forbid: a misspelt key is an error, not a silently ignored option; frozen: a validated
    # spec cannot change after its checks ran.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Study(_Strict):
    """What a training sweep and an inference study derive alike from their `name`,
    `output_dir` and `tracking` fields (which each declares): one place for these defaults."""

    @property
    def resolved_output_dir(self) -> Path:
        assert self.output_dir is not None, "set by the spec's default"  # type: ignore[attr-defined]
        return self.output_dir  # type: ignore[attr-defined]

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri is not None:  # type: ignore[attr-defined]
            return self.tracking.uri  # type: ignore[attr-defined]
        return f"sqlite:///{self.resolved_output_dir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name  # type: ignore[attr-defined]


def _check_slots(template: str, allowed: tuple[str, ...]) -> str:
    """Raise unless `template` is a format string using only the `allowed` slots."""
    try:
        slots = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"{template!r} is not a valid template: {err}") from None
    unknown = slots - set(allowed)
    if unknown:
        raise ValueError(
            f"{template!r} uses unknown slot(s) {sorted(unknown)}; allowed: "
            + ", ".join("{" + s + "}" for s in allowed)
        )
    return template


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path.resolve() if base is not None else path


def _folder_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a folder (it is missing, or a file), or None."""
    if path.is_dir():
        return None
    if path.exists():
        return f"{str(path)!r} is a file, not a folder"
    return f"folder {str(path)!r} does not exist"
