"""Packed trials through the launchers (`launcher.pack`): what validation refuses and says, how
trials are grouped, and the quickstart's packable trials packed on the local launcher and on a
real SLURM cluster, each with the id and curves it has in the (unpacked) quickstart."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_subject, dreamsweep, small_spec, write_spec
from mlflow.tracking import MlflowClient

from contract.layout import (
    METRIC_BEST_SCORE,
    METRIC_BEST_STEP,
    METRIC_COLLAPSE_STEP,
    METRIC_EVAL_SECONDS,
)
from contract.packs import PACK_JSON, PackFile, group_packs, pack_key, packing_notes
from contract.spec import SpecError, load_any_spec, load_spec
from contract.trial import TrialConfig
from launch.cli import main as cli_main
from launch.grid import expand_grid


def problems_of(path: Path) -> list[str]:
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    return caught.value.problems


# --- validation ---------------------------------------------------------------------------


def test_packs_are_refused_with_what_a_pack_cannot_share(tmp_path: Path) -> None:
    """Several processes per trial, DeepSpeed and fp16 (train's, or a base model's) cannot train
    in one pack: each is refused with its reason, all at once."""
    spec = small_spec(
        tmp_path,
        base_model=["tiny", {"id": "tiny-sd2", "mixed_precision": "fp16"}],
        train={"deepspeed": {"zero_stage": 2}},
        launcher={"kind": "local", "pack": 4, "processes_per_trial": 2},
    )
    packing = [p for p in problems_of(write_spec(tmp_path, spec)) if "launcher.pack" in p]
    assert packing == [
        "launcher.pack: 4 with launcher.processes_per_trial 2: a pack trains in one process, "
        "and these trials train on 2; set launcher.pack: 1, or train each trial in one process",
        "launcher.pack: 4 with train.deepspeed: DeepSpeed partitions one model's optimizer "
        "state across a trial's processes, and a pack trains in one process; set "
        "launcher.pack: 1 or drop train.deepspeed",
        "launcher.pack: 4 with base_model[1].mixed_precision fp16: fp16 trains with a loss "
        "scaler per trial, and one scaler for a pack would skip every member's step when one "
        "member overflows; use bf16 or no mixed precision, or set launcher.pack: 1",
    ]
    spec = small_spec(
        tmp_path,
        train={"mixed_precision": "fp16"},
        launcher={"kind": "slurm", "pack": 2, "nodes": 2},
    )
    assert problems_of(write_spec(tmp_path, spec)) == [
        "launcher.pack: 2 with launcher.nodes 2 × processes_per_node 1: a pack trains in one "
        "process, and these trials train on 2; set launcher.pack: 1, or train each trial in "
        "one process",
        "launcher.pack: 2 with train.mixed_precision fp16: fp16 trains with a loss scaler per "
        "trial, and one scaler for a pack would skip every member's step when one member "
        "overflows; use bf16 or no mixed precision, or set launcher.pack: 1",
    ]
    # The same settings without packing are another matter (one process, bf16): accepted.
    spec = small_spec(
        tmp_path, train={"mixed_precision": "bf16"}, launcher={"kind": "local", "pack": 4}
    )
    assert load_spec(write_spec(tmp_path, spec)).launcher.pack == 4


def test_ray_and_searches_refuse_packs_and_say_why(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, launcher={"kind": "ray", "pack": 2})
    assert problems_of(write_spec(tmp_path, spec)) == [
        "launcher.pack: packed trials are not supported on the Ray launcher yet: Tune runs and "
        "its scheduler (ASHA, median) stops each trial as a trainable of its own; set "
        "launcher.pack: 1, or pack with the local or SLURM launcher (got 2)"
    ]
    spec = small_spec(
        tmp_path,
        launcher={"kind": "local", "pack": 2},
        search={
            "kind": "optuna",
            "n_trials": 2,
            "space": {"methods.lora.rank": {"type": "int", "low": 2, "high": 8}},
        },
    )
    assert problems_of(write_spec(tmp_path, spec)) == [
        "launcher.pack: 2 with search.kind 'optuna': packs group a grid's trials, and a search "
        "asks its trials one at a time; set launcher.pack: 1"
    ]


def test_validate_counts_the_packs_and_names_the_trials_that_train_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = small_spec(
        tmp_path,
        methods={"dreambooth": {}, "lora": {}, "textual_inversion": {}},
        grid={"num_images": [1, 2, 3]},
        launcher={"kind": "local", "pack": 2},
    )
    assert cli_main(["validate", str(write_spec(tmp_path, spec))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  pack: 2" in lines  # the resolved spec
    notes = [line for line in lines if line.startswith("launcher.pack 2:")]
    assert notes == [
        # lora: a pack of 2 and one alone; the same for textual inversion; 3 DreamBooth alone
        "launcher.pack 2: 9 trial(s) train in 7 worker(s): 2 pack(s) of 4 trial(s), "
        "5 trial(s) alone.",
        "launcher.pack 2: 3 dreambooth trial(s) train alone (dreambooth fine-tunes the base "
        "model itself, which a pack's members share; packable methods: lora, "
        "textual_inversion).",
    ]
    spec["launcher"] = {"kind": "local", "pack": 1}
    assert cli_main(["validate", str(write_spec(tmp_path, spec))]) == 0
    assert "launcher.pack" not in capsys.readouterr().out


# --- grouping -----------------------------------------------------------------------------


def grid_trials(tmp_path: Path, **overrides: object) -> list[TrialConfig]:
    return expand_grid(load_spec(write_spec(tmp_path, small_spec(tmp_path, **overrides))))


def test_group_packs_keeps_unpackable_trials_alone_and_groups_by_key_in_order(
    tmp_path: Path,
) -> None:
    copy_subject("mug", tmp_path / "subjects" / "mug")
    trials = grid_trials(
        tmp_path,
        subjects=[
            {"name": "robot", "images": "subjects/robot", "class_token": "toy"},
            {"name": "mug", "images": "subjects/mug", "class_token": "cup"},
        ],
        methods={
            "dreambooth": {},
            "lora": {"learning_rate": [1e-3, 2e-3]},
            "textual_inversion": {},
        },
        grid={"num_images": [1, 2]},
    )
    labels = {t.trial_id: t.label for t in trials}

    def shown(packs: list[list[TrialConfig]]) -> list[list[str]]:
        return [[labels[t.trial_id] for t in pack] for pack in packs]

    # grid order: subject, method (dreambooth, lora, textual_inversion), num_images, lr
    robot, mug = trials[:8], trials[8:]
    by_method = {m: [t for t in trials if t.method == m] for m in ("dreambooth", "lora")}
    textual = [t for t in trials if t.method == "textual_inversion"]
    packs = group_packs(trials, 4)
    # Each pack forms when its first member comes and takes the next of its key, whatever the
    # subject, up to 4; DreamBooth trials are alone; the order of the trials is kept.
    assert shown(packs) == shown(
        [
            [robot[0]],
            [robot[1]],
            by_method["lora"][:4],
            textual[:4],
            [mug[0]],
            [mug[1]],
            by_method["lora"][4:],
        ]
    )
    assert [len(p) for p in group_packs(by_method["lora"], 3)] == [3, 3, 2]  # chunked
    assert all(len(p) == 1 for p in group_packs(trials, 1))  # pack 1: every trial alone
    # Another rank is another key: it shares no pack (nor does another base model or setting).
    other = by_method["lora"][1].model_copy(
        update={"options": by_method["lora"][1].options.model_copy(update={"rank": 8})}
    )
    assert pack_key(other) != pack_key(by_method["lora"][0])
    labels[other.trial_id] = "rank 8"
    mixed = [by_method["lora"][0], other, by_method["lora"][2], by_method["lora"][3]]
    assert shown(group_packs(mixed, 4)) == shown([[mixed[0], mixed[2], mixed[3]], [other]])
    assert packing_notes(trials, 1) == []


# --- inference studies --------------------------------------------------------------------


def test_an_inference_study_refuses_packs_and_says_why(tmp_path: Path) -> None:
    """An inference study has no trials to pack: its `launcher.pack` is refused, not ignored."""
    study = {
        "kind": "inference",
        "name": "study",
        "models": ["tiny"],
        "schedulers": ["ddim"],
        "num_inference_steps": [2],
        "resolution": 64,
        "prompts": {"template": "object", "n": 2},
        "metrics": {"names": ["aesthetics"], "clip_model": "tiny", "aesthetics_head": "tiny"},
    }
    for launcher in ({"kind": "local", "pack": 2}, {"kind": "slurm", "pack": 3}):
        path = write_spec(tmp_path, {**study, "launcher": launcher}, "study.yaml")
        with pytest.raises(SpecError) as caught:
            load_any_spec(path)
        assert caught.value.problems == [
            f"launcher.pack: {launcher['pack']} in an inference study: packs group a training "
            "sweep's trials, and an inference study has none (its workers split the images "
            "into shards, shards.prompts_per_shard); set launcher.pack: 1 or drop it"
        ]
    path = write_spec(tmp_path, {**study, "launcher": {"kind": "local", "pack": 1}}, "study.yaml")
    assert load_any_spec(path).launcher.pack == 1


# --- packed sweeps, end to end ------------------------------------------------------------

PACKABLE = ("lora", "textual_inversion")


def quickstart_cut(folder: Path, subjects: list[str], launcher: dict) -> Path:
    """configs/ copied into `folder`, its tiny_quickstart.yaml cut to the LoRA and
    textual-inversion trials of `subjects` (DreamBooth trains alone in a packed sweep: nothing
    to show) and run on `launcher`. Its name stays `tiny_quickstart`, so each trial keeps its
    id; its outputs and MLflow store are the copy's (runs/tiny_quickstart in `folder`)."""
    shutil.copytree(REPO / "configs", folder / "configs")
    path = folder / "configs" / "tiny_quickstart.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["subjects"] = [s for s in spec["subjects"] if s["name"] in subjects]
    spec["methods"] = {m: options for m, options in spec["methods"].items() if m in PACKABLE}
    spec["launcher"] = launcher
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


