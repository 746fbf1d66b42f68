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
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

from contract.layout import (
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_SUBJECT,
    TAG_FACE_DETECTOR,
    no_negative_key,
)
from contract.scoring import (
    best_step,
    first_collapse,
    min_max_scale,
    weighted_scores,
)
from contract.spec import SELECTABLE_METRICS, SweepSpec, logged_curves
from selection.search_report import with_search_section
from tracking.records import load_records, per_phrase_means
from tracking.sweep import SweepTracking

RULE_OF_THUMB = 100
"""The portrait study's rule of thumb: about 100 steps per input image (it measured about 120
for men and 150 for women)."""
K_HEADER = "k (steps per image)"
"""The column of the least-squares `steps = k × images` fit per class token (the fit table)."""
POOLED_K_HEADER = "k (steps per image, all class tokens)"
"""The same fit over a comparison row's trials, whatever their class tokens (by method, by base
model): a summary, where the fit table keeps class tokens apart."""
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
    face_detector: str | None = None
    """The face detector in_domain and identity ran (None when neither detected faces)."""

    @property
    def num_images(self) -> int:
        return int(self.params.get(PARAM_NUM_IMAGES, 0))


Cell = str | int | float | None
"""A table cell: None is shown as "–" (not measured, or no best step)."""


@dataclass
class Table:
    """One of the page's tables, as Python computes it: what its CSV holds and the page shows."""

    header: list[str]
    rows: list[list[Cell]]


def fit_steps_per_image(points: list[tuple[int, int]]) -> float | None:
    """Least-squares `k` of `steps = k × num_images` through the origin: Σ n·s / Σ n²."""
    denominator = sum(n * n for n, _ in points)
    return None if denominator == 0 else sum(n * s for n, s in points) / denominator


def measured_metrics(spec: SweepSpec) -> list[str]:
    """The metrics the page has a slider and a column for: the measured, weightable ones."""
    return [m for m in logged_curves(spec.eval.metrics) if m in SELECTABLE_METRICS]


def gather(spec: SweepSpec) -> list[TrialCurves]:
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    if parent is None:
        raise ReportError(
            f"sweep {spec.name!r} has no runs in {spec.tracking_uri}: run `dreamsweep run` first"
        )
    measured = measured_metrics(spec)
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
                    run.data.tags.get(TAG_FACE_DETECTOR),
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


@contextmanager
def no_artifact_progress_bars() -> Iterator[None]:
    """MLflow draws a "Downloading artifacts" bar on stderr for every download, piped or not: one
    per trial here, which buries the report's own output. Off for the report's downloads only."""
    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def choose(
    trial: TrialCurves, weights: dict[str, float], ranges: dict[str, tuple[float, float]]
) -> tuple[int, float] | None:
    """(best step, its score) under `weights`, or None when no step has every weighted metric."""
    if not any(weight > 0 for weight in weights.values()):
        return None
    scores = weighted_scores(trial.histories, weights, ranges)
    return best_step(scores) if scores else None


