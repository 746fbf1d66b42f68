"""Sampling pieces shared by training (class images, prompts) and evaluation: the samplers by
name and the prompt slots. Trainers import them from here; evaluation never imports trainers."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
)

from contract.prompts import Prompt

SAMPLERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "pndm": PNDMScheduler,
}


def make_sampler(name: str, training_scheduler_config: dict) -> SchedulerMixin:
    """The evaluation sampler, configured from the base model's noise schedule."""
    return SAMPLERS[name].from_config(training_scheduler_config)


def fill_prompt(template: str, *, token: str, class_token: str) -> str:
    """`template` with its `{token}` and `{class}` slots filled."""
    return Prompt(text=template, phrases={}).render(token=token, class_token=class_token)
