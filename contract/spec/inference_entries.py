"""The model and scheduler entries of an inference spec, and what is known of them offline:
the schedulers' prediction types, the short scheduler names, hub ids of known families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from contract.spec.base import TINY, _folder_problem, _resolve, _Strict
from contract.toy_models import TOY, toy_model_problem

PredictionType = Literal["epsilon", "v_prediction", "sample"]
ModelStyle = Literal["auto", "standard", "turbo", "lcm"]

SCHEDULER_PREDICTION_TYPES: dict[str, tuple[str, ...]] = {
    "DDPMScheduler": ("epsilon", "sample", "v_prediction"),
    "DDIMScheduler": ("epsilon", "sample", "v_prediction"),
    "PNDMScheduler": ("epsilon", "v_prediction"),
    "EulerDiscreteScheduler": ("epsilon", "sample", "v_prediction"),
    "EulerAncestralDiscreteScheduler": ("epsilon", "v_prediction"),
    "DPMSolverMultistepScheduler": ("epsilon", "sample", "v_prediction"),
    "UniPCMultistepScheduler": ("epsilon", "sample", "v_prediction"),
    "LCMScheduler": ("epsilon", "sample", "v_prediction"),
}
"""The diffusers scheduler classes a study may use → the prediction types their `step` handles
(diffusers 0.42's `step` raises on the others)."""
SCHEDULER_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
"""Short names → (class, config overrides): DPM-Solver++ 2M with Karras sigmas, and the rest."""
KNOWN_MODELS: dict[str, tuple[PredictionType, ModelStyle]] = {
    "stabilityai/stable-diffusion-2-1": ("v_prediction", "standard"),
    "stabilityai/stable-diffusion-2": ("v_prediction", "standard"),
    "stabilityai/stable-diffusion-2-1-base": ("epsilon", "standard"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("epsilon", "standard"),
    "stabilityai/sd-turbo": ("epsilon", "turbo"),
    "stabilityai/sdxl-turbo": ("epsilon", "turbo"),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("epsilon", "standard"),
    "runwayml/stable-diffusion-v1-5": ("epsilon", "standard"),
    "latent-consistency/lcm-sdxl": ("epsilon", "lcm"),
    "SimianLuo/LCM_Dreamshaper_v7": ("epsilon", "lcm"),
}
"""Hub ids whose prediction type and style are known without downloading them."""
FEW_STEP_MAX_STEPS = 8
"""Turbo and LCM models are distilled for 1–8 steps (and guidance ≤ 1): more warns."""
REGISTRY_PREFIX = "models:/"


def registry_reference(source: str) -> tuple[str, str | None, str | None] | None:
    """`models:/<name>@<alias>` → (name, alias, None); `models:/<name>/<version>` → (name, None,
    version); anything else → None. Raises ValueError for a malformed `models:/` source."""
    if not source.startswith(REGISTRY_PREFIX):
        return None
    rest = source.removeprefix(REGISTRY_PREFIX)
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise ValueError(
        f"{source!r} is not a registry reference: use models:/<name>@<alias> or "
        "models:/<name>/<version>"
    )


class ModelSpec(_Strict):
    """One model entry: a base model, a registered checkpoint, or every best of a sweep."""

    source: str | None = None
    """`tiny`, `toy`, a hub id, a local diffusers folder, `models:/<name>@<alias>` or
    `models:/<name>/<version>` (a checkpoint registered by `dreamsweep select`)."""
    best_of: Path | None = None
    """A training spec: every `<sweep>.<subject>.<method>@best` it registered (instead of
    `source`)."""
    label: str | None = None
    """The name shown in MLflow and the report; unset means the source."""
    token: str | None = None
    """What fills `{token}` in the prompts; unset means a registered checkpoint's subject token
    (its identifier, or its textual-inversion placeholder), else `prompts.token`."""
    class_token: str | None = None
    """What fills `{class}`; unset means a registered checkpoint's class token, else
    `prompts.class_token`."""
    prediction_type: PredictionType | None = None
    """What the denoiser predicts; unset means known offline (`tiny`, a folder's scheduler
    config, a known hub id) or not checked."""
    style: ModelStyle = "auto"
    """`turbo` / `lcm`: distilled for few steps (warned about many steps or guidance > 1; `lcm`
    is what LCMScheduler samples); `auto` reads it from the name."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _local_or_remote(cls, source: str | None, info: ValidationInfo) -> str | None:
        if source == TOY and (problem := toy_model_problem("base_model")):
            raise ValueError(problem)
        if source is None or source in (TINY, TOY):
            return source
        if source.startswith(REGISTRY_PREFIX):
            registry_reference(source)
            return source
        if source.startswith((".", "/", "~")):
            path = _resolve(Path(source), info)
            problem = _folder_problem(path)
            if problem:
                raise ValueError(f"local model {problem}")
            return str(path)
        return source

    @field_validator("best_of")
    @classmethod
    def _resolve_best_of(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.source is None) == (self.best_of is None):
            raise ValueError("give exactly one of `source` and `best_of`")
        return self

    @property
    def shown(self) -> str:
        return self.label or self.source or f"best_of {self.best_of}"

    def known_prediction_type(self) -> str | None:
        """The model's prediction type when known offline."""
        if self.prediction_type is not None:
            return self.prediction_type
        if self.source in (TINY, TOY):
            return "epsilon"
        if self.source in KNOWN_MODELS:
            return KNOWN_MODELS[self.source][0]
        if self.source and Path(self.source).is_dir():
            config = Path(self.source) / "scheduler" / "scheduler_config.json"
            try:
                return json.loads(config.read_text(encoding="utf-8")).get(
                    "prediction_type", "epsilon"
                )
            except (OSError, ValueError):
                return None
        return None

    def resolved_style(self) -> str:
        if self.style != "auto":
            return self.style
        if self.source in KNOWN_MODELS:
            return KNOWN_MODELS[self.source][1]
        name = (self.label or self.source or "").lower()
        return "turbo" if "turbo" in name else "lcm" if "lcm" in name else "standard"


class SchedulerSpec(_Strict):
    """A sampler: a diffusers scheduler class built from the model's scheduler config."""

    name: str
    """A diffusers class (`DDIMScheduler`, …, see SCHEDULER_PREDICTION_TYPES) or a short name
    (`ddpm`, `ddim`, `pndm`, `euler`, `euler_a`, `dpmpp_2m_karras`, `unipc`, `lcm`)."""
    config: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    """Config overrides on top of the model's scheduler config (and the short name's)."""
    label: str | None = None
    """The name in MLflow and the report; unset means `name`."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in SCHEDULER_PRESETS and name not in SCHEDULER_PREDICTION_TYPES:
            raise ValueError(
                f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULER_PRESETS)} or "
                f"{', '.join(SCHEDULER_PREDICTION_TYPES)}"
            )
        return name

    @property
    def class_name(self) -> str:
        return SCHEDULER_PRESETS[self.name][0] if self.name in SCHEDULER_PRESETS else self.name

    @property
    def resolved_config(self) -> dict[str, Any]:
        preset = SCHEDULER_PRESETS[self.name][1] if self.name in SCHEDULER_PRESETS else {}
        return {**preset, **self.config}

    @property
    def shown(self) -> str:
        return self.label or self.name