def _mean(values: list[float | None]) -> float | None:
    """None when there is nothing to average or a value is missing (as the page's NaN)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def comparison_tables(
    spec: SweepSpec, trials: list[TrialCurves], weights: dict[str, float]
) -> dict[str, Table]:
    """The page's tables under `weights`, keyed by their element ids, computed as its script
    computes them when the sliders are at `weights` (the phrase table is fixed: see
    `phrase_table`). Written as CSVs beside the page, and what its tests compare it with."""
    metrics = measured_metrics(spec)
    ranges = spec.selection.ranges
    watched = spec.selection.collapse_metrics(spec.eval.metrics)
    threshold = spec.selection.collapse.threshold
    choices = [choose(trial, weights, ranges) for trial in trials]
    chosen = [(t, c) for t, c in zip(trials, choices, strict=True) if c is not None]

    def at_best(trial: TrialCurves, choice: tuple[int, float] | None, key: str) -> float | None:
        return None if choice is None else trial.histories.get(key, {}).get(choice[0])

    def metric_means(group: list[tuple[TrialCurves, tuple[int, float]]]) -> list[Cell]:
        return [
            _mean([at_best(t, c, metric) for t, c in group if metric in t.histories])
            for metric in metrics
        ]

    best_rows: list[list[Cell]] = []
    for trial, choice in zip(trials, choices, strict=True):
        collapse = first_collapse(trial.histories, watched, ranges, threshold)
        best_rows.append(
            [
                trial.label,
                trial.num_images,
                None if choice is None else choice[0],
                None if choice is None else choice[1],
                None if collapse is None else f"{collapse[1]} @ {collapse[0]}",
                *(at_best(trial, choice, m) for m in metrics),
            ]
        )
    tables = {
        "best-table": Table(
            ["trial", "images", "best step", "score", "collapse", *metrics], best_rows
        )
    }
    by_images: dict[int, list[tuple[TrialCurves, tuple[int, float]]]] = {}
    for trial, choice in chosen:
        by_images.setdefault(trial.num_images, []).append((trial, choice))
    tables["by-images"] = Table(
        ["images", "trials", "mean best step", *metrics],
        [
            [n, len(group), _mean([c[0] for _, c in group]), *metric_means(group)]
            for n, group in sorted(by_images.items())
        ],
    )
    for table_id, param, title in (
        ("by-method", PARAM_METHOD, "method"),
        ("by-base", PARAM_BASE_MODEL, "base model"),
    ):
        groups: dict[str, list[tuple[TrialCurves, tuple[int, float]]]] = {}
        for trial, choice in chosen:
            groups.setdefault(str(trial.params.get(param)), []).append((trial, choice))
        tables[table_id] = Table(
            [title, "trials", "mean best step", "mean score", POOLED_K_HEADER, *metrics],
            [
                [
                    name,
                    len(group),
                    _mean([c[0] for _, c in group]),
                    _mean([c[1] for _, c in group]),
                    fit_steps_per_image([(t.num_images, c[0]) for t, c in group]),
                    *metric_means(group),
                ]
                for name, group in sorted(groups.items())
            ],
        )
    if spec.eval.compare_negative:
        tables["negative"] = Table(
            ["trial", *(h for m in metrics for h in (m, f"{m} (no negative)"))],
            [
                [
                    trial.label,
                    *(
                        value
                        for m in metrics
                        for value in (at_best(trial, c, m), at_best(trial, c, no_negative_key(m)))
                    ),
                ]
                for trial, c in zip(trials, choices, strict=True)
            ],
        )
    return tables


def fit_table(trials: list[TrialCurves], weights: dict[str, float], spec: SweepSpec) -> Table:
    """The `steps = k × images` fit per class token (and per base model when the trials name
    several), over the best steps under `weights`, as the page's fit table shows it."""
    several = len({t.params.get(PARAM_BASE_MODEL) for t in trials}) > 1
    groups: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for trial in trials:
        choice = choose(trial, weights, spec.selection.ranges)
        if choice is not None:
            key = (str(trial.params.get(PARAM_CLASS_TOKEN)),)
            if several:
                key += (str(trial.params.get(PARAM_BASE_MODEL)),)
            groups.setdefault(key, []).append((trial.num_images, choice[0]))
    header = ["class token", *(["base model"] if several else []), K_HEADER, "trials"]
    return Table(
        header,
        [
            [*key, fit_steps_per_image(points), len(points)]
            for key, points in sorted(groups.items())
        ],
    )


