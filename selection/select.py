"""`dreamsweep select`: read each trial's curves from MLflow, choose its stop step, detect
collapse, log both, and register each subject × method's best checkpoint.

The chosen step may have no checkpoint: step 0 is the base model, and retention may have removed
a trained step that other weights (`--weights`) now prefer. The trial then offers the registry
its best step that still has a checkpoint on disk, so every trial competes for `@best` with a
checkpoint that exists, and the output says which step stands in for which.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contract.layout import (
    METRIC_BEST_SCORE,
    METRIC_BEST_STEP,
    METRIC_COLLAPSE_STEP,
    PARAM_BASE_MODEL,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_SUBJECT,
    TAG_BEST_CHECKPOINT,
    TAG_CHECKPOINT,
    TAG_COLLAPSE,
    TAG_SELECTION_WEIGHTS,
    TAG_TRIAL,
)
from contract.scoring import best_step, first_collapse, weighted_scores
from contract.spec import SweepSpec
from selection.registry import Candidate, Registered, register_best
from tracking.sweep import SweepTracking


@dataclass(frozen=True)
class KeptCheckpoint:
    """A trained step whose checkpoint folder is on disk, and its weighted score."""

    step: int
    score: float
    folder: str


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
    """The checkpoint folder of the best step; None when the best step is 0 (the base model)
    or its checkpoint is gone (removed by the retention policy or by hand)."""
    registrable: KeptCheckpoint | None = None
    """The best step with a checkpoint on disk: the best step itself when it has one, else the
    best-scoring other trained step; None when no checkpoint of the trial is left."""
    collapse: tuple[int, str] | None = None
    """(step, metric) where a watched curve first collapsed, or None."""
    scores: dict[int, float] = field(default_factory=dict)
    """The weighted score at every evaluated step."""

    def checkpoint_note(self) -> str:
        """The best step's checkpoint in words: its folder, or what stands in for it."""
        if self.checkpoint is not None:
            return self.checkpoint
        chosen = f"step {self.best_step} (score {self.best_score:.4f})"
        if self.best_step == 0:
            note = f"{chosen} is the base model"
        else:
            note = f"{chosen} has no checkpoint on disk"
        kept = self.registrable
        if kept is None:
            return f"{note}; no checkpoint of this trial is left"
        return (
            f"{note}; the best step with a checkpoint on disk is step {kept.step} "
            f"(score {kept.score:.4f}): {kept.folder}"
        )


def kept_checkpoint(
    scores: Mapping[int, float], checkpoints: Mapping[int, str]
) -> KeptCheckpoint | None:
    """The best-scoring trained step whose checkpoint folder exists (ties to the earlier step);
    `checkpoints` maps steps to the folders their runs recorded."""
    for step in sorted(scores, key=lambda s: (-scores[s], s)):
        folder = checkpoints.get(step)
        if step != 0 and folder is not None and Path(folder).is_dir():
            return KeptCheckpoint(step=step, score=scores[step], folder=folder)
    return None


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
        folders = {s: run.data.tags.get(TAG_CHECKPOINT.format(step=s)) for s in scores}
        registrable = kept_checkpoint(scores, {s: f for s, f in folders.items() if f})
        checkpoint = registrable.folder if registrable and registrable.step == step else None
        client.log_metric(run_id, METRIC_BEST_STEP, step)
        client.log_metric(run_id, METRIC_BEST_SCORE, score)
        client.set_tag(run_id, TAG_SELECTION_WEIGHTS, json.dumps(weights, sort_keys=True))
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
            registrable=registrable,
            collapse=collapse,
            scores=scores,
        )
        client.set_tag(run_id, TAG_BEST_CHECKPOINT, selection.checkpoint_note())
        selections.append(selection)
        if registrable is not None:
            # The trial competes with the checkpoint it can offer, scored as that step: a
            # trial whose best checkpoint is gone neither drops out nor wins on a score its
            # registered checkpoint does not have.
            candidates.append(
                Candidate(
                    run_id=run_id,
                    trial_id=run.data.tags[TAG_TRIAL],
                    label=selection.label,
                    subject=selection.subject,
                    method=selection.method,
                    # One registered model per base model too when the sweep compares several.
                    base_model=(
                        run.data.params.get(PARAM_BASE_MODEL) if spec.compares_models else None
                    ),
                    step=registrable.step,
                    score=registrable.score,
                    checkpoint=registrable.folder,
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
