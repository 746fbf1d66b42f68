"""The tiny quickstart sweep (configs/tiny_quickstart.yaml, the pipeline's smoke run) end to end:
the real config file, the real CLI, a real MLflow store, and the three methods side by side on
its subjects. The toy-world quickstart's dynamics: tests/test_toy_models.py and bench/."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    FAKE_SECRETS,
    REPO,
    assert_page_shows,
    dreamsweep,
    headless_chromium,
    shown_table,
)
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient

from contract.layout import METRIC_COLLAPSE_STEP, TAG_COLLAPSE, TAG_SETUP_PREFIX, TAG_TRIAL
from contract.scoring import first_collapse
from contract.spec import load_spec
from selection.registry import download_best
from selection.report import comparison_tables, fit_steps_per_image, gather, phrase_table
from tracking.records import load_records, per_phrase_means
from tracking.sweep import SweepTracking
from trainers.methods import load_trained_pipeline
from trainers.models import resolve_model_source

pytestmark = pytest.mark.slow

CURVES = ("similarity", "aesthetics", "diversity", "clip_t", "in_domain")

# The file each method's checkpoint holds (its diffusers format).
METHOD_FILES = {
    "dreambooth": "unet/diffusion_pytorch_model.safetensors",
    "lora": "pytorch_lora_weights.safetensors",
    "textual_inversion": "learned_embeds.safetensors",
}


def test_parent_and_child_runs(quickstart: dict) -> None:
    runs = quickstart["runs"]
    parents = [r for r in runs if r.data.tags.get("dreamsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("dreamsweep.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 12
    parent_id = parents[0].info.run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    # max_parallel: 2 trials side by side share the cores instead of each taking them all.
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert {c.data.tags[f"{TAG_SETUP_PREFIX}cpu_threads"] for c in children} == {share}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(
        (c.data.params["subject"], c.data.params["method"], c.data.params["num_images"])
        for c in children
    ) == [
        (subject, method, n)
        for subject in ("mug", "robot")
        for method in METHOD_FILES
        for n in ("2", "4")
    ]


def test_curves_images_and_checkpoints(quickstart: dict) -> None:
    client: MlflowClient = quickstart["client"]
    for run in quickstart["runs"]:
        if run.data.tags.get("dreamsweep.role") != "trial":
            continue
        run_id = run.info.run_id
        for metric in (*CURVES, "eval_seconds"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == [0, 10, 20, 30]
        assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "in_domain"))
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(
            range(1, 31)
        )
        samples = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
        assert samples == [f"samples/step_{s:06d}.png" for s in (0, 10, 20, 30)]
        for step in (10, 20, 30):
            folder = Path(run.data.tags[f"dreamsweep.checkpoint.step_{step:06d}"])
            assert (folder / "COMPLETE").is_file()
            assert (folder / METHOD_FILES[run.data.params["method"]]).is_file()


def test_per_image_records_carry_prompts_phrases_and_the_curves_values(quickstart: dict) -> None:
    client: MlflowClient = quickstart["client"]
    trials = [r for r in quickstart["runs"] if r.data.tags.get(TAG_TRIAL)]
    for run in trials[:3]:
        records = load_records(client, run.info.run_id)
        assert len(records) == 4 * 2 * 2  # steps × prompts × images per prompt
        assert sorted(set(records["step"])) == [0, 10, 20, 30]
        assert {"prompt", "seed", "negative_prompt", *CURVES} <= set(records.columns)
        slots = {c for c in records.columns if c.startswith("phrase.")}
        assert slots == {"phrase.style", "phrase.context", "phrase.viewpoint", "phrase.lighting"}
        for prompt, style, context in zip(
            records["prompt"], records["phrase.style"], records["phrase.context"], strict=True
        ):  # the phrases recorded are the ones in the prompt
            assert prompt.startswith(f"{style} of ") and context in prompt
        for metric in CURVES:  # each logged point is the mean of its images' records
            logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric)}
            means = records.groupby("step")[metric].mean().to_dict()
            assert means == pytest.approx(logged)
        by_phrase = per_phrase_means(records, "clip_t", step=30)
        assert set(by_phrase["slot"]) == {"style", "context", "viewpoint", "lighting"}
        assert by_phrase.groupby("slot")["images"].sum().tolist() == [4, 4, 4, 4]


def test_select_logs_best_step_and_prints_table(quickstart: dict) -> None:
    client: MlflowClient = quickstart["client"]
    spec = load_spec(quickstart["root"] / quickstart["spec"])
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    watched = spec.selection.collapse_metrics(spec.eval.metrics)
    threshold = spec.selection.collapse.threshold
    for run in quickstart["runs"]:
        if run.data.tags.get("dreamsweep.role") != "trial":
            continue
        fresh = client.get_run(run.info.run_id)
        assert fresh.data.metrics["best_step"] in (0, 10, 20, 30)
        assert 0.0 <= fresh.data.metrics["best_score"] <= 1.0
        assert run.info.run_name in quickstart["select"].stdout
        # The collapse, as contract.scoring finds it on the logged curves (none collapses in
        # the quickstart; tests/test_report.py has curves that do).
        histories = tracking.histories(run.info.run_id, watched)
        collapse = first_collapse(histories, watched, spec.selection.ranges, threshold)
        if collapse is None:
            assert fresh.data.tags[TAG_COLLAPSE] == "none"
            assert METRIC_COLLAPSE_STEP not in fresh.data.metrics
        else:
            assert fresh.data.tags[TAG_COLLAPSE] == f"{collapse[1]} at step {collapse[0]}"
            assert fresh.data.metrics[METRIC_COLLAPSE_STEP] == collapse[0]
    assert "best step" in quickstart["select"].stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in quickstart["select"].stdout


def test_second_run_trains_nothing(quickstart: dict) -> None:
    root = quickstart["root"]
    checkpoints = sorted((root / "runs" / "tiny_quickstart").rglob("trainer_state.pt"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    again = dreamsweep("run", quickstart["spec"], cwd=root)
    assert again.returncode == 0, again.stderr
    assert "12 already done, 0 to run" in again.stdout
    assert "All trials are already done: nothing to train." in again.stdout
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    client: MlflowClient = quickstart["client"]
    experiment = client.get_experiment_by_name("tiny_quickstart")
    assert len(client.search_runs([experiment.experiment_id])) == 13


def generate(pipeline: StableDiffusionPipeline, prompt: str) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt,
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def test_each_methods_checkpoint_loads_into_a_pipeline_and_generates(quickstart: dict) -> None:
    """Through diffusers' own loaders (a UNet folder, load_lora_weights, load_textual_inversion);
    the trained weights change the picture the base model draws for the same prompt and seed."""
    base = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    unet_size = sum(p.numel() for p in base.unet.parameters())
    trials = [r for r in quickstart["runs"] if r.data.tags.get(TAG_TRIAL)]
    for run in trials:
        method, subject = run.data.params["method"], run.data.params["subject"]
        class_token = run.data.params["class_token"]
        # What trained, read from the live modules by the worker, is logged with the run.
        setup = {k.removeprefix(TAG_SETUP_PREFIX): v for k, v in run.data.tags.items()}
        trained = {m: int(setup[f"{m}.trained_parameters"]) for m in ("unet", "text_encoder")}
        expected_unet = {"dreambooth": unet_size, "textual_inversion": 0}
        if method in expected_unet:
            assert trained["unet"] == expected_unet[method]
        else:
            assert 0 < trained["unet"] < unet_size // 10
        assert (trained["text_encoder"] > 0) == (method == "textual_inversion")

        checkpoint = Path(run.data.tags["dreamsweep.checkpoint.step_000030"])
        pipeline = load_trained_pipeline("tiny", method, checkpoint)
        token = f"<{subject}>" if method == "textual_inversion" else "sks"
        image = generate(pipeline, f"a photo of {token} {class_token}")
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()
        # An untrained TI token is its class word (its initial embedding).
        base_token = class_token if method == "textual_inversion" else "sks"
        before = generate(base, f"a photo of {base_token} {class_token}")
        assert np.abs(image - before).max() > 1e-3, (method, subject)


def test_the_best_checkpoint_of_each_subject_and_method_is_registered_and_loads(
    quickstart: dict, tmp_path: Path
) -> None:
    client: MlflowClient = quickstart["client"]
    uri = client.tracking_uri
    trials = {r.info.run_id: r for r in quickstart["runs"] if r.data.tags.get(TAG_TRIAL)}
    for subject in ("mug", "robot"):
        for method in METHOD_FILES:
            name = f"tiny_quickstart.{subject}.{method}"
            version = client.get_model_version_by_alias(name, "best")
            run = client.get_run(version.run_id)
            assert version.run_id in trials
            assert (run.data.params["subject"], run.data.params["method"]) == (subject, method)
            # The alias points at the best-scoring trial of the group, at its best step.
            group = [
                client.get_run(r)
                for r, t in trials.items()
                if (t.data.params["subject"], t.data.params["method"]) == (subject, method)
            ]
            assert run.data.metrics["best_score"] == max(
                g.data.metrics["best_score"] for g in group
            )
            assert version.tags["step"] == str(int(run.data.metrics["best_step"]))
            folder = download_best(name, tracking_uri=uri, destination=tmp_path / name)
            assert (folder / METHOD_FILES[method]).is_file()
            pipeline = load_trained_pipeline("tiny", method, folder)
            token = f"<{subject}>" if method == "textual_inversion" else "sks"
            image = generate(pipeline, f"a photo of {token} thing")
            assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_select_with_other_weights_points_the_alias_at_their_choice_and_records_them(
    quickstart: dict,
) -> None:
    client: MlflowClient = quickstart["client"]
    name = "tiny_quickstart.robot.lora"
    before = client.get_model_version_by_alias(name, "best")
    root, spec = quickstart["root"], quickstart["spec"]
    bad = dreamsweep("select", spec, "--weights", "similarity=1,fid=2,sharpness=1", cwd=root)
    assert bad.returncode == 2
    assert "--weights: 'fid' is not a measured, weightable metric" in bad.stderr
    assert "--weights: 'sharpness' is not a measured" in bad.stderr

    # Diversity alone: its best steps differ from the study weights' on the quickstart curves.
    again = dreamsweep("select", spec, "--weights", "diversity=1", cwd=root)
    assert again.returncode == 0, again.stderr
    model = client.get_registered_model(name)
    assert json.loads(model.tags["dreamsweep.selection_weights"]) == {"diversity": 1.0}
    after = client.get_model_version_by_alias(name, "best")
    run = client.get_run(after.run_id)
    assert after.tags["step"] == str(int(run.data.metrics["best_step"]))
    assert json.loads(after.tags["dreamsweep.selection_weights"]) == {"diversity": 1.0}
    versions = client.search_model_versions(f"name = '{name}'")
    assert len({(v.tags["trial_id"], v.tags["step"]) for v in versions}) == len(versions)
    # Back to the spec's weights: the first version is reused, not registered again.
    restored = dreamsweep("select", spec, cwd=root)
    assert restored.returncode == 0, restored.stderr
    assert client.get_model_version_by_alias(name, "best").version == before.version


def python_best_steps(quickstart: dict, weights: dict[str, float]) -> dict[str, int]:
    """Each trial's best step for `weights`, computed here from MLflow (not by the page)."""
    from contract.scoring import best_step, weighted_scores

    spec = load_spec(quickstart["root"] / quickstart["spec"])
    tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
    best = {}
    for run in quickstart["runs"]:
        if run.data.tags.get(TAG_TRIAL):
            histories = tracking.histories(run.info.run_id, list(weights))
            scores = weighted_scores(histories, weights, spec.selection.ranges)
            best[run.info.run_name] = best_step(scores)[0]
    return best


