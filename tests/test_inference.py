"""Inference studies (`kind: inference`): the spec's checks, the combination id, a study end to
end against a registered checkpoint (every combination's child run: metrics, timing, records,
grid; a rerun logs nothing), and a shard killed with SIGKILL that resumes without generating an
image twice and ends pixel- and metric-equal to an uninterrupted shard."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, copy_subject, write_spec
from mlflow.tracking import MlflowClient
from PIL import Image

import mlflow
from cluster.forked_worker import forked_worker
from cluster.worker import RunningWorker
from contract.inference import (
    IMAGES_DIR,
    ResolvedModel,
    ResolvedScheduler,
    combination_folder,
    image_seed,
)
from contract.layout import (
    COMBINATION_RECORDS_FILE,
    COMBINATION_SAMPLES_FILE,
    METRIC_COMBINATIONS,
    METRIC_DENOISER_ITERATIONS_PER_SECOND,
    METRIC_PEAK_MEMORY_MB,
    METRIC_SECONDS_PER_IMAGE_MEAN,
    METRIC_SECONDS_PER_IMAGE_P50,
    METRIC_SECONDS_PER_IMAGE_P90,
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_COMBINATIONS,
    PARAM_IDENTIFIER,
    PARAM_METHOD,
    PARAM_MODEL,
    PARAM_NEGATIVE_PROMPT,
    PARAM_PLACEHOLDER_TOKEN,
    PARAM_SCHEDULER,
    PARAM_SUBJECT,
    ROLE_COMBINATION,
    TAG_COMBINATION,
    TAG_PROMPTS_DIGEST,
    TAG_ROLE,
    TAG_SCORING_DIGEST,
)
from contract.spec import InferenceSpec, SpecError, load_any_spec
from launch.cli import main

TIMING = [
    METRIC_SECONDS_PER_IMAGE_MEAN,
    METRIC_SECONDS_PER_IMAGE_P50,
    METRIC_SECONDS_PER_IMAGE_P90,
    METRIC_DENOISER_ITERATIONS_PER_SECOND,
    METRIC_PEAK_MEMORY_MB,
]


def study(tmp_path: Path, **overrides: object) -> dict:
    """A study small enough for seconds on a CPU: `tiny`, 64 px, 2 steps."""
    spec = {
        "kind": "inference",
        "name": "study",
        "models": ["tiny"],
        "schedulers": ["ddim", "euler_a"],
        "num_inference_steps": [2],
        "guidance_scale": [7.5],
        "negative_prompt": {"none": None, "lowq": "blurry"},
        "resolution": 64,
        "prompts": {"template": "object", "n": 3, "token": "sks", "class_token": "toy"},
        "images_per_prompt": 2,
        "metrics": {
            "names": ["aesthetics", "clip_t", "diversity"],
            "clip_model": "tiny",
            "aesthetics_head": "tiny",
        },
        "shards": {"prompts_per_shard": 2},
    }
    spec.update(overrides)
    return spec


def test_the_shipped_inference_quickstart_validates() -> None:
    spec = load_any_spec(REPO / "configs" / "inference_quickstart.yaml")
    assert isinstance(spec, InferenceSpec)
    assert spec.prompts.n >= 50 and len(spec.models) >= 2
    assert len(spec.schedulers) == 3 and len(spec.num_inference_steps) == 3
    assert sorted(spec.negative_prompt) == ["low_quality", "none"]
    first = (REPO / "configs" / "inference_quickstart.yaml").read_text().splitlines()[0]
    assert first.startswith("# Run: dreamsweep run configs/inference_quickstart.yaml")


def test_bad_input_names_every_problem_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "scheduler-sample"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "sample"}')
    spec = study(
        tmp_path,
        models=["tiny", {"source": "./scheduler-sample", "label": "x0"}],
        schedulers=["ddim", "DDIMSchedulr", "pndm"],
        guidance_scale=[1.0, 7.5],
        metrics={"names": ["fid", "similarity"], "fid_reference": "missing-folder"},
        kinds="x",
    )
    with pytest.raises(SpecError) as raised:
        load_any_spec(write_spec(tmp_path, spec, "study.yaml"))
    problems = raised.value.problems
    assert raised.value.source.endswith("study.yaml")
    text = "\n".join(problems)
    assert "kinds: unknown key; allowed keys: kind, name, output_dir, models," in text
    assert "schedulers[1].name: unknown scheduler 'DDIMSchedulr'; allowed: ddpm, ddim" in text
    assert "DDPMScheduler, DDIMScheduler, PNDMScheduler" in text
    # The schema failed on `schedulers`: the other sections are still checked in the same pass.
    assert any(
        p.startswith("guidance_scale: [1.0] with negative_prompt ['lowq']") for p in problems
    )
    assert any(p.startswith("metrics.fid_reference: folder ") for p in problems)
    assert any("metrics.references: metric 'similarity' needs" in p for p in problems)

    spec = study(tmp_path, models=[{"source": "./scheduler-sample", "label": "x0"}])
    spec["schedulers"] = ["ddim", "pndm", {"name": "lcm"}]
    spec["metrics"] = {"names": ["kid"], "clip_model": "tiny"}
    with pytest.raises(SpecError) as raised:
        load_any_spec(write_spec(tmp_path, spec, "study.yaml"))
    text = "\n".join(raised.value.problems)
    assert (
        "schedulers[1]: PNDMScheduler handles prediction types ['epsilon', 'v_prediction'], "
        "not 'sample' (model 'x0')" in text
    )
    assert "schedulers[2]: LCMScheduler samples latent-consistency" in text
    assert "metrics.fid_reference: metric 'kid' needs a folder of reference images" in text
    assert "schedulers[0]" not in text  # DDIM handles `sample`
    assert (
        "schedulers[1]: PNDMScheduler with its Runge-Kutta warm-up needs num_inference_steps "
        ">= 4, not [2]; use at least 4 steps, or set schedulers[1].config.skip_prk_steps: true"
        in text
    )

    with pytest.raises(SpecError, match=r"kind: unknown kind 'infer'; allowed: train, inference"):
        load_any_spec(write_spec(tmp_path, study(tmp_path, kind="infer"), "study.yaml"))


def test_pndm_is_refused_the_step_counts_it_crashes_on(tmp_path: Path) -> None:
    """PNDM's default Runge-Kutta warm-up fails below 4 steps (diffusers raises in `step`);
    without the warm-up it takes 1. Every other scheduler of the study takes 1 step."""
    import diffusers
    import torch

    def sample(steps: int, **config: object) -> None:
        scheduler = diffusers.PNDMScheduler(**config)
        scheduler.set_timesteps(steps)
        latents = torch.zeros(1, 4, 8, 8)
        for t in scheduler.timesteps:
            latents = scheduler.step(torch.ones_like(latents), t, latents).prev_sample

    with pytest.raises(ValueError):
        sample(3)
    sample(4)
    sample(1, skip_prk_steps=True)
    spec = study(tmp_path, schedulers=["ddpm", "pndm"], num_inference_steps=[1, 3, 4])
    with pytest.raises(SpecError) as raised:
        load_any_spec(write_spec(tmp_path, spec, "study.yaml"))
    assert raised.value.problems == [
        "schedulers[1]: PNDMScheduler with its Runge-Kutta warm-up needs num_inference_steps "
        ">= 4, not [1, 3]; use at least 4 steps, or set schedulers[1].config.skip_prk_steps: true"
    ]
    spec["schedulers"] = ["ddpm", {"name": "pndm", "config": {"skip_prk_steps": True}}]
    assert isinstance(load_any_spec(write_spec(tmp_path, spec, "study.yaml")), InferenceSpec)


def test_a_models_name_missing_from_the_registry_is_refused_before_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).create_registered_model("other.robot.lora")
    spec = study(tmp_path, models=["tiny", "models:/nope.robot.lora@best"], registry=uri)
    path = write_spec(tmp_path, spec, "study.yaml")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: 1 problem" in err  # the spec's file, not `spec`
    assert "models[1].source: 'models:/nope.robot.lora@best': the registry" in err
    assert "has no model 'nope.robot.lora' with alias 'best'" in err
    assert "registered models: ['other.robot.lora']" in err
    assert not (tmp_path / "runs" / "study" / "combinations").exists()  # nothing generated


def test_the_combination_id_follows_what_decides_the_images() -> None:
    from contract.inference import Combination

    model = ResolvedModel(label="a", base_model="tiny", identity="tiny", token="", class_token="c")
    scheduler = ResolvedScheduler(label="ddim", class_name="DDIMScheduler")
    base = Combination(
        model=model,
        scheduler=scheduler,
        num_inference_steps=4,
        guidance_scale=7.5,
        negative_name="none",
        negative_prompt=None,
        resolution=64,
        dtype="float32",
        seed=0,
    )
    relabelled = base.model_copy(
        update={
            "model": model.model_copy(update={"label": "b"}),
            "scheduler": scheduler.model_copy(update={"label": "mine"}),
            "negative_name": "empty",
        }
    )
    assert relabelled.combination_id == base.combination_id  # labels are not identity
    karras = scheduler.model_copy(update={"config": {"use_karras_sigmas": True}})
    for changed in (
        base.model_copy(update={"scheduler": karras}),
        base.model_copy(update={"num_inference_steps": 5}),
        base.model_copy(update={"negative_prompt": "blurry"}),
        base.model_copy(update={"model": model.model_copy(update={"identity": "t1@10"})}),
    ):
        assert changed.combination_id != base.combination_id
    # An image's latents depend on (seed, prompt, image) only.
    assert image_seed(0, 3, 1) == image_seed(0, 3, 1) != image_seed(0, 1, 3)


def test_a_done_shard_is_pending_again_when_its_images_or_scoring_change(tmp_path: Path) -> None:
    """done.json is for the shard's combinations, image keys and per-image scoring: a grown
    last shard, other images per prompt, other shard sizes or per-image metrics make it pending
    (its worker generates what is missing); a set-level metric less does not (only the finish
    logs again)."""
    from inference.shard import write_done
    from launch.inference import prepare_study, shard_is_done

    def done(**overrides: object) -> list[bool]:
        spec = load_any_spec(write_spec(tmp_path, study(tmp_path, **overrides), "study.yaml"))
        assert isinstance(spec, InferenceSpec)
        return [shard_is_done(s) for s in prepare_study(spec, download=False).shards]

    spec = load_any_spec(write_spec(tmp_path, study(tmp_path), "study.yaml"))
    assert isinstance(spec, InferenceSpec)
    for shard in prepare_study(spec, download=False).shards:  # 3 prompts: [0, 1] and [2]
        shard.folder.mkdir(parents=True)
        write_done(shard)  # as its worker leaves it
    prompts = study(tmp_path)["prompts"]
    metrics = study(tmp_path)["metrics"]
    assert done() == [True, True]
    assert done(prompts={**prompts, "n": 4}) == [True, False]  # the last shard grew
    assert done(images_per_prompt=3) == [False, False]
    assert done(shards={"prompts_per_shard": 1}) == [False, False, False]
    assert done(metrics={**metrics, "names": ["aesthetics", "diversity"]}) == [False, False]
    assert done(metrics={**metrics, "batch_size": 3}) == [False, False]
    assert done(metrics={**metrics, "names": ["aesthetics", "clip_t"]}) == [True, True]
    assert done(schedulers=["ddim"]) == [False, False]


def test_a_summary_reads_only_the_grids_images_without_set_level_metrics(tmp_path: Path) -> None:
    """Per-image means come from the sidecars, so only the sample grid's images are opened (a
    study's thousands of PNGs are not); timing without a timed denoising loop has no rate."""
    from PIL import PngImagePlugin

    from contract.inference import Combination, StudyPrompt, image_key
    from evaluation.evaluator import GRID_PROMPTS
    from inference.shard import PNG_INFO_KEY
    from inference.summary import summarize_combination

    combination = Combination(
        model=ResolvedModel(
            label="a", base_model="tiny", identity="tiny", token="", class_token="c"
        ),
        scheduler=ResolvedScheduler(label="ddim", class_name="DDIMScheduler"),
        num_inference_steps=2,
        guidance_scale=7.5,
        negative_name="none",
        negative_prompt=None,
        resolution=8,
        dtype="float32",
        seed=0,
    )
    prompts = [StudyPrompt(index=i, text=f"a {{class}} {i}") for i in range(GRID_PROMPTS + 2)]
    images = combination_folder(tmp_path, combination.combination_id) / IMAGES_DIR
    images.mkdir(parents=True)
    for prompt in prompts:
        # No callback ran: no denoising step timed (denoise_seconds as inference.shard leaves it).
        info = {"seconds": 0.5 + prompt.index, "denoiser_steps": 0, "denoise_seconds": -0.1}
        info |= {"warmup": prompt.index == 0, "prompt_index": prompt.index, "image_index": 0}
        sidecar = {**info, "prompt": prompt.text, "negative_prompt": None, "seed": 1}
        sidecar |= {"phrases": {}, "metrics": {"aesthetics": float(prompt.index)}}
        key = image_key(prompt, 0)
        (images / f"{key}.json").write_text(json.dumps(sidecar))
        if prompt.index < GRID_PROMPTS:  # the others' PNGs are never opened: left out here
            chunk = PngImagePlugin.PngInfo()
            chunk.add_text(PNG_INFO_KEY, json.dumps(info))
            Image.new("RGB", (8, 8), (prompt.index, 0, 0)).save(
                images / f"{key}.png", pnginfo=chunk
            )
    summary = summarize_combination(
        tmp_path, combination, prompts, 1, per_image_metrics=["aesthetics"], set_scorer=None
    )
    assert summary.metrics["aesthetics"] == pytest.approx(np.mean(range(GRID_PROMPTS + 2)))
    assert METRIC_DENOISER_ITERATIONS_PER_SECOND not in summary.metrics
    assert summary.metrics[METRIC_SECONDS_PER_IMAGE_MEAN] == pytest.approx(
        np.mean([0.5 + i for i in range(1, GRID_PROMPTS + 2)])  # without the warm-up
    )
    assert summary.grid.size == (8, 8 * GRID_PROMPTS) and len(summary.records) == GRID_PROMPTS + 2


