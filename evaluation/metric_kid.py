"""`kid`: the Kernel Inception Distance between each variant's images and `eval.fid_reference`,
on the features of `fid` (`eval.fid_features`). A set-level metric: lower is better.

Unlike FID, KID's estimate is unbiased, so values from few images (a few hundred per step)
compare fairly across sample sizes. It is averaged over `eval.kid_subsets` random subsets of
`eval.kid_subset_size` images of each set (capped at the smaller set), drawn with `eval.seed`,
so every step draws the same subsets.
"""

from __future__ import annotations

import torch

from evaluation.context import GeneratedImages
from evaluation.metric_fid import SetLevelMetric
from evaluation.metrics import kernel_inception_distance


class Kid(SetLevelMetric):
    name = "kid"

    def curve(
        self, generated: GeneratedImages, rows: list[int], per_image: torch.Tensor | None
    ) -> float:
        spec = self.trial.spec
        return kernel_inception_distance(
            self.features.of(generated, rows),
            self.features.reference,
            subsets=spec.kid_subsets,
            subset_size=spec.kid_subset_size,
            seed=spec.seed,
        )
