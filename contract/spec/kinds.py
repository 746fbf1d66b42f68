"""Either kind of spec from one file: `kind: train` (the default, `SweepSpec`) or
`kind: inference` (`InferenceSpec`), and the inference spec's checks across fields and on the
files it points at. Every problem of every phase is reported at once, as for a training spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contract.images import image_problem
from contract.spec.base import SpecError, _folder_problem
from contract.spec.inference import (
    FEW_STEP_MAX_STEPS,
    SCHEDULER_PREDICTION_TYPES,
    SELECTABLE_METRICS,
    InferenceMetricsSpec,
    InferencePromptsSpec,
    InferenceSpec,
    ModelSpec,
    SchedulerSpec,
)
from contract.spec.loading import _describe, parse_spec, read_spec_file, subject_image_files
from contract.spec.sweep import PARSED_SECTIONS, SweepSpec

SPEC_KINDS = {"train": SweepSpec, "inference": InferenceSpec}
"""`kind` → the spec it selects (`train` when unset)."""
AnySpec = SweepSpec | InferenceSpec


def _model_problems(models: list[ModelSpec], schedulers: list[SchedulerSpec]) -> list[str]:
    problems = []
    for m, model in enumerate(models):
        if model.best_of is not None:
            try:
                trained = load_any_spec(model.best_of)
            except SpecError as err:
                problems.append(
                    f"models[{m}].best_of: the training spec {err.source} is not valid: "
                    + "; ".join(err.problems)
                )
            else:
                if not isinstance(trained, SweepSpec):
                    problems.append(f"models[{m}].best_of: {model.best_of} is not a training spec")
            continue
        predicted = model.known_prediction_type()
        style = model.resolved_style()
        for s, scheduler in enumerate(schedulers):
            field = f"schedulers[{s}]"
            overridden = scheduler.resolved_config.get("prediction_type")
            if predicted and overridden and overridden != predicted:
                problems.append(
                    f"{field}.config.prediction_type: {overridden!r} does not fit model "
                    f"{model.shown!r}, which predicts {predicted!r}; drop the override"
                )
            effective = overridden or predicted
            supported = SCHEDULER_PREDICTION_TYPES[scheduler.class_name]
            if effective and effective not in supported:
                problems.append(
                    f"{field}: {scheduler.class_name} handles prediction types "
                    f"{list(supported)}, not {effective!r} (model {model.shown!r})"
                )
            if scheduler.class_name == "LCMScheduler" and style != "lcm":
                problems.append(
                    f"{field}: LCMScheduler samples latent-consistency (LCM-distilled) models "
                    f"only, and model {model.shown!r} is {style!r}; set models[{m}].style: lcm "
                    "if it is one, or drop the scheduler"
                )
    labels = [m.shown for m in models]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        problems.append(f"models: labels must be unique, repeated: {repeated} (set `label`)")
    names = [s.shown for s in schedulers]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        problems.append(f"schedulers: labels must be unique, repeated: {repeated} (set `label`)")
    return problems


def _guidance_problems(negatives: dict[str, str | None], guidance: list[float]) -> list[str]:
    unguided = [g for g in guidance if g <= 1]
    with_text = sorted(name for name, text in negatives.items() if text)
    if unguided and with_text:
        return [
            f"guidance_scale: {unguided} with negative_prompt {with_text}: diffusers ignores a "
            "negative prompt at guidance <= 1 (no classifier-free guidance); use guidance "
            "scales > 1 or negative_prompt: none"
        ]
    return []


def _negative_problems(negatives: dict[str, str | None]) -> list[str]:
    return [
        f"negative_prompt.{name}: empty text; use `none: null` for no negative prompt"
        for name, text in negatives.items()
        if text is not None and not text.strip()
    ]


def _metric_problems(metrics: InferenceMetricsSpec, selection: Any | None) -> list[str]:
    problems = []
    names = metrics.names
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        problems.append(f"metrics.names: repeated {repeated}")
    if "oracle" in names:
        problems.append(
            "metrics.names: 'oracle' judges a training sweep's images of a toy-world subject; "
            "an inference study does not measure it"
        )
    for metric in ("similarity", "identity"):
        if metric in names and metrics.references is None:
            problems.append(
                f"metrics.references: metric {metric!r} needs a folder of the subject's images"
            )
    for field, folder, needed in (
        ("metrics.references", metrics.references, 1),
        ("metrics.fid_reference", metrics.fid_reference, 2),
    ):
        if folder is None:
            continue
        problem = _folder_problem(folder)
        if problem:
            problems.append(f"{field}: {problem}")
            continue
        files = subject_image_files(folder)
        if len(files) < needed:
            problems.append(f"{field}: folder {str(folder)!r} has {len(files)} image(s)")
        problems += [
            f"{field}: {str(p)!r} is {reason}" for p in files if (reason := image_problem(p))
        ]
    for metric in ("fid", "kid"):
        if metric in names and metrics.fid_reference is None:
            problems.append(
                f"metrics.fid_reference: metric {metric!r} needs a folder of reference images"
            )
    if selection is not None:
        weights = selection.weights_for(names)
        bad = sorted(set(weights) - {m for m in names if m in SELECTABLE_METRICS})
        if bad:
            problems.append(
                f"selection.weights: {bad} are not measured weightable metrics; allowed: "
                f"{[m for m in names if m in SELECTABLE_METRICS]}"
            )
        missing = sorted(set(weights) - set(selection.ranges))
        if missing:
            problems.append(f"selection.ranges: no range for weighted metric(s) {missing}")
    return problems


def _prompt_problems(prompts: InferencePromptsSpec) -> list[str]:
    from contract.prompts import PromptTemplateError, load_template

    if prompts.template is not None:
        try:
            template = load_template(prompts.template)
        except PromptTemplateError as err:
            return [f"prompts.template: {err}"]
        if prompts.n is not None and prompts.n > template.combinations:
            return [
                f"prompts.n: {prompts.n} prompts asked, but {str(prompts.template)!r} has only "
                f"{template.combinations} phrase combinations"
            ]
        return []
    assert prompts.file is not None, "one of template and file is set"
    try:
        lines = [line for line in prompts.file.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, UnicodeDecodeError) as err:
        return [f"prompts.file: cannot read {str(prompts.file)!r}: {err}"]
    if not lines:
        return [f"prompts.file: {str(prompts.file)!r} holds no prompts"]
    problems = []
    for number, line in enumerate(lines, start=1):
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                problems.append(
                    f"prompts.file: line {number} of {str(prompts.file)!r} is not a JSON "
                    'object with a "prompt" string'
                )
    return problems


PNDM_PRK_MIN_STEPS = 4
"""PNDMScheduler's Runge-Kutta warm-up (its default, `skip_prk_steps: false`) needs this many
steps: with fewer, diffusers 0.42's `set_timesteps` builds a short schedule and `step` fails."""