def test_a_turbo_or_lcm_model_asked_for_many_steps_or_guidance_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = [
        "tiny",
        {"source": "tiny", "label": "tiny-turbo"},  # the style read from the name
        {"source": "tiny", "label": "fast", "style": "lcm"},
    ]
    spec = study(tmp_path, models=models, num_inference_steps=[2, 20], guidance_scale=[7.5])
    assert main(["validate", str(write_spec(tmp_path, spec, "study.yaml"))]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: models[1]: 'tiny-turbo' is a turbo model, distilled for 1-8 steps; "
        "num_inference_steps [20] spend time for no gain",
        "warning: models[1]: 'tiny-turbo' is a turbo model, trained without classifier-free "
        "guidance; guidance_scale [7.5] > 1 degrades its images",
        "warning: models[2]: 'fast' is a lcm model, distilled for 1-8 steps; "
        "num_inference_steps [20] spend time for no gain",
        "warning: models[2]: 'fast' is a lcm model, trained without classifier-free "
        "guidance; guidance_scale [7.5] > 1 degrades its images",
    ]
    few = study(tmp_path, models=models[1:], num_inference_steps=[1, 4], guidance_scale=[1.0])
    few["negative_prompt"] = {"none": None}
    assert main(["validate", str(write_spec(tmp_path, few, "study.yaml"))]) == 0
    assert "warning" not in capsys.readouterr().err


