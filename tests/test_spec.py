"""The sweep spec rejects bad input with a message naming the file, the field and the value."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import REPO, dreamsweep, small_spec, write_spec
from PIL import Image

from contract.spec import SpecError, load_spec
from launch import cli
from launch.preflight import network_warnings, tracking_warnings
from tracking.journal import HTTP_DEFAULTS

Validate = Callable[[Path], tuple[int, str, str]]


@pytest.fixture
def validate(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Validate:
    """`dreamsweep validate SPEC` through the real entry point, in-process: (status, out, err)."""
    for key, value in HTTP_DEFAULTS.items():  # main() sets them; undone after the test
        monkeypatch.setenv(key, value)

    def run(path: Path) -> tuple[int, str, str]:
        status = cli.main(["validate", str(path)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert str(path) in str(raised.value)
    return raised.value.problems


def test_quickstart_spec_is_valid_and_resolved() -> None:
    spec = load_spec(REPO / "configs" / "tiny_quickstart.yaml")
    assert [model.id for model in spec.base_model] == ["tiny"]
    assert spec.base_models[0].resolution == 64 and not spec.compares_models
    assert spec.subjects[0].images == REPO / "configs" / "subjects" / "robot"
    assert spec.resolved_output_dir == REPO / "runs" / "tiny_quickstart"
    assert spec.tracking_uri == f"sqlite:///{REPO / 'runs' / 'tiny_quickstart' / 'mlflow.db'}"


def test_the_quickstart_is_the_toy_world_with_oracle_curves_shown_not_weighted() -> None:
    from launch.grid import expand_grid

    spec = load_spec(REPO / "configs" / "quickstart.yaml")
    assert [model.id for model in spec.base_model] == ["toy"]
    assert spec.base_models[0].resolution == 64
    assert [s.images for s in spec.subjects] == [
        REPO / "configs" / "subjects" / "toyworld" / name for name in ("robot", "mug")
    ]
    assert (spec.eval.clip_model, spec.eval.aesthetics_head) == ("toy", "toy")
    assert "oracle" in spec.eval.metrics
    assert not any(name.startswith("oracle") for name in spec.selection_weights)
    trials = expand_grid(spec)
    assert len(trials) == 16 and {t.num_images for t in trials} == {2, 4}
    assert {t.method for t in trials} == {"dreambooth", "lora", "textual_inversion"}
    first = (REPO / "configs" / "quickstart.yaml").read_text().splitlines()[0]
    assert first.startswith("# Run: dreamsweep run configs/quickstart.yaml")


def test_unknown_key_lists_the_allowed_keys(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, train={"resolution": 64, "learning_rat": 1})
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem.startswith("train.learning_rat: unknown key; allowed keys: resolution,")
    assert "mixed_precision" in problem


def test_unknown_top_level_key(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, epochs=3)
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem.startswith("epochs: unknown key; allowed keys: name, base_model,")


def test_missing_image_folder(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    spec["subjects"][0]["images"] = "subjects/nobody"
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem == (
        f"subjects[0].images: folder {str(tmp_path / 'subjects' / 'nobody')!r} does not exist"
    )


def test_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "subjects" / "empty").mkdir(parents=True)
    (tmp_path / "subjects" / "empty" / ".DS_Store").write_bytes(b"\0")
    spec = small_spec(tmp_path)
    spec["subjects"][0]["images"] = "subjects/empty"
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem.endswith("has no images")


def test_fewer_images_than_the_largest_num_images(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, grid={"num_images": [2, 9]})
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert "has 4 image(s) but grid.num_images asks for up to 9" in problem


def test_unreadable_and_non_image_files_are_named(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    folder = tmp_path / "subjects" / "robot"
    (folder / "broken.png").write_bytes(b"this is not a png")
    (folder / "notes.txt").write_text("hello")
    problems = problems_of(write_spec(tmp_path, spec))
    assert len(problems) == 2
    assert any(str(folder / "broken.png") in p and "unreadable image" in p for p in problems)
    assert any(str(folder / "notes.txt") in p and "not an image file" in p for p in problems)


def test_truncated_image_is_unreadable(tmp_path: Path) -> None:
    spec = small_spec(tmp_path)
    good = tmp_path / "subjects" / "robot" / "00.png"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert str(good) in problem and "unreadable image" in problem


@pytest.mark.parametrize("name", ["../escape", "a b", "", ".hidden", "x" * 65])
def test_subject_name_must_be_a_safe_path_component(tmp_path: Path, name: str) -> None:
    spec = small_spec(tmp_path)
    spec["subjects"][0]["name"] = name
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem.startswith("subjects[0].name: must be a safe path component")
    assert repr(name) in problem


def test_eval_every_must_divide_max_steps(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, grid={"max_steps": 30, "eval_every": 7})
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem == (
        "grid: eval_every (7) must divide max_steps (30) so the last step is evaluated"
    )


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        methods=["lora", "hypernetwork"],
        train={"resolution": 60, "mixed_precision": "fp8"},
        eval={"prompts": ["a {tok} {class}"]},
    )
    problems = problems_of(write_spec(tmp_path, spec))
    fields = sorted(p.split(":")[0] for p in problems)
    assert fields == [
        "eval.prompts",
        "methods",
        "train.mixed_precision",
        "train.resolution",
    ]
    assert any(
        "unknown method(s) ['hypernetwork']; allowed: dreambooth, lora, textual_inversion" in p
        for p in problems
    )
    assert any("{token}, {class}" in p for p in problems)


def test_selection_weights_must_name_measured_metrics(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path, eval={"metrics": ["similarity"]}, selection={"weights": {"diversity": 1.0}}
    )
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert "selection.weights: ['diversity'] not in eval.metrics ['similarity']" in problem


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    [problem] = problems_of(path)
    assert problem.startswith("not valid YAML")


@pytest.mark.slow
def test_cli_validate_prints_trial_count_and_rejects_bad_specs(tmp_path: Path) -> None:
    good = write_spec(tmp_path, small_spec(tmp_path, grid={"seed": [0, 1, 2]}))
    result = dreamsweep("validate", str(good), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 trials" in result.stdout
    assert "num_inference_steps: 3" in result.stdout  # the resolved spec, defaults included

    bad = write_spec(tmp_path, small_spec(tmp_path, grid={"eval_every": 3}), "bad.yaml")
    result = dreamsweep("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{bad}: 1 problem in the sweep spec" in result.stderr
    assert "eval_every (3) must divide max_steps (4)" in result.stderr


def test_odd_but_valid_images_pass(tmp_path: Path) -> None:
    """Grayscale and JPEG files are images too: they are converted at load time."""
    spec = small_spec(tmp_path)
    folder = tmp_path / "subjects" / "robot"
    Image.open(folder / "00.png").convert("L").save(folder / "10.jpg")
    assert load_spec(write_spec(tmp_path, spec)).subjects[0].images == folder


def test_method_options_are_checked_with_the_allowed_keys(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        methods={
            "lora": {"rank": 0, "learning_rate": []},
            "textual_inversion": {"placeholder_token": "<{name}>"},
            "dreambooth": {"prior": True},
        },
    )
    problems = problems_of(write_spec(tmp_path, spec))
    assert sorted(p.split(":")[0] for p in problems) == [
        "methods.dreambooth.prior",
        "methods.lora.learning_rate",
        "methods.lora.rank",
        "methods.textual_inversion.placeholder_token",
    ]
    assert any(
        "allowed keys: learning_rate, train_text_encoder, prior_preservation" in p for p in problems
    )
    assert any("unknown slot(s) ['name']; allowed: {subject}" in p for p in problems)


def test_keys_of_the_earlier_layout_say_where_they_moved(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, grid={"learning_rate": [1e-4]}, train={"lora_rank": 8})
    problems = problems_of(write_spec(tmp_path, spec))
    assert any(
        p.startswith("grid.learning_rate: unknown key (it moved to methods.<method>.learning_rate)")
        for p in problems
    )
    assert any(
        p.startswith("train.lora_rank: unknown key (it moved to methods.lora.rank)")
        for p in problems
    )


def test_8bit_adam_and_deepspeed_are_refused_together(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, train={"optimizer": "adamw8bit", "deepspeed": {"zero_stage": 2}})
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert "train.optimizer: 'adamw8bit' cannot be combined with train.deepspeed" in problem
    # Each on its own is fine; ZeRO-3 is not offered.
    for train in ({"optimizer": "adamw8bit"}, {"deepspeed": {"offload_optimizer": "cpu"}}):
        assert load_spec(write_spec(tmp_path, small_spec(tmp_path, train=train)))
    [problem] = problems_of(
        write_spec(tmp_path, small_spec(tmp_path, train={"deepspeed": {"zero_stage": 3}}))
    )
    assert problem.startswith("train.deepspeed.zero_stage: Input should be 1 or 2")


def test_evaluation_options_are_checked_together(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        eval={
            "image_encoder": "tiny",
            "compare_negative": True,
            "metrics": ["similarity", "fid", "similarity"],
        },
        selection={"weights": {"fid": 1.0}},
    )
    problems = problems_of(write_spec(tmp_path, spec))
    assert any(
        p.startswith("eval.image_encoder: unknown key (it moved to eval.clip_model)")
        for p in problems
    )
    del spec["eval"]["image_encoder"]
    problem = "\n".join(problems_of(write_spec(tmp_path, spec)))
    for expected in (
        "eval.compare_negative needs eval.negative_prompt",
        "metric 'fid' needs eval.fid_reference (a folder of images)",
        "eval.metrics: repeated ['similarity']",
    ):
        assert expected in problem


def test_fid_is_reported_not_weighted_and_its_reference_folder_is_checked(
    tmp_path: Path,
) -> None:
    spec = small_spec(
        tmp_path,
        eval={"metrics": ["similarity", "fid"], "fid_reference": "coco/dog"},
        selection={"weights": {"similarity": 1.0, "fid": 1.0}},
    )
    problems = problems_of(write_spec(tmp_path, spec))
    assert any("selection.weights: 'fid' cannot be weighted" in p for p in problems)
    spec["selection"] = {"weights": {"similarity": 1.0}}
    assert problems_of(write_spec(tmp_path, spec)) == [
        f"eval.fid_reference: folder {str(tmp_path / 'coco' / 'dog')!r} does not exist"
    ]


def test_default_weights_need_a_study_metric(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, eval={"metrics": ["clip_t", "in_domain"]})
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert "cover none of eval.metrics ['clip_t', 'in_domain']; set selection.weights" in problem


def test_ray_launcher_and_scheduler_options_are_checked(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        grid={"num_images": [2], "max_steps": 8, "eval_every": 2},
        launcher={"kind": "ray", "gpu_per_trial": 1, "scheduler": {"kind": "asha", "rungs": 3}},
    )
    problems = problems_of(write_spec(tmp_path, spec))
    assert sorted(problems) == [
        "launcher.gpu_per_trial: unknown key; allowed keys: kind, address, cpus_per_trial, "
        "gpus_per_trial, processes_per_trial, max_concurrent_trials, scheduler, max_failures, "
        "keep_checkpoints, pack",
        "launcher.scheduler.rungs: unknown key; allowed keys: kind, grace_period, "
        "reduction_factor, max_t",
    ]
    asha = {"kind": "asha", "grace_period": 12, "max_t": 10}
    spec["launcher"] = {"kind": "ray", "scheduler": asha}
    problems = problems_of(write_spec(tmp_path, spec))
    assert any("launcher.scheduler.max_t: 10 is beyond grid.max_steps (8)" in p for p in problems)
    assert any("launcher.scheduler.grace_period: 12 must be below" in p for p in problems)
    spec["launcher"] = {"kind": "ray", "scheduler": "median"}  # a name alone is a scheduler
    assert load_spec(write_spec(tmp_path, spec)).launcher.scheduler.kind == "median"


@pytest.mark.slow
def test_validate_warns_when_a_cluster_launcher_writes_to_a_sqlite_file(tmp_path: Path) -> None:
    path = write_spec(tmp_path, small_spec(tmp_path, launcher={"kind": "ray"}))
    checked = dreamsweep("validate", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "is a SQLite file, and launcher.kind is 'ray'" in checked.stderr
    assert "network filesystems do not honour SQLite's locks" in checked.stderr
    # this spec starts Ray here, whose services listen beyond loopback: said, not hidden
    assert "Ray's GCS and raylets listen on every network interface" in checked.stderr
    on_a_cluster = small_spec(tmp_path, launcher={"kind": "ray", "address": "10.0.0.1:6379"})
    assert network_warnings(load_spec(write_spec(tmp_path, on_a_cluster))) == []
    for launcher in ({"kind": "slurm"}, {"kind": "ray"}, {"kind": "local"}):
        on_sqlite = load_spec(write_spec(tmp_path, small_spec(tmp_path, launcher=launcher)))
        assert bool(tracking_warnings(on_sqlite)) == (launcher["kind"] != "local")
        served = small_spec(tmp_path, launcher=launcher, tracking={"uri": "http://127.0.0.1:5000"})
        assert tracking_warnings(load_spec(write_spec(tmp_path, served))) == []


def test_validate_reports_schema_cross_section_and_file_problems_together(
    tmp_path: Path, validate: Validate
) -> None:
    spec = small_spec(
        tmp_path,
        train={"resolution": 60},
        eval={"metrics": ["similarity"]},
        selection={"weights": {"diversity": 1.0}},
    )
    spec["subjects"][0]["images"] = "subjects/nobody"
    # A sibling's error does not hide the file checks of the subject that validated.
    spec["subjects"].append({"name": "a b", "images": "subjects/robot", "class_token": "toy"})
    path = write_spec(tmp_path, spec)
    status, out, err = validate(path)
    assert status == 2 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: {path}: 4 problems in the sweep spec:\n"), err
    for expected in (
        "  - train.resolution: Input should be a multiple of 8 (got 60)",
        "  - subjects[1].name: must be a safe path component",
        "  - selection.weights: ['diversity'] not in eval.metrics ['similarity']",
        f"  - subjects[0].images: folder {str(tmp_path / 'subjects' / 'nobody')!r} does not exist",
    ):
        assert expected in err, err


def test_file_checks_run_for_sections_that_validated_beside_schema_errors(
    tmp_path: Path,
) -> None:
    spec = small_spec(
        tmp_path,
        grid={"num_images": [9], "max_steps": 0},
        eval={"metrics": ["similarity", "fid"], "fid_reference": "coco", "seed": "x"},
    )
    notes = tmp_path / "subjects" / "robot" / "notes.txt"
    notes.write_text("hello")
    problems = problems_of(write_spec(tmp_path, spec))
    # grid failed: the subject's files are still checked, only their count against
    # grid.num_images is not; eval failed: its reference folder is not checked.
    assert [p.split(":")[0] for p in problems] == [
        "grid.max_steps",
        "eval.seed",
        "subjects[0].images",
    ]
    assert str(notes) in problems[2] and "not an image file" in problems[2]
    spec["grid"]["max_steps"] = 4
    spec["eval"]["seed"] = 0
    problems = problems_of(write_spec(tmp_path, spec))
    assert [p.split(":")[0] for p in problems] == ["subjects[0].images"] * 2 + [
        "eval.fid_reference"
    ]
    assert "has 5 image(s) but grid.num_images asks for up to 9" in problems[1]


def test_early_stop_that_could_never_fire_is_refused(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        eval={"metrics": ["similarity", "clip_t"]},
        selection={"early_stop": {"patience": 1}},
    )
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert problem == (
        "selection.early_stop: stops a trial only when a watched curve collapses, but "
        "eval.metrics ['similarity', 'clip_t'] measures none of selection.collapse.metrics "
        "['aesthetics', 'diversity'], so it would never stop one; add one of ['aesthetics', "
        "'diversity'] to eval.metrics, set selection.collapse.metrics to some of "
        "['similarity', 'clip_t'], or remove selection.early_stop"
    )
    spec["selection"]["collapse"] = {"metrics": []}
    [problem] = problems_of(write_spec(tmp_path, spec))
    assert "but selection.collapse.metrics is empty, so it would never stop one" in problem
    # Each fix the message names makes the spec valid.
    spec["selection"]["collapse"] = {"metrics": ["clip_t"]}
    assert load_spec(write_spec(tmp_path, spec)).selection.collapse.metrics == ["clip_t"]
    spec["selection"] = {"early_stop": {"patience": 1}}
    spec["eval"]["metrics"] = ["similarity", "clip_t", "aesthetics"]
    assert load_spec(write_spec(tmp_path, spec)).selection.early_stop.patience == 1
    del spec["selection"]["early_stop"]
    spec["eval"]["metrics"] = ["similarity", "clip_t"]
    assert load_spec(write_spec(tmp_path, spec)).selection.early_stop is None


def test_a_file_where_a_folder_belongs_is_named_as_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\0")
    (tmp_path / "reference.png").write_bytes(b"\0")
    image = tmp_path / "subjects" / "robot" / "00.png"
    spec = small_spec(
        tmp_path,
        base_model="./model.safetensors",
        eval={"metrics": ["similarity", "fid"], "fid_reference": "reference.png"},
    )
    spec["subjects"][0]["images"] = "subjects/robot/00.png"
    spec["output_dir"] = "reference.png"  # `run` would fail making its folders there
    assert problems_of(write_spec(tmp_path, spec)) == [
        f"base_model: local model {str(tmp_path / 'model.safetensors')!r} is a file, not a "
        f"folder (got './model.safetensors')",
        f"output_dir: {str(tmp_path / 'reference.png')!r} is a file, not a folder "
        "(got 'reference.png')",
        f"subjects[0].images: {str(image)!r} is a file, not a folder",
        f"eval.fid_reference: {str(tmp_path / 'reference.png')!r} is a file, not a folder",
    ]


@pytest.mark.parametrize(
    ("max_steps", "eval_every", "seeds", "summary"),
    [
        (4, 4, [0], "1 trial; each trains 4 steps, evaluated at steps 0 and 4."),
        (4, 2, [0, 1], "2 trials; each trains 4 steps, evaluated at steps 0, 2 and 4."),
        (6, 2, [0], "1 trial; each trains 6 steps, evaluated at steps 0, 2, 4 and 6."),
        (600, 200, [0], "evaluated at steps 0, 200, 400 and 600."),
        (12, 1, [0], "evaluated at steps 0, 1, …, 12 (13 evaluations)."),
    ],
)
def test_validate_summary_lists_the_step_grid(
    tmp_path: Path,
    validate: Validate,
    max_steps: int,
    eval_every: int,
    seeds: list[int],
    summary: str,
) -> None:
    grid = {"max_steps": max_steps, "eval_every": eval_every, "seed": seeds}
    status, out, err = validate(write_spec(tmp_path, small_spec(tmp_path, grid=grid)))
    assert status == 0, err
    assert summary in out, out


def pipeline_folder(
    folder: Path, pipeline: str = "StableDiffusionXLPipeline", *, vae_blocks: int = 5
) -> Path:
    """A diffusers folder's configs (no weights): what validation reads of a model. Its pixel
    multiple is its VAE's factor, 2 ** (vae_blocks - 1): 16 by default."""
    for relative, config in {
        "model_index.json": {"_class_name": pipeline},
        "unet/config.json": {"down_block_types": ["DownBlock2D"] * 3},
        "vae/config.json": {"block_out_channels": [32] * vae_blocks},
        "scheduler/scheduler_config.json": {"prediction_type": "epsilon"},
    }.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_every_base_model_problem_is_reported_at_once(tmp_path: Path) -> None:
    """An unsupported pipeline, a folder without a VAE, a duplicate (by its resolved folder),
    two folders with one short name, resolutions the model cannot take (an entry's own and
    train's, a repeated entry's once), an unknown entry key: one pass."""
    xl = pipeline_folder(tmp_path / "xl")  # multiple 16 (a VAE of five blocks)
    other_xl = pipeline_folder(tmp_path / "other" / "xl")
    pipeline_folder(tmp_path / "flux", "FluxPipeline")
    shutil.rmtree(pipeline_folder(tmp_path / "no-vae") / "vae")
    (tmp_path / "no-index").mkdir()
    spec = small_spec(
        tmp_path,
        base_model=[
            "tiny",
            "./flux",
            {"id": "./xl", "resolution": 40},
            "./xl/../xl",
            "./no-index",
            {"id": "tiny-sdxl", "precision": "bf16"},
            "tiny",
            "./no-vae",
            "./other/xl",
        ],
        train={"resolution": 72},
    )
    problems = problems_of(write_spec(tmp_path, spec))
    supported = "sd1 (StableDiffusionPipeline), sd2 (StableDiffusionPipeline), sdxl"
    assert problems[0].startswith(
        f"base_model[1].id: {tmp_path / 'flux'}: model_index.json's _class_name is "
        f"'FluxPipeline', not a supported family; supported: {supported}"
    )
    assert problems[1].startswith(
        f"base_model[4].id: {tmp_path / 'no-index'} is not a diffusers pipeline folder: it has "
        f"no model_index.json; supported families: {supported}"
    )
    assert problems[2] == (
        "base_model[5].precision: unknown key; allowed keys: id, resolution, mixed_precision"
    )
    assert problems[3].startswith(
        f"base_model[7].id: {tmp_path / 'no-vae'} is not a diffusers pipeline folder: it has "
        "no vae/config.json"
    )
    assert problems[4:] == [
        f"base_model[3]: {str(xl)!r} is the same model as base_model[2]; list each model once",
        "base_model[6]: 'tiny' is the same model as base_model[0]; list each model once",
        f"base_model[8]: {str(other_xl)!r} has the short name 'xl' of base_model[2] "
        f"({str(xl)!r}), which names its trials' labels and registered models; rename one of "
        "the folders",
        f"base_model[2].resolution: 40 px is not a multiple of 16, the pixel multiple "
        f"{str(xl)!r} (sdxl) can take; use e.g. 32",
        f"train.resolution: 72 px is not a multiple of 16, the pixel multiple {str(other_xl)!r} "
        "(sdxl) can take; use e.g. 64",  # once: base_model[3] is the same model as [2]
    ]
    # Valid entries validate the same checks in the cross-section pass; a hub id and a folder
    # of one short name (`a/b`, `a--b`) are refused too; a toy model at 80 px is valid.
    pipeline_folder(tmp_path / "a--b")
    spec["base_model"] = [
        "tiny",
        {"id": "./xl", "resolution": 40},
        "tiny",
        "a/b",
        "./a--b",
        {"id": "tiny-sdxl", "resolution": 80},
    ]
    del spec["train"]["resolution"]
    assert problems_of(write_spec(tmp_path, spec)) == [
        "base_model[2]: 'tiny' is the same model as base_model[0]; list each model once",
        f"base_model[4]: {str(tmp_path / 'a--b')!r} has the short name 'a--b' of base_model[3] "
        "('a/b'), which names its trials' labels and registered models; rename one of the "
        "folders",
        f"base_model[1].resolution: 40 px is not a multiple of 16, the pixel multiple "
        f"{str(xl)!r} (sdxl) can take; use e.g. 32",
    ]


