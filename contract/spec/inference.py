"""`InferenceSpec` (`kind: inference`): models × schedulers × steps × guidance × negative prompts
over a prompt set, generated with fixed latents, measured and timed.

The schema is here; the checks across fields and on files (`inference_problems`) and the
warnings (`inference_warnings`) are run by `contract.spec.kinds`, which loads either kind of
spec. Whether a `models:/` name exists in the registry needs MLflow: `launch.inference` checks
it before any generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from contract.layout import NO_NEGATIVE_PROMPT
from contract.spec.base import SAFE_NAME, Curve, Metric, _resolve, _Strict, _Study
from contract.spec.evaluation import EvalSpec, PromptTemplateSpec
from contract.spec.inference_entries import (
    FEW_STEP_MAX_STEPS,
    KNOWN_MODELS,
    REGISTRY_PREFIX,
    SCHEDULER_PREDICTION_TYPES,
    SCHEDULER_PRESETS,
    ModelSpec,
    SchedulerSpec,
    registry_reference,
)
from contract.spec.launchers import (
    LocalLauncherSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    TrackingSpec,
)
from contract.spec.selection import SELECTABLE_METRICS, STUDY_RANGES, STUDY_WEIGHTS
from contract.spec.sweep import PARSED_SECTIONS

SET_LEVEL_METRICS = ("diversity", "fid", "kid")
"""Measured over a combination's whole image set (after every shard), not per image."""


