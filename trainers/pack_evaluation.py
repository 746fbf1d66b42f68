"""Evaluating a pack's members at a step together: each of the evaluators' pipeline calls holds
the same batch of every member's jobs (their prompts name each member's own token), each row
through its own member's weights, so K members take one call where alone they take K.

Members evaluate together when they share the `eval` spec and resolution (every member of a
sweep's pack does); each member's images are then measured by its own evaluator, as alone.
Batch composition changes the numerics in the last bits: a member's curves agree with its lone
run's to rounding (tests/test_packing.py says how closely). A member's `eval_seconds` counts
from the start of the shared generation to the end of its own measuring (so it includes the
members measured before it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from evaluation.sampling import make_sampler
from trainers.loop import on_device
from trainers.models import assemble_pipeline
from trainers.packing import Router

if TYPE_CHECKING:
    from trainers.pack_loop import Member


def evaluate_members(members: Sequence[Member], router: Router) -> dict[str, dict[str, float]]:
    """Evaluate `members`, each at its current step, report each one's evaluation, and return
    each one's metrics by member name."""
    groups: dict[str, list[Member]] = {}
    for member in members:
        config = member.config
        key = f"{config.train.resolution}:{config.eval.model_dump_json()}"
        groups.setdefault(key, []).append(member)
    metrics = {}
    for group in groups.values():
        metrics |= _evaluate_group(group, router)
    return metrics


def _evaluate_group(members: Sequence[Member], router: Router) -> dict[str, dict[str, float]]:
    first = members[0].state
    model, accelerator = first.model, first.accelerator
    pipeline = assemble_pipeline(
        model, make_sampler(first.config.eval.scheduler, model.noise_scheduler.config)
    )
    for module in first.training.modules.values():
        module.eval()
    images: dict[str, list] = {m.name: [] for m in members}
    started = time.perf_counter()
    on_accelerator = on_device([module for _, module in first.offloaded], accelerator.device)
    with on_accelerator, torch.no_grad(), accelerator.autocast():
        batches = [m.state.evaluator.batches() for m in members]
        for chunks in zip(*batches, strict=True):
            owners = [m.name for m, jobs in zip(members, chunks, strict=True) for _ in jobs]
            jobs = [job for chunk in chunks for job in chunk]
            with router.routing(unet=owners, text=owners):
                generated = first.evaluator.generate_batch(pipeline, jobs)
            start = 0
            for member, chunk in zip(members, chunks, strict=True):
                images[member.name] += generated[start : start + len(chunk)]
                start += len(chunk)
        evaluations = {
            m.name: m.state.evaluator.evaluation(images[m.name], started=started) for m in members
        }
    for member in members:
        member.state.reporter.on_evaluation(member.step, evaluations[member.name])
    first.training.train_mode()
    return {name: evaluation.metrics for name, evaluation in evaluations.items()}
