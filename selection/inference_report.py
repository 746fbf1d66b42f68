"""`dreamsweep report` on an inference study (`kind: inference`): quality vs latency with its
Pareto front, scheduler × steps heatmaps, the fewest steps within ε of the best, the
negative-prompt effect and per-phrase means, as one self-contained HTML page with a CSV beside
it for every table.

Every value is computed here, in Python, and the page only draws it (its charts are SVG made by
its own script, values set as text): what the CSVs hold is what the page shows. Reads MLflow
only; logs nothing.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

import pandas as pd
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from contract.layout import (
    COMBINATION_RECORDS_FILE,
    METRIC_DENOISER_ITERATIONS_PER_SECOND,
    METRIC_PEAK_MEMORY_MB,
    METRIC_SECONDS_PER_IMAGE_MEAN,
    METRIC_SECONDS_PER_IMAGE_P50,
    METRIC_SECONDS_PER_IMAGE_P90,
    NO_NEGATIVE_PROMPT,
    PARAM_GUIDANCE_SCALE,
    PARAM_INFERENCE_STEPS,
    PARAM_MODEL,
    PARAM_NEGATIVE_PROMPT,
    PARAM_SCHEDULER,
    ROLE_COMBINATION,
    ROLE_INFERENCE_STUDY,
    STUDY_COMBINATIONS_FILE,
    TAG_COMBINATION,
    TAG_PROMPTS_DIGEST,
    TAG_ROLE,
    TAG_SCORING_DIGEST,
    TAG_SWEEP,
)
from contract.scoring import best_step, weighted_scores
from contract.spec import SELECTABLE_METRICS
from selection.report import Cell, ReportError, Table, no_artifact_progress_bars, write_csv
from tracking.records import load_table, per_phrase_means

PAGE = Path(__file__).with_name("inference_report_page.html").read_text(encoding="utf-8")
"""The page: the study's data is put in place of its `/*DATA*/null`."""
SCORE = "score"
"""The weighted, min–max-scaled score of a combination's metric means (a heatmap's metric too)."""
DISTANCES = ("fid", "kid")
"""Lower is better and unbounded: reported, never weighted (as in training)."""
TIMING = {
    "s/image": METRIC_SECONDS_PER_IMAGE_MEAN,
    "s/image p50": METRIC_SECONDS_PER_IMAGE_P50,
    "s/image p90": METRIC_SECONDS_PER_IMAGE_P90,
    "denoiser it/s": METRIC_DENOISER_ITERATIONS_PER_SECOND,
    "peak MB": METRIC_PEAK_MEMORY_MB,
}
"""Column header → the combination run's timing metric."""
SECONDS = "s/image"
CSV_NAMES = {
    "combinations": "combinations.csv",
    "pareto": "pareto.csv",
    "heatmaps": "heatmaps.csv",
    "fewest-steps": "fewest_steps.csv",
    "negative": "negative_prompt.csv",
    "phrases": "phrases.csv",
}
"""The page's table ids → the CSVs written beside it."""


@dataclass
class Combination:
    """One child run: a model × scheduler × steps × guidance × negative prompt, and its means."""

    combination_id: str
    run_id: str
    model: str
    scheduler: str
    steps: int
    guidance: str
    """As logged (`7.5`), so the page shows what the spec said; ordered by its value."""
    negative: str
    values: dict[str, float]
    """Quality metric means under their own names, and the timing metrics under `TIMING`'s keys."""
    score: float | None = None

    @property
    def label(self) -> str:
        return (
            f"{self.model} · {self.scheduler} · {self.steps} steps · guidance {self.guidance} · "
            f"negative {self.negative}"
        )

    def value(self, metric: str) -> float | None:
        """A metric's mean, a timing column (`TIMING`'s keys), or the score (`SCORE`)."""
        return self.score if metric == SCORE else self.values.get(metric)

    def order(self) -> tuple:
        return (self.model, self.scheduler, self.steps, float(self.guidance), self.negative)


@dataclass
class Study:
    name: str
    combinations: list[Combination]
    metrics: list[str]
    """The quality metrics some combination measured, weightable ones first."""
    records: dict[str, pd.DataFrame] = field(default_factory=dict)
    """Combination id → its per-image records (combinations without records are absent)."""


def _metric_order(metric: str) -> tuple[int, str]:
    known = (*SELECTABLE_METRICS, *DISTANCES)
    return (known.index(metric), "") if metric in known else (len(known), metric)


