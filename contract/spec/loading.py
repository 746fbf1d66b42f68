"""Loading a sweep spec: YAML parsing, schema validation with pydantic's errors rewritten to
name the field, the value and what is allowed, the checks across sections, and the checks of the
files the spec points at. Every problem of every phase is reported at once: the checks across
sections and of files run on each section that validated, whatever failed elsewhere."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from contract.images import image_problem
from contract.spec.base import SpecError, _folder_problem
from contract.spec.evaluation import (
    INCEPTION_WEIGHTS,
    LAION_AESTHETIC_HEAD,
    EvalSpec,
    is_url,
)
from contract.spec.launchers import LAUNCHERS, SCHEDULERS
from contract.spec.sweep import (
    PARSED_SECTIONS,
    SweepSpec,
    cross_section_problems,
    duplicate_model_problems,
    resolution_problems,
)
from contract.spec.train import BaseModelSpec, SubjectSpec


def subject_image_files(folder: Path) -> list[Path]:
    """The subject's files in name order (dotfiles such as `.DS_Store` are not images)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def check_subject_files(subjects: Mapping[int, SubjectSpec], needed: int | None) -> list[str]:
    """Problems with the image folders of `subjects` (their index in the spec → subject), every
    one, not just the first; `needed` is the largest of grid.num_images, None when unknown."""
    problems = []
    for index, subject in subjects.items():
        field = f"subjects[{index}].images"
        folder_problem = _folder_problem(subject.images)
        if folder_problem:
            problems.append(f"{field}: {folder_problem}")
            continue
        files = subject_image_files(subject.images)
        if not files:
            problems.append(f"{field}: folder {str(subject.images)!r} has no images")
            continue
        for path in files:
            reason = image_problem(path)
            if reason:
                problems.append(f"{field}: {str(path)!r} is {reason}")
        if needed is not None and len(files) < needed:
            problems.append(
                f"{field}: folder {str(subject.images)!r} has {len(files)} image(s) but "
                f"grid.num_images asks for up to {needed}"
            )
    return problems


def check_eval_files(evaluation: EvalSpec) -> list[str]:
    """Problems with the prompt template, FID reference folder and weights files the eval
    section points at."""
    from contract.prompts import PromptTemplateError, load_template

    problems = []
    template_spec = evaluation.prompt_template
    if template_spec is not None:
        try:
            template = load_template(template_spec.template)
        except PromptTemplateError as err:
            problems.append(f"eval.prompt_template.template: {err}")
        else:
            if template_spec.n_validation > template.combinations:
                problems.append(
                    f"eval.prompt_template.n_validation: {template_spec.n_validation} prompts "
                    f"asked, but {str(template_spec.template)!r} has only "
                    f"{template.combinations} phrase combinations"
                )
    folder = evaluation.fid_reference
    if folder is not None:
        folder_problem = _folder_problem(folder)
        if folder_problem:
            problems.append(f"eval.fid_reference: {folder_problem}")
        else:
            files = subject_image_files(folder)
            if len(files) < 2:
                problems.append(
                    f"eval.fid_reference: folder {str(folder)!r} has {len(files)} image(s); "
                    "FID needs at least 2"
                )
            for path in files:
                reason = image_problem(path)
                if reason:
                    problems.append(f"eval.fid_reference: {str(path)!r} is {reason}")
    released = {
        "eval.fid_weights": INCEPTION_WEIGHTS,
        "eval.aesthetics_head": LAION_AESTHETIC_HEAD,
        "eval.oracle_model": "`toy` (the toy world's oracle)",
    }
    for field, source in evaluation.weights_sources.items():  # URLs: launch.preflight
        if not is_url(source) and not Path(source).is_file():
            problems.append(
                f"{field}: no file at {source!r}; the released file is {released[field]}"
            )
    return problems


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model found at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
        while get_origin(current) is not None:  # list[X], X | None
            args = [a for a in get_args(current) if a is not type(None)]
            current = next(
                (a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0]
            )
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


# Keys of earlier releases, and where they live now.
MOVED_KEYS = {
    "grid.learning_rate": "methods.<method>.learning_rate",
    "train.lora_rank": "methods.lora.rank",
    "train.lora_alpha": "methods.lora.alpha",
    "eval.image_encoder": "eval.clip_model",
}


def _describe(error: dict[str, Any], root: type[BaseModel] | None = None) -> str:
    """One pydantic error as `field: problem (got value)`; `root`: the spec's model (default
    `SweepSpec`), where unknown keys' allowed siblings are looked up."""
    loc = error["loc"]
    launcher = None
    if len(loc) >= 2 and loc[0] == "launcher" and loc[1] in LAUNCHERS:
        # pydantic puts the union's tag in the location: launcher.slurm.nodes → launcher.nodes
        launcher, loc = LAUNCHERS[loc[1]], (loc[0], *loc[2:])
        if len(loc) >= 3 and loc[1] == "scheduler" and loc[2] in SCHEDULERS:
            launcher, loc = SCHEDULERS[loc[2]], (*loc[:2], *loc[3:])
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        if launcher is not None and len(loc) == (3 if loc[1] == "scheduler" else 2):
            allowed = list(launcher.model_fields)
        else:
            allowed = _allowed_keys(root or SweepSpec, loc[:-1]) or []
        moved = MOVED_KEYS.get(field)
        hint = f" (it moved to {moved})" if moved else ""
        return f"{field or '<top>'}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    value = error.get("input")
    if isinstance(value, dict):  # a check across fields: the message names them
        return f"{field or '<top>'}: {message}"
    shown = repr(value) if len(repr(value)) < 120 else repr(value)[:117] + "..."
    return f"{field or '<top>'}: {message} (got {shown})"


