"""What is generated at every evaluation: the validation prompts and one job per image.

The jobs are fixed when a trial starts (prompt, negative prompt, seed), so every step of the
grid generates the same images from the same noise and only the trained weights differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.layout import NO_NEGATIVE
from contract.prompts import Prompt, expand, fixed_prompts, load_template
from contract.spec import EvalSpec


def validation_prompts(spec: EvalSpec) -> list[Prompt]:
    """`eval.prompts`, or the first `n_validation` prompts drawn from `eval.prompt_template`."""
    if spec.prompts is not None:
        return fixed_prompts(spec.prompts)
    template = load_template(spec.prompt_template.template)
    return expand(template, spec.prompt_template.n_validation, seed=spec.prompt_template.seed)


@dataclass(frozen=True)
class ImageJob:
    """One evaluation image: what it is generated from, identical at every step."""

    variant: str
    """`""` (the spec's negative prompt, if any) or `no_negative`."""
    prompt_index: int
    image_index: int
    """Which of the prompt's `images_per_prompt` images."""
    seed: int
    prompt: str
    text_prompt: str
    """The prompt without the subject's identifier (DreamBench's CLIP-T prompt)."""
    negative_prompt: str
    phrases: dict[str, str] = field(default_factory=dict)


def image_variants(spec: EvalSpec) -> list[tuple[str, str]]:
    """(variant, its negative prompt): the main one, then `no_negative` if compared."""
    variants = [("", spec.negative_prompt or "")]
    if spec.compare_negative:
        variants.append((NO_NEGATIVE, ""))
    return variants


def image_jobs(spec: EvalSpec, *, token: str, class_token: str) -> list[ImageJob]:
    """Every evaluation image, in generation order: variant, then prompt, then image.

    An image's seed depends on its prompt and index only, so both variants of an image start
    from the same noise.
    """
    return [
        ImageJob(
            variant=variant,
            prompt_index=index,
            image_index=k,
            seed=spec.seed + index * spec.images_per_prompt + k,
            prompt=prompt.render(token=token, class_token=class_token),
            text_prompt=prompt.render(token="", class_token=class_token),
            negative_prompt=negative,
            phrases=prompt.phrases,
        )
        for variant, negative in image_variants(spec)
        for index, prompt in enumerate(validation_prompts(spec))
        for k in range(spec.images_per_prompt)
    ]
