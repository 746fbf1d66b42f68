"""The inference study's report on a study written straight into a real MLflow store, as the
study's workers lay it out (contract.layout): every table its CSVs hold equals a computation made
here from the values written, and the page in headless Chromium shows Python's values (Pareto
points, heatmap cells, tables) with names and phrases that hold HTML as text."""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import assert_page_shows, headless_chromium, shown_table
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from contract.layout import (
    COMBINATION_RECORDS_FILE,
    METRIC_COMBINATIONS,
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
    TAG_COMBINATION,
    TAG_PROMPTS_DIGEST,
    TAG_ROLE,
    TAG_SWEEP,
)
from contract.spec import SpecError, load_any_spec
from launch.cli import main
from selection.inference_report import (
    gather_study,
    score_combinations,
    study_tables,
    write_inference_report,
)
from selection.report import ReportError
from tracking.inference import InferenceTracking

PAYLOAD = "<img src=x onerror=alert(1)>"
MODELS = ("tiny", PAYLOAD)
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler")
STEPS = (5, 10, 20)
NEGATIVES = (NO_NEGATIVE_PROMPT, "blurry")
GUIDANCE = "7.5"
METRICS = ("similarity", "aesthetics", "diversity", "clip_t", "fid")
PER_IMAGE = ("similarity", "aesthetics", "clip_t")
STYLES = (PAYLOAD, "a watercolor painting")
LIGHTS = ("at dusk", "in studio light")
WEIGHTS = {"similarity": 1.0, "aesthetics": 1.0, "diversity": 0.5, "clip_t": 0.0}
RANGES = {"similarity": (0.0, 1.0), "aesthetics": (0.3, 0.7), "diversity": (0.0, 1.0)}
EPSILON = 0.05
# tiny × DDIM without a negative prompt, by hand: scores (sim + scaled aes + 0.5 div) / 2.5 are
# 0.5, 0.732 and 0.76 at 5, 10 and 20 steps: the best is 20, and 10 is within ε = 0.05 of it.
KNOWN = {
    5: {"similarity": 0.5, "aesthetics": 0.5, "diversity": 0.5},
    10: {"similarity": 0.78, "aesthetics": 0.6, "diversity": 0.6},
    20: {"similarity": 0.8, "aesthetics": 0.62, "diversity": 0.6},
}
TIMING = {
    "s/image": METRIC_SECONDS_PER_IMAGE_MEAN,
    "s/image p50": METRIC_SECONDS_PER_IMAGE_P50,
    "s/image p90": METRIC_SECONDS_PER_IMAGE_P90,
    "denoiser it/s": METRIC_DENOISER_ITERATIONS_PER_SECOND,
    "peak MB": METRIC_PEAK_MEMORY_MB,
}


def by_hand_score(means: dict[str, float]) -> float:
    total = sum(w for w in WEIGHTS.values() if w > 0)
    scaled = {
        m: min(1.0, max(0.0, (means[m] - RANGES[m][0]) / (RANGES[m][1] - RANGES[m][0])))
        for m, w in WEIGHTS.items()
        if w > 0
    }
    return sum(WEIGHTS[m] * v for m, v in scaled.items()) / total


def value_of(combination: dict, metric: str) -> float:
    """A written combination's score, metric mean or timing (by the report's header)."""
    return {"score": combination["score"], **combination["means"], **combination["timing"]}[metric]


