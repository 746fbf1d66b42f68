"""The quickstart sweep end to end: the real config file, the real CLI, a real MLflow store."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, dreamsweep
from diffusers import StableDiffusionPipeline
from mlflow.tracking import MlflowClient

from launch.tracking import TAG_TRIAL

pytestmark = pytest.mark.slow


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
    assert len(children) == 4
    parent_id = parents[0].info.run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted((c.data.params["subject"], c.data.params["num_images"]) for c in children) == [
        ("mug", "2"),
        ("mug", "4"),
        ("robot", "2"),
        ("robot", "4"),
    ]


def test_curves_images_and_checkpoints(quickstart: dict) -> None:
    client: MlflowClient = quickstart["client"]
    for run in quickstart["runs"]:
        if run.data.tags.get("dreamsweep.role") != "trial":
            continue
        run_id = run.info.run_id
        for metric in ("similarity", "diversity"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == [0, 10, 20, 30]
            assert all(0.0 <= m.value <= 2.0 for m in history)
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(
            range(1, 31)
        )
        samples = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
        assert samples == [f"samples/step_{s:06d}.png" for s in (0, 10, 20, 30)]
        for step in (10, 20, 30):
            folder = Path(run.data.tags[f"dreamsweep.checkpoint.step_{step:06d}"])
            assert (folder / "COMPLETE").is_file()
            assert (folder / "pytorch_lora_weights.safetensors").is_file()


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
    assert "4 already done, 0 to run" in again.stdout
    assert "All trials are already done: nothing to train." in again.stdout
    assert [p.stat().st_mtime_ns for p in checkpoints] == mtimes
    client: MlflowClient = quickstart["client"]
    experiment = client.get_experiment_by_name("quickstart")
    assert len(client.search_runs([experiment.experiment_id])) == 5


def test_lora_checkpoint_loads_into_a_pipeline(quickstart: dict) -> None:
    from trainers.models import resolve_model_source

    run = next(r for r in quickstart["runs"] if r.data.tags.get(TAG_TRIAL))
    checkpoint = run.data.tags["dreamsweep.checkpoint.step_000030"]
    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    pipeline.set_progress_bar_config(disable=True)

    def generate() -> torch.Tensor:
        return pipeline(
            "a photo of sks toy",
            num_inference_steps=3,
            height=64,
            width=64,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    base = generate()
    pipeline.load_lora_weights(checkpoint)
    tuned = generate()
    assert tuned.shape == (1, 3, 64, 64)
    assert not torch.allclose(base, tuned)  # the trained adapters change the output
