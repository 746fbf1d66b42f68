"""The metrics by name: `eval.metrics` picks from here.

Adding a metric is one module (an `EvalMetric` subclass) and one entry below, plus its name in
`contract.spec.Metric`. The order is not cosmetic: the chosen metrics are built (their
reference embeddings, heads and detectors loaded) in this order, and their per-image columns
appear in the records in this order; the logged curves follow `eval.metrics`.
"""

from __future__ import annotations

from typing import get_args

from contract.spec import Metric
from evaluation.metric import EvalMetric
from evaluation.metric_aesthetics import Aesthetics
from evaluation.metric_clip_t import ClipT
from evaluation.metric_diversity import Diversity
from evaluation.metric_fid import Fid
from evaluation.metric_identity import Identity
from evaluation.metric_in_domain import InDomain
from evaluation.metric_kid import Kid
from evaluation.metric_oracle import OracleMetric
from evaluation.metric_similarity import Similarity

METRICS: dict[str, type[EvalMetric]] = {
    "similarity": Similarity,
    "aesthetics": Aesthetics,
    "clip_t": ClipT,
    "in_domain": InDomain,
    "identity": Identity,
    "diversity": Diversity,
    "fid": Fid,
    "kid": Kid,
    "oracle": OracleMetric,
}

# The spec validates names against `contract.spec.Metric`: both lists must say the same.
if set(METRICS) != set(get_args(Metric)) or any(n != m.name for n, m in METRICS.items()):
    raise RuntimeError(f"evaluation.registry {list(METRICS)} disagrees with contract.spec.Metric")


def chosen_metrics(names: list[str]) -> list[type[EvalMetric]]:
    """The metrics named in `eval.metrics`, in registry order."""
    return [metric for name, metric in METRICS.items() if name in names]