class InferencePromptsSpec(_Strict):
    """The study's prompts: drawn from a template (seeded, prefix-stable) or read from a file."""

    template: Path | None = None
    """A shipped template's name (`portrait`, `object`) or a template YAML file."""
    n: int | None = Field(default=None, ge=1)
    """How many template prompts: the first `n` of the seeded draw (`dreamsweep prompts --n`)."""
    seed: int = 0
    """Seed of the template's draw."""
    file: Path | None = None
    """A file of prompts instead: JSON lines as `dreamsweep prompts` writes them (`prompt`,
    `phrases`), or plain text, one prompt a line."""
    token: str = ""
    """What fills `{token}` for models that do not set their own."""
    class_token: str = "person"
    """What fills `{class}` for models that do not set their own."""

    @field_validator("template", mode="before")
    @classmethod
    def _shipped_or_path(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        return PromptTemplateSpec._shipped_or_path(value, info)

    @field_validator("file")
    @classmethod
    def _resolve_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @model_validator(mode="after")
    def _one_source(self) -> InferencePromptsSpec:
        if (self.template is None) == (self.file is None):
            raise ValueError("give exactly one of `template` (with `n`) and `file`")
        if self.template is not None and self.n is None:
            raise ValueError("`template` needs `n`: how many prompts to draw")
        return self


def _eval_default(field: str) -> Any:
    return EvalSpec.model_fields[field].default


class InferenceMetricsSpec(_Strict):
    """What is measured: the training metrics that apply, with `eval`'s settings."""

    names: list[Metric] = Field(default=["aesthetics", "clip_t", "diversity"], min_length=1)
    """Per image: similarity, aesthetics, clip_t, in_domain, identity; per combination:
    diversity, fid, kid. Timing is always measured."""
    references: Path | None = None
    """Folder of the subject's images: what `similarity` and `identity` compare with."""
    encoder: Literal["clip", "dino"] = _eval_default("encoder")
    """As `eval.encoder`."""
    clip_model: str = _eval_default("clip_model")
    """As `eval.clip_model` (hub id, folder or `tiny`)."""
    dino_model: str = _eval_default("dino_model")
    """As `eval.dino_model`."""
    aesthetics_head: str = _eval_default("aesthetics_head")
    """As `eval.aesthetics_head` (URL, file or `tiny`)."""
    in_domain: Literal["auto", "face", "zero_shot"] = _eval_default("in_domain")
    """As `eval.in_domain`."""
    distractor_classes: list[str] = Field(
        default_factory=lambda: list(_eval_default("distractor_classes")), min_length=1
    )
    """As `eval.distractor_classes`."""
    fid_reference: Path | None = None
    """`fid`, `kid`: the folder of reference images."""
    fid_features: Literal["inception", "clip", "dino"] = _eval_default("fid_features")
    """As `eval.fid_features`."""
    fid_weights: str = _eval_default("fid_weights")
    """As `eval.fid_weights`."""
    kid_subsets: int = Field(default=_eval_default("kid_subsets"), ge=1)
    """As `eval.kid_subsets`."""
    kid_subset_size: int = Field(default=_eval_default("kid_subset_size"), ge=2)
    """As `eval.kid_subset_size`."""
    batch_size: int = Field(default=8, ge=1)
    """Images encoded per batch."""

    @field_validator("references", "fid_reference")
    @classmethod
    def _resolve_folder(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @field_validator("fid_weights", "aesthetics_head")
    @classmethod
    def _resolve_weights(cls, source: str, info: ValidationInfo) -> str:
        return EvalSpec._resolve_weights_file(source, info)

    def eval_spec(self, *, seed: int) -> EvalSpec:
        """The same settings as an `EvalSpec`, which the metric registry reads."""
        settings = self.model_dump(exclude={"names", "references"})
        return EvalSpec(**settings, metrics=list(self.names), seed=seed)


class InferenceSelectionSpec(_Strict):
    """How combinations are scored, as training steps are: weighted, min–max-scaled metrics."""

    weights: dict[Curve, Annotated[float, Field(ge=0)]] | None = None
    """Weight per metric; unset means the study's weights for the measured ones."""
    ranges: dict[Curve, tuple[float, float]] = Field(default_factory=lambda: dict(STUDY_RANGES))
    """Min–max range per metric (scaled to [0, 1], clipped)."""
    steps_within: float = Field(default=0.02, ge=0, le=1)
    """ε on the 0–1 weighted score: the report's "fewest steps within ε of the best"."""

    def weights_for(self, measured: list[str]) -> dict[str, float]:
        if self.weights is not None:
            return dict(self.weights)
        return {m: STUDY_WEIGHTS[m] for m in measured if m in STUDY_WEIGHTS}


class ShardsSpec(_Strict):
    """How the prompts are split into shards (the unit a worker claims and resumes)."""

    prompts_per_shard: int = Field(default=100, ge=1)
    """Prompts per shard; every combination of the study is generated for each."""


class InferenceSpec(_Study):
    """An inference study: every combination of models × schedulers × steps × guidance ×
    negative prompts, over the same prompts and the same initial latents."""

    kind: Literal["inference"]
    """`inference` (a training sweep is `kind: train`, the default)."""
    name: str
    """Study name: letters, digits, `_`, `.`, `-`."""
    output_dir: Path | None = None
    """Images, shards and the default MLflow store; unset means `runs/<name>` beside the spec."""
    models: list[ModelSpec] = Field(min_length=1)
    """The models compared (strings are `source`s)."""
    registry: str | None = None
    """Where `models:/` names are registered: an MLflow URI, or a training spec (its tracking
    store); unset means `tracking`'s store."""
    schedulers: list[SchedulerSpec] = Field(min_length=1)
    """The samplers compared (strings are names)."""
    num_inference_steps: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    """Denoising steps compared."""
    guidance_scale: list[Annotated[float, Field(ge=0)]] = Field(default=[7.5], min_length=1)
    """Classifier-free guidance scales compared (≤ 1 turns guidance off)."""
    negative_prompt: dict[str, str | None] = Field(default_factory=lambda: {"none": None})
    """Name → negative prompt compared; `none: null` generates without one."""
    resolution: int = Field(default=512, ge=8)
    """Image side in pixels (a multiple of 8)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and latents precision."""
    prompts: InferencePromptsSpec
    images_per_prompt: int = Field(default=1, ge=1)
    """Images per prompt, each from its own fixed initial latents."""
    seed: int = 0
    """Seed of every initial latent: image k of prompt p starts from the same noise in every
    combination, so differences are the combination's."""
    metrics: InferenceMetricsSpec = InferenceMetricsSpec()
    selection: InferenceSelectionSpec = InferenceSelectionSpec()
    shards: ShardsSpec = ShardsSpec()
    launcher: Annotated[
        LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, Field(discriminator="kind")
    ] = LocalLauncherSpec()
    """Where shards run; `local`: `max_parallel` shard workers here."""
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not SAFE_NAME.match(name):
            raise ValueError("must be 1-64 letters, digits, '_', '.', '-' (a safe folder name)")
        return name

    @field_validator("negative_prompt")
    @classmethod
    def _none_means_without(cls, negatives: dict[str, str | None]) -> dict[str, str | None]:
        # The report pairs each negative prompt with the combination logged as `none` (the one
        # without): a text named so would be taken for the baseline.
        problems = []
        if negatives.get(NO_NEGATIVE_PROMPT):
            problems.append(
                f"{NO_NEGATIVE_PROMPT!r} names the run without a negative prompt; give it null "
                f"(or rename the text {negatives[NO_NEGATIVE_PROMPT]!r})"
            )
        without = [name for name, text in negatives.items() if not text]
        if len(without) > 1:  # the same images twice, under one combination id
            problems.append(f"{without} all mean without a negative prompt; keep one")
        if problems:
            raise ValueError("; ".join(problems))
        return negatives

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("output_dir") is None and isinstance(data.get("name"), str):
            data = {**data, "output_dir": f"runs/{data['name']}"}
        if data.get("negative_prompt") in (None, "none"):
            data = {**data, "negative_prompt": {"none": None}}
        if isinstance(data.get("launcher"), str):
            data = {**data, "launcher": {"kind": data["launcher"]}}
        return data

    @field_validator("output_dir")
    @classmethod
    def _resolve_output(cls, output_dir: Path | None, info: ValidationInfo) -> Path | None:
        return None if output_dir is None else _resolve(output_dir, info)

    @field_validator("registry")
    @classmethod
    def _registry_spec_or_uri(cls, registry: str | None, info: ValidationInfo) -> str | None:
        if registry is None or "://" in registry or registry.startswith("sqlite:"):
            return registry
        return str(_resolve(Path(registry), info))  # a training spec's path

    # Last field validator: keeps each section that validated, for the checks across sections
    # and on files that the loader runs beside the schema errors of the others.
    @field_validator("*")
    @classmethod
    def _keep_parsed_section(cls, value: Any, info: ValidationInfo) -> Any:
        parsed = (info.context or {}).get(PARSED_SECTIONS)
        if parsed is not None:
            parsed[info.field_name] = value
        return value

    @property
    def selection_weights(self) -> dict[str, float]:
        return self.selection.weights_for(self.metrics.names)

    def negatives(self) -> list[tuple[str, str | None]]:
        """(name, text) of each negative prompt compared; text None means without."""
        return [(name, text or None) for name, text in self.negative_prompt.items()]


__all__ = [
    "FEW_STEP_MAX_STEPS",
    "KNOWN_MODELS",
    "REGISTRY_PREFIX",
    "SCHEDULER_PREDICTION_TYPES",
    "SCHEDULER_PRESETS",
    "SELECTABLE_METRICS",
    "SET_LEVEL_METRICS",
    "InferenceMetricsSpec",
    "InferencePromptsSpec",
    "InferenceSelectionSpec",
    "InferenceSpec",
    "ModelSpec",
    "SchedulerSpec",
    "ShardsSpec",
    "registry_reference",
]