def _current_combinations(client: MlflowClient, parent: Run) -> tuple[set[str], str, str | None]:
    """The combination ids, prompts digest and scoring digest (None when not recorded) of the
    spec the study last ran."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(parent.info.run_id, STUDY_COMBINATIONS_FILE, scratch)
        except (MlflowException, OSError) as err:  # MLflow raises for a missing artifact
            raise ReportError(
                f"the study run {parent.info.run_id} has no {STUDY_COMBINATIONS_FILE} (written by "
                f"`dreamsweep run`): run the study again to record its combinations ({err})"
            ) from err
        current = json.loads(Path(path).read_text(encoding="utf-8"))
    return set(current["combination_ids"]), current["prompts_digest"], current.get("scoring_digest")


def gather_study(tracking_uri: str, experiment: str, *, study: str) -> Study:
    """Study `study`'s current combinations (those of the spec last run, over its prompts; the
    earliest FINISHED run of each combination id) and their records."""
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    missing = f"no inference study {study!r} in experiment {experiment!r} of {tracking_uri}"
    if found is None:
        raise ReportError(f"{missing}: run the study first (`dreamsweep run`)")
    ids = [found.experiment_id]
    parents = client.search_runs(
        ids,
        f"tags.`{TAG_ROLE}` = '{ROLE_INFERENCE_STUDY}' and tags.`{TAG_SWEEP}` = '{study}'",
        max_results=50_000,
    )
    if not parents:
        raise ReportError(f"{missing}: run the study first (`dreamsweep run`)")
    parent = min(parents, key=lambda r: r.info.start_time)  # as tracking.inference reuses it
    current, prompts, scoring = _current_combinations(client, parent)
    # Of its scoring too (earlier metric settings' runs are not), once recorded.
    scored = "" if scoring is None else f"and tags.`{TAG_SCORING_DIGEST}` = '{scoring}' "
    children = client.search_runs(
        ids,
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' "
        f"and tags.`{TAG_ROLE}` = '{ROLE_COMBINATION}' "
        f"and tags.`{TAG_PROMPTS_DIGEST}` = '{prompts}' {scored}"
        f"and attributes.status = '{RunStatus.to_string(RunStatus.FINISHED)}'",
        max_results=50_000,
    )
    earliest: dict[str, Run] = {}
    for run in sorted(children, key=lambda r: r.info.start_time, reverse=True):
        combination_id = run.data.tags.get(TAG_COMBINATION)
        if combination_id in current:  # not an earlier spec's combination
            earliest[combination_id] = run
    combinations, records = [], {}
    with no_artifact_progress_bars():
        for combination_id, run in earliest.items():
            params, logged = run.data.params, run.data.metrics
            if not logged:
                continue
            values = {m: v for m, v in logged.items() if not m.startswith("timing/")}
            values |= {h: logged[m] for h, m in TIMING.items() if m in logged}
            combinations.append(
                Combination(
                    combination_id,
                    run.info.run_id,
                    params.get(PARAM_MODEL, "?"),
                    params.get(PARAM_SCHEDULER, "?"),
                    int(params.get(PARAM_INFERENCE_STEPS, 0)),
                    params.get(PARAM_GUIDANCE_SCALE, "nan"),
                    params.get(PARAM_NEGATIVE_PROMPT, NO_NEGATIVE_PROMPT),
                    values,
                )
            )
            table = load_table(client, run.info.run_id, COMBINATION_RECORDS_FILE)
            if table is not None:
                records[combination_id] = table
    if not combinations:
        raise ReportError(f"no combination of the study in {experiment!r} has metrics to report")
    combinations.sort(key=Combination.order)
    metrics = sorted(
        {m for c in combinations for m in c.values if m not in TIMING}, key=_metric_order
    )
    name = parent.data.tags.get(TAG_SWEEP, parent.info.run_name or experiment)
    return Study(name, combinations, metrics, records)


def check_weights(
    study: Study, weights: Mapping[str, float], ranges: Mapping[str, tuple[float, float]]
) -> list[str]:
    """Every problem with the weights at once (empty when they can score the study)."""
    problems = [
        f"weights: {metric} must be >= 0, got {weight}"  # as `dreamsweep select --weights`
        for metric, weight in sorted(weights.items())
        if weight < 0
    ]
    weighted = {m for m, w in weights.items() if w > 0}
    if not weighted:
        problems.append("weights: at least one weight must be > 0")
    for metric in sorted(weighted):
        if metric in DISTANCES:
            problems.append(
                f"weights: {metric!r} cannot be weighted (lower is better and it has no fixed "
                f"range); weight any of {list(SELECTABLE_METRICS)}"
            )
        elif metric not in SELECTABLE_METRICS:
            problems.append(
                f"weights: {metric!r} is not a quality metric; weight any of "
                f"{list(SELECTABLE_METRICS)}"
            )
        elif metric not in study.metrics:
            problems.append(f"weights: {metric!r} was not measured; the study has {study.metrics}")
        elif metric not in ranges:
            problems.append(f"ranges: weighted metric {metric!r} has no min–max range")
    return problems


def score_combinations(
    study: Study, weights: Mapping[str, float], ranges: Mapping[str, tuple[float, float]]
) -> None:
    """Each combination's score: contract.scoring's weighted mean of its scaled metric means
    (None when it lacks a weighted metric)."""
    for combination in study.combinations:
        histories = {m: {0: v} for m, v in combination.values.items() if m not in TIMING}
        combination.score = weighted_scores(histories, weights, ranges).get(0)


def pareto_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the (seconds, score) points no other point beats: as fast or faster and as
    good or better, strictly in one. Sorted by time, a point is on the front when it scores above
    every faster point (equal points are both on it)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: set[int] = set()
    best_faster = float("-inf")  # the best score of the strictly faster points
    best_here, here = float("-inf"), None
    for index in order:
        seconds, score = points[index]
        if seconds != here:
            best_faster, best_here, here = max(best_faster, best_here), float("-inf"), seconds
        if score > best_faster and score >= best_here:
            front.add(index)
        best_here = max(best_here, score)
    return front


def _slices(study: Study) -> str:
    """Which guidance scales and negative prompts a heatmap's cell stands for, in words."""
    guidance = sorted({c.guidance for c in study.combinations}, key=float)
    negatives = sorted({c.negative for c in study.combinations})
    if len(guidance) == 1 and len(negatives) == 1:
        return f"guidance {guidance[0]}, negative prompt {negatives[0]}: one combination a cell"
    return (
        f"each cell is the mean over guidance {', '.join(guidance)} and negative prompt "
        f"{', '.join(negatives)} (its count says over how many combinations)"
    )


