"""Base models compared in one sweep, end to end: the three toy families (`tiny`, `tiny-sd2`,
`tiny-sdxl`) × the three methods × two image counts through the real CLI and the local
launcher. The sweep first runs on two models, then the list grows to three: only the new
model's trials train. `select` registers a best checkpoint per subject × method × base model;
every trial's final checkpoint (the registered ones among them) loads in its family's pipeline
and generates; SDXL's load as diffusers documents it too (LoRA's kohya copy, TI's
`clip_l`/`clip_g` rows, DreamBooth's UNet and both text encoders); and the report's base-model
table (read in headless Chromium) shows one row per model, as Python computes it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    assert_page_shows,
    dreamsweep,
    headless_chromium,
    shown_table,
    small_spec,
    write_spec,
)
from diffusers import UNet2DConditionModel
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file
from test_kohya_export import text_encoder_prefixes
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from contract.layout import (
    BEST_ALIAS,
    PARAM_BASE_MODEL,
    ROLE_TRIAL,
    TAG_CHECKPOINT,
    TAG_ROLE,
    TAG_TRIAL,
    registered_model_name,
)
from contract.spec import load_spec
from evaluation.sampling import make_sampler
from launch.grid import expand_grid
from selection.report import build_report, comparison_tables, fit_table, gather
from selection.select import select_sweep
from trainers.lora import KOHYA_WEIGHTS_NAME
from trainers.methods import load_trained_pipeline
from trainers.models import load_base_model, load_pipeline
from trainers.prior import class_images

pytestmark = pytest.mark.slow

MODELS = ("tiny", "tiny-sd2", "tiny-sdxl")
METHODS = ("dreambooth", "lora", "textual_inversion")
PIPELINES = {
    "tiny": "StableDiffusionPipeline",
    "tiny-sd2": "StableDiffusionPipeline",
    "tiny-sdxl": "StableDiffusionXLPipeline",
}
METRICS = ["similarity", "aesthetics", "clip_t"]  # diversity needs 2 images a step
KOHYA_TEXT_PREFIXES = {
    "tiny": {"lora_te_"},
    "tiny-sd2": {"lora_te_"},
    "tiny-sdxl": {"lora_te1_", "lora_te2_"},
}


def image(pipeline, prompt: str) -> np.ndarray:
    return pipeline(
        prompt,
        num_inference_steps=1,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def trial_runs(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """Every trial run of the sweep: run id → trial id."""
    runs = client.search_runs([experiment_id], f"tags.`{TAG_ROLE}` = '{ROLE_TRIAL}'")
    return {run.info.run_id: run.data.tags[TAG_TRIAL] for run in runs}


def check_sdxl_checkpoints(checkpoints: dict[str, Path]) -> None:
    """Each SDXL checkpoint loads into a plain `StableDiffusionXLPipeline` as diffusers documents
    it, giving `load_trained_pipeline`'s image; what trained differs from the base."""
    base = load_base_model("tiny-sdxl")
    for method, checkpoint in checkpoints.items():
        prompt = f"a photo of {'<robot>' if method == 'textual_inversion' else 'sks'} toy"
        if method == "textual_inversion":
            pipeline = load_pipeline("tiny-sdxl")
            rows = load_file(checkpoint / "learned_embeds.safetensors")
            encoders = [
                ("clip_l", pipeline.text_encoder, pipeline.tokenizer, base.text_encoder),
                ("clip_g", pipeline.text_encoder_2, pipeline.tokenizer_2, base.text_encoder_2),
            ]
            for key, encoder, tokenizer, base_encoder in encoders:
                pipeline.load_textual_inversion(
                    rows[key], token="<robot>", text_encoder=encoder, tokenizer=tokenizer
                )
                # Initialised from the class token's row; trained in each encoder.
                (toy,) = tokenizer.encode("toy", add_special_tokens=False)
                initial = base_encoder.get_input_embeddings().weight[toy]
                assert not torch.allclose(rows[key][0], initial, atol=1e-6), key
        elif method == "dreambooth":
            trained = {
                "unet": UNet2DConditionModel.from_pretrained(checkpoint / "unet"),
                "text_encoder": CLIPTextModel.from_pretrained(checkpoint / "text_encoder"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    checkpoint / "text_encoder_2"
                ),
            }
            for name, module in trained.items():
                weights, initial = module.state_dict(), base.modules[name].state_dict()
                assert any(not torch.equal(weights[k], initial[k]) for k in weights), name
            pipeline = load_pipeline("tiny-sdxl", **trained)
        else:
            pipeline = load_pipeline("tiny-sdxl")
            pipeline.load_lora_weights(checkpoint)
            assert {"unet", "text_encoder", "text_encoder_2"} <= set(pipeline.get_list_adapters())
        ours = load_trained_pipeline("tiny-sdxl", method, checkpoint)
        np.testing.assert_array_equal(image(ours, prompt), image(pipeline, prompt))


