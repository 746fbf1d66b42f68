"""The selection section of the sweep spec: the study's weights and ranges, collapse detection,
early stopping and `SelectionSpec`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from contract.spec.base import CURVES, ORACLE_CURVES, Curve, _Strict, logged_curves

# Curves whose value rises with quality, so a stop step can be chosen on them. FID compares
# models (lower is better, unbounded) and is reported, not weighted.
SELECTABLE_METRICS = tuple(curve for curve in CURVES if curve not in ("fid", "kid"))

# Min–max ranges; scores are clipped to [0, 1] after scaling. Similarity, aesthetics (the LAION
# score / 10) and diversity are the portrait study's; clip_t spans what DreamBench reports for
# CLIP ViT-B/32 to L/14 (about 0.2 to 0.35); in_domain is a rate. identity is 1 − dlib's face
# distance: its low end is dlib's same-person threshold (distance 0.6; at or below it, scaled 0:
# another person, or no face), its high end distance 0.3, half the threshold: a clear match.
STUDY_RANGES: dict[str, tuple[float, float]] = {
    "similarity": (0.45, 0.85),
    "aesthetics": (0.3, 0.7),
    "diversity": (0.5, 0.75),
    "clip_t": (0.2, 0.35),
    "in_domain": (0.0, 1.0),
    "identity": (0.4, 0.7),
    **dict.fromkeys(ORACLE_CURVES, (0.0, 1.0)),
}
STUDY_WEIGHTS: dict[str, float] = {"similarity": 1.0, "aesthetics": 1.0, "diversity": 0.5}


class CollapseSpec(_Strict):
    """When a curve is said to collapse: it falls from its running best by more than `threshold`
    (in scaled units: a fraction of its min–max range)."""

    metrics: list[Curve] = Field(default=["aesthetics", "diversity"])
    """Curves watched (those of them that are measured): the study read training degeneration
    from drops of aesthetics and diversity."""
    threshold: float = Field(default=0.2, gt=0, le=1)
    """Drop from the running best, as a fraction of the metric's range, that counts as collapse."""


class EarlyStopSpec(_Strict):
    """Stop a trial early, in its worker (every launcher; the trial counts as finished)."""

    patience: int = Field(ge=1)
    """Evaluations without a better weighted score, with a collapse detected, before stopping."""


class SelectionSpec(_Strict):
    """How the stop step is chosen from the curves."""

    weights: dict[Curve, Annotated[float, Field(ge=0)]] | None = None
    """Weight of each metric in the score; unset means the study's weights for the measured ones."""
    ranges: dict[Curve, tuple[float, float]] = Field(default_factory=lambda: dict(STUDY_RANGES))
    """Min–max range per metric; values are scaled to [0, 1] over it and clipped."""
    collapse: CollapseSpec = CollapseSpec()
    """Collapse detection, reported beside the best step."""
    early_stop: EarlyStopSpec | None = None
    """Stop trials whose score stopped improving and whose curves collapsed; unset means never.
    Not part of a trial's identity: a trial already finished is not resumed to go further."""
    register_best: bool = True
    """Register each subject × method's best checkpoint in the MLflow model registry."""

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for metric, (low, high) in ranges.items():
            if not low < high:
                raise ValueError(f"range of {metric} must have min < max, got [{low}, {high}]")
        return ranges

    def weights_for(self, measured: list[str]) -> dict[str, float]:
        """The weights: the spec's, or the study's for the measured metrics."""
        if self.weights is not None:
            return dict(self.weights)
        return {m: STUDY_WEIGHTS[m] for m in logged_curves(measured) if m in STUDY_WEIGHTS}

    def collapse_metrics(self, measured: list[str]) -> list[str]:
        """The watched curves that `measured` (`eval.metrics`) logs."""
        curves = logged_curves(measured)
        return [m for m in self.collapse.metrics if m in curves]