AXES = ["model", "scheduler", "steps", "guidance", "negative prompt"]


def _axis_cells(c: Combination) -> list[Cell]:
    return [c.model, c.scheduler, c.steps, c.guidance, c.negative]


def pareto_table(study: Study) -> Table:
    """Score vs seconds per image of every scored, timed combination, fastest first."""
    timed = [c for c in study.combinations if c.score is not None and SECONDS in c.values]
    front = pareto_front([(c.values[SECONDS], c.score) for c in timed])
    rows = [
        [*_axis_cells(c), c.values[SECONDS], c.score, "yes" if i in front else "no"]
        for i, c in enumerate(timed)
    ]
    rows.sort(key=lambda row: (row[5], -row[6]))  # fastest first, then the best
    return Table([*AXES, SECONDS, SCORE, "Pareto front"], rows)


def heatmap_table(study: Study) -> Table:
    """Per model and metric (the score, each quality metric, seconds per image): the mean over
    each scheduler × steps cell's combinations (see `_slices`), and their count."""
    rows: list[list[Cell]] = []
    for model in sorted({c.model for c in study.combinations}):
        for metric in (SCORE, *study.metrics, SECONDS):
            cells: dict[tuple[str, int], list[float]] = {}
            for c in (c for c in study.combinations if c.model == model):
                if (value := c.value(metric)) is not None:
                    cells.setdefault((c.scheduler, c.steps), []).append(value)
            for (scheduler, steps), values in sorted(cells.items()):
                rows.append([model, metric, scheduler, steps, fmean(values), len(values)])
    return Table(["model", "metric", "scheduler", "steps", "mean", "combinations"], rows)


def fewest_steps_table(study: Study, steps_within: float) -> Table:
    """Per model × scheduler at each guidance and negative prompt: the score over the steps
    axis, its best (contract.scoring's `best_step`: ties to fewer steps) and the fewest steps
    whose score is within ε of it."""
    curves: dict[tuple[str, str, str, str], dict[int, Combination]] = {}
    for c in study.combinations:
        if c.score is not None:
            curves.setdefault((c.model, c.scheduler, c.guidance, c.negative), {})[c.steps] = c
    rows: list[list[Cell]] = []
    for key in sorted(curves, key=lambda k: (k[0], k[1], float(k[2]), k[3])):
        by_steps = curves[key]
        scores = {steps: c.score for steps, c in by_steps.items()}
        best, top = best_step(scores)
        fewest = min(steps for steps, score in scores.items() if score >= top - steps_within)
        measured = ", ".join(map(str, sorted(scores)))
        rows.append([*key, measured, best, top, fewest, scores[fewest]])
        rows[-1].append(by_steps[fewest].values.get(SECONDS))
    header = ["model", "scheduler", "guidance", "negative prompt", "steps measured"]
    header += ["best steps", "best score", f"fewest steps within {steps_within:g}"]
    return Table([*header, "its score", "its s/image"], rows)


