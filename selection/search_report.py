"""The report's Bayesian-search section: per study (one per subject × method × num_images × seed
group), the optimisation history (each trial's score in the order it was asked, and the best so
far), the parameters' importances (Optuna's fANOVA: computed here, no network) and each sampled
value against the score; beside the page, `search/<study>.csv` and the charts as PNGs.

The studies are those the sweep's child runs name (`dreamsweep.optuna.study`), read from the
sweep's study storage; a grid sweep has none and gets no section. The section is static HTML
with embedded PNGs (the page stays self-contained and opens offline), inserted before the end
of the page's body.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run

from contract.layout import TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_TRIAL
from contract.spec import SweepSpec
from contract.spec.search import open_storage, study_storage
from tracking.sweep import SweepTracking

if TYPE_CHECKING:
    import optuna


@dataclass
class StudySummary:
    """What the report shows of one study."""

    name: str
    rows: list[dict[str, Any]]
    """One per trial, in trial-number order: number, state, score, best so far, trial id,
    and the sampled values by spec path."""
    params: list[str]
    importances: dict[str, float] | None
    """Parameter → fANOVA importance (summing to 1); None when it cannot be computed."""
    importance_note: str = ""

    @property
    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.rows if r["state"] == "COMPLETE"]
        return max(scored, key=lambda r: (r["score"], -r["number"])) if scored else None


def study_names(runs: list[Run]) -> list[str]:
    """The studies the sweep's child runs belong to, sorted."""
    return sorted({r.data.tags[TAG_OPTUNA_STUDY] for r in runs if TAG_OPTUNA_STUDY in r.data.tags})


def summarize(study: optuna.Study, trial_ids: dict[int, str]) -> StudySummary:
    """The study's history, importances and sampled values (`trial_ids`: number → trial id)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    rows, best = [], None
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    params = sorted({p for t in trials for p in t.params})
    for trial in trials:
        score = trial.value
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            score = trial.intermediate_values[max(trial.intermediate_values)]  # where it stopped
        if trial.state == TrialState.COMPLETE and score is not None:
            best = score if best is None else max(best, score)
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "score": score,
                "best_so_far": best,
                "trial_id": trial_ids.get(trial.number, trial.user_attrs.get("trial_id", "")),
                **{p: trial.params.get(p) for p in params},
            }
        )
    importances, note = None, ""
    try:
        found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        importances = {name: float(value) for name, value in found.items()}
    except (RuntimeError, ValueError) as err:  # too few completed trials, one value only
        note = f"importances not computed: {err}"
    return StudySummary(study.study_name, rows, params, importances, note)


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def history_png(summary: StudySummary) -> bytes:
    """Score per trial in the order asked (pruned ones hollow, at their last score) and the
    best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3))
    for state, style in (("COMPLETE", {"color": "C0"}), ("PRUNED", {"facecolors": "none"})):
        points = [(r["number"], r["score"]) for r in summary.rows if r["state"] == state]
        if points:
            axes.scatter(*zip(*points, strict=True), label=state.lower(), edgecolors="C0", **style)
    best = [(r["number"], r["best_so_far"]) for r in summary.rows if r["best_so_far"] is not None]
    if best:
        axes.step(*zip(*best, strict=True), where="post", color="C1", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel("best weighted score")
    axes.legend(loc="lower right", fontsize="small")
    return _png(figure)


def values_png(summary: StudySummary, log_params: set[str]) -> bytes:
    """Each sampled value against the trial's score, one panel per parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(1, len(summary.params))
    figure, panels = plt.subplots(1, count, figsize=(3.2 * count, 2.8), squeeze=False)
    for panel, param in zip(panels[0], summary.params, strict=False):
        points = [
            (r[param], r["score"])
            for r in summary.rows
            if r[param] is not None and r["score"] is not None
        ]
        if points:
            panel.scatter(*zip(*points, strict=True), color="C0")
        if param in log_params:
            panel.set_xscale("log")
        panel.set_xlabel(param, fontsize="small")
        panel.set_ylabel("score")
    return _png(figure)


def _image(png: bytes, alt: str) -> str:
    encoded = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _study_html(summary: StudySummary, history: bytes, values: bytes) -> str:
    best = summary.best
    shown = "no completed trial yet"
    if best is not None:
        sampled = ", ".join(
            f"{p} = {best[p]:.4g}" if isinstance(best[p], float) else f"{p} = {best[p]}"
            for p in summary.params
        )
        shown = (
            f"best: trial {best['number']} ({best['trial_id']}), score {best['score']:.4f}, "
            + sampled
        )
    if summary.importances is not None:
        rows = "".join(
            f"<tr><td>{html.escape(p)}</td><td>{v:.3f}</td></tr>"
            for p, v in summary.importances.items()
        )
        importances = (
            f"<table><tr><th>parameter</th><th>importance (fANOVA)</th></tr>{rows}</table>"
        )
    else:
        importances = f"<p>{html.escape(summary.importance_note)}</p>"
    counts = {
        s: sum(r["state"] == s for r in summary.rows) for s in ("COMPLETE", "PRUNED", "RUNNING")
    }
    return (
        f'<div class="search-study"><h3>{html.escape(summary.name)}</h3>'
        f"<p>{len(summary.rows)} trials ({counts['COMPLETE']} complete, {counts['PRUNED']} "
        f"pruned, {counts['RUNNING']} running); {html.escape(shown)}</p>"
        f"{_image(history, 'optimisation history')}{importances}"
        f"{_image(values, 'sampled values vs score')}</div>"
    )


def search_section(spec: SweepSpec, output: Path) -> str:
    """The search section's HTML ('' for a grid sweep), with `output/search/<study>.csv` and
    its charts as PNGs."""
    if spec.search.kind != "optuna":
        return ""
    import optuna

    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    parent = tracking.find_parent_run(spec.name)
    runs = [] if parent is None else list(tracking.trial_runs(parent.info.run_id).values())
    names = study_names(runs)
    if not names:
        return ""
    storage = open_storage(study_storage(spec.search, spec.resolved_output_dir))
    log_params = {p for p, d in spec.search.space.items() if d.log}
    folder = output / "search"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for name in names:
        trial_ids = {
            int(r.data.tags[TAG_OPTUNA_TRIAL]): r.data.tags[TAG_TRIAL]
            for r in runs
            if r.data.tags.get(TAG_OPTUNA_STUDY) == name
            and r.data.tags.get(TAG_OPTUNA_TRIAL, "").isdigit()
        }
        summary = summarize(optuna.load_study(study_name=name, storage=storage), trial_ids)
        history, values = history_png(summary), values_png(summary, log_params)
        (folder / f"{name}-history.png").write_bytes(history)
        (folder / f"{name}-values.png").write_bytes(values)
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as handle:
            columns = ["number", "state", "score", "best_so_far", "trial_id", *summary.params]
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(summary.rows)
        parts.append(_study_html(summary, history, values))
    return (
        '<section id="search"><h2>Bayesian search</h2><p>One Optuna study per group; the '
        "objective is each trial's best weighted score.</p>" + "".join(parts) + "</section>"
    )


def with_search_section(spec: SweepSpec, page: str, output: Path) -> str:
    """The report page with the search section before the end of its body (unchanged for a
    grid sweep)."""
    section = search_section(spec, output)
    return page.replace("</body>", section + "\n</body>", 1) if section else page