def _validated_sections(
    data: dict[str, Any], base_dir: Path
) -> tuple[SweepSpec | None, dict[str, Any], list[dict[str, Any]]]:
    """One schema pass: the spec (None if it failed), every top-level section that validated
    (given, or left to its default) and pydantic's errors."""
    recorded: dict[str, Any] = {}
    try:
        spec = SweepSpec.model_validate(
            data, context={"base_dir": base_dir, PARSED_SECTIONS: recorded}
        )
    except ValidationError as err:
        errors = err.errors()
    else:
        return spec, dict(spec), []
    failed = {error["loc"][0] for error in errors if error["loc"]}
    sections = {name: value for name, value in recorded.items() if name not in failed}
    for name, field in SweepSpec.model_fields.items():
        # Absent from the spec: its default, which pydantic does not validate.
        if name not in data and name not in failed and not field.is_required():
            sections[name] = field.get_default(call_default_factory=True)
    return None, sections, errors


def _subjects_that_validated(
    data: dict[str, Any], sections: dict[str, Any], base_dir: Path
) -> dict[int, SubjectSpec]:
    """Index → subject, for every subject that validated, also when a sibling did not."""
    if "subjects" in sections:
        return dict(enumerate(sections["subjects"]))
    items = data.get("subjects")
    if not isinstance(items, list):
        return {}
    subjects = {}
    for index, item in enumerate(items):
        try:  # the same model as in the list: its errors are already among `errors`
            subjects[index] = SubjectSpec.model_validate(item, context={"base_dir": base_dir})
        except ValidationError:
            continue
    return subjects


def _as_written(problem: str, base_model: Any) -> str:
    """A problem of a one-model `base_model` names the field as the spec wrote it (`base_model`,
    `base_model.resolution`), not as the list it is read into (`base_model[0].id`)."""
    if isinstance(base_model, list) or not problem.startswith("base_model[0]"):
        return problem
    if isinstance(base_model, str):
        problem = problem.replace("base_model[0].id", "base_model", 1)
    return problem.replace("base_model[0]", "base_model", 1)


def _model_problems_beside_failed_ones(
    data: dict[str, Any], sections: dict[str, Any], base_dir: Path
) -> list[str]:
    """When some `base_model` entry failed (its errors are already listed), the checks across
    entries on the others, so a duplicate or a resolution problem shows in the same pass."""
    items = data.get("base_model")
    if "base_model" in sections or not isinstance(items, list):
        return []  # validated: the cross-section checks ran on it
    models = {}
    for index, item in enumerate(items):
        try:
            models[index] = BaseModelSpec.model_validate(item, context={"base_dir": base_dir})
        except ValidationError:
            continue
    problems = duplicate_model_problems(models)
    if "train" in sections:
        problems += resolution_problems(models, sections["train"])
    return problems


def parse_spec(data: Any, *, source: str, base_dir: Path, check_files: bool = True) -> SweepSpec:
    """Validate already-parsed YAML: the schema, the checks across sections and (with
    `check_files`) the files; raises one `SpecError` listing every problem of every phase."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"<top>: expected a mapping of fields, got {type(data).__name__}"])
    spec, sections, errors = _validated_sections(data, base_dir)
    problems = [_describe(e) for e in errors] + cross_section_problems(sections)
    problems += _model_problems_beside_failed_ones(data, sections, base_dir)
    problems = [_as_written(problem, data.get("base_model")) for problem in problems]
    if check_files:
        grid = sections.get("grid")
        subjects = _subjects_that_validated(data, sections, base_dir)
        problems += check_subject_files(subjects, None if grid is None else max(grid.num_images))
        if "eval" in sections:
            problems += check_eval_files(sections["eval"])
    if problems:
        raise SpecError(source, problems)
    assert spec is not None, "a spec that failed validation has problems"
    return spec


def read_spec_file(path: str | Path) -> tuple[Any, str, Path]:
    """A spec file's YAML data, its name for messages, and the folder its relative paths resolve
    against; raises `SpecError` for a file that cannot be read or parsed."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(source, [f"cannot read the file: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        raise SpecError(
            source, [f"not valid YAML: the file is not UTF-8 text (byte {err.start}: {err.reason})"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(source, [f"not valid YAML: {err}"]) from None
    return data, source, path.resolve().parent


def load_spec(path: str | Path, *, check_files: bool = True) -> SweepSpec:
    """Load, validate and resolve a sweep spec; raises `SpecError` before any work starts."""
    data, source, base_dir = read_spec_file(path)
    return parse_spec(data, source=source, base_dir=base_dir, check_files=check_files)