def negative_table(study: Study) -> Table:
    """Per negative prompt and metric: over the combinations that differ only in it (matched to
    the one without a negative prompt), the mean with, without and of the difference."""
    without = {
        (c.model, c.scheduler, c.steps, c.guidance): c
        for c in study.combinations
        if c.negative == NO_NEGATIVE_PROMPT
    }
    rows: list[list[Cell]] = []
    for negative in sorted({c.negative for c in study.combinations} - {NO_NEGATIVE_PROMPT}):
        pairs = [
            (c, without[key])
            for c in study.combinations
            if c.negative == negative
            and (key := (c.model, c.scheduler, c.steps, c.guidance)) in without
        ]
        for metric in (SCORE, *study.metrics):
            values = [(a.value(metric), b.value(metric)) for a, b in pairs]
            both = [(a, b) for a, b in values if a is not None and b is not None]
            if both:
                rows.append([negative, metric, len(both), fmean(a for a, _ in both)])
                rows[-1] += [fmean(b for _, b in both), fmean(a - b for a, b in both)]
    return Table(["negative prompt", "metric", "pairs", "with", "without", "with − without"], rows)


def study_tables(study: Study, steps_within: float) -> dict[str, Table]:
    """The page's tables, keyed by their element ids (the CSVs of `CSV_NAMES`), on scored
    combinations (`score_combinations`)."""
    combinations = Table(
        ["combination", *AXES, SCORE, *study.metrics, *TIMING],
        [
            [c.combination_id, *_axis_cells(c)]
            + [c.value(m) for m in (SCORE, *study.metrics, *TIMING)]
            for c in study.combinations
        ],
    )
    return {
        "combinations": combinations,
        "pareto": pareto_table(study),
        "heatmaps": heatmap_table(study),
        "fewest-steps": fewest_steps_table(study, steps_within),
        "negative": negative_table(study),
        "phrases": phrase_table(study),
    }


def phrase_table(study: Study) -> Table:
    """Mean of each per-image metric per (slot, phrase) over every combination's records pooled
    (every combination generates the same prompts), with the number of images."""
    header = ["slot", "phrase", "metric", "mean", "images"]
    if not study.records:
        return Table(header, [])
    pooled = pd.concat(study.records.values(), ignore_index=True).assign(step=0)
    # Only quality metrics: a records table may carry other numbers (a seed, a shard index).
    known = {*study.metrics, *SELECTABLE_METRICS}
    per_image = [
        column
        for column in pooled.columns
        if column in known and pd.api.types.is_numeric_dtype(pooled[column])
    ]
    rows: list[list[Cell]] = []
    for metric in sorted(per_image, key=_metric_order):
        means = per_phrase_means(pooled, metric, step=0)
        rows += [
            [r.slot, str(r.phrase), metric, float(r.mean), r.images] for r in means.itertuples()
        ]
    rows.sort(key=lambda row: (row[0], row[1], _metric_order(str(row[2]))))
    return Table(header, rows)


def _page_table(table: Table) -> dict:
    """A table for the page, with the decimals it shows per column: 4 for a column of floats,
    none (the value as is) for text and integers."""
    floats = [
        any(isinstance(row[j], float) for row in table.rows) for j in range(len(table.header))
    ]
    decimals = [4 if is_float else None for is_float in floats]
    return {"header": table.header, "rows": table.rows, "decimals": decimals}


def write_inference_report(
    *,
    tracking_uri: str,
    experiment: str,
    study: str,
    weights: dict[str, float],
    ranges: dict[str, tuple[float, float]],
    steps_within: float,
    output_dir: Path,
) -> Path:
    """Write `report.html` and its tables' CSVs (`CSV_NAMES`) to `output_dir`; returns the page.
    `steps_within` is ε, in score units (the score lies in [0, 1])."""
    gathered = gather_study(tracking_uri, experiment, study=study)
    problems = check_weights(gathered, weights, ranges)
    if steps_within < 0:
        problems.append(f"steps_within: {steps_within} must be ≥ 0 (a score difference)")
    if problems:
        raise ReportError(f"inference report of {experiment!r}:\n  " + "\n  ".join(problems))
    score_combinations(gathered, weights, ranges)
    tables = study_tables(gathered, steps_within)
    output_dir.mkdir(parents=True, exist_ok=True)
    for table_id, name in CSV_NAMES.items():
        write_csv(output_dir / name, tables[table_id])
    data = {
        "study": gathered.name,
        "weights": {m: w for m, w in weights.items() if w > 0},
        "ranges": {m: list(ranges[m]) for m in weights if weights[m] > 0},
        "stepsWithin": steps_within,
        "distances": [m for m in DISTANCES if m in gathered.metrics],
        "slices": _slices(gathered),
        "tables": {k: _page_table(t) for k, t in tables.items()},
    }
    # Inside <script> no "<" may appear, or "</script>" in a name or phrase would end it: JSON
    # spells them as \u escapes, which parse back to the same text (as the training report).
    escaped = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
    page = PAGE.replace("/*DATA*/null", json.dumps(data).translate(str.maketrans(escaped)))
    path = output_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