def _child_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [found.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = '{ROLE_COMBINATION}'"
    )


def register_checkpoint(tmp_path: Path, uri: str) -> None:
    """A textual-inversion checkpoint (one embedding row for `<robot>` on the tiny model's text
    width), its trial run, and its registration as `small.robot.textual_inversion@best` by the
    project's registry code, as `dreamsweep select` would leave them (without training)."""
    import torch
    from safetensors.torch import save_file

    from selection.registry import Candidate, register_best

    checkpoint = tmp_path / "trial" / "checkpoints" / "step_000002"
    checkpoint.mkdir(parents=True)
    save_file({"<robot>": torch.randn(1, 64)}, checkpoint / "learned_embeds.safetensors")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("small"))
    params = {
        PARAM_SUBJECT: "robot",
        PARAM_CLASS_TOKEN: "toy",
        PARAM_IDENTIFIER: "sks",
        PARAM_METHOD: "textual_inversion",
        PARAM_PLACEHOLDER_TOKEN: "<{subject}>",
        PARAM_BASE_MODEL: "tiny",
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    candidate = Candidate(
        run_id=run.info.run_id,
        trial_id="t0",
        label="robot-ti",
        subject="robot",
        method="textual_inversion",
        step=2,
        score=0.5,
        checkpoint=str(checkpoint),
    )
    register_best(client, "small", [candidate], weights={"similarity": 1.0})


@pytest.mark.slow
def test_a_study_of_tiny_and_a_registered_checkpoint_logs_every_combination(
    tmp_path: Path,
) -> None:
    """The quickstart's shape, smaller: a registered checkpoint (`models:/…@best`) and the
    base model × with/without a negative prompt (the schedulers and step counts are axes of
    the same product: the combination id test covers them). Then the spec changes: fewer
    combinations (the report leaves the old ones out); a fourth prompt for the last shard's
    one and a per-image metric less (only that prompt's images are generated, the others are
    scored again, every combination is logged again over the four prompts); a set-level
    metric less (logged again, nothing scored again per image)."""
    register_checkpoint(tmp_path, f"sqlite:///{tmp_path / 'registry.db'}")
    copy_subject("robot", tmp_path / "references")
    spec = study(
        tmp_path,
        models=["tiny", {"source": "models:/small.robot.textual_inversion@best", "label": "ti"}],
        registry=f"sqlite:///{tmp_path / 'registry.db'}",
        prompts={"template": "object", "n": 3, "token": "sks", "class_token": "toy"},
        shards={"prompts_per_shard": 2},  # the second shard holds one prompt
        schedulers=["ddim"],
        images_per_prompt=1,
        metrics={
            "names": ["similarity", "aesthetics", "clip_t", "diversity"],
            "references": "references",
            "clip_model": "tiny",
            "aesthetics_head": "tiny",
        },
    )
    path = write_spec(tmp_path, spec, "study.yaml")
    assert main(["run", str(path)]) == 0
    uri = f"sqlite:///{tmp_path / 'runs' / 'study' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    runs = _child_runs(uri, "study")
    assert len(runs) == 2 * 2
    combos = {
        (
            r.data.params[PARAM_MODEL],
            r.data.params[PARAM_SCHEDULER],
            r.data.params["num_inference_steps"],
            r.data.params[PARAM_NEGATIVE_PROMPT],
        )
        for r in runs
    }
    assert len(combos) == 4 and {c[0] for c in combos} == {"tiny", "ti"}
    assert {c[3] for c in combos} == {"none", "lowq"}
    for run in runs:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert set(metrics) == {"similarity", "aesthetics", "clip_t", "diversity", *TIMING}
        assert metrics[METRIC_SECONDS_PER_IMAGE_MEAN] > 0
        assert metrics[METRIC_SECONDS_PER_IMAGE_P90] >= metrics[METRIC_SECONDS_PER_IMAGE_P50]
        # load_table searches the runs through the process-wide tracking URI.
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        try:
            records = client.load_table(
                run.info.experiment_id,
                artifact_file=COMBINATION_RECORDS_FILE,
                run_ids=[run.info.run_id],
            )
        finally:
            mlflow.set_tracking_uri(previous)
        assert len(records) == 3
        assert {
            "prompt_index",
            "image_index",
            "prompt",
            "seconds",
            "similarity",
            "phrase.style",
            "phrase.context",
        } <= set(records.columns)
        assert records["similarity"].mean() == pytest.approx(metrics["similarity"], abs=1e-9)
        if run.data.params[PARAM_MODEL] == "ti":
            assert records["prompt"].str.contains("<robot> toy").all()  # the trial's own token
        paths = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert paths == [COMBINATION_SAMPLES_FILE]
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.params[PARAM_COMBINATIONS] == "4"
    assert parent.info.status == "FINISHED"

    # A rerun generates nothing and logs nothing twice.
    images = sorted((tmp_path / "runs" / "study" / "combinations").rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in images]
    assert main(["run", str(path)]) == 0
    assert [p.stat().st_mtime_ns for p in images] == mtimes
    again = _child_runs(uri, "study")
    assert len(again) == 4
    history = client.get_metric_history(again[0].info.run_id, "aesthetics")
    assert len(history) == 1
    sidecars = [json.loads(p.read_text()) for p in images[0].parent.glob("*.json")]
    assert all(0 < s["denoise_seconds"] < s["seconds"] for s in sidecars)  # the loop alone

    # The report: one row per child run, and the negative prompt paired with none.
    report = tmp_path / "runs" / "study" / "report"
    assert main(["report", str(path)]) == 0
    with (report / "combinations.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["combination"] for r in rows} == {r.data.tags[TAG_COMBINATION] for r in runs}
    assert len(rows) == 4
    with (report / "negative_prompt.csv").open(encoding="utf-8") as handle:
        assert {r["negative prompt"] for r in csv.DictReader(handle)} == {"lowq"}
    # The spec changed (no negative prompt compared): its report leaves the old ones out.
    write_spec(tmp_path, {**spec, "negative_prompt": {"none": None}}, "study.yaml")
    assert main(["run", str(path)]) == 0
    assert main(["report", str(path)]) == 0
    with (report / "combinations.csv").open(encoding="utf-8") as handle:
        assert {r["negative prompt"] for r in csv.DictReader(handle)} == {"none"}
    assert client.get_run(parent.info.run_id).data.metrics[METRIC_COMBINATIONS] == 2

    # A fourth prompt (the last shard's second) and no clip_t: its done.json no longer fits it.
    study_dir = tmp_path / "runs" / "study"
    logs = {p: p.read_text().splitlines() for p in study_dir.glob("shards/*/generated.log")}
    pngs = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*.png")}
    metrics = {**spec["metrics"], "names": ["similarity", "aesthetics", "diversity"]}
    grown = {
        **spec,
        "negative_prompt": {"none": None},
        "prompts": {**spec["prompts"], "n": 4},
        "metrics": metrics,
    }
    write_spec(tmp_path, grown, "study.yaml")
    assert main(["run", str(path)]) == 0
    new_lines = {p: p.read_text().splitlines()[len(lines) :] for p, lines in logs.items()}
    assert new_lines[study_dir / "shards" / "shard_0000" / "generated.log"] == []
    added = new_lines[study_dir / "shards" / "shard_0001" / "generated.log"]
    assert len(added) == 2 and all(line.split()[1].startswith("p000003_i000_") for line in added)
    assert all(p.stat().st_mtime_ns == t for p, t in pngs.items())  # scored again, not redrawn
    sidecars = [json.loads(p.read_text()) for p in study_dir.glob("combinations/*/images/*.json")]
    current = {
        r.data.tags[TAG_COMBINATION]
        for r in again
        if r.data.params[PARAM_NEGATIVE_PROMPT] == "none"
    }
    rescored = [s for s in sidecars if s["combination_id"] in current]
    assert len(rescored) == 2 * 4 and all("clip_t" not in s["metrics"] for s in rescored)
    from launch.inference import prepare_study

    now = prepare_study(load_any_spec(path), download=False)
    logged = [
        r
        for r in _child_runs(uri, "study")
        if r.data.tags[TAG_PROMPTS_DIGEST] == now.prompts_digest
        and r.data.tags.get(TAG_SCORING_DIGEST) == now.scoring_digest
    ]
    assert len(logged) == 2 and {r.info.status for r in logged} == {"FINISHED"}
    assert all(set(r.data.metrics) == {*metrics["names"], *TIMING} for r in logged)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"

    # A set-level metric less: no image is scored again, the combinations are logged again for
    # this scoring (same prompts), and the report reads those runs, not the earlier scoring's.
    scored = {p: p.stat().st_mtime_ns for p in study_dir.glob("combinations/*/images/*.json")}
    fewer = {**metrics, "names": ["similarity", "aesthetics"]}
    write_spec(tmp_path, {**grown, "metrics": fewer}, "study.yaml")
    assert main(["run", str(path)]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in scored.items())
    assert main(["report", str(path)]) == 0
    with (report / "combinations.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["combination"] for r in rows} == current
    assert "diversity" not in rows[0] and "aesthetics" in rows[0]


def _shard_worker(shard_json: Path) -> AbstractContextManager[RunningWorker]:
    """The shard's worker as the local launcher starts it: a process of its own, forked from
    the fork server (which imported the worker's code once per test session)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return forked_worker([str(shard_json)], env, None, entry="cluster.inference_shard")


def _prepared(tmp_path: Path, name: str) -> tuple[InferenceSpec, Path]:
    from launch.inference import prepare_study

    folder = tmp_path / name
    folder.mkdir()
    small = study(folder, schedulers=["euler_a"], shards={"prompts_per_shard": 3})
    spec = load_any_spec(write_spec(folder, small, "study.yaml"))
    assert isinstance(spec, InferenceSpec)
    shard = prepare_study(spec).shards[0]
    return spec, shard.folder / "shard.json"


@pytest.mark.slow
def test_a_killed_shard_resumes_without_generating_an_image_twice(
    tmp_path: Path, one_thread: None
) -> None:
    spec, shard_json = _prepared(tmp_path, "killed")
    log = shard_json.parent / "generated.log"
    with _shard_worker(shard_json) as worker:
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 4):
            assert time.monotonic() < deadline, "the worker generated < 4 images in 120 s"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait() == -signal.SIGKILL
    before = {p: p.stat().st_mtime_ns for p in spec.resolved_output_dir.rglob("*.png")}
    assert 4 <= len(before) < 12
    with _shard_worker(shard_json) as worker:
        output = worker.output.read()
        assert worker.wait() == 0, output
    generated = log.read_text().splitlines()
    assert len(generated) == len(set(generated)) == 2 * 3 * 2  # each image's one pipeline call
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # none rewritten

    # An uninterrupted shard elsewhere: the same images, pixel for pixel, the same scores.
    # Run in this process (on one thread, as the workers above): another process, same bits.
    import torch

    from contract.inference import read_shard
    from inference.shard import run_shard

    other, other_json = _prepared(tmp_path, "uninterrupted")
    assert run_shard(read_shard(other_json), device=torch.device("cpu")) == 12
    images = sorted(p.relative_to(spec.resolved_output_dir) for p in before)
    for relative in sorted(
        p.relative_to(other.resolved_output_dir) for p in other.resolved_output_dir.rglob("*.png")
    ):
        resumed = np.asarray(Image.open(spec.resolved_output_dir / relative))
        assert np.array_equal(resumed, np.asarray(Image.open(other.resolved_output_dir / relative)))
        sidecar = relative.with_suffix(".json")
        scores = json.loads((spec.resolved_output_dir / sidecar).read_text())["metrics"]
        assert scores == json.loads((other.resolved_output_dir / sidecar).read_text())["metrics"]
    assert images  # compared above
    folders = {
        p.relative_to(other.resolved_output_dir).parts[1]
        for p in other.resolved_output_dir.glob("combinations/*/images/*.png")
    }
    assert len(folders) == 2  # one folder per combination, keyed by its id
    assert all(
        (combination_folder(spec.resolved_output_dir, f) / IMAGES_DIR).is_dir() for f in folders
    )
    # And the study's final metrics (per-image means and set-level diversity) are equal too.
    from inference.summary import SetScorer, summarize_combination
    from launch.inference import prepare_study

    finals = []
    for resolved in (spec, other):
        prepared = prepare_study(resolved, download=False)
        scorer = SetScorer(prepared.shards[0].eval, ["diversity"], 6, torch.device("cpu"))
        finals.append(
            [
                {
                    k: v
                    for k, v in summarize_combination(
                        resolved.resolved_output_dir,
                        c,
                        prepared.prompts,
                        2,
                        per_image_metrics=["aesthetics", "clip_t"],
                        set_scorer=scorer,
                    ).metrics.items()
                    if not k.startswith("timing/")
                }
                for c in prepared.combinations
            ]
        )
    assert finals[0] == finals[1] and set(finals[0][0]) == {"aesthetics", "clip_t", "diversity"}