def records(rng: np.random.Generator) -> pd.DataFrame:
    """Four prompts × two images: each (style, light) once, the first style is the payload."""
    rows = []
    for prompt_index, (light, style) in enumerate(itertools.product(LIGHTS, STYLES)):
        for image_index in range(2):
            rows.append(
                {
                    "prompt_index": prompt_index,
                    "image_index": image_index,
                    "seed": 1000 + 10 * prompt_index + image_index,  # a number, not a metric
                    "prompt": f"{style} of a toy {light}",
                    "phrase.style": style,
                    "phrase.light": light,
                    "seconds": float(rng.uniform(0.05, 0.2)),
                    **{m: float(rng.uniform(0, 1)) for m in PER_IMAGE},
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The store as a study's workers leave it (2 models × 2 schedulers × 3 step counts, with
    and without a negative prompt), then the report written from it. Also in the store, and
    never in the report: another study of the same experiment, created first; a combination of
    the study's earlier spec (the spec changed and ran again, under the same parent run); one
    of its combinations still running."""
    root = tmp_path_factory.mktemp("inference_report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    tracking = InferenceTracking(uri, "study", artifact_root=root / "art")
    experiment = tracking.experiment_id
    current = [f"c{index:02d}" for index in range(24)]
    other = tracking.study_run(
        "other", combination_ids=["x00"], prompts_digest="p", spec_yaml="name: other\n"
    )
    parent = tracking.study_run(
        "study", combination_ids=["old", "c00"], prompts_digest="p0", spec_yaml="old: 1\n"
    )
    again = tracking.study_run(
        "study", combination_ids=current, prompts_digest="p", spec_yaml="new: 1\n"
    )
    assert again == parent
    assert client.get_run(parent).data.metrics[METRIC_COMBINATIONS] == 24
    rng = np.random.default_rng(0)
    written = []
    grid = itertools.product(MODELS, SCHEDULERS, STEPS, NEGATIVES)
    strays = [
        (other, "x00", "p", MODELS[0], "FINISHED"),  # another study's
        (parent, "old", "p", MODELS[0], "FINISHED"),  # the earlier spec's
        (parent, "c01", "p0", "fewer prompts", "FINISHED"),  # a current one, other prompts
        (parent, "c00", "p", "running copy", "RUNNING"),  # an unfinished run of a current one
    ]
    for run_parent, combination_id, prompts, model, status in strays:
        run_id = client.create_run(
            experiment,
            tags={
                MLFLOW_PARENT_RUN_ID: run_parent,
                TAG_ROLE: ROLE_COMBINATION,
                TAG_COMBINATION: combination_id,
                TAG_PROMPTS_DIGEST: prompts,
            },
        ).info.run_id
        client.log_param(run_id, PARAM_MODEL, model)
        client.log_metric(run_id, "similarity", 0.123)
        if status == "FINISHED":
            client.set_terminated(run_id, status)
    for index, (model, scheduler, steps, negative) in enumerate(grid):
        known = model == "tiny" and scheduler == SCHEDULERS[0] and negative == NO_NEGATIVE_PROMPT
        means = {m: float(rng.uniform(0.2, 0.9)) for m in METRICS} | (KNOWN[steps] if known else {})
        seconds = 0.01 * steps * (1 + MODELS.index(model)) + float(rng.uniform(0, 0.05))
        timing = {
            "s/image": seconds,
            "s/image p50": seconds * 0.95,
            "s/image p90": seconds * 1.2,
            "denoiser it/s": steps / seconds,
            "peak MB": float(rng.uniform(500, 900)),
        }
        run_id = client.create_run(
            experiment,
            run_name=f"c{index:02d}",
            tags={
                MLFLOW_PARENT_RUN_ID: parent,
                TAG_ROLE: ROLE_COMBINATION,
                TAG_SWEEP: "study",
                TAG_COMBINATION: f"c{index:02d}",
                TAG_PROMPTS_DIGEST: "p",
            },
        ).info.run_id
        params = {
            PARAM_MODEL: model,
            PARAM_SCHEDULER: scheduler,
            PARAM_INFERENCE_STEPS: str(steps),
            PARAM_GUIDANCE_SCALE: GUIDANCE,
            PARAM_NEGATIVE_PROMPT: negative,
        }
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(m, v, now, 0) for m, v in means.items()]
            + [Metric(TIMING[h], v, now, 0) for h, v in timing.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        table = records(rng)
        client.log_table(run_id, table, COMBINATION_RECORDS_FILE)
        client.set_terminated(run_id, "FINISHED")
        written.append(
            {"id": f"c{index:02d}", "axes": (model, scheduler, steps, negative)}
            | {"means": means, "timing": timing, "records": table, "score": by_hand_score(means)}
        )
    folder = root / "report"
    page = write_inference_report(
        tracking_uri=uri,
        experiment="study",
        study="study",
        weights=WEIGHTS,
        ranges=RANGES,
        steps_within=EPSILON,
        output_dir=folder,
    )
    return {"uri": uri, "folder": folder, "page": page, "written": written}


def read_csv(study: dict, name: str) -> list[dict[str, str]]:
    with (study["folder"] / name).open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_each_combinations_score_and_timing_is_its_weighted_scaled_means(study: dict) -> None:
    rows = {row["combination"]: row for row in read_csv(study, "combinations.csv")}
    assert len(rows) == len(study["written"]) == 24  # no stray run of the store
    assert {row["model"] for row in rows.values()} == set(MODELS)
    for combination in study["written"]:
        row = rows[combination["id"]]
        model, scheduler, steps, negative = combination["axes"]
        assert (row["model"], row["scheduler"], row["steps"]) == (model, scheduler, str(steps))
        assert (row["guidance"], row["negative prompt"]) == (GUIDANCE, negative)
        assert float(row["score"]) == pytest.approx(combination["score"], abs=1e-12)
        for metric, value in combination["means"].items():  # fid too: shown, not weighted
            assert float(row[metric]) == pytest.approx(value)
        for header, value in combination["timing"].items():
            assert float(row[header]) == pytest.approx(value)
    assert float(rows["c00"]["score"]) == pytest.approx(0.5)  # the known curve at 5 steps


def test_the_pareto_front_is_every_point_no_other_beats(study: dict) -> None:
    points = {
        (c["axes"][0], c["axes"][1], c["axes"][2], c["axes"][3]): (
            c["timing"]["s/image"],
            c["score"],
        )
        for c in study["written"]
    }
    expected = {
        key: not any(
            (s <= seconds and q >= score) and (s < seconds or q > score)
            for other, (s, q) in points.items()
            if other != key
        )
        for key, (seconds, score) in points.items()
    }
    rows = read_csv(study, "pareto.csv")
    shown = {
        (r["model"], r["scheduler"], int(r["steps"]), r["negative prompt"]): r["Pareto front"]
        for r in rows
    }
    assert shown == {key: "yes" if front else "no" for key, front in expected.items()}
    assert 0 < sum(expected.values()) < len(expected)
    seconds = [float(r["s/image"]) for r in rows]
    assert seconds == sorted(seconds)  # fastest first


def test_heatmaps_average_each_scheduler_and_steps_cell_over_the_negative_prompts(
    study: dict,
) -> None:
    rows = read_csv(study, "heatmaps.csv")
    cells = {(r["model"], r["metric"], r["scheduler"], int(r["steps"])): r for r in rows}
    metrics = ("score", *METRICS, "s/image")
    assert len(cells) == len(rows) == len(MODELS) * len(metrics) * len(SCHEDULERS) * len(STEPS)
    for model, metric, scheduler, steps in itertools.product(MODELS, metrics, SCHEDULERS, STEPS):
        values = [
            value_of(c, metric)
            for c in study["written"]
            if c["axes"][:3] == (model, scheduler, steps)
        ]
        row = cells[(model, metric, scheduler, steps)]
        assert (float(row["mean"]), int(row["combinations"])) == (pytest.approx(np.mean(values)), 2)


def test_fewest_steps_within_epsilon_of_the_best_per_model_scheduler_and_slice(
    study: dict,
) -> None:
    rows = read_csv(study, "fewest_steps.csv")
    within = f"fewest steps within {EPSILON:g}"
    shown = {(r["model"], r["scheduler"], r["negative prompt"]): r for r in rows}
    assert len(rows) == len(shown) == len(MODELS) * len(SCHEDULERS) * len(NEGATIVES)
    for model, scheduler, negative in itertools.product(MODELS, SCHEDULERS, NEGATIVES):
        curve = {
            c["axes"][2]: c["score"]
            for c in study["written"]
            if (c["axes"][0], c["axes"][1], c["axes"][3]) == (model, scheduler, negative)
        }
        best = max(curve.values())
        best_steps = min(s for s, v in curve.items() if v == best)
        fewest = min(s for s, v in curve.items() if v >= best - EPSILON)
        row = shown[(model, scheduler, negative)]
        assert (row["steps measured"], row["guidance"]) == ("5, 10, 20", GUIDANCE)
        assert (int(row["best steps"]), int(row[within])) == (best_steps, fewest)
        assert float(row["best score"]) == pytest.approx(best)
        assert float(row["its score"]) == pytest.approx(curve[fewest])
    known = shown[("tiny", SCHEDULERS[0], NO_NEGATIVE_PROMPT)]
    assert (known["best steps"], known[within]) == ("20", "10")
    assert float(known["best score"]) == pytest.approx(0.76)


def test_the_negative_prompt_effect_is_the_mean_over_matched_pairs(study: dict) -> None:
    rows = {(r["negative prompt"], r["metric"]): r for r in read_csv(study, "negative_prompt.csv")}
    assert set(rows) == {("blurry", m) for m in ("score", *METRICS)}
    by_axes = {c["axes"]: c for c in study["written"]}
    for metric in ("score", *METRICS):
        pairs = []
        for model, scheduler, steps in itertools.product(MODELS, SCHEDULERS, STEPS):
            with_, without = (by_axes[(model, scheduler, steps, n)] for n in ("blurry", "none"))
            pairs.append((value_of(with_, metric), value_of(without, metric)))
        row = rows[("blurry", metric)]
        assert int(row["pairs"]) == 12
        assert float(row["with"]) == pytest.approx(np.mean([a for a, _ in pairs]))
        assert float(row["without"]) == pytest.approx(np.mean([b for _, b in pairs]))
        assert float(row["with − without"]) == pytest.approx(np.mean([a - b for a, b in pairs]))


def test_phrase_means_pool_every_combinations_records_with_counts(study: dict) -> None:
    rows = read_csv(study, "phrases.csv")
    shown = {(r["slot"], r["phrase"], r["metric"]): r for r in rows}
    assert len(shown) == len(rows) == (len(STYLES) + len(LIGHTS)) * len(PER_IMAGE)
    for slot, phrases in (("style", STYLES), ("light", LIGHTS)):
        for phrase, metric in itertools.product(phrases, PER_IMAGE):
            values = [
                value
                for c in study["written"]
                for value, said in zip(
                    c["records"][metric], c["records"][f"phrase.{slot}"], strict=True
                )
                if said == phrase
            ]
            row = shown[(slot, phrase, metric)]
            assert int(row["images"]) == len(values) == 24 * 4  # 2 prompts × 2 images each
            assert float(row["mean"]) == pytest.approx(sum(values) / len(values))


def test_bad_weights_and_epsilon_are_refused_naming_every_problem(study: dict, tmp_path) -> None:
    with pytest.raises(ReportError) as refused:
        write_inference_report(
            tracking_uri=study["uri"],
            experiment="study",
            study="study",
            weights={"fid": 1.0, "identity": 1.0, "clip_t": 1.0, "seconds": 1.0, "aesthetics": -1},
            ranges={},
            steps_within=-0.1,
            output_dir=tmp_path / "refused",
        )
    message = str(refused.value)
    assert "'fid' cannot be weighted" in message
    assert "'identity' was not measured" in message
    assert "'clip_t' has no min–max range" in message
    assert "'seconds' is not a quality metric" in message
    assert "steps_within: -0.1 must be ≥ 0" in message
    assert "weights: aesthetics must be >= 0, got -1" in message
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    with pytest.raises(ReportError, match="no inference study 'study' in experiment 'nope'"):
        write_inference_report(
            tracking_uri=study["uri"],
            experiment="nope",
            study="study",
            weights=WEIGHTS,
            ranges=RANGES,
            steps_within=EPSILON,
            output_dir=tmp_path / "nope",
        )


def test_the_page_shows_pythons_values_and_html_in_names_as_text(
    study: dict, tmp_path: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    found = gather_study(study["uri"], "study", study="study")
    score_combinations(found, WEIGHTS, RANGES)
    expected = study_tables(found, EPSILON)
    driver = headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(study["page"].as_uri())
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert  # noqa: B018 (the property raises when none is open)
        assert driver.execute_script("return document.images.length") == 0
        for table_id, name in (
            ("combinations", "combinations"),
            ("pareto-table", "pareto"),
            ("fewest-steps", "fewest-steps"),
            ("negative", "negative"),
            ("phrases", "phrases"),
        ):
            assert_page_shows(shown_table(driver, table_id), expected[name])
        points = driver.execute_script(
            "return [...document.querySelectorAll('#pareto-svg circle.point')].map(c => [c.dataset"
            ".label, Number(c.dataset.seconds), Number(c.dataset.score), c.dataset.front])"
        )
        python_points = [
            [" · ".join(map(str, row[:5])), row[5], row[6], row[7]]
            for row in expected["pareto"].rows
        ]
        assert points == python_points  # the same floats, not only as rounded
        assert {p[3] for p in points} == {"yes", "no"}
        cells = driver.execute_script(
            "return [...document.querySelectorAll('#heatmaps text.cell')].map(t => "
            "[t.dataset.model, t.dataset.metric, t.dataset.scheduler, Number(t.dataset.steps),"
            " Number(t.dataset.value), Number(t.dataset.count), t.textContent])"
        )
        assert [c[:6] for c in cells] == expected["heatmaps"].rows
        assert all(c[6] == f"{c[4]:.4f}" for c in cells)
        headings = driver.execute_script(
            "return [...document.querySelectorAll('#heatmaps h3')].map(h => h.textContent)"
        )
        assert headings == [f"model {m}" for m in sorted(MODELS)]  # the payload as text
        phrases = [row[1] for row in shown_table(driver, "phrases")[1:]]
        assert PAYLOAD in phrases
        assert [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    finally:
        driver.quit()


def inference_spec(folder: Path, **overrides: object) -> Path:
    """A small study's spec file (never run here: these tests stop before generation)."""
    spec = {
        "kind": "inference",
        "name": "unrun",
        "models": ["tiny"],
        "schedulers": ["ddim"],
        "num_inference_steps": [2],
        "negative_prompt": {"none": None, "lowq": "blurry"},
        "resolution": 64,
        "prompts": {"template": "object", "n": 2, "token": "sks", "class_token": "toy"},
        "metrics": {"names": ["aesthetics"], "clip_model": "tiny", "aesthetics_head": "tiny"},
        **overrides,
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_report_before_the_study_ran_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(inference_spec(tmp_path))]) == 1
    error = capsys.readouterr().err
    assert "error: no inference study 'unrun' in experiment 'unrun'" in error
    assert "run the study first" in error and "Traceback" not in error


