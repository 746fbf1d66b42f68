"""`dreamsweep report` on a sweep written straight into a real MLflow store (no training): names
and phrases that hold HTML are shown as text and run nothing, every table the page shows equals
selection.report's Python computation, `select` logs the collapse, and the command prints no
MLflow progress bars."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    assert_page_shows,
    dreamsweep,
    headless_chromium,
    shown_table,
    small_spec,
    write_spec,
)
from mlflow.entities import Metric, Param
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from contract.layout import (
    METRIC_COLLAPSE_STEP,
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_SUBJECT,
    ROLE_TRIAL,
    TAG_COLLAPSE,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    no_negative_key,
    records_file,
)
from contract.spec import load_spec
from selection.report import comparison_tables, fit_table, gather, phrase_table
from selection.select import select_sweep
from tracking.sweep import SweepTracking

pytestmark = pytest.mark.slow

PAYLOAD = "<img src=x onerror=alert(1)>"
BREAKOUT = '"><img src=x onerror=alert(2)>'
"""Out of a quoted attribute first (the curve images' alt text is the trial's label)."""
STEPS = (0, 10, 20, 30)
METRICS = ("similarity", "aesthetics", "diversity", "clip_t")
STYLES = (PAYLOAD, "a watercolor painting")
# subject, class token, method, base model, images: three methods, three base models, two image
# counts.
TRIALS = (
    (BREAKOUT, PAYLOAD, "lora", "tiny", 2),
    ("mug", "cup", "dreambooth", "tiny", 4),
    ("robot", "toy", "lora", "other-base", 4),
    ("robot", "toy", "textual_inversion", "other-base", 2),
    ("robot", "toy", "lora", "tiny-sdxl", 2),
    ("mug", "cup", "lora", "tiny-sdxl", 4),
)
# The first trial's curves, by hand (ranges [0, 1]): the score (similarity + aesthetics + 0.5 ×
# diversity) / 2.5 peaks at step 20, and aesthetics falls 0.3 below its best at step 30 (the
# collapse threshold is 0.2). The second's rise steadily: best at 30, no collapse.
KNOWN = {
    0: {
        "similarity": (0.2, 0.5, 0.8, 0.7),
        "aesthetics": (0.5, 0.6, 0.6, 0.3),
        "diversity": (0.4, 0.4, 0.4, 0.4),
        "clip_t": (0.3, 0.4, 0.5, 0.6),
    },
    1: {m: (0.1, 0.2, 0.3, 0.4) for m in METRICS},
}


def label(index: int) -> str:
    """As a sweep that compares base models labels its trials."""
    subject, _, method, base_model, images = TRIALS[index]
    return f"{subject}/{method}/{base_model}/n={images}/lr=0.001/seed=0"


def trial_curves(index: int, rng: np.random.Generator) -> dict[str, tuple[float, ...]]:
    curves = KNOWN.get(index) or {m: tuple(rng.uniform(0, 1, len(STEPS))) for m in METRICS}
    # Without the negative prompt: other values, so a swapped column would show.
    return curves | {
        no_negative_key(m): tuple(v * 0.9 + 0.05 for v in values) for m, values in curves.items()
    }


def trial_records(step: int, rng: np.random.Generator) -> pd.DataFrame:
    """Two prompts × two images, with and without the negative prompt; the first prompt's style
    phrase is the payload."""
    rows = []
    for variant in ("main", "no_negative"):
        for prompt_index, style in enumerate(STYLES):
            for image_index in range(2):
                rows.append(
                    {
                        "variant": variant,
                        "prompt_index": prompt_index,
                        "image_index": image_index,
                        "seed": image_index,
                        "prompt": f"{style} of sks toy",
                        "negative_prompt": "blurry" if variant == "main" else None,
                        "phrase.style": style,
                        **{m: float(rng.uniform(0, 1)) for m in METRICS},
                    }
                )
    return pd.DataFrame(rows).assign(step=step)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The store, as a sweep's trials would have left it, then `report` and `select` on it."""
    root = tmp_path_factory.mktemp("report")
    spec_dict = small_spec(
        root,
        name="escaping",
        eval={"metrics": list(METRICS), "negative_prompt": "blurry", "compare_negative": True},
        selection={"ranges": {m: [0.0, 1.0] for m in METRICS}, "register_best": False},
    )
    write_spec(root, spec_dict)
    spec = load_spec(root / "sweep.yaml")
    output = spec.resolved_output_dir
    tracking = SweepTracking(
        spec.tracking_uri, spec.experiment_name, artifact_root=output / "mlartifacts"
    )
    client = tracking.client
    parent = tracking.parent_run(spec.name)
    rng = np.random.default_rng(0)
    curves, records = {}, {}
    for index, (subject, class_token, method, base_model, images) in enumerate(TRIALS):
        run_id = client.create_run(
            tracking.experiment_id,
            run_name=label(index),
            tags={
                MLFLOW_PARENT_RUN_ID: parent,
                TAG_ROLE: ROLE_TRIAL,
                TAG_SWEEP: spec.name,
                TAG_TRIAL: f"trial{index}",
            },
        ).info.run_id
        params = {
            PARAM_SUBJECT: subject,
            PARAM_CLASS_TOKEN: class_token,
            PARAM_METHOD: method,
            PARAM_BASE_MODEL: base_model,
            PARAM_NUM_IMAGES: str(images),
        }
        curves[label(index)] = trial_curves(index, rng)
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[
                Metric(key, value, now, step)
                for key, values in curves[label(index)].items()
                for step, value in zip(STEPS, values, strict=True)
            ],
            params=[Param(k, v) for k, v in params.items()],
        )
        for step in STEPS:  # as the trial's reporter writes them
            table = records.setdefault(label(index), {})[step] = trial_records(step, rng)
            client.log_text(run_id, table.to_json(orient="split", index=False), records_file(step))
        client.set_terminated(run_id, "FINISHED")
    folder = root / "report"
    report = dreamsweep("report", "sweep.yaml", "--output", str(folder), cwd=root)
    assert report.returncode == 0, report.stdout + report.stderr
    select_sweep(spec)  # in this process: the CLI's select is the quickstart's
    return {
        "root": root,
        "spec": spec,
        "folder": folder,
        "report": report,
        "client": client,
        "curves": curves,
        "records": records,
    }