def test_a_resolved_spec_with_several_models_loads_back_to_the_same_trials(
    tmp_path: Path,
) -> None:
    """Written with every default filled in (train.resolution then set), a folder that took
    its family's native resolution keeps it: the written entry carries it."""
    from launch.grid import expand_grid

    pipeline_folder(tmp_path / "xl")
    spec = small_spec(
        tmp_path, base_model=["tiny", "./xl", {"id": "tiny-sd2", "mixed_precision": "bf16"}]
    )
    del spec["train"]["resolution"]
    spec = load_spec(write_spec(tmp_path, spec))
    assert [(m.resolution, m.mixed_precision) for m in spec.base_models] == [
        (512, "no"),  # train.resolution's default, as `tiny` always trained (same trial ids)
        (1024, "no"),  # sdxl's
        (64, "bf16"),  # a toy's own, not sd2's 768 for v-prediction
    ]
    written = spec.model_dump(mode="json")
    assert written["base_model"] == [
        "tiny",
        {"id": str(tmp_path / "xl"), "resolution": 1024},
        {"id": "tiny-sd2", "resolution": 64, "mixed_precision": "bf16"},
    ]
    again = load_spec(write_spec(tmp_path, written, "resolved.yaml"))
    assert [t.trial_id for t in expand_grid(again)] == [t.trial_id for t in expand_grid(spec)]
    assert (
        yaml.safe_load(
            yaml.safe_dump(
                load_spec(REPO / "configs" / "tiny_quickstart.yaml").model_dump(mode="json")
            )
        )["base_model"]
        == "tiny"
    )  # one model: written as a value