def _step_problems(schedulers: list[SchedulerSpec], steps: list[int]) -> list[str]:
    """Step counts a scheduler cannot take (every other scheduler runs from 1 step)."""
    problems = []
    for s, scheduler in enumerate(schedulers):
        too_few = [n for n in steps if n < PNDM_PRK_MIN_STEPS]
        if (
            scheduler.class_name == "PNDMScheduler"
            and too_few
            and not scheduler.resolved_config.get("skip_prk_steps")
        ):
            problems.append(
                f"schedulers[{s}]: PNDMScheduler with its Runge-Kutta warm-up needs "
                f"num_inference_steps >= {PNDM_PRK_MIN_STEPS}, not {too_few}; use at least "
                f"{PNDM_PRK_MIN_STEPS} steps, or set schedulers[{s}].config.skip_prk_steps: true"
            )
    return problems


def inference_problems(sections: dict[str, Any]) -> list[str]:
    """Problems across the sections that validated (name → value) and of the files they name."""
    problems = []
    if "models" in sections and "schedulers" in sections:
        problems += _model_problems(sections["models"], sections["schedulers"])
    if "schedulers" in sections and "num_inference_steps" in sections:
        problems += _step_problems(sections["schedulers"], sections["num_inference_steps"])
    if "negative_prompt" in sections:
        problems += _negative_problems(sections["negative_prompt"])
        if "guidance_scale" in sections:
            problems += _guidance_problems(sections["negative_prompt"], sections["guidance_scale"])
    if "metrics" in sections:
        problems += _metric_problems(sections["metrics"], sections.get("selection"))
    if "prompts" in sections:
        problems += _prompt_problems(sections["prompts"])
    launcher = sections.get("launcher")
    if launcher is not None and launcher.pack > 1:
        # The training launchers' field, accepted by the shared launcher schema: an inference
        # study would silently ignore it (the Ray launcher refuses it itself).
        problems.append(
            f"launcher.pack: {launcher.pack} in an inference study: packs group a training "
            "sweep's trials, and an inference study has none (its workers split the images "
            "into shards, shards.prompts_per_shard); set launcher.pack: 1 or drop it"
        )
    resolution = sections.get("resolution")
    if resolution is not None and resolution % 8:
        problems.append(f"resolution: {resolution} must be a multiple of 8 (the VAE's factor)")
    if (
        "registry" in sections
        and sections["registry"]
        and sections["registry"].endswith((".yaml", ".yml"))
    ):
        try:
            load_any_spec(Path(sections["registry"]))
        except SpecError as err:
            problems.append(
                f"registry: the training spec {err.source} is not valid: {'; '.join(err.problems)}"
            )
    return problems