def test_the_report_prints_no_download_bars_and_writes_the_tables_beside_the_page(
    sweep: dict,
) -> None:
    printed = sweep["report"].stdout + sweep["report"].stderr
    assert "Downloading artifacts" not in printed  # MLflow's bar, one per trial's records
    assert "Report: " in sweep["report"].stdout
    folder = sweep["folder"]
    with (folder / "best_steps.csv").open(encoding="utf-8") as handle:
        best = {row["trial"]: row for row in csv.DictReader(handle)}
    assert (best[label(0)]["best_step"], best[label(0)]["collapse"]) == ("20", "aesthetics @ 30")
    assert float(best[label(0)]["score"]) == pytest.approx((0.8 + 0.6 + 0.5 * 0.4) / 2.5)
    assert (best[label(1)]["best_step"], best[label(1)]["collapse"]) == ("30", "")
    with (folder / "by_base_model.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["base model"] for row in rows] == ["other-base", "tiny", "tiny-sdxl"]
    # tiny: best steps 20 (2 images) and 30 (4 images): k = (2·20 + 4·30) / (2² + 4²) = 8.
    assert float(rows[1]["k (steps per image, all class tokens)"]) == pytest.approx(8.0)
    with (folder / "fit.csv").open(encoding="utf-8") as handle:
        fits = {(row["class token"], row["base model"]): row for row in csv.DictReader(handle)}
    assert float(fits[(PAYLOAD, "tiny")]["k (steps per image)"]) == pytest.approx(10.0)
    with (folder / "negative_prompt.csv").open(encoding="utf-8") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    assert float(rows[label(0)]["similarity (no negative)"]) == pytest.approx(0.8 * 0.9 + 0.05)
    with (folder / "phrases.csv").open(encoding="utf-8") as handle:
        assert {row["phrase"] for row in csv.DictReader(handle)} == set(STYLES)


def test_phrase_means_are_taken_at_each_trials_best_step(sweep: dict) -> None:
    """Computed here from the records written, at the best steps the page shows."""
    spec = sweep["spec"]
    trials = gather(spec)
    tables = comparison_tables(spec, trials, spec.selection_weights)
    best = {row[0]: row[2] for row in tables["best-table"].rows}
    table = phrase_table(spec, trials)
    rows = {(row[0], row[1]): dict(zip(table.header, row, strict=True)) for row in table.rows}
    for style in STYLES:
        for metric in METRICS:
            per_trial = []
            for trial, by_step in sweep["records"].items():
                at_best = by_step[best[trial]]
                main = at_best[(at_best["variant"] == "main") & (at_best["phrase.style"] == style)]
                per_trial.append(main[metric].mean())
            assert rows[("style", style)][metric] == pytest.approx(np.mean(per_trial))


def test_select_logs_each_trials_collapse(sweep: dict) -> None:
    client = sweep["client"]
    spec = sweep["spec"]
    parent = SweepTracking(spec.tracking_uri, spec.experiment_name).find_parent_run(spec.name)
    runs = {
        r.info.run_name: r
        for r in client.search_runs(
            [parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'"
        )
    }
    assert runs[label(0)].data.tags[TAG_COLLAPSE] == "aesthetics at step 30"
    assert runs[label(0)].data.metrics[METRIC_COLLAPSE_STEP] == 30
    assert runs[label(1)].data.tags[TAG_COLLAPSE] == "none"
    assert METRIC_COLLAPSE_STEP not in runs[label(1)].data.metrics
    # The others: where their drawn curves first fall 0.2 below their running best.
    for index in (2, 3, 4, 5):
        curves = sweep["curves"][label(index)]
        found = []
        for metric in ("aesthetics", "diversity"):  # selection.collapse's default metrics
            running = float("-inf")
            for step, value in zip(STEPS, curves[metric], strict=True):
                if value < running - 0.2:
                    found.append((step, metric))
                    break
                running = max(running, value)
        run = runs[label(index)]
        if found:
            step, metric = min(found)
            assert run.data.tags[TAG_COLLAPSE] == f"{metric} at step {step}"
            assert run.data.metrics[METRIC_COLLAPSE_STEP] == step
        else:
            assert run.data.tags[TAG_COLLAPSE] == "none"


def test_html_in_names_and_phrases_shows_as_text_and_every_table_equals_python(
    sweep: dict, tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    spec = sweep["spec"]
    trials = gather(spec)
    expected = comparison_tables(spec, trials, spec.selection_weights)
    expected["phrases"] = phrase_table(spec, trials)
    expected["fit-table"] = fit_table(trials, spec.selection_weights, spec)
    driver = headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get((sweep["folder"] / "report.html").as_uri())
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert  # noqa: B018 (the property raises when none is open)
        # The only images are the curves (data URIs): no element was made from the payloads.
        sources = [e.get_attribute("src") for e in driver.find_elements(By.TAG_NAME, "img")]
        assert len(sources) == len(TRIALS)
        assert all(s.startswith("data:image/png;base64,") for s in sources)
        alts = [e.get_attribute("alt") for e in driver.find_elements(By.TAG_NAME, "img")]
        assert alts == sorted(label(i) for i in range(len(TRIALS)))
        for table_id, table in expected.items():
            assert_page_shows(shown_table(driver, table_id), table)
        best = shown_table(driver, "best-table")
        assert best[1][:5] == [label(0), "2", "20", "0.640", "aesthetics @ 30"]
        phrases = [row[1] for row in shown_table(driver, "phrases")[1:]]
        assert PAYLOAD in phrases  # as text
        # The model comparison: one row per base model, its k over its trials' best steps.
        by_base = shown_table(driver, "by-base")
        assert [row[0] for row in by_base[1:]] == ["other-base", "tiny", "tiny-sdxl"]
        assert by_base[0][4] == "k (steps per image, all class tokens)" and by_base[2][4] == "8.0"
        # The fit per class token × base model.
        fit = {(row[0], row[1]): row[3] for row in shown_table(driver, "fit-table")[1:]}
        assert fit == {
            (PAYLOAD, "tiny"): "1",
            ("cup", "tiny"): "1",
            ("cup", "tiny-sdxl"): "1",
            ("toy", "other-base"): "2",
            ("toy", "tiny-sdxl"): "1",
        }
        assert f"{PAYLOAD} (tiny): k = " in driver.find_element(By.ID, "fit-svg").text
        assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    finally:
        driver.quit()