def phrase_table(spec: SweepSpec, trials: list[TrialCurves]) -> Table:
    """Mean of each metric per (slot, phrase) at each trial's best step under the spec's weights,
    over the trials; no rows without per-image records."""
    metrics = logged_curves(spec.eval.metrics)
    if not spec.eval.records:
        return Table(["slot", "phrase"], [])
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    sums: dict[tuple[str, str, str], list[float]] = {}
    with no_artifact_progress_bars():
        for trial in trials:
            choice = choose(trial, spec.selection_weights, spec.selection.ranges)
            if choice is None:
                continue
            try:
                records = load_records(tracking.client, trial.run_id)
            except LookupError:
                continue
            records = records[records["variant"] == "main"]
            for metric in (m for m in metrics if m in records.columns):
                for row in per_phrase_means(records, metric, step=choice[0]).itertuples():
                    sums.setdefault((row.slot, row.phrase, metric), []).append(row.mean)
    shown = [m for m in metrics if any(key[2] == m for key in sums)]
    phrases = sorted({(slot, phrase) for slot, phrase, _ in sums})
    return Table(
        ["slot", "phrase", *shown],
        [
            [slot, phrase, *(_mean(sums.get((slot, phrase, m), [])) for m in shown)]
            for slot, phrase in phrases
        ],
    )


CSV_NAMES = {
    "by-images": "by_images.csv",
    "by-method": "by_method.csv",
    "by-base": "by_base_model.csv",
    "negative": "negative_prompt.csv",
}
"""The comparison tables written beside the page (the best-step table is best_steps.csv)."""
FIT_CSV = "fit.csv"
"""The `steps = k × images` fit per class token (× base model), beside the page."""


def write_csv(path: Path, table: Table) -> None:
    """The table as CSV, a missing value (None) as an empty cell."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(table.header)
        writer.writerows(["" if cell is None else cell for cell in row] for row in table.rows)


def build_report(spec: SweepSpec, output: Path) -> Path:
    """Write report.html, the curve PNGs, trials.csv, best_steps.csv, the comparison tables and
    phrases.csv to `output`."""
    trials = gather(spec)
    weights = spec.selection_weights
    ranges = {m: list(r) for m, r in spec.selection.ranges.items()}
    output.mkdir(parents=True, exist_ok=True)
    (output / "curves").mkdir(exist_ok=True)

    images: dict[str, str] = {}
    for index, trial in enumerate(trials):
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
    tables = comparison_tables(spec, trials, weights)
    with (output / "best_steps.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["trial", "class_token", "num_images", "best_step", "score", "collapse", "weights"]
        )
        for trial, row in zip(trials, tables["best-table"].rows, strict=True):
            writer.writerow(
                [
                    trial.label,
                    trial.params.get(PARAM_CLASS_TOKEN),
                    trial.num_images,
                    "" if row[2] is None else row[2],
                    "" if row[3] is None else row[3],
                    row[4] or "",
                    json.dumps(weights, sort_keys=True),
                ]
            )
    for table_id, name in CSV_NAMES.items():
        if table_id in tables:
            write_csv(output / name, tables[table_id])
    write_csv(output / FIT_CSV, fit_table(trials, weights, spec))
    phrases = phrase_table(spec, trials)
    write_csv(output / "phrases.csv", phrases)

    data = {
        "sweep": spec.name,
        "weights": {m: weights.get(m, 0.0) for m in measured_metrics(spec)},
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
                "numImages": t.num_images,
                "histories": {m: {str(s): v for s, v in h.items()} for m, h in t.histories.items()},
                "image": images[t.label],
            }
            for t in trials
        ],
        "phrases": {"header": phrases.header, "rows": phrases.rows},
        "noNegative": spec.eval.compare_negative,
        "faceDetectors": sorted({t.face_detector for t in trials if t.face_detector}),
    }
    # Inside <script> no "<" may appear, or text like "</script>" or "<!--" in a name or phrase
    # would end or derail it: JSON spells them as \u escapes, which parse back to the same text.
    escaped = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
    embedded = json.dumps(data).translate(str.maketrans(escaped))
    page = PAGE.replace("/*DATA*/null", embedded)
    page = with_search_section(spec, page, output)  # a search's studies (none for a grid)
    path = output / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
