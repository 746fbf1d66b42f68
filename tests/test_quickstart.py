"""The quickstart sweep end to end: the real config file, the real CLI, a real MLflow store, and
the three methods side by side on the quickstart subjects."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, dreamsweep
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient

from launch.tracking import TAG_SETUP_PREFIX, TAG_TRIAL
from selection.records import load_records, per_phrase_means
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


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `dreamsweep run` + `select` on a copy of configs/ (outputs land in the copy)."""
    root = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(REPO / "configs", root / "configs")
    spec = "configs/quickstart.yaml"
    run = dreamsweep("run", spec, cwd=root)
    assert run.returncode == 0, run.stdout + run.stderr
    select = dreamsweep("select", spec, cwd=root)
    assert select.returncode == 0, select.stdout + select.stderr
    uri = f"sqlite:///{root / 'runs' / 'quickstart' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id])
    return {
        "root": root,
        "spec": spec,
        "run": run,
        "select": select,
        "client": client,
        "runs": runs,
    }


def test_parent_and_child_runs(quickstart: dict) -> None:
    runs = quickstart["runs"]
    parents = [r for r in runs if r.data.tags.get("dreamsweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("dreamsweep.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 12
    parent_id = parents[0].info.run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
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
    for run in quickstart["runs"]:
        if run.data.tags.get("dreamsweep.role") != "trial":
            continue
        fresh = client.get_run(run.info.run_id)
        assert fresh.data.metrics["best_step"] in (0, 10, 20, 30)
        assert 0.0 <= fresh.data.metrics["best_score"] <= 1.0
        assert run.info.run_name in quickstart["select"].stdout
    assert "best step" in quickstart["select"].stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in quickstart["select"].stdout


def test_second_run_trains_nothing(quickstart: dict) -> None:
    root = quickstart["root"]
    checkpoints = sorted((root / "runs" / "quickstart").rglob("trainer_state.pt"))
    mtimes = [p.stat().st_mtime_ns for p in checkpoints]
    again = dreamsweep("run", quickstart["spec"], cwd=root)
    assert again.returncode == 0, again.stderr
    assert "12 already done, 0 to run" in again.stdout
    assert "All trials are already done: nothing to train." in again.stdout
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    client: MlflowClient = quickstart["client"]
    experiment = client.get_experiment_by_name("quickstart")
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