def test_report_is_self_contained_and_recomputes_best_steps_when_a_slider_moves(
    quickstart: dict, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder = tmp_path / "report"
    result = dreamsweep(
        "report", quickstart["spec"], "--output", str(folder), cwd=quickstart["root"]
    )
    assert result.returncode == 0, result.stderr
    # MLflow draws a bar per download (a trial's records) unless told not to.
    assert "Downloading artifacts" not in result.stdout + result.stderr
    page = folder / "report.html"
    html = page.read_text(encoding="utf-8")
    assert "<script src" not in html and "<link" not in html  # nothing fetched: offline
    assert len(list((folder / "curves").glob("*.png"))) == 12
    with (folder / "best_steps.csv").open(encoding="utf-8") as handle:
        written = {row["trial"]: int(row["best_step"]) for row in csv.DictReader(handle)}
    study = {"similarity": 1.0, "aesthetics": 1.0, "diversity": 0.5}
    assert written == python_best_steps(quickstart, study)
    # Every table the page computes, as selection.report computes it in Python.
    spec = load_spec(quickstart["root"] / quickstart["spec"])
    curves = gather(spec)
    phrases = phrase_table(spec, curves)
    assert {row[0] for row in phrases.rows} == {"style", "context", "viewpoint", "lighting"}

    def assert_tables_show(weights: dict[str, float]) -> None:
        tables = comparison_tables(spec, curves, weights)
        assert set(tables) == {"best-table", "by-images", "by-method", "by-base"}
        for table_id, table in {**tables, "phrases": phrases}.items():
            assert_page_shows(shown_table(driver, table_id), table)

    driver = headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(page.as_uri())
        assert_tables_show(spec.selection_weights)
        assert shown_table(driver, "negative") == []  # eval.compare_negative is off
        assert "not measured" in driver.find_element(By.ID, "negative-title").text
        rows = driver.find_elements(By.CSS_SELECTOR, "#best-table tr")[1:]
        labels = [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows]

        def shown() -> dict[str, int]:
            steps = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "span.best")]
            return {label: int(step) for label, step in zip(labels, steps, strict=True)}

        assert shown() == written  # the page's JavaScript agrees with Python
        for metric, key in (("similarity", Keys.HOME), ("aesthetics", Keys.HOME)):
            slider = driver.find_element(By.ID, f"weight-{metric}")
            slider.click()
            slider.send_keys(key)  # to 0: only diversity is left
        assert driver.find_element(By.ID, "value-similarity").text == "0.0"
        moved = shown()
        assert moved == python_best_steps(quickstart, {"diversity": 0.5})
        assert moved != written
        assert_tables_show({"diversity": 0.5})
        # The fit follows the sliders: k per class token = Σ n·s / Σ n² of the shown best steps.
        fits = {
            row.find_elements(By.TAG_NAME, "td")[0].text: row.find_element(By.CLASS_NAME, "k").text
            for row in driver.find_elements(By.CSS_SELECTOR, "#fit-table tr")[1:]
        }
        trials = [r for r in quickstart["runs"] if r.data.tags.get(TAG_TRIAL)]
        for class_token in ("cup", "toy"):
            points = [
                (int(r.data.params["num_images"]), moved[r.info.run_name])
                for r in trials
                if r.data.params["class_token"] == class_token
            ]
            assert fits[class_token] == f"{fit_steps_per_image(points):.1f}"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(artifacts / "report.png"))
    finally:
        driver.quit()


def test_credentials_in_the_environment_surface_nowhere(quickstart: dict) -> None:
    """The run and select ran with fake hub and MLflow credentials set: none of them is in a
    param, tag or metric key, in the command output, or in any file the sweep wrote (the
    SQLite database, artifacts, worker logs, trial.json, checkpoints)."""
    secrets = [value.encode() for value in FAKE_SECRETS.values()]
    for run in quickstart["runs"]:
        fields = json.dumps(
            [run.data.params, run.data.tags, sorted(run.data.metrics)], ensure_ascii=False
        ).encode()
        assert not any(secret in fields for secret in secrets), run.info.run_id
    for result in (quickstart["run"], quickstart["select"]):
        printed = (result.stdout + result.stderr).encode()
        assert not any(secret in printed for secret in secrets)
    files = [p for p in (quickstart["root"] / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "worker.log" for p in files)
    assert len(files) > 50
    for path in files:
        content = path.read_bytes()
        assert not any(secret in content for secret in secrets), path