def test_a_hub_model_without_a_resolution_is_warned_about(tmp_path: Path) -> None:
    """A hub id's family is unknown offline: it trains at train.resolution's default, 512."""
    from launch.preflight import model_warnings

    models = ["tiny", "org/some-sdxl", {"id": "org/b", "resolution": 64}]
    spec = small_spec(tmp_path, base_model=models)
    del spec["train"]["resolution"]
    assert model_warnings(load_spec(write_spec(tmp_path, spec))) == [
        "base_model[1]: 'org/some-sdxl' is a hub id and no resolution is set, so its trials "
        "train at train.resolution's default, 512 px, whatever its family (SD 2.x 768-v models "
        "are trained at 768, SDXL at 1024); set base_model[1].resolution or train.resolution"
    ]
    spec["base_model"] = "org/some-sdxl"
    assert model_warnings(load_spec(write_spec(tmp_path, spec)))[0].startswith("base_model: ")
    spec["train"]["resolution"] = 512  # set: what the user chose
    assert model_warnings(load_spec(write_spec(tmp_path, spec))) == []


def test_a_lora_format_list_without_diffusers_is_refused(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, export={"lora_format": ["kohya"]})
    assert problems_of(write_spec(tmp_path, spec)) == [
        "export.lora_format: 'diffusers' is left out, the file evaluation and "
        "load_trained_pipeline load; list it, e.g. [diffusers, kohya] (got ['kohya'])"
    ]
    spec["export"]["lora_format"] = ["kohya", "diffusers"]
    assert load_spec(write_spec(tmp_path, spec)).export.lora_format == ["kohya", "diffusers"]


