"""Grid expansion: one trial per (subject, method, num_images, the method's learning rates, seed),
stable ids."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import copy_subject, small_spec, write_spec

from contract.spec import load_spec
from launch.grid import expand_grid


def test_grid_is_the_cross_product_in_a_stable_order(tmp_path: Path) -> None:
    copy_subject("mug", tmp_path / "subjects" / "mug")
    spec = small_spec(
        tmp_path,
        methods={"lora": {"learning_rate": [1e-4, 1e-3]}, "dreambooth": None},
        grid={"num_images": [2, 4]},
    )
    spec["subjects"].append({"name": "mug", "images": "subjects/mug", "class_token": "cup"})
    trials = expand_grid(load_spec(write_spec(tmp_path, spec)))
    # Each method crosses its own learning rates (dreambooth's default: 5e-6).
    assert [t.label for t in trials] == [
        f"{subject}/{method}/n={n}/lr={lr}/seed=0"
        for subject in ("robot", "mug")
        for method, rates in (("dreambooth", ("5e-06",)), ("lora", ("0.0001", "0.001")))
        for n in (2, 4)
        for lr in rates
    ]
    assert len({t.trial_id for t in trials}) == 12
    assert trials[0].eval_steps == [0, 2, 4]
    assert trials[0].checkpoint_steps == [2, 4]
    assert [p.name for p in trials[1].image_files] == ["00.png", "01.png", "02.png", "03.png"]


def test_growing_a_list_keeps_the_finished_trials(tmp_path: Path) -> None:
    """Adding a learning rate, changing what is kept, or changing prior settings that a method
    does not use must not orphan the trials already run."""
    base = small_spec(tmp_path, methods={"lora": {"learning_rate": [1e-3]}})
    [trial] = expand_grid(load_spec(write_spec(tmp_path, base)))
    grown = small_spec(
        tmp_path,
        methods={"lora": {"learning_rate": [1e-3, 1e-2]}},
        train={"prior": {"num_class_images": 7}, "checkpoints": {"keep_last": 1}},
    )
    ids = [t.trial_id for t in expand_grid(load_spec(write_spec(tmp_path, grown)))]
    assert ids[0] == trial.trial_id and len(set(ids)) == 2
    # With prior preservation on, the prior settings are part of the trial.
    with_prior = {"lora": {"learning_rate": [1e-3], "prior_preservation": True}}
    first = expand_grid(load_spec(write_spec(tmp_path, small_spec(tmp_path, methods=with_prior))))
    changed = small_spec(tmp_path, methods=with_prior, train={"prior": {"num_class_images": 7}})
    second = expand_grid(load_spec(write_spec(tmp_path, changed)))
    assert first[0].trial_id != second[0].trial_id


def test_trial_ids_follow_content_not_location(tmp_path: Path) -> None:
    first = tmp_path / "a"
    first.mkdir()
    ids = [t.trial_id for t in expand_grid(load_spec(write_spec(first, small_spec(first))))]
    moved = tmp_path / "b"
    shutil.copytree(first, moved)
    moved_spec = load_spec(moved / "sweep.yaml")
    assert [t.trial_id for t in expand_grid(moved_spec)] == ids
    # Different images → a different trial; different selection weights → the same trial.
    (moved / "subjects" / "robot" / "00.png").write_bytes(
        (moved / "subjects" / "robot" / "02.png").read_bytes()
    )
    assert [t.trial_id for t in expand_grid(load_spec(moved / "sweep.yaml"))] != ids
    reweighted = small_spec(first, selection={"weights": {"similarity": 1.0}})
    assert [t.trial_id for t in expand_grid(load_spec(write_spec(first, reweighted)))] == ids


def test_a_metrics_settings_count_only_when_it_is_measured_and_weights_by_content(
    tmp_path: Path,
) -> None:
    first = tmp_path / "a"
    first.mkdir()
    ids = [t.trial_id for t in expand_grid(load_spec(write_spec(first, small_spec(first))))]
    unmeasured = small_spec(first, eval={"kid_subsets": 7, "fid_weights": "https://x/w.pth"})
    assert [t.trial_id for t in expand_grid(load_spec(write_spec(first, unmeasured)))] == ids

    (first / "inception.pth").write_bytes(b"weights")
    fid = {"metrics": ["similarity", "fid"], "fid_reference": "subjects/robot"}
    with_file = small_spec(first, eval={**fid, "fid_weights": "inception.pth"})
    fid_ids = [t.trial_id for t in expand_grid(load_spec(write_spec(first, with_file)))]
    assert fid_ids != ids
    moved = tmp_path / "b"
    shutil.copytree(first, moved)  # the weights file by content, not by where it lies
    assert [t.trial_id for t in expand_grid(load_spec(moved / "sweep.yaml"))] == fid_ids
    (moved / "inception.pth").write_bytes(b"other weights")
    assert [t.trial_id for t in expand_grid(load_spec(moved / "sweep.yaml"))] != fid_ids

    # Files no chosen metric loads are neither read nor checked, and change no id.
    dino_fid = {**fid, "fid_features": "dino"}
    unread = [
        small_spec(first, eval={**dino_fid, "fid_weights": "gone/inception.pth"}),
        small_spec(first, eval={**dino_fid, "aesthetics_head": "gone/head.pth"}),
    ]
    dino_ids = [t.trial_id for t in expand_grid(load_spec(write_spec(first, unread[0])))]
    assert [t.trial_id for t in expand_grid(load_spec(write_spec(first, unread[1])))] != dino_ids
    plain = small_spec(first, eval=dino_fid)
    assert [t.trial_id for t in expand_grid(load_spec(write_spec(first, plain)))] == dino_ids


def test_trial_config_round_trips_through_json(tmp_path: Path) -> None:
    methods = ["dreambooth", "lora", "textual_inversion"]
    trials = expand_grid(load_spec(write_spec(tmp_path, small_spec(tmp_path, methods=methods))))
    for trial in trials:
        again = type(trial).model_validate_json(trial.model_dump_json())
        assert again == trial and again.trial_id == trial.trial_id
        assert type(again.options) is type(trial.options)
    trial = trials[0]
    assert trial.output_dir == tmp_path / "runs" / "small" / "trials" / f"robot-{trial.trial_id}"


def test_the_quickstart_trials_keep_their_ids() -> None:
    """A trial's id is how a re-run finds it finished: a change to what is hashed (a new spec
    field, a new default) must not silently retrain every sweep already run. These are the ids
    the quickstart's trials have had since the world size and the FID/KID settings were added
    (they are left out where they change nothing; so is the oracle's). The quickstart was
    configs/tiny_quickstart.yaml until it moved to the toy world: under its old name (the sweep's
    name is part of the id) its trials still hash as they did."""
    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / "tiny_quickstart.yaml")
    renamed = {trial.label: trial.trial_id for trial in expand_grid(spec)}
    ids = {t.label: t.trial_id for t in expand_grid(spec.model_copy(update={"name": "quickstart"}))}
    assert renamed.keys() == ids.keys() and not set(renamed.values()) & set(ids.values())
    assert ids == {
        "robot/dreambooth/n=2/lr=0.0001/seed=0": "d02ab9a1ce89",
        "robot/dreambooth/n=4/lr=0.0001/seed=0": "dd931e5e7db3",
        "robot/lora/n=2/lr=0.001/seed=0": "076b550ad3f3",
        "robot/lora/n=4/lr=0.001/seed=0": "3bce63fdd7f4",
        "robot/textual_inversion/n=2/lr=0.005/seed=0": "c14650142760",
        "robot/textual_inversion/n=4/lr=0.005/seed=0": "114d0112d6b6",
        "mug/dreambooth/n=2/lr=0.0001/seed=0": "04ce90ee566c",
        "mug/dreambooth/n=4/lr=0.0001/seed=0": "c5d4a1ab833b",
        "mug/lora/n=2/lr=0.001/seed=0": "87db69d51015",
        "mug/lora/n=4/lr=0.001/seed=0": "54615e82f04b",
        "mug/textual_inversion/n=2/lr=0.005/seed=0": "95ce88f7a45c",
        "mug/textual_inversion/n=4/lr=0.005/seed=0": "5e3bbb7f2d67",
    }


def test_base_models_are_a_grid_axis_with_their_own_train_settings(tmp_path: Path) -> None:
    """A list of models crosses every subject × method (next to the subject); the first
    model's trials keep the ids they had as the only model, each model trains with its own
    resolution and precision, and labels name the model once there are several."""
    one = small_spec(tmp_path, methods=["lora", "textual_inversion"])
    alone = expand_grid(load_spec(write_spec(tmp_path, one)))
    models = ["tiny", {"id": "tiny-sdxl", "resolution": 128, "mixed_precision": "bf16"}]
    spec = load_spec(write_spec(tmp_path, small_spec(tmp_path, **{**one, "base_model": models})))
    trials = expand_grid(spec)
    assert [t.label for t in trials] == [
        f"robot/{method}/{model}/n=2/lr={lr}/seed=0"
        for model in ("tiny", "tiny-sdxl")
        for method, lr in (("lora", "0.0001"), ("textual_inversion", "0.0005"))
    ]
    assert [t.trial_id for t in trials[:2]] == [t.trial_id for t in alone]
    assert [t.label for t in alone] == [t.label.replace("/tiny/", "/") for t in trials[:2]]
    assert len({t.trial_id for t in trials}) == 4
    assert [(t.base_model, t.train.resolution, t.train.mixed_precision) for t in trials] == [
        ("tiny", 64, "no"),
        ("tiny", 64, "no"),
        ("tiny-sdxl", 128, "bf16"),
        ("tiny-sdxl", 128, "bf16"),
    ]
    # An override equal to train's value is the same trial as no override.
    same = small_spec(tmp_path, **{**one, "base_model": {"id": "tiny", "resolution": 64}})
    assert [t.trial_id for t in expand_grid(load_spec(write_spec(tmp_path, same)))] == [
        t.trial_id for t in alone
    ]


def test_a_search_samples_each_base_model_s_group_as_that_model(tmp_path: Path) -> None:
    """A sampled trial is its group's: the group's base model, with its own resolution, and
    labelled as the group."""
    from launch.search_study import sampled_trial, search_groups

    space = {"methods.lora.rank": {"type": "int", "low": 2, "high": 8}}
    models = ["tiny", {"id": "tiny-sdxl", "resolution": 128}]
    spec = small_spec(
        tmp_path, base_model=models, search={"kind": "optuna", "n_trials": 2, "space": space}
    )
    spec = load_spec(write_spec(tmp_path, spec))
    groups = search_groups(spec)
    assert [g.base.label for g in groups] == [
        "robot/lora/tiny/n=2/lr=0.001/seed=0",
        "robot/lora/tiny-sdxl/n=2/lr=0.001/seed=0",
    ]
    for group, resolution in zip(groups, (64, 128), strict=True):
        trial = sampled_trial(spec, group.base, {"methods.lora.rank": 6})
        assert (trial.base_model, trial.train.resolution) == (group.base.base_model, resolution)
        assert (trial.label, trial.options.rank) == (group.base.label, 6)
        assert trial.trial_id != group.base.trial_id


def test_registered_model_names_name_the_base_model_only_when_asked() -> None:
    """A one-model sweep keeps `<sweep>.<subject>.<method>`; several models add each model's
    short name, which MLflow accepts (no `/` or `:`)."""
    from contract.layout import model_short_name, registered_model_name

    assert registered_model_name("s", "robot", "lora") == "s.robot.lora"
    assert registered_model_name("s", "robot", "lora", "tiny-sdxl") == "s.robot.lora.tiny-sdxl"
    assert model_short_name("/models/sdxl-base/") == "sdxl-base"
    hub = registered_model_name("s", "robot", "lora", "stabilityai/stable-diffusion-xl-base-1.0")
    assert hub == "s.robot.lora.stabilityai--stable-diffusion-xl-base-1.0"
