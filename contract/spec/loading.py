"""Loading a sweep spec: YAML parsing, schema validation with pydantic's errors rewritten to
name the field, the value and what is allowed, and the checks of the files the spec points at."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from contract.images import image_problem
from contract.spec.base import SpecError
from contract.spec.launchers import LAUNCHERS, SCHEDULERS
from contract.spec.sweep import SweepSpec


def subject_image_files(folder: Path) -> list[Path]:
    """The subject's files in name order (dotfiles such as `.DS_Store` are not images)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def check_subject_files(spec: SweepSpec) -> list[str]:
    """Problems with the image folders the spec points at (every one, not just the first)."""
    problems = []
    needed = max(spec.grid.num_images)
    for index, subject in enumerate(spec.subjects):
        field = f"subjects[{index}].images"
        if not subject.images.is_dir():
            problems.append(f"{field}: folder {str(subject.images)!r} does not exist")
            continue
        files = subject_image_files(subject.images)
        if not files:
            problems.append(f"{field}: folder {str(subject.images)!r} has no images")
            continue
        for path in files:
            reason = image_problem(path)
            if reason:
                problems.append(f"{field}: {str(path)!r} is {reason}")
        if len(files) < needed:
            problems.append(
                f"{field}: folder {str(subject.images)!r} has {len(files)} image(s) but "
                f"grid.num_images asks for up to {needed}"
            )
    return problems


def check_eval_files(spec: SweepSpec) -> list[str]:
    """Problems with the prompt template and FID reference folder the spec points at."""
    from contract.prompts import PromptTemplateError, load_template

    problems = []
    template_spec = spec.eval.prompt_template
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
    folder = spec.eval.fid_reference
    if folder is not None:
        if not folder.is_dir():
            problems.append(f"eval.fid_reference: folder {str(folder)!r} does not exist")
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


def _describe(error: dict[str, Any]) -> str:
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
            allowed = _allowed_keys(SweepSpec, loc[:-1]) or []
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


def parse_spec(data: Any, *, source: str, base_dir: Path) -> SweepSpec:
    """Validate already-parsed YAML; raises `SpecError` listing every schema problem."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"<top>: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return SweepSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise SpecError(source, [_describe(e) for e in err.errors()]) from None


def load_spec(path: str | Path, *, check_files: bool = True) -> SweepSpec:
    """Load, validate and resolve a sweep spec; raises `SpecError` before any work starts."""
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
    spec = parse_spec(data, source=source, base_dir=path.resolve().parent)
    if check_files:
        problems = check_subject_files(spec) + check_eval_files(spec)
        if problems:
            raise SpecError(source, problems)
    return spec