def test_a_study_run_without_its_combinations_file_is_an_error_naming_it(tmp_path: Path) -> None:
    """A parent run whose `dreamsweep run` stopped before it recorded its combinations (MLflow
    raises MlflowException, not OSError, for the missing artifact)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = InferenceTracking(uri, "bare", artifact_root=tmp_path / "art")
    run_id = tracking.client.create_run(
        tracking.experiment_id, tags={TAG_ROLE: ROLE_INFERENCE_STUDY, TAG_SWEEP: "bare"}
    ).info.run_id
    with pytest.raises(ReportError) as refused:
        write_inference_report(
            tracking_uri=uri,
            experiment="bare",
            study="bare",
            weights=WEIGHTS,
            ranges=RANGES,
            steps_within=EPSILON,
            output_dir=tmp_path / "report",
        )
    assert f"the study run {run_id} has no combinations.json" in str(refused.value)
    assert "run the study again" in str(refused.value)


def test_a_negative_prompt_text_named_none_is_refused(tmp_path: Path) -> None:
    path = inference_spec(tmp_path, negative_prompt={"none": "blurry", "off": None})
    with pytest.raises(SpecError) as refused:
        load_any_spec(path)
    assert refused.value.source.endswith("study.yaml")
    assert "negative_prompt" in str(refused.value)
    assert "'none' names the run without a negative prompt" in str(refused.value)
    path = inference_spec(tmp_path, negative_prompt={"off": None, "plain": "", "lowq": "blurry"})
    with pytest.raises(SpecError, match=r"\['off', 'plain'\] all mean without a negative"):
        load_any_spec(path)


def test_a_combination_without_a_negative_prompt_is_logged_as_none(tmp_path: Path) -> None:
    """Whatever the spec named it: the report pairs every negative prompt with `none`."""
    from PIL import Image

    from contract.inference import Combination, ResolvedModel, ResolvedScheduler

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = InferenceTracking(uri, "named", artifact_root=tmp_path / "art")
    parent = tracking.study_run(
        "named", combination_ids=["a"], prompts_digest="p", spec_yaml="x: 1\n"
    )
    model = ResolvedModel(
        label="tiny", base_model="tiny", identity="tiny", token="sks", class_token="toy"
    )
    combination = Combination(
        model=model,
        scheduler=ResolvedScheduler(label="ddim", class_name="DDIMScheduler"),
        num_inference_steps=2,
        guidance_scale=7.5,
        negative_name="off",
        negative_prompt=None,
        resolution=64,
        dtype="float32",
        seed=0,
    )
    run_id = tracking.log_combination(
        parent,
        "named",
        combination,
        prompts_digest="p",
        scoring_digest="s",
        metrics={"aesthetics": 0.5},
        records=[{"prompt_index": 0, "aesthetics": 0.5}],
        grid=Image.new("RGB", (8, 8)),
        memory_source="process_peak_rss",
    )
    assert tracking.client.get_run(run_id).data.params[PARAM_NEGATIVE_PROMPT] == NO_NEGATIVE_PROMPT
