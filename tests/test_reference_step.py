"""The shared loop against a minimal hand-written LoRA DreamBooth step (plain torch + diffusers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, small_spec, write_spec
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from launch.grid import expand_grid
from launch.spec import load_spec
from trainers.data import load_subject_pixels
from trainers.loop import TRAINER_STATE, checkpoints_root, train_trial
from trainers.models import load_base_model

STEPS = 3


def reference_lora_steps(trial) -> tuple[list[float], dict[str, torch.Tensor]]:
    """What train_dreambooth_lora.py does per step, written out by hand."""
    model = load_base_model("tiny")
    unet, vae, text_encoder, scheduler = (
        model.unet,
        model.vae,
        model.text_encoder,
        model.noise_scheduler,
    )
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(trial.seed)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=4.0,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trial.learning_rate, weight_decay=1e-2)
    with torch.no_grad():
        posterior = vae.encode(load_subject_pixels(trial.image_files, 64)).latent_dist
        ids = model.tokenizer(
            "a photo of sks toy", padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        prompt = text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(trial.seed)
    losses = []
    for _ in range(STEPS):
        index = torch.randint(0, trial.num_images, (1,), generator=generator)
        eps = torch.randn((1, 4, 8, 8), generator=generator)
        noise = torch.randn((1, 4, 8, 8), generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        latents = (posterior.mean[index] + posterior.std[index] * eps) * 0.18215
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, prompt).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, get_peft_model_state_dict(unet)


def test_lora_loop_equals_hand_written_steps(tmp_path: Path) -> None:
    spec = small_spec(tmp_path, grid={"max_steps": STEPS, "eval_every": STEPS})
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    train_trial(trial, recorder)
    expected_losses, expected_weights = reference_lora_steps(trial)

    assert [recorder.losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        expected_losses, rel=1e-5
    )
    state = torch.load(
        checkpoints_root(trial) / f"step_{STEPS:06d}" / TRAINER_STATE, weights_only=True
    )
    trained = state["trainable"]
    assert trained.keys() == expected_weights.keys()
    moved = 0
    for key, expected in expected_weights.items():
        torch.testing.assert_close(trained[key], expected, rtol=1e-5, atol=1e-6)
        moved += int("lora_B" in key and expected.abs().sum() > 0)
    assert moved > 0  # the steps really trained the adapters (B starts at zero)


def reference_textual_inversion_steps(trial) -> tuple[list[float], torch.Tensor]:
    """What diffusers' textual_inversion.py does per step, written out by hand."""
    model = load_base_model("tiny")
    tokenizer, text_encoder, unet, vae, scheduler = (
        model.tokenizer,
        model.text_encoder,
        model.unet,
        model.vae,
        model.noise_scheduler,
    )
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    tokenizer.add_tokens("<robot>")
    token_id = tokenizer.convert_tokens_to_ids("<robot>")
    [class_id] = tokenizer.encode("toy", add_special_tokens=False)
    text_encoder.resize_token_embeddings(len(tokenizer))
    embedding = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[token_id] = embedding[class_id]
    original = embedding.detach().clone()
    embedding.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding], lr=trial.learning_rate, weight_decay=1e-2)
    with torch.no_grad():
        posterior = vae.encode(load_subject_pixels(trial.image_files, 64)).latent_dist
    ids = tokenizer(
        "a photo of <robot> toy", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    generator = torch.Generator().manual_seed(trial.seed)
    losses = []
    for _ in range(STEPS):
        index = torch.randint(0, trial.num_images, (1,), generator=generator)
        eps = torch.randn((1, 4, 8, 8), generator=generator)
        noise = torch.randn((1, 4, 8, 8), generator=generator)
        timesteps = torch.randint(0, 1000, (1,), generator=generator)
        latents = (posterior.mean[index] + posterior.std[index] * eps) * 0.18215
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, text_encoder(ids)[0]).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([embedding], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # only the new token's row may change
            keep = torch.arange(len(tokenizer)) != token_id
            embedding[keep] = original[keep]
        losses.append(loss.item())
    return losses, embedding[token_id].detach().clone()


def test_textual_inversion_loop_equals_hand_written_steps(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path, methods=["textual_inversion"], grid={"max_steps": STEPS, "eval_every": STEPS}
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    train_trial(trial, recorder)
    expected_losses, expected_row = reference_textual_inversion_steps(trial)

    assert [recorder.losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        expected_losses, rel=1e-5
    )
    folder = checkpoints_root(trial) / f"step_{STEPS:06d}"
    trained_row = torch.load(folder / TRAINER_STATE, weights_only=True)["trainable"]["embedding"]
    torch.testing.assert_close(trained_row, expected_row, rtol=1e-5, atol=1e-7)

    # The saved embedding loads into a plain pipeline under its token, and changes its output.
    from diffusers import StableDiffusionPipeline

    from trainers.models import resolve_model_source

    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    loaded = pipeline.text_encoder.get_input_embeddings().weight[
        pipeline.tokenizer.convert_tokens_to_ids("<robot>")
    ]
    torch.testing.assert_close(loaded.detach(), expected_row)
    image = pipeline("a photo of <robot> toy", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