def test_a_sweep_of_three_model_families_runs_selects_and_reports_per_model(
    tmp_path: Path,
) -> None:
    spec_dict = small_spec(
        tmp_path,
        name="families",
        base_model=list(MODELS[:2]),
        methods={
            "dreambooth": {"learning_rate": [1e-4], "train_text_encoder": True},
            "lora": {"learning_rate": [1e-3], "train_text_encoder": True},
            "textual_inversion": {"learning_rate": [1e-3]},
        },
        grid={"num_images": [1, 2], "seed": [0], "max_steps": 2, "eval_every": 2},
        train={"resolution": 64, "prior": {"num_class_images": 1, "num_inference_steps": 2}},
        export={"lora_format": ["diffusers", "kohya"]},
        eval={
            "images_per_prompt": 1,
            "num_inference_steps": 2,
            "metrics": METRICS,
            "records": False,
        },
        # The toy encoders' values lie close together: wide ranges keep the scores apart.
        selection={
            "weights": {"similarity": 1.0, "aesthetics": 1.0},
            "ranges": {m: [-1.0, 1.0] for m in METRICS},
        },
        launcher={"kind": "local", "max_parallel": 2},
    )
    write_spec(tmp_path, spec_dict)
    run = dreamsweep("run", "sweep.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    spec = load_spec(tmp_path / "sweep.yaml")
    client = MlflowClient(spec.tracking_uri, registry_uri=spec.tracking_uri)
    experiment_id = client.get_experiment_by_name(spec.experiment_name).experiment_id
    first = trial_runs(client, experiment_id)
    assert sorted(first.values()) == sorted(t.trial_id for t in expand_grid(spec))

    # Growing the list keeps the finished trials: only tiny-sdxl's train now.
    write_spec(tmp_path, {**spec_dict, "base_model": list(MODELS)})
    run = dreamsweep("run", "sweep.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    spec = load_spec(tmp_path / "sweep.yaml")
    trials = expand_grid(spec)
    runs = trial_runs(client, experiment_id)
    added = sorted(trial for run_id, trial in runs.items() if run_id not in first)
    assert added == sorted(t.trial_id for t in trials if t.base_model == "tiny-sdxl")
    assert len(added) == len(METHODS) * 2

    # In this process (the CLI's select and report are the quickstart's): one import less each.
    selection = select_sweep(spec)
    assert len(selection.trials) == len(MODELS) * len(METHODS) * 2
    # One registered model per subject × method × base model, named after the model.
    names = {m.name for m in client.search_registered_models()}
    expected = {
        registered_model_name("families", "robot", method, model)
        for method in METHODS
        for model in MODELS
    }
    assert names == expected
    assert "families.robot.lora.tiny-sdxl" in names
    best = {}
    for model in MODELS:
        for method in METHODS:
            name = registered_model_name("families", "robot", method, model)
            version = client.get_model_version_by_alias(name, BEST_ALIAS)
            assert client.get_run(version.run_id).data.params[PARAM_BASE_MODEL] == model
            best[model, method] = Path(version.source.removeprefix("file://")).resolve()
    # Every trial's final checkpoint (the registered ones among them) loads in its family's
    # pipeline and generates: 1 step at 64 px each.
    trial_run = {trial: run_id for run_id, trial in runs.items()}
    sdxl_checkpoints, finals = {}, set()
    for trial in trials:
        model, method = trial.base_model, trial.method
        tags = client.get_run(trial_run[trial.trial_id]).data.tags
        checkpoint = Path(tags[TAG_CHECKPOINT.format(step=trial.max_steps)]).resolve()
        finals.add(checkpoint)
        pipeline = load_trained_pipeline(model, method, checkpoint)
        assert type(pipeline).__name__ == PIPELINES[model], trial.label
        prompt = f"a photo of {'<robot>' if method == 'textual_inversion' else 'sks'} toy"
        generated = image(pipeline, prompt)
        assert generated.shape == (64, 64, 3) and np.isfinite(generated).all(), trial.label
        if checkpoint != best[model, method]:
            continue
        if method == "lora":  # the registered LoRA's kohya copy is the same LoRA, every family
            kohya = load_file(checkpoint / KOHYA_WEIGHTS_NAME)
            assert text_encoder_prefixes(kohya) == KOHYA_TEXT_PREFIXES[model]
            from_kohya = load_pipeline(model)
            from_kohya.load_lora_weights(checkpoint, weight_name=KOHYA_WEIGHTS_NAME)
            np.testing.assert_allclose(image(from_kohya, prompt), generated, atol=1e-6)
        if model == "tiny-sdxl":
            sdxl_checkpoints[method] = checkpoint
    assert len(finals) == len(trials) and set(best.values()) <= finals
    check_sdxl_checkpoints(sdxl_checkpoints)

    # DreamBooth's SDXL class image (cached by the trial: found, not generated again) is what
    # the plain SDXL pipeline draws for the class prompt, seed `prior.seed`.
    prior = spec.train.prior
    files = class_images(
        load_base_model("tiny-sdxl"), prior, class_token="toy", resolution=64, device="cpu"
    )
    assert len(files) == prior.num_class_images
    sampler = load_pipeline("tiny-sdxl")
    sampler.scheduler = make_sampler("dpm++", sampler.scheduler.config)
    drawn = sampler(
        "a photo of a toy",
        num_inference_steps=prior.num_inference_steps,
        guidance_scale=prior.guidance_scale,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(prior.seed),
    ).images[0]
    with Image.open(files[0]) as cached:
        difference = np.asarray(cached.convert("RGB"), np.int16) - np.asarray(drawn, np.int16)
    assert np.abs(difference).max() <= 2

    page = build_report(spec, tmp_path / "report")
    with (tmp_path / "report" / "by_base_model.csv").open(encoding="utf-8") as handle:
        assert [row["base model"] for row in csv.DictReader(handle)] == sorted(MODELS)
    gathered = gather(spec)
    assert len(gathered) == len(MODELS) * len(METHODS) * 2
    tables = comparison_tables(spec, gathered, spec.selection_weights)
    fits = fit_table(gathered, spec.selection_weights, spec)
    driver = headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(page.as_uri())
        shown = shown_table(driver, "by-base")
        assert [row[0] for row in shown[1:]] == sorted(MODELS)
        assert_page_shows(shown, tables["by-base"])
        assert_page_shows(shown_table(driver, "fit-table"), fits)
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
