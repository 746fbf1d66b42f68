"""`dreamsweep report`: the study's analyses of a sweep as one self-contained HTML page, with PNG
curves and CSV tables beside it.

The page carries the curves as JSON and recomputes every best step, the `steps = k × images` fit
and the comparisons in the browser when a weight slider moves, as the portrait study let its
readers do. It loads nothing from the network: the charts are SVG drawn by the page's own script
and the PNGs are embedded as data URIs. Reading MLflow only: the report logs nothing.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from contract.layout import (
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_SUBJECT,
    no_negative_key,
)
from contract.spec import SELECTABLE_METRICS, SweepSpec
from selection.scoring import (
    best_step,
    first_collapse,
    min_max_scale,
    weighted_scores,
)
from tracking.records import load_records, per_phrase_means
from tracking.sweep import SweepTracking

RULE_OF_THUMB = 100
"""The portrait study's rule of thumb: about 100 steps per input image (it measured about 120
for men and 150 for women)."""
PAGE = (Path(__file__).with_name("report_page.html")).read_text(encoding="utf-8")
"""The page: the sweep's data is put in place of its `/*DATA*/null`."""


class ReportError(RuntimeError):
    pass


@dataclass
class TrialCurves:
    label: str
    run_id: str
    params: dict[str, str]
    histories: dict[str, dict[int, float]]
    """metric (and `<metric>/no_negative`) → step → value."""


def fit_steps_per_image(points: list[tuple[int, int]]) -> float | None:
    """Least-squares `k` of `steps = k × num_images` through the origin: Σ n·s / Σ n²."""
    denominator = sum(n * n for n, _ in points)
    return None if denominator == 0 else sum(n * s for n, s in points) / denominator


def gather(spec: SweepSpec) -> list[TrialCurves]:
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    if parent is None:
        raise ReportError(
            f"sweep {spec.name!r} has no runs in {spec.tracking_uri}: run `dreamsweep run` first"
        )
    measured = [m for m in spec.eval.metrics if m in SELECTABLE_METRICS]
    names = list(measured)
    if spec.eval.compare_negative:
        names += [no_negative_key(m) for m in measured]
    trials = []
    runs = tracking.trial_runs(parent.info.run_id).values()
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        histories = {
            name: history
            for name, history in tracking.histories(run.info.run_id, names).items()
            if history
        }
        if histories:
            trials.append(
                TrialCurves(
                    run.info.run_name or run.info.run_id,
                    run.info.run_id,
                    dict(run.data.params),
                    histories,
                )
            )
    if not trials:
        raise ReportError(f"no trial of sweep {spec.name!r} has evaluated steps to report")
    return trials


def _curves_png(trial: TrialCurves, spec: SweepSpec, weights: dict[str, float]) -> bytes:
    ranges = spec.selection.ranges
    figure, axes = plt.subplots(figsize=(5.5, 3.2), dpi=90)
    for metric in (m for m in trial.histories if m in ranges):
        steps = sorted(trial.histories[metric])
        scaled = [min_max_scale(trial.histories[metric][s], *ranges[metric]) for s in steps]
        axes.plot(steps, scaled, marker=".", linewidth=1, label=metric)
    scores = weighted_scores(trial.histories, weights, ranges)
    if scores:
        steps = sorted(scores)
        axes.plot(steps, [scores[s] for s in steps], color="black", linewidth=2.5, label="score")
        best, _ = best_step(scores)
        axes.axvline(best, color="green", linewidth=1.5, label=f"best {best}")
    watched = spec.selection.collapse_metrics(spec.eval.metrics)
    collapse = first_collapse(trial.histories, watched, ranges, spec.selection.collapse.threshold)
    if collapse is not None:
        axes.axvline(collapse[0], color="red", linestyle="--", label=f"collapse {collapse[0]}")
    axes.set(title=trial.label, xlabel="step", ylabel="scaled value", ylim=(-0.05, 1.05))
    axes.legend(fontsize=6, loc="lower left")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _phrase_table(
    spec: SweepSpec, trials: list[TrialCurves], best: dict[str, int]
) -> list[dict[str, object]]:
    """Mean of each metric per (slot, phrase) at each trial's best step, over the trials."""
    if not spec.eval.records:
        return []
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    sums: dict[tuple[str, str, str], list[float]] = {}
    for trial in trials:
        try:
            records = load_records(tracking.client, trial.run_id)
        except LookupError:
            continue
        records = records[records["variant"] == "main"]
        for metric in (m for m in spec.eval.metrics if m in records.columns):
            for row in per_phrase_means(records, metric, step=best[trial.label]).itertuples():
                sums.setdefault((row.slot, row.phrase, metric), []).append(row.mean)
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for (slot, phrase, metric), values in sorted(sums.items()):
        rows.setdefault((slot, phrase), {"slot": slot, "phrase": phrase})[metric] = sum(
            values
        ) / len(values)
    return list(rows.values())


