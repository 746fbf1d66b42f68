"""Early-stopping rules: small objects that read a trial's evaluations so far and say why it
should stop (or None). They are pure functions of the history, so a resumed trial, fed its
logged history again, decides exactly as an uninterrupted one would.

    stopper = EarlyStopper(AllOf(NoImprovement(patience=3, weights=w, ranges=r),
                                 Collapsed(metrics=["aesthetics"], ranges=r, threshold=0.2)))
    reason = stopper(step, metrics)   # after every evaluation
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from contract.scoring import best_step, first_collapse, weighted_scores
from contract.spec import SelectionSpec

Evaluations = Mapping[int, Mapping[str, float]]
"""step → metric → value, for every evaluated step so far."""


def _histories(evaluations: Evaluations) -> dict[str, dict[int, float]]:
    histories: dict[str, dict[int, float]] = {}
    for step, metrics in evaluations.items():
        for metric, value in metrics.items():
            histories.setdefault(metric, {})[step] = value
    return histories


class StoppingRule(Protocol):
    def reason(self, evaluations: Evaluations) -> str | None: ...


class NoImprovement:
    """The weighted score has not beaten its best for `patience` evaluations."""

    def __init__(
        self,
        *,
        patience: int,
        weights: Mapping[str, float],
        ranges: Mapping[str, tuple[float, float]],
    ) -> None:
        self.patience, self.weights, self.ranges = patience, weights, ranges

    def reason(self, evaluations: Evaluations) -> str | None:
        scores = weighted_scores(_histories(evaluations), self.weights, self.ranges)
        if not scores:
            return None
        best, score = best_step(scores)
        since = sum(1 for step in scores if step > best)
        if since < self.patience:
            return None
        return f"no better weighted score for {since} evaluations (best {score:.4f} at step {best})"


class Collapsed:
    """A watched curve fell from its running best by more than `threshold` (scaled units)."""

    def __init__(
        self, *, metrics: list[str], ranges: Mapping[str, tuple[float, float]], threshold: float
    ) -> None:
        self.metrics, self.ranges, self.threshold = metrics, ranges, threshold

    def reason(self, evaluations: Evaluations) -> str | None:
        found = first_collapse(_histories(evaluations), self.metrics, self.ranges, self.threshold)
        if found is None:
            return None
        step, metric = found
        return f"{metric} collapsed at step {step}"


class AllOf:
    """Stop only when every rule says so; the reasons are joined."""

    def __init__(self, *rules: StoppingRule) -> None:
        self.rules = rules

    def reason(self, evaluations: Evaluations) -> str | None:
        reasons = [rule.reason(evaluations) for rule in self.rules]
        return None if any(r is None for r in reasons) else "; ".join(reasons)


class EarlyStopper:
    """Feeds one trial's evaluations to a rule. `__call__` after each evaluation; a step at or
    before one already seen (a resumed trial redoing steps) replaces the later history."""

    def __init__(self, rule: StoppingRule, history: Evaluations | None = None) -> None:
        self.rule = rule
        self.evaluations: dict[int, dict[str, float]] = {
            step: dict(metrics) for step, metrics in (history or {}).items()
        }

    def __call__(self, step: int, metrics: Mapping[str, float]) -> str | None:
        self.evaluations = {s: m for s, m in self.evaluations.items() if s < step}
        self.evaluations[step] = dict(metrics)
        return self.rule.reason(self.evaluations)


def early_stopper(
    selection: SelectionSpec, measured: list[str], history: Evaluations | None = None
) -> EarlyStopper | None:
    """The spec's rule (`selection.early_stop`): no improvement for `patience` evaluations AND a
    collapse of a watched curve. None when early stopping is off."""
    if selection.early_stop is None:
        return None
    ranges = dict(selection.ranges)
    rule = AllOf(
        NoImprovement(
            patience=selection.early_stop.patience,
            weights=selection.weights_for(measured),
            ranges=ranges,
        ),
        Collapsed(
            metrics=selection.collapse_metrics(measured),
            ranges=ranges,
            threshold=selection.collapse.threshold,
        ),
    )
    return EarlyStopper(rule, history)