def inference_warnings(spec: InferenceSpec) -> list[str]:
    """Combinations that run but are unlikely to be meant: a few-step model asked for many
    steps or for guidance."""
    warnings = []
    for m, model in enumerate(spec.models):
        style = model.resolved_style()
        if style not in ("turbo", "lcm"):
            continue
        many = [s for s in spec.num_inference_steps if s > FEW_STEP_MAX_STEPS]
        guided = [g for g in spec.guidance_scale if g > 1]
        if many:
            warnings.append(
                f"models[{m}]: {model.shown!r} is a {style} model, distilled for 1-"
                f"{FEW_STEP_MAX_STEPS} steps; num_inference_steps {many} spend time for no gain"
            )
        if guided:
            warnings.append(
                f"models[{m}]: {model.shown!r} is a {style} model, trained without "
                f"classifier-free guidance; guidance_scale {guided} > 1 degrades its images"
            )
    return warnings


def parse_inference_spec(data: dict[str, Any], *, source: str, base_dir: Path) -> InferenceSpec:
    """Validate an inference spec's parsed YAML; one `SpecError` with every problem."""
    recorded: dict[str, Any] = {}
    try:
        spec = InferenceSpec.model_validate(
            data, context={"base_dir": base_dir, PARSED_SECTIONS: recorded}
        )
    except ValidationError as err:
        errors = err.errors()
        failed = {error["loc"][0] for error in errors if error["loc"]}
        sections = {name: value for name, value in recorded.items() if name not in failed}
        for name, field in InferenceSpec.model_fields.items():
            if name not in data and name not in failed and not field.is_required():
                sections[name] = field.get_default(call_default_factory=True)
        spec = None
    else:
        errors, sections = [], dict(spec)
    problems = [_describe(e, InferenceSpec) for e in errors] + inference_problems(sections)
    if problems:
        raise SpecError(source, problems)
    assert spec is not None, "a spec that failed validation has problems"
    return spec


def parse_any_spec(data: Any, *, source: str, base_dir: Path, check_files: bool = True) -> AnySpec:
    """A training or an inference spec, by its `kind`."""
    kind = data.get("kind", "train") if isinstance(data, dict) else "train"
    if kind not in SPEC_KINDS:
        raise SpecError(source, [f"kind: unknown kind {kind!r}; allowed: {', '.join(SPEC_KINDS)}"])
    if kind == "inference":
        return parse_inference_spec(data, source=source, base_dir=base_dir)
    return parse_spec(data, source=source, base_dir=base_dir, check_files=check_files)


def load_any_spec(path: str | Path, *, check_files: bool = True) -> AnySpec:
    """Load and validate a spec of either kind; raises `SpecError` before any work starts."""
    data, source, base_dir = read_spec_file(path)
    return parse_any_spec(data, source=source, base_dir=base_dir, check_files=check_files)