def build_report(spec: SweepSpec, output: Path) -> Path:
    """Write report.html, the curve PNGs, trials.csv and best_steps.csv to `output`."""
    trials = gather(spec)
    weights = spec.selection_weights
    ranges = {m: list(r) for m, r in spec.selection.ranges.items()}
    output.mkdir(parents=True, exist_ok=True)
    (output / "curves").mkdir(exist_ok=True)

    best: dict[str, int] = {}
    images: dict[str, str] = {}
    for index, trial in enumerate(trials):
        scores = weighted_scores(trial.histories, weights, spec.selection.ranges)
        best[trial.label] = best_step(scores)[0] if scores else 0
        png = _curves_png(trial, spec, weights)
        (output / "curves" / f"trial_{index:03d}.png").write_bytes(png)
        images[trial.label] = base64.b64encode(png).decode()

    with (output / "trials.csv").open("w", newline="", encoding="utf-8") as handle:
        metrics = sorted({m for t in trials for m in t.histories})
        writer = csv.writer(handle)
        writer.writerow(["trial", "subject", "method", "num_images", "step", *metrics])
        for trial in trials:
            steps = sorted({s for h in trial.histories.values() for s in h})
            for step in steps:
                writer.writerow(
                    [
                        trial.label,
                        trial.params.get(PARAM_SUBJECT),
                        trial.params.get(PARAM_METHOD),
                        trial.params.get(PARAM_NUM_IMAGES),
                        step,
                        *(trial.histories.get(m, {}).get(step, "") for m in metrics),
                    ]
                )
    with (output / "best_steps.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "class_token", "num_images", "best_step", "weights"])
        for trial in trials:
            writer.writerow(
                [
                    trial.label,
                    trial.params.get(PARAM_CLASS_TOKEN),
                    trial.params.get(PARAM_NUM_IMAGES),
                    best[trial.label],
                    json.dumps(weights, sort_keys=True),
                ]
            )

    data = {
        "sweep": spec.name,
        "weights": {m: weights.get(m, 0.0) for m in spec.eval.metrics if m in SELECTABLE_METRICS},
        "ranges": ranges,
        "collapse": {
            "metrics": spec.selection.collapse_metrics(spec.eval.metrics),
            "threshold": spec.selection.collapse.threshold,
        },
        "ruleOfThumb": RULE_OF_THUMB,
        "trials": [
            {
                "label": t.label,
                "subject": t.params.get(PARAM_SUBJECT),
                "classToken": t.params.get(PARAM_CLASS_TOKEN),
                "method": t.params.get(PARAM_METHOD),
                "baseModel": t.params.get(PARAM_BASE_MODEL),
                "numImages": int(t.params.get(PARAM_NUM_IMAGES, 0)),
                "histories": {m: {str(s): v for s, v in h.items()} for m, h in t.histories.items()},
                "image": images[t.label],
            }
            for t in trials
        ],
        "phrases": _phrase_table(spec, trials, best),
        "noNegative": spec.eval.compare_negative,
    }
    page = PAGE.replace("/*DATA*/null", json.dumps(data).replace("</", "<\\/"))
    path = output / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
