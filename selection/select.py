"""`dreamsweep select`: read each trial's curves from MLflow, choose its stop step, detect
collapse, log both, and register each subject × method's best checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from contract.layout import (
    METRIC_BEST_SCORE,
    METRIC_BEST_STEP,
    METRIC_COLLAPSE_STEP,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_SUBJECT,
    TAG_BEST_CHECKPOINT,
    TAG_CHECKPOINT,
    TAG_COLLAPSE,
    TAG_SELECTION_WEIGHTS,
    TAG_TRIAL,
)
from contract.spec import SweepSpec
from selection.registry import Candidate, Registered, register_best
from selection.scoring import best_step, first_collapse, weighted_scores
from tracking.sweep import SweepTracking


@dataclass
class TrialSelection:
    run_id: str
    label: str
    subject: str
    method: str
    num_images: int
    best_step: int
    best_score: float
    metrics: dict[str, float]
    """Every weighted metric's value at the best step."""
    checkpoint: str | None
    """The checkpoint saved at the best step (None at step 0: that is the base model)."""
    collapse: tuple[int, str] | None = None
    """(step, metric) where a watched curve first collapsed, or None."""
    scores: dict[int, float] = field(default_factory=dict)
    """The weighted score at every evaluated step."""


@dataclass
class SweepSelection:
    trials: list[TrialSelection]
    registered: list[Registered]
    weights: dict[str, float]


class SelectionError(RuntimeError):
    pass


def select_sweep(spec: SweepSpec, *, weights: dict[str, float] | None = None) -> SweepSelection:
    """Choose every trial's stop step with the spec's (or the given) weights and ranges; log it
    to its run and register the best checkpoints."""
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    if parent is None:
        raise SelectionError(
            f"sweep {spec.name!r} has no runs in {spec.tracking_uri}: run `dreamsweep run` first"
        )
    weights = dict(weights) if weights is not None else spec.selection_weights
    ranges = dict(spec.selection.ranges)
    watched = spec.selection.collapse_metrics(spec.eval.metrics)
    client = tracking.client
    selections, candidates = [], []
    runs = tracking.trial_runs(parent.info.run_id).values()
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        run_id = run.info.run_id
        histories = tracking.histories(run_id, sorted({*weights, *watched}))
        scores = weighted_scores(histories, weights, ranges)
        if not scores:
            continue  # a trial that never evaluated (it failed early) has nothing to choose
        step, score = best_step(scores)
        collapse = first_collapse(histories, watched, ranges, spec.selection.collapse.threshold)
        checkpoint = run.data.tags.get(TAG_CHECKPOINT.format(step=step))
        client.log_metric(run_id, METRIC_BEST_STEP, step)
        client.log_metric(run_id, METRIC_BEST_SCORE, score)
        client.set_tag(run_id, TAG_SELECTION_WEIGHTS, json.dumps(weights, sort_keys=True))
        client.set_tag(run_id, TAG_BEST_CHECKPOINT, checkpoint or "base model (step 0)")
        if collapse is not None:
            client.log_metric(run_id, METRIC_COLLAPSE_STEP, collapse[0])
            client.set_tag(run_id, TAG_COLLAPSE, f"{collapse[1]} at step {collapse[0]}")
        else:
            client.set_tag(run_id, TAG_COLLAPSE, "none")
        selection = TrialSelection(
            run_id=run_id,
            label=run.info.run_name or run_id,
            subject=run.data.params[PARAM_SUBJECT],
            method=run.data.params[PARAM_METHOD],
            num_images=int(run.data.params[PARAM_NUM_IMAGES]),
            best_step=step,
            best_score=score,
            metrics={metric: histories[metric][step] for metric in weights},
            checkpoint=checkpoint,
            collapse=collapse,
            scores=scores,
        )
        selections.append(selection)
        if checkpoint is not None:
            candidates.append(
                Candidate(
                    run_id=run_id,
                    trial_id=run.data.tags[TAG_TRIAL],
                    label=selection.label,
                    subject=selection.subject,
                    method=selection.method,
                    step=step,
                    score=score,
                    checkpoint=checkpoint,
                )
            )
    if not selections:
        raise SelectionError(
            f"no trial of sweep {spec.name!r} has evaluated steps with the weighted metrics "
            f"{sorted(weights)}: did every trial fail? See `dreamsweep run`'s output"
        )
    registered = []
    if spec.selection.register_best:
        registered = register_best(client, spec.name, candidates, weights=weights)
    return SweepSelection(trials=selections, registered=registered, weights=weights)
