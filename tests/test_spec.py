"""The sweep spec rejects bad input with a message naming the file, the field and the value."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
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
    spec = load_spec(REPO / "configs" / "quickstart.yaml")
    assert spec.base_model == "tiny"
    assert spec.subjects[0].images == REPO / "configs" / "subjects" / "robot"
    assert spec.resolved_output_dir == REPO / "runs" / "quickstart"
    assert spec.tracking_uri == f"sqlite:///{REPO / 'runs' / 'quickstart' / 'mlflow.db'}"


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
        "keep_checkpoints",
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