NOT_CURVES = {METRIC_EVAL_SECONDS, METRIC_BEST_STEP, METRIC_BEST_SCORE, METRIC_COLLAPSE_STEP}
"""Wall times, and what `dreamsweep select` logs to a trial's run."""


def curves(path: Path) -> dict[str, tuple[str, dict[str, dict[int, float]]]]:
    """Trial label → (trial id, every curve it trained: key → step → value), for a sweep whose
    trials all FINISHED; each (key, step) once."""
    spec = load_spec(path)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
    )
    out = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("dreamsweep.error")
        histories = {}
        for key in sorted(set(run.data.metrics) - NOT_CURVES):
            logged = client.get_metric_history(run.info.run_id, key)
            histories[key] = {m.step: m.value for m in logged}
            assert len(histories[key]) == len(logged), (run.info.run_name, key)
        out[run.info.run_name] = (run.data.tags["dreamsweep.trial_id"], histories)
    return out


TRAINING_CURVES = ("loss", "lr")
METRIC_ABSOLUTE = 5e-5
"""Losses agree to rounding (seen: 2.3e-7 relative). Every evaluation, step 0's (the base model)
included, samples the pack's members in one batch (trainers/pack_evaluation.py), and the batch's
composition moves the last bits: the metrics are cosines of embeddings of images sampled at
guidance 7.5, diversity a small difference of them (seen at step 0: 1.9e-7, 1.2e-4 relative).
Through training, Adam moves an element whose gradient is near zero by a visible part of a step
on rounding alone: seen up to 2.1e-5 (similarity, textual inversion at lr 1e-2, step 10; 4.6e-6
in the quickstart's trials), where similarity and clip_t move by 6e-4 and 8e-5 or more between
steps. The losses, held to 1e-5 at every step, are what tell a member trained on another's rows
or weights."""


