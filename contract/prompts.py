"""Prompt templates: a sentence with slots, each slot a list of phrases, expanded deterministically.

As in the portrait study, a prompt is the identifier and class token plus one randomly chosen
phrase per component (style, framing, lighting, background, …). `expand(template, n, seed)`
draws `n` distinct phrase combinations; the draw for `n` is a prefix of the draw for any larger
`n` with the same seed, so the `n_validation` prompts used during training are the first
prompts of a 5000-prompt inference study on the same template.

Each prompt keeps which phrase filled each slot, so metrics can later be averaged per phrase.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SUBJECT_SLOTS = ("token", "class")
# The shipped templates live in configs/prompts/ with the other configs; a wheel carries them
# beside this module as contract/prompt_templates/ (pyproject.toml maps the folder). A file path,
# as a spec's template travels to the workers: a setuptools wheel is installed as files, never
# imported zipped, and `importlib.resources.files` would fail where `contract` resolves as a
# namespace package (an editable install made before it had its __init__.py).
_INSTALLED_TEMPLATES = Path(__file__).resolve().parent / "prompt_templates"  # in a wheel
SHIPPED_TEMPLATES = (
    _INSTALLED_TEMPLATES
    if _INSTALLED_TEMPLATES.is_dir()
    else Path(__file__).resolve().parents[1] / "configs" / "prompts"  # in a checkout
)


class PromptTemplate(BaseModel):
    """A prompt template file (the shipped ones: `configs/prompts/*.yaml`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str
    """The sentence: `{token}` (the subject's identifier), `{class}` (its class token) and one
    `{slot}` per entry of `slots`."""
    slots: dict[str, list[str]] = Field(default_factory=dict)
    """Slot name → the phrases it is filled with (each slot's list non-empty, no repeats)."""

    @model_validator(mode="after")
    def _slots_match_template(self) -> PromptTemplate:
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as err:
            raise ValueError(f"template {self.template!r} is not a valid template: {err}") from None
        problems = []
        if "token" not in used:
            problems.append(f"template {self.template!r} must contain {{token}}")
        undefined = sorted(used - set(SUBJECT_SLOTS) - set(self.slots))
        if undefined:
            problems.append(f"template uses slot(s) {undefined} that `slots` does not define")
        unused = sorted(set(self.slots) - used)
        if unused:
            problems.append(f"slots {unused} are not used by the template")
        reserved = sorted(set(self.slots) & set(SUBJECT_SLOTS))
        if reserved:
            problems.append(f"slots {reserved} are reserved for the subject")
        for name, phrases in self.slots.items():
            if not phrases:
                problems.append(f"slots.{name}: needs at least one phrase")
            braced = [p for p in phrases if "{" in p or "}" in p]
            if braced:
                problems.append(f"slots.{name}: phrases may not contain braces: {braced}")
            repeated = sorted({p for p in phrases if phrases.count(p) > 1})
            if repeated:
                problems.append(f"slots.{name}: repeated phrase(s) {repeated}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def combinations(self) -> int:
        return math.prod(len(phrases) for phrases in self.slots.values())


class PromptTemplateError(ValueError):
    """A template file that cannot be used; the message names the file and every problem."""


def template_path(name_or_path: str, *, base_dir: Path | None = None) -> Path:
    """A shipped template's name (`portrait`, `object`) or a YAML path (relative to `base_dir`)."""
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        return SHIPPED_TEMPLATES / f"{name_or_path}.yaml"
    path = Path(name_or_path).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return path.resolve()


def shipped_templates() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TEMPLATES.glob("*.yaml"))


def load_template(path: Path) -> PromptTemplate:
    """Read and validate a template file; raises `PromptTemplateError` naming every problem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PromptTemplateError(f"{path}: cannot read the template: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PromptTemplateError(f"{path}: not valid YAML: {err}") from None
    try:
        return PromptTemplate.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            field = ".".join(str(p) for p in error["loc"]) or "<top>"
            problems.append(f"  - {field}: {error['msg'].removeprefix('Value error, ')}")
        message = f"{path}: invalid prompt template:\n" + "\n".join(problems)
        raise PromptTemplateError(message) from None


@dataclass(frozen=True)
class Prompt:
    """One expanded prompt, before the subject is filled in."""

    text: str
    """The template with its phrase slots filled; `{token}` and `{class}` still open."""
    phrases: dict[str, str]
    """Slot → the phrase that filled it."""

    def render(self, *, token: str, class_token: str) -> str:
        """The prompt for a subject; `token=""` gives DreamBench's identifier-free prompt."""
        filled = self.text.format(token=token, **{"class": class_token})
        return " ".join(filled.split())


def expand(template: PromptTemplate, n: int, *, seed: int) -> list[Prompt]:
    """`n` distinct phrase combinations drawn with `seed`; a prefix of any larger draw."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > template.combinations:
        raise ValueError(
            f"asked for {n} distinct prompts, but the template has only "
            f"{template.combinations} phrase combinations"
        )
    rng = random.Random(seed)
    names = list(template.slots)
    seen: set[tuple[int, ...]] = set()
    prompts = []
    while len(prompts) < n:
        choice = tuple(rng.randrange(len(template.slots[name])) for name in names)
        if choice in seen:
            continue
        seen.add(choice)
        phrases = {name: template.slots[name][i] for name, i in zip(names, choice, strict=True)}
        # Subject slots stay open: `{{token}}` survives this format as `{token}`.
        text = template.template.format(token="{token}", **{"class": "{class}"}, **phrases)
        prompts.append(Prompt(text=text, phrases=phrases))
    return prompts


def fixed_prompts(texts: list[str]) -> list[Prompt]:
    """Explicit prompts (`eval.prompts`): no phrase slots."""
    return [Prompt(text=text, phrases={}) for text in texts]
