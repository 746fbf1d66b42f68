"""Early-stopping rules on scripted metric sequences, and the loop stopping on a stopper's word."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import Recorder, run_trial, small_spec, write_spec

from contract.spec import SelectionSpec, load_spec
from launch.grid import expand_grid
from selection.stopping import AllOf, Collapsed, EarlyStopper, NoImprovement, early_stopper

RANGES = {"similarity": (0.0, 1.0), "aesthetics": (0.0, 1.0)}
# similarity peaks at step 2; aesthetics drops by 0.5 at step 4.
SCRIPT = [
    (0, {"similarity": 0.2, "aesthetics": 0.8}),
    (1, {"similarity": 0.5, "aesthetics": 0.8}),
    (2, {"similarity": 0.7, "aesthetics": 0.8}),
    (3, {"similarity": 0.6, "aesthetics": 0.7}),
    (4, {"similarity": 0.6, "aesthetics": 0.3}),
    (5, {"similarity": 0.5, "aesthetics": 0.3}),
]


def decisions(stopper: EarlyStopper) -> list[str | None]:
    return [stopper(step, metrics) for step, metrics in SCRIPT]


def test_no_improvement_waits_patience_evaluations_after_the_best() -> None:
    rule = NoImprovement(patience=2, weights={"similarity": 1.0}, ranges=RANGES)
    said = decisions(EarlyStopper(rule))
    assert said[:4] == [None, None, None, None]
    assert said[4] == "no better weighted score for 2 evaluations (best 0.7000 at step 2)"


def test_collapsed_names_the_metric_and_step() -> None:
    rule = Collapsed(metrics=["aesthetics"], ranges=RANGES, threshold=0.2)
    said = decisions(EarlyStopper(rule))
    assert said[:4] == [None] * 4
    assert said[4] == said[5] == "aesthetics collapsed at step 4"


def test_all_of_stops_only_when_both_agree() -> None:
    rule = AllOf(
        NoImprovement(patience=1, weights={"similarity": 1.0}, ranges=RANGES),
        Collapsed(metrics=["aesthetics"], ranges=RANGES, threshold=0.2),
    )
    said = decisions(EarlyStopper(rule))
    # No improvement from step 3 on, but the collapse only comes at step 4.
    assert said[:4] == [None] * 4
    assert said[4] == (
        "no better weighted score for 2 evaluations (best 0.7000 at step 2); "
        "aesthetics collapsed at step 4"
    )


def test_a_resumed_stopper_decides_as_an_uninterrupted_one() -> None:
    def rule() -> AllOf:
        return AllOf(
            NoImprovement(patience=1, weights={"similarity": 1.0}, ranges=RANGES),
            Collapsed(metrics=["aesthetics"], ranges=RANGES, threshold=0.2),
        )

    uninterrupted = decisions(EarlyStopper(rule()))
    # Killed after logging step 3, resumed from the checkpoint of step 2: the run's history
    # holds steps 0-3, and the resumed trial evaluates 3, 4, 5 again.
    resumed = EarlyStopper(rule(), history=dict(SCRIPT[:4]))
    assert [resumed(step, metrics) for step, metrics in SCRIPT[3:]] == uninterrupted[3:]


def test_the_spec_rule_needs_early_stop_and_watches_measured_curves() -> None:
    assert early_stopper(SelectionSpec(), ["similarity", "aesthetics"]) is None
    selection = SelectionSpec(
        early_stop={"patience": 1},
        weights={"similarity": 1.0},
        ranges=RANGES,
        collapse={"threshold": 0.2},
    )
    stopper = early_stopper(selection, ["similarity", "aesthetics"])  # no diversity measured
    assert decisions(stopper)[4] is not None
    assert [m for m in stopper.rule.rules[1].metrics] == ["aesthetics"]


@pytest.mark.slow
def test_the_loop_stops_at_the_evaluated_step_after_saving_its_checkpoint(tmp_path: Path) -> None:
    spec_dict = small_spec(
        tmp_path, grid={"max_steps": 6}, selection={"early_stop": {"patience": 1}}
    )
    spec = load_spec(write_spec(tmp_path, spec_dict))
    [trial] = expand_grid(spec)
    recorder = Recorder()
    seen: list[int] = []

    def stop_at_four(step: int, metrics: dict[str, float]) -> str | None:
        seen.append(step)
        assert "similarity" in metrics
        return "scripted stop" if step == 4 else None

    run_trial(trial, recorder, stopper=stop_at_four)
    assert seen == [0, 2, 4]
    assert recorder.early_stop == (4, "scripted stop")
    assert max(recorder.losses) == 4 and sorted(recorder.metrics) == [0, 2, 4]
    assert recorder.checkpoints[-1] == 4
    assert (trial.output_dir / "checkpoints" / "step_000004" / "COMPLETE").is_file()


@pytest.mark.slow
def test_a_sweep_trial_stops_early_records_why_and_counts_as_done(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from launch.local import run_local

    # in_domain is 0 on the tiny model for a toy: a weight on it alone never improves the score.
    # The other curves are watched with a hair-trigger threshold over ranges that hold their
    # tiny-model values, so the first drop of any of them is a collapse.
    selection = {
        "weights": {"in_domain": 1.0},
        "ranges": {
            "in_domain": [0.5, 1.0],
            "similarity": [0.7, 0.9],
            "aesthetics": [-0.0055, -0.0052],
            "diversity": [0.0, 0.004],
            "clip_t": [-0.2, 0.0],
        },
        "collapse": {
            "metrics": ["similarity", "aesthetics", "diversity", "clip_t"],
            "threshold": 0.001,
        },
        "early_stop": {"patience": 1},
    }
    spec = small_spec(tmp_path, grid={"max_steps": 8, "eval_every": 2}, selection=selection)
    path = write_spec(tmp_path, spec)
    printed = io.StringIO()
    outcome = run_local(load_spec(path), console=Console(file=printed, width=200))
    assert not outcome.failed, outcome.failed[0].log_tail
    assert "stopped early at step" in printed.getvalue()

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'small' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("small")
    [trial] = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("dreamsweep.role") == "trial"
    ]
    stopped = int(trial.data.tags["dreamsweep.early_stop.step"])
    assert stopped < 8 and trial.info.status == "FINISHED"
    assert "no better weighted score" in trial.data.tags["dreamsweep.early_stop.reason"]
    assert "collapsed at step" in trial.data.tags["dreamsweep.early_stop.reason"]
    losses = client.get_metric_history(trial.info.run_id, "loss")
    assert max(m.step for m in losses) == stopped
    again = io.StringIO()
    run_local(load_spec(path), console=Console(file=again, width=200))
    assert "1 already done, 0 to run" in again.getvalue()