def assert_the_quickstarts_trials_and_curves(
    packed: dict, quickstart: dict, subjects: list[str]
) -> None:
    """`packed` (from `curves`) holds the quickstart's LoRA and textual-inversion trials of
    `subjects`, by label and id, each with the curves it has in the (unpacked) quickstart."""
    plain = REPO / "configs" / "tiny_quickstart.yaml"
    expected = {
        t.label: t.trial_id
        for t in expand_grid(load_spec(plain))
        if t.method in PACKABLE and t.subject.name in subjects
    }
    assert {label: trial_id for label, (trial_id, _) in packed.items()} == expected
    alone = curves(quickstart["root"] / "configs" / "tiny_quickstart.yaml")
    for label, (trial_id, histories) in packed.items():
        alone_id, alone_histories = alone[label]
        assert alone_id == trial_id, label
        assert histories.keys() == alone_histories.keys() and "loss" in histories, label
        assert sorted(histories["similarity"]) == [0, 10, 20, 30], label
        for key, values in alone_histories.items():
            assert histories[key].keys() == values.keys(), (label, key)
            for step, value in values.items():
                absolute = 1e-7 if key in TRAINING_CURVES else METRIC_ABSOLUTE
                assert histories[key][step] == pytest.approx(value, rel=1e-5, abs=absolute), (
                    label,
                    key,
                    step,
                )


