"""What the toy-world benchmarks read from a finished sweep: each trial's settings and curves, and
the stop steps that selection, the oracle and the naive rules choose on them.

Shared by `bench/stop_accuracy.py` (selection against the oracle) and `bench/toyworld_figures.py`
(the quickstart's dynamics); both write Markdown and JSON under bench/results/.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.layout import METRIC_BEST_STEP, METRIC_COLLAPSE_STEP
from contract.scoring import best_step, weighted_scores
from contract.spec import SweepSpec, logged_curves
from tracking.sweep import SweepTracking

ORACLE_SCORE = "oracle/score"


@dataclass
class TrialCurves:
    label: str
    run_id: str
    subject: str
    method: str
    num_images: int
    learning_rate: float
    curves: dict[str, dict[int, float]]
    """curve → step → value."""
    selected: dict[str, float] = field(default_factory=dict)
    """What `dreamsweep select` logged: best_step, collapse_step (when found)."""

    @property
    def steps(self) -> list[int]:
        return sorted(self.curves["similarity"])


def read_trials(spec: SweepSpec) -> list[TrialCurves]:
    """Every finished trial of the sweep, with each curve `eval.metrics` logs."""
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    if parent is None:
        raise SystemExit(f"sweep {spec.name!r} has no runs in {spec.tracking_uri}: run it first")
    names = logged_curves(spec.eval.metrics)
    trials = []
    for run in tracking.trial_runs(parent.info.run_id).values():
        if run.info.status != "FINISHED":
            continue
        params = run.data.params
        selected = {
            key: run.data.metrics[key]
            for key in (METRIC_BEST_STEP, METRIC_COLLAPSE_STEP)
            if key in run.data.metrics
        }
        trials.append(
            TrialCurves(
                label=run.info.run_name,
                run_id=run.info.run_id,
                subject=params["subject"],
                method=params["method"],
                num_images=int(params["num_images"]),
                learning_rate=float(params["learning_rate"]),
                curves=tracking.histories(run.info.run_id, names),
                selected=selected,
            )
        )
    return sorted(trials, key=lambda t: (t.subject, t.method, t.learning_rate, t.num_images))


def weighted_stop(trial: TrialCurves, spec: SweepSpec) -> int:
    """The step the spec's weighted, min–max-scaled selection chooses."""
    scores = weighted_scores(trial.curves, spec.selection_weights, spec.selection.ranges)
    return best_step(scores)[0]


def oracle_stop(trial: TrialCurves) -> int:
    """The step with the best oracle score (ties: the earlier)."""
    return best_step(trial.curves[ORACLE_SCORE])[0]


def naive_stops(trial: TrialCurves) -> dict[str, int]:
    """The naive rules: the last step, and 100 steps per image rounded to the nearest step of
    the grid (the earlier on a tie)."""
    steps = trial.steps
    per_image = min(steps, key=lambda s: (abs(s - 100 * trial.num_images), s))
    return {"last step": steps[-1], "100 × images": per_image}
