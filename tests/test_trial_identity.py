"""A trial's id holds what changes its trajectory: the world size and the gradient accumulation
(with the batch size, the global batch of each step); a resume with another world size is
refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import Recorder, run_trial, small_spec, write_spec
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.models import BaseModel
from trainers.resume import TRAINER_STATE, TrialCheckpoints, WorldSizeMismatch


def trial_of(folder: Path, **overrides: object) -> TrialConfig:
    folder.mkdir(exist_ok=True)
    [trial] = expand_grid(load_spec(write_spec(folder, small_spec(folder, **overrides))))
    return trial


def test_the_id_follows_the_world_size_and_the_accumulation(tmp_path: Path) -> None:
    def trial_under(**overrides: object) -> TrialConfig:
        return trial_of(tmp_path, **overrides)

    one = trial_under(launcher={"kind": "local", "processes_per_trial": 1})
    four = trial_under(launcher={"kind": "local", "processes_per_trial": 4})
    slurm_four = trial_under(launcher={"kind": "slurm", "nodes": 2, "processes_per_node": 2})
    slurm_two = trial_under(launcher={"kind": "slurm", "nodes": 2})
    slurm_one = trial_under(launcher={"kind": "slurm"})
    ray_two = trial_under(launcher={"kind": "ray", "processes_per_trial": 2})
    accumulating = trial_under(train={"gradient_accumulation_steps": 2})

    sizes = [t.world_size for t in (one, four, slurm_four, slurm_two, slurm_one, ray_two)]
    assert sizes == [1, 4, 4, 2, 1, 2]
    assert len({one.trial_id, four.trial_id, slurm_two.trial_id, accumulating.trial_id}) == 4
    # The same global batch trains the same trajectory, whichever launcher starts it.
    assert slurm_four.trial_id == four.trial_id
    assert slurm_one.trial_id == one.trial_id
    assert ray_two.trial_id == slurm_two.trial_id
    # Trials of different ids live in different folders: no checkpoint is shared.
    assert four.output_dir != one.output_dir
    # The same spec keeps one id, and the id survives trial.json.
    assert trial_under(launcher={"kind": "local", "processes_per_trial": 4}) == four
    again = TrialConfig.model_validate_json(four.model_dump_json())
    assert again.world_size == 4 and again.trial_id == four.trial_id


def smallest_model() -> BaseModel:
    """The base model's parts at the smallest sizes their classes take (one block each): what a
    checkpoint saves and restores does not depend on their size, and loading the `tiny` model
    (with its tokenizer and noise schedule) costs seconds this test does not need."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,  # nothing here tokenizes
        noise_scheduler=DDPMScheduler(),
        source="built by the test",
    )


def trial_checkpoints(trial: TrialConfig) -> TrialCheckpoints:
    """The trial's checkpoints as `train_trial` builds them (its method, optimizer and
    schedule, prepared by its accelerator), on the smallest model, without data, evaluation or
    steps."""
    from accelerate.state import AcceleratorState

    from cluster.accelerator import make_accelerator
    from trainers.batches import batch_generator
    from trainers.loop import setup_method, setup_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = make_accelerator(trial.train)
    model = smallest_model()
    method, trainable = setup_method(
        trial, model, frozen_dtype=torch.float32, device=accelerator.device
    )
    training = setup_optimizer(trial, model, trainable, accelerator)
    return TrialCheckpoints(
        config=trial,
        accelerator=accelerator,
        reporter=Recorder(),
        method=method,
        model=model,
        optimizer=training.optimizer,
        lr_scheduler=training.lr_scheduler,
        generator=batch_generator(trial.seed),
    )


def test_a_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    trial = trial_of(tmp_path)
    assert trial.world_size == 1
    checkpoints = trial_checkpoints(trial)
    checkpoints.save(2)
    step, folder = latest_checkpoint(checkpoints_root(trial))
    assert step == 2
    assert torch.load(folder / TRAINER_STATE, weights_only=True)["world_size"] == 1
    name, parameter = next(iter(checkpoints.named_trainable.items()))
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.add_(1.0)  # trained on after the save

    # The same model and optimizer, under a config that says 2 processes.
    doubled = replace(checkpoints, config=trial.model_copy(update={"world_size": 2}))
    assert doubled.root == checkpoints.root
    with pytest.raises(WorldSizeMismatch) as refused:
        doubled.resume()
    message = str(refused.value)
    assert str(folder) in message
    assert "on 1 process, and this run has 2 processes" in message
    assert "run it with 1 process (launcher.processes_per_trial" in message
    assert "start a new trial" in message
    # Refused before anything was restored; the checkpoint is left as it was, and a run with the
    # checkpoint's world size still resumes from it.
    torch.testing.assert_close(parameter.detach(), saved + 1.0, rtol=0, atol=0, msg=name)
    assert latest_checkpoint(checkpoints_root(trial)) == (2, folder)
    assert checkpoints.resume() == 2
    torch.testing.assert_close(parameter.detach(), saved, rtol=0, atol=0, msg=name)


def test_a_trial_run_under_another_world_size_is_refused_before_any_work(tmp_path: Path) -> None:
    trial = trial_of(tmp_path).model_copy(update={"world_size": 2})
    recorder = Recorder()
    with pytest.raises(WorldSizeMismatch, match=r"has world size 2 .* and this run's is 1"):
        run_trial(trial, recorder)
    assert not hasattr(recorder, "start_step") and recorder.losses == {}
    assert not checkpoints_root(trial).exists()