@pytest.mark.slow
def test_the_packed_quickstart_equals_the_quickstart_on_the_local_launcher_and_selects(
    quickstart: dict, tmp_path: Path
) -> None:
    """The quickstart's 8 LoRA and textual-inversion trials, 4 to a pack: 2 workers, one per
    method, and every trial the id and curves it has alone. The CLI gives each worker the
    quickstart's thread share (its `max_parallel` 2: cores // 2), so reductions add up alike."""
    subjects = ["robot", "mug"]
    path = quickstart_cut(tmp_path, subjects, {"kind": "local", "max_parallel": 2, "pack": 4})
    run = dreamsweep("run", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 to run in 2 workers (launcher.pack 4)" in run.stdout
    assert run.stdout.count(" finished (") == 8  # an outcome line per trial
    packed = curves(path)
    assert_the_quickstarts_trials_and_curves(packed, quickstart, subjects)

    spec = load_spec(path)
    trials = {t.trial_id: t for t in expand_grid(spec)}
    pack_files = sorted((spec.resolved_output_dir / "packs").glob(f"*/{PACK_JSON}"))
    assert len(pack_files) == 2
    for pack_file in pack_files:
        pack = PackFile.model_validate_json(pack_file.read_text())
        members = [TrialConfig.model_validate_json(p.read_text()) for p in pack.members]
        assert len({m.method for m in members}) == 1 and len(members) == 4
        assert {m.subject.name for m in members} == set(subjects)
        assert all(trials[m.trial_id].output_dir == m.output_dir for m in members)
        log = (pack_file.parent / "worker.log").read_text()
        assert f"pack {pack.pack_id}: training 4 trial(s) together" in log
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert {r.data.tags["dreamsweep.setup.pack_members"] for r in runs} == {"4"}

    select = dreamsweep("select", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert select.returncode == 0, select.stdout + select.stderr
    assert all(label in select.stdout for label in packed)
    # every subject × method's best checkpoint registered, from packed members' checkpoints
    for subject in subjects:
        for method in PACKABLE:
            assert f"models:/tiny_quickstart.{subject}.{method}@best" in select.stdout


@pytest.mark.slow
def test_the_packed_quickstart_on_slurm_runs_a_task_per_pack_requeues_and_equals_it(
    slurm_cluster, quickstart: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quickstart's LoRA and textual-inversion trials of one subject, `pack: 2` on SLURM:
    one array task per pack, each member recorded with its pack's job. SLURM's time-limit
    signal (USR2, delivered now by `scancel --signal`) to each task once its members
    checkpointed step 10: every member checkpoints its current step, the task requeues, and
    each member resumes from its own checkpoint into its run. Every curve equals the
    quickstart's, with no gap and no duplicate step; `status` shows each member. (A task has
    one CPU, one thread: the quickstart's share on this 2-core machine.)"""
    from test_slurm import squeue_reason, wait_for_jobs

    subjects = ["robot"]
    path = quickstart_cut(tmp_path, subjects, {"kind": "slurm", "pack": 2, "time_min": 10})
    submitted = dreamsweep("run", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    listed = [
        line.rsplit("job ", 1)[1] for line in submitted.stdout.splitlines() if ": pack " in line
    ]
    assert len(listed) == 4 and len({j.split("_")[0] for j in listed}) == 1  # of one array
    jobs = sorted(set(listed))
    assert len(jobs) == 2  # a task per pack
    spec = load_spec(path)
    recorded = json.loads((spec.resolved_output_dir / "slurm" / "jobs.json").read_text())
    assert sorted(r["job_id"] for r in recorded.values()) == sorted(listed)
    assert len({r["pack"] for r in recorded.values()}) == 2
    # Each pack's task is signalled once its members have checkpointed step 10: mid-trajectory.
    waiting = {
        job: [
            Path(r["output_dir"]) / "checkpoints" / "step_000010" / "COMPLETE"
            for r in recorded.values()
            if r["job_id"] == job
        ]
        for job in jobs
    }
    deadline = time.monotonic() + 300
    while waiting:
        for job, markers in list(waiting.items()):
            if all(marker.exists() for marker in markers):
                subprocess.run(["scancel", "--signal=USR2", job], check=True)
                del waiting[job]
        assert time.monotonic() < deadline, f"never reached step 10: {sorted(waiting)}"
        time.sleep(0.05)
    # SLURM holds a requeued job back for one credential lifetime (10 s on the dev cluster).
    requeued: set[str] = set()
    while requeued != set(jobs):
        requeued |= {job for job in jobs if "BeginTime" in squeue_reason(job)}
        assert time.monotonic() < deadline + 300, [squeue_reason(job) for job in jobs]
        time.sleep(0.5)
    wait_for_jobs(jobs, timeout=300)

    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert len(runs) == 4
    for run in runs:
        paused = int(run.data.tags["dreamsweep.paused_at_step"])
        assert 10 <= paused < 30, run.info.run_name
        assert run.data.tags["dreamsweep.resumed_from_step"] == str(paused), run.info.run_name
        assert run.data.tags["dreamsweep.setup.pack_members"] == "2", run.info.run_name
    # every step once, as in the quickstart
    assert_the_quickstarts_trials_and_curves(curves(path), quickstart, subjects)
    # In this process: the CLI's code, without a second start of Python and its imports.
    assert cli_main(["status", str(path)]) == 0
    status = capsys.readouterr().out
    assert status.count("FINISHED") == 4, status
    assert cli_main(["run", str(path)]) == 0
    assert "4 already done, 0 still in SLURM, 0 to submit" in capsys.readouterr().out


def test_the_packed_quickstart_is_the_quickstart_packed() -> None:
    """configs/quickstart_packed.yaml: the quickstart's trials (labels, settings), 4 to a pack:
    its LoRA and textual-inversion trials in one pack each, its DreamBooth trials alone."""
    packed = load_spec(REPO / "configs" / "quickstart_packed.yaml")
    plain = load_spec(REPO / "configs" / "tiny_quickstart.yaml")
    first = (REPO / "configs" / "quickstart_packed.yaml").read_text().splitlines()[0]
    assert first.startswith("# Run: dreamsweep run configs/quickstart_packed.yaml")
    assert packed.launcher.pack == 4
    ignored = {"name", "output_dir", "launcher"}
    assert packed.model_dump(exclude=ignored) == plain.model_dump(exclude=ignored)
    trials = expand_grid(packed)
    assert [t.label for t in trials] == [t.label for t in expand_grid(plain)]
    assert sorted(len(p) for p in group_packs(trials, packed.launcher.pack)) == [1] * 4 + [4, 4]
