"""The three methods side by side through the local launcher, on the quickstart subjects: curves
and checkpoints in MLflow, and each checkpoint loads into a pipeline that generates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_subject, small_spec, write_spec
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient
from rich.console import Console

from launch.local import run_local
from launch.spec import load_spec
from launch.tracking import TAG_TRIAL
from trainers.methods import load_trained_pipeline
from trainers.models import resolve_model_source

pytestmark = pytest.mark.slow

METHODS = {
    "dreambooth": {"learning_rate": [1e-4]},
    "lora": {"learning_rate": [1e-3]},
    "textual_inversion": {"learning_rate": [1e-2]},
}


def generate(pipeline, prompt: str) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt,
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_three_methods_train_log_and_load(tmp_path: Path) -> None:
    copy_subject("mug", tmp_path / "subjects" / "mug")
    spec_dict = small_spec(tmp_path, methods=METHODS, launcher={"max_parallel": 2})
    spec_dict["subjects"].append({"name": "mug", "images": "subjects/mug", "class_token": "cup"})
    spec = load_spec(write_spec(tmp_path, spec_dict))
    outcome = run_local(spec, console=Console(file=io.StringIO(), width=200))
    assert not outcome.failed, [o.log_tail for o in outcome.failed]
    assert sorted((t.subject.name, t.method) for t in outcome.trials) == sorted(
        (s, m) for s in ("robot", "mug") for m in METHODS
    )

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = {
        r.data.tags[TAG_TRIAL]: r
        for r in client.search_runs([experiment.experiment_id])
        if TAG_TRIAL in r.data.tags
    }
    base_pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    for trial in outcome.trials:
        run = runs[trial.trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["method"] == trial.method
        history = client.get_metric_history(run.info.run_id, "similarity")
        assert sorted(m.step for m in history) == [0, 2, 4]
        # What really trained, read from the live objects, is logged with the run.
        setup = {k.removeprefix("dreamsweep.setup."): v for k, v in run.data.tags.items()}
        trained = {m: int(setup[f"{m}.trained_parameters"]) for m in ("unet", "text_encoder")}
        assert int(setup["vae.trained_parameters"]) == 0
        if trial.method == "dreambooth":
            assert trained["unet"] == sum(p.numel() for p in base_pipeline.unet.parameters())
        elif trial.method == "lora":
            assert (
                0 < trained["unet"] < 0.1 * sum(p.numel() for p in base_pipeline.unet.parameters())
            )
        else:
            assert trained["unet"] == 0 and trained["text_encoder"] > 0

        # The newest checkpoint loads the diffusers way and changes what the model draws.
        checkpoint = Path(run.data.tags["dreamsweep.checkpoint.step_000004"])
        pipeline = load_trained_pipeline("tiny", trial.method, checkpoint)
        token = f"<{trial.subject.name}>" if trial.method == "textual_inversion" else "sks"
        image = generate(pipeline, f"a photo of {token} {trial.subject.class_token}")
        assert image.shape == (64, 64, 3) and np.isfinite(image).all()
        # Untrained, the TI token is its class word; the others' prompt is unchanged.
        base_token = trial.subject.class_token if trial.method == "textual_inversion" else "sks"
        before = generate(base_pipeline, f"a photo of {base_token} {trial.subject.class_token}")
        assert np.abs(image - before).max() > 1e-3