@pytest.mark.parametrize(
    "preset", sorted(p.name for p in (REPO / "configs" / "presets").glob("*.yaml"))
)
def test_every_memory_preset_validates_and_opens_with_its_command(preset: str) -> None:
    """Offline: a hub id is accepted as it is (its family is read once it is fetched)."""
    path = REPO / "configs" / "presets" / preset
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(f"# Run: dreamsweep run configs/presets/{preset}")
    spec = load_spec(path)
    assert spec.train.gradient_checkpointing and spec.train.optimizer == "adamw8bit"
    assert spec.train.cache_latents and spec.train.mixed_precision in ("bf16", "fp16")
    family_resolution = {"sdxl": 1024, "sd2": 768, "sd15": 512}[preset.split("_")[0]]
    assert [m.resolution for m in spec.base_models] == [family_resolution]
    from launch.grid import expand_grid

    assert len(expand_grid(spec)) == 1


def test_a_models_own_fp16_is_refused_on_a_machine_without_a_gpu(tmp_path: Path) -> None:
    """A model entry's precision overrides train's: the preflight checks each model's."""
    import torch

    from launch.preflight import missing_device

    if torch.accelerator.current_accelerator() is not None:
        pytest.skip("this machine has an accelerator: fp16 trains here")
    models = ["tiny", {"id": "tiny-sdxl", "mixed_precision": "fp16"}]
    spec = load_spec(write_spec(tmp_path, small_spec(tmp_path, base_model=models)))
    [problem] = missing_device(spec)
    assert problem.startswith("base_model[1].mixed_precision: 'fp16' needs a GPU")
    models = [{"id": "tiny", "mixed_precision": "bf16"}, "tiny-sdxl"]
    fp16 = small_spec(tmp_path, base_model=models, train={"mixed_precision": "fp16"})
    [problem] = missing_device(load_spec(write_spec(tmp_path, fp16)))
    assert problem.startswith("train.mixed_precision: 'fp16' needs a GPU")
    models = [
        {"id": "tiny", "mixed_precision": "bf16"},
        {"id": "tiny-sd2", "mixed_precision": "no"},
    ]
    bf16 = small_spec(tmp_path, base_model=models, train={"mixed_precision": "fp16"})
    assert missing_device(load_spec(write_spec(tmp_path, bf16))) == []


def test_validate_lists_the_compared_base_models(tmp_path: Path, validate: Validate) -> None:
    models = ["tiny", {"id": "tiny-sdxl", "resolution": 128, "mixed_precision": "bf16"}, "org/m"]
    status, out, err = validate(write_spec(tmp_path, small_spec(tmp_path, base_model=models)))
    assert status == 0, err
    assert "3 trials;" in out
    assert (
        "Base models compared: tiny (sd1, 64 px, no), tiny-sdxl (sdxl, 128 px, bf16), org/m "
        "(family read once fetched, 64 px, no)."
    ) in " ".join(out.split())
