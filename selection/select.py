"""`dreamsweep select`: read each trial's curves from MLflow, choose its stop step, log it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from launch.spec import SweepSpec
from launch.tracking import TAG_CHECKPOINT, SweepTracking
from selection.scoring import best_step, weighted_scores


@dataclass
class TrialSelection:
    run_id: str
    label: str
    best_step: int
    best_score: float
    metrics: dict[str, float]
    """Every weighted metric's value at the best step."""
    checkpoint: str | None
    """The checkpoint saved at the best step (None at step 0: that is the base model)."""


class SelectionError(RuntimeError):
    pass


def select_sweep(spec: SweepSpec) -> list[TrialSelection]:
    """Choose every trial's stop step with the spec's weights and ranges; log it to its run."""
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    if parent is None:
        raise SelectionError(
            f"sweep {spec.name!r} has no runs in {spec.tracking_uri}: run `dreamsweep run` first"
        )
    weights = spec.selection_weights
    ranges = dict(spec.selection.ranges)
    client = tracking.client
    selections = []
    runs = tracking.trial_runs(parent.info.run_id).values()
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        run_id = run.info.run_id
        histories = {
            metric: {m.step: m.value for m in client.get_metric_history(run_id, metric)}
            for metric in weights
        }
        scores = weighted_scores(histories, weights, ranges)
        if not scores:
            continue  # a trial that never evaluated (it failed early) has nothing to choose
        step, score = best_step(scores)
        checkpoint = run.data.tags.get(TAG_CHECKPOINT.format(step=step))
        client.log_metric(run_id, "best_step", step)
        client.log_metric(run_id, "best_score", score)
        client.set_tag(run_id, "dreamsweep.selection_weights", json.dumps(weights, sort_keys=True))
        client.set_tag(run_id, "dreamsweep.best_checkpoint", checkpoint or "base model (step 0)")
        selections.append(
            TrialSelection(
                run_id=run_id,
                label=run.info.run_name or run_id,
                best_step=step,
                best_score=score,
                metrics={metric: histories[metric][step] for metric in weights},
                checkpoint=checkpoint,
            )
        )
    return selections
