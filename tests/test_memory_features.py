"""Each memory and speed option of `train:` is really on when asked for, and changes nothing it
should not: checked on the live objects (the setup the loop reports), the optimizer's states,
counted calls, and trajectories compared with the option off."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from conftest import Recorder, dreamsweep, run_trial, small_spec, write_spec
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from cluster.accelerator import deepspeed_config
from contract.cache import cache_root
from contract.spec import TrainSpec, load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from trainers.checkpoint import checkpoints_root, complete_checkpoints, steps_to_remove
from trainers.memory import MissingPackageError
from trainers.resume import TRAINER_STATE


def make_trial(folder: Path, methods: dict | None = None, **sections: dict) -> TrialConfig:
    folder.mkdir(parents=True)
    spec = small_spec(folder, methods=methods or {"lora": {"learning_rate": [1e-3]}}, **sections)
    [trial] = expand_grid(load_spec(write_spec(folder, spec)))
    return trial


def train(trial: TrialConfig) -> Recorder:
    recorder = Recorder()
    run_trial(trial, recorder)
    return recorder


@pytest.mark.slow
def test_8bit_adamw_keeps_its_states_in_8_bits(tmp_path: Path) -> None:
    trial = make_trial(
        tmp_path / "t",
        {"dreambooth": {"learning_rate": [1e-4], "prior_preservation": False}},
        train={"optimizer": "adamw8bit"},
    )
    recorder = train(trial)
    assert recorder.setup["optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit"
    _, newest = complete_checkpoints(checkpoints_root(trial))[-1]
    states = torch.load(newest / TRAINER_STATE, weights_only=True)["optimizer"]["state"]
    # bitsandbytes 0.50 packs each parameter's quantised state under one key.
    first_moments = [s.get("__bnb_optimizer_quant_state__", s)["state1"] for s in states.values()]
    # bitsandbytes quantises tensors of 4096+ elements to 8 bits; the UNet's big ones qualify.
    assert any(m.dtype == torch.uint8 for m in first_moments)
    assert all(m.dtype in (torch.uint8, torch.float32) for m in first_moments)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses.values())


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods = {"lora": {"learning_rate": [1e-3], "train_text_encoder": True}}
    plain = train(make_trial(tmp_path / "plain", methods))

    recomputed: list[str] = []
    original = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        owner = getattr(function, "__self__", function)
        recomputed.append(type(owner).__name__)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    checkpointed = train(
        make_trial(tmp_path / "ckpt", methods, train={"gradient_checkpointing": True})
    )
    assert checkpointed.setup["unet.gradient_checkpointing"] == "True"
    assert checkpointed.setup["text_encoder.gradient_checkpointing"] == "True"
    assert plain.setup["unet.gradient_checkpointing"] == "False"
    # The UNet's blocks really recompute (transformers binds its checkpoint function when
    # enabled, so the text encoder's layers are checked by their flag above).
    assert any("Block" in name for name in recomputed)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


@pytest.mark.slow
def test_cached_inputs_are_reused_and_equal_the_uncached_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes: list[int] = []
    original = AutoencoderKL.encode

    def counting_encode(self, x, *args, **kwargs):
        encodes.append(x.shape[0])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting_encode)
    first = train(make_trial(tmp_path / "first"))
    assert first.setup["offloaded"] == "vae,text_encoder"
    latent_files = list((cache_root() / "latents").glob("*.safetensors"))
    assert len(latent_files) >= 2  # one per image
    assert list((cache_root() / "prompt_embeddings").glob("*.safetensors"))

    # Another trial of the same subject (another learning rate) encodes nothing again.
    encodes.clear()
    other = make_trial(
        tmp_path / "second", {"lora": {"learning_rate": [3e-3]}}, grid={"max_steps": 2}
    )
    train(other)
    assert encodes == []

    # Without the caches, every step encodes its batch, and the trajectory is the same.
    uncached = train(
        make_trial(
            tmp_path / "uncached",
            train={"cache_latents": False, "cache_text_embeddings": False},
        )
    )
    assert uncached.setup["offloaded"] == "-"
    assert encodes == [1] * 4  # 4 steps × batch 1
    assert uncached.losses == pytest.approx(first.losses, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "trained_module", "trained_dtype", "frozen"),
    [
        ("lora", "unet", "float32", {"unet": "bfloat16", "vae": "bfloat16"}),
        ("dreambooth", "unet", "float32", {"vae": "bfloat16", "text_encoder": "bfloat16"}),
        ("textual_inversion", "text_encoder", "float32", {"unet": "bfloat16"}),
    ],
)
def test_bf16_holds_frozen_weights_low_and_trained_weights_in_fp32(
    tmp_path: Path, method: str, trained_module: str, trained_dtype: str, frozen: dict
) -> None:
    options = {"learning_rate": [1e-4]}
    if method == "dreambooth":
        options["prior_preservation"] = False
    recorder = train(
        make_trial(tmp_path / "t", {method: options}, train={"mixed_precision": "bf16"})
    )
    assert recorder.setup[f"{trained_module}.trained_dtype"] == trained_dtype
    for module, dtype in frozen.items():
        assert recorder.setup[f"{module}.frozen_dtype"] == dtype
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses.values())


@pytest.mark.slow
def test_gradient_accumulation_equals_one_bigger_batch(tmp_path: Path) -> None:
    big = make_trial(tmp_path / "big", train={"batch_size": 2})
    accumulated = make_trial(
        tmp_path / "acc", train={"batch_size": 1, "gradient_accumulation_steps": 2}
    )
    big_run, accumulated_run = train(big), train(accumulated)
    assert accumulated_run.losses == pytest.approx(big_run.losses, rel=1e-5)
    weights = [
        load_file(checkpoints_root(t) / "step_000004" / "pytorch_lora_weights.safetensors")
        for t in (big, accumulated)
    ]
    # One batch of 2 and two batches of 1 sum in a different order; Adam divides by the
    # gradients' scale, so float noise shows in near-zero elements (as with data parallelism).
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_xformers_asked_for_but_missing_is_a_clear_error(tmp_path: Path) -> None:
    # xformers has no build for the CPU torch these machines run, so it is missing here.
    assert importlib.util.find_spec("xformers") is None
    spec = small_spec(tmp_path, train={"attention": "xformers"})
    result = dreamsweep("validate", str(write_spec(tmp_path, spec)), cwd=tmp_path)
    assert result.returncode == 2
    assert "train.attention: 'xformers' needs the 'xformers' package" in result.stderr
    # A worker on another machine refuses the same way, before training.
    trial = make_trial(tmp_path / "t", train={"attention": "xformers"})
    with pytest.raises(MissingPackageError, match=r"train\.attention: 'xformers' needs"):
        train(trial)
    assert not checkpoints_root(trial).exists()


@pytest.mark.slow
def test_sdpa_is_the_default_attention(tmp_path: Path) -> None:
    recorder = train(make_trial(tmp_path / "t", grid={"max_steps": 2}))
    assert recorder.setup["unet.attention"] == "AttnProcessor2_0"


@pytest.mark.slow
def test_compiled_steps_train_the_trajectory_of_eager_ones_under_the_same_id(
    tmp_path: Path, one_thread: None
) -> None:
    # aot_eager: dynamo traces the trained modules and AOTAutograd builds their backward, as for
    # inductor, without generating kernels (inductor's cold compilation of even the tiny UNet
    # takes minutes on 2 cores: bench/throughput.py times it). Two compiled modules: UNet and
    # text encoder.
    torch.compiler.reset()  # dynamo's recompile limit counts per process: a fresh count
    methods = {"lora": {"learning_rate": [1e-3], "train_text_encoder": True}}
    eager_trial = make_trial(tmp_path / "eager", methods)
    compiled_trial = make_trial(tmp_path / "compiled", methods, train={"compile": "aot_eager"})
    assert compiled_trial.train.compile == "aot_eager"
    assert compiled_trial.trial_id == eager_trial.trial_id
    eager, compiled = train(eager_trial), train(compiled_trial)
    assert eager.setup["compiled"] == "-"
    assert compiled.setup["compiled"] == "unet,text_encoder"
    assert sorted(compiled.losses) == sorted(eager.losses) == [1, 2, 3, 4]
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    for step, metrics in eager.metrics.items():  # evaluation stays eager: the same images
        measured = {k: v for k, v in metrics.items() if not k.endswith("_seconds")}
        assert {k: compiled.metrics[step][k] for k in measured} == pytest.approx(measured, abs=1e-5)
    _, eager_folder = complete_checkpoints(checkpoints_root(eager_trial))[-1]
    _, compiled_folder = complete_checkpoints(checkpoints_root(compiled_trial))[-1]
    weights = "pytorch_lora_weights.safetensors"
    expected, got = load_file(eager_folder / weights), load_file(compiled_folder / weights)
    assert expected.keys() == got.keys() and expected
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6)


def test_compile_settings_are_checked_together(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        train={
            "compile_mode": "reduce-overhead",
            "deepspeed": {"zero_stage": 2},
            "compile": "aot_eager",
        },
    )
    with pytest.raises(ValueError) as raised:
        load_spec(write_spec(tmp_path, spec))
    message = str(raised.value)
    assert "train.compile_mode: 'reduce-overhead' is a mode of the inductor backend" in message
    assert "train.compile: 'aot_eager' cannot be combined with train.deepspeed" in message
    bad = small_spec(tmp_path, train={"compile": "yes"})
    with pytest.raises(ValueError, match="compile") as raised:
        load_spec(write_spec(tmp_path, bad, name="bad.yaml"))
    assert "'no', 'inductor' or 'aot_eager'" in str(raised.value)
    launcher = {"kind": "local", "processes_per_trial": 2}
    spread = small_spec(tmp_path, train={"compile": "inductor"}, launcher=launcher)
    with pytest.raises(ValueError) as raised:
        load_spec(write_spec(tmp_path, spread, name="spread.yaml"))
    assert "train.compile: 'inductor' with launcher.processes_per_trial 2" in str(raised.value)
    # YAML reads an unquoted `compile: no` as false: it means "no".
    unquoted = write_spec(tmp_path, small_spec(tmp_path, train={"compile": "unset"}), "no.yaml")
    unquoted.write_text(
        unquoted.read_text(encoding="utf-8").replace("compile: unset", "compile: no")
    )
    assert load_spec(unquoted).train.compile == "no"
    # How the steps run is no search axis: the trials would share one id.
    from contract.spec.search import searchable_fields

    spec = load_spec(unquoted)
    fields = searchable_fields(spec.methods, spec.train, spec.grid)
    assert "train.gradient_checkpointing" in fields and "train.compile" not in fields


def test_inductor_on_a_cpu_without_a_compiler_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launch.preflight import missing_compiler

    spec = load_spec(write_spec(tmp_path, small_spec(tmp_path, train={"compile": "inductor"})))
    assert missing_compiler(spec) == []  # this machine has g++
    monkeypatch.setenv("PATH", str(tmp_path / "no-compilers-here"))
    monkeypatch.delenv("CXX", raising=False)
    [problem] = missing_compiler(spec)
    assert problem.startswith("train.compile: 'inductor' on this machine's CPU needs a C++")
    eager = load_spec(write_spec(tmp_path, small_spec(tmp_path), name="eager.yaml"))
    assert missing_compiler(eager) == []


def test_deepspeed_config_is_generated_from_the_spec() -> None:
    train_spec = TrainSpec(
        batch_size=2,
        gradient_accumulation_steps=4,
        max_grad_norm=0.5,
        mixed_precision="bf16",
        deepspeed={"zero_stage": 2, "offload_optimizer": "cpu"},
    )
    assert deepspeed_config(train_spec) == {
        "zero_force_ds_cpu_optimizer": False,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "gradient_clipping": 0.5,
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
        },
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
    }


@pytest.mark.parametrize(
    ("steps", "keep_last", "protected", "removed"),
    [
        ([1, 2, 3], None, set(), []),
        ([1, 2, 3, 4], 2, set(), [1, 2]),
        ([1, 2, 3, 4, 5, 6], 2, {3, 6}, [1, 2, 4]),
        ([6, 3, 1], 1, set(), [1, 3]),
        ([2], 1, set(), []),
    ],
)
def test_retention_policy(
    steps: list[int], keep_last: int | None, protected: set[int], removed: list[int]
) -> None:
    assert steps_to_remove(steps, keep_last=keep_last, protected=protected) == removed


@pytest.mark.slow
def test_retention_keeps_eval_steps_and_the_newest_and_resume_state_only_once(
    tmp_path: Path,
) -> None:
    trial = make_trial(
        tmp_path / "t",
        grid={"max_steps": 6, "eval_every": 3},
        train={"checkpoints": {"every": 1, "keep_last": 2}},
    )
    recorder = train(trial)
    assert recorder.checkpoints == [1, 2, 3, 4, 5, 6]
    assert recorder.removed == [1, 2, 4]
    kept = complete_checkpoints(checkpoints_root(trial))
    assert [step for step, _ in kept] == [3, 5, 6]
    assert [(folder / TRAINER_STATE).exists() for _, folder in kept] == [False, False, True]
    assert all((folder / "pytorch_lora_weights.safetensors").exists() for _, folder in kept)

    # keep_last: 1 without keep_eval_steps (the best step is kept beside the newest): see
    # test_a_trained_trial_keeps_its_best_checkpoint_beside_the_newest (test_select_retention.py).


@pytest.mark.slow
def test_warmup_then_linear_decay_is_the_logged_schedule(tmp_path: Path) -> None:
    trial = make_trial(
        tmp_path / "t",
        grid={"max_steps": 6, "eval_every": 6},
        train={"lr_scheduler": "linear", "lr_warmup_steps": 2},
    )
    recorder = train(trial)
    # Logged as the diffusers scripts log it, after each step: up over the 2 warm-up steps,
    # then linearly down to 0 at the last step.
    expected = [5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0]
    assert [recorder.learning_rates[s] for s in range(1, 7)] == pytest.approx(expected)
