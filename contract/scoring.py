"""Scaled, weighted scores over the step grid, the best step and collapse: pure functions on
histories, defined once for every stage that ranks steps. The worker ranks them online (early
stopping, which checkpoints retention keeps), `dreamsweep select` and the report afterwards."""

from __future__ import annotations

from collections.abc import Mapping

History = Mapping[int, float]
"""step → metric value."""


def min_max_scale(value: float, low: float, high: float) -> float:
    """Scale `value` from [low, high] to [0, 1], clipped."""
    return min(1.0, max(0.0, (value - low) / (high - low)))


def weighted_scores(
    histories: Mapping[str, History],
    weights: Mapping[str, float],
    ranges: Mapping[str, tuple[float, float]],
) -> dict[int, float]:
    """Weighted mean of the scaled metrics at every step where all weighted metrics exist."""
    active = {metric: weight for metric, weight in weights.items() if weight > 0}
    if not active:
        raise ValueError("at least one selection weight must be > 0")
    missing = sorted(m for m in active if m not in ranges)
    if missing:
        raise ValueError(f"no min–max range for weighted metric(s) {missing}")
    step_sets = [set(histories.get(metric, {})) for metric in active]
    steps = sorted(set.intersection(*step_sets))
    total = sum(active.values())
    return {
        step: sum(
            weight * min_max_scale(histories[metric][step], *ranges[metric])
            for metric, weight in active.items()
        )
        / total
        for step in steps
    }


def best_step(scores: Mapping[int, float]) -> tuple[int, float]:
    """The step with the highest score; ties go to the earlier step."""
    if not scores:
        raise ValueError("no evaluated step to choose from")
    step = min(scores, key=lambda s: (-scores[s], s))
    return step, scores[step]


def collapse_step(
    history: History, value_range: tuple[float, float], threshold: float
) -> int | None:
    """The first step whose scaled value lies more than `threshold` below the running best of
    the steps before it (the curve has collapsed there); None if it never does."""
    running_best = float("-inf")
    for step in sorted(history):
        scaled = min_max_scale(history[step], *value_range)
        if scaled < running_best - threshold:
            return step
        running_best = max(running_best, scaled)
    return None


def first_collapse(
    histories: Mapping[str, History],
    metrics: list[str],
    ranges: Mapping[str, tuple[float, float]],
    threshold: float,
) -> tuple[int, str] | None:
    """The earliest collapse over `metrics`: (step, metric), or None."""
    found = [
        (step, metric)
        for metric in metrics
        if (step := collapse_step(histories.get(metric, {}), ranges[metric], threshold)) is not None
    ]
    return min(found) if found else None
