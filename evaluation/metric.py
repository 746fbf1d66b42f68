"""What a metric is to the evaluator: what it needs, and how it scores the generated images.

A metric is built once per trial from the shared `TrialContext` (its constructor loads what it
compares against: reference embeddings, a scoring head, prompt embeddings, a detector) and then
scores every evaluation's `GeneratedImages` in two parts: each image's own value, which becomes
its column in the per-image records, and one logged value per variant (`<name>` and
`<name>/no_negative`), by default the mean of the variant's per-image values.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from evaluation.context import GeneratedImages, TrialContext


class EvalMetric:
    """One of `eval.metrics`. Subclasses set `name` and override what differs."""

    name: ClassVar[str]
    """The name in `eval.metrics`, of the logged curve and of the records column."""

    @classmethod
    def needs(cls, trial: TrialContext) -> set[str]:
        """The shared encoders (of `context.ENCODERS`) this metric uses, loaded before any
        metric is built."""
        return set()

    def __init__(self, trial: TrialContext) -> None:
        self.trial = trial

    def per_image(self, generated: GeneratedImages) -> torch.Tensor | None:
        """Each image's value (float64 `[N]`, job order), or None for a set-level metric."""
        return None

    def curve(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> float:
        """The logged value for one variant's images (`rows`), given `per_image`'s values."""
        if per_image is None:
            raise NotImplementedError(f"{self.name}: a set-level metric overrides curve()")
        return per_image[rows].mean().item()

    def curves(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> dict[str, float]:
        """Every curve this metric logs for one variant's images, by name: one, its own
        (`curve`), unless the metric logs several (`contract.spec.base.CURVES_OF`)."""
        return {self.name: self.curve(generated, rows, per_image)}

    def record_columns(self, generated: GeneratedImages) -> dict[str, list[object]]:
        """More per-image columns for the records (`<name>.<what>` → one value per job), asked
        after `per_image` on the same images: what explains a value, such as a face count."""
        return {}

    def setup(self) -> dict[str, str]:
        """What this metric really ran (e.g. which face detector), logged with the trial's setup
        tags (`dreamsweep.setup.<key>`)."""
        return {}
