"""The shared loop against minimal hand-written training steps (plain torch + diffusers), one per
method: same seed, same batch, same losses and same updated weights to float tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, run_trial, small_spec, write_spec
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from contract.cache import cache_root
from contract.spec import load_spec
from launch.grid import expand_grid
from trainers.checkpoint import checkpoints_root
from trainers.data import load_subject_pixels
from trainers.models import load_base_model, resolve_model_source

STEPS = 3


def encode_each(vae, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each image, one image per forward pass (as the diffusers
    scripts do with --cache_latents and batch size 1)."""
    with torch.no_grad():
        posteriors = [vae.encode(load_subject_pixels([f], 64)).latent_dist for f in files]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


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
    mean, std = encode_each(vae, trial.image_files)
    with torch.no_grad():
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
        latents = (mean[index] + std[index] * eps) * 0.18215
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, prompt).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def final_checkpoint(trial) -> Path:
    return checkpoints_root(trial) / f"step_{STEPS:06d}"


@pytest.mark.slow
def test_lora_loop_equals_hand_written_steps(tmp_path: Path, one_thread: None) -> None:
    spec = small_spec(tmp_path, grid={"max_steps": STEPS, "eval_every": STEPS})
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)
    expected_losses, expected_weights = reference_lora_steps(trial)

    assert [recorder.losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        expected_losses, rel=1e-5
    )
    # The checkpoint's native file (what load_lora_weights reads) holds the same weights.
    saved = load_file(final_checkpoint(trial) / "pytorch_lora_weights.safetensors")
    saved = {k.removeprefix("unet."): v for k, v in saved.items()}
    assert saved.keys() == expected_weights.keys()
    moved = 0
    for key, expected in expected_weights.items():
        torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6)
        moved += int("lora.up" in key and expected.abs().sum() > 0)
    assert moved > 0  # the steps really trained the adapters (B, "up", starts at zero)


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
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[token_id] = embedding[class_id]
    original = embedding.detach().clone()
    embedding.requires_grad_(True)
    optimizer = torch.optim.AdamW([embedding], lr=trial.learning_rate, weight_decay=1e-2)
    mean, std = encode_each(vae, trial.image_files)
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
        latents = (mean[index] + std[index] * eps) * 0.18215
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


@pytest.mark.slow
def test_textual_inversion_loop_equals_hand_written_steps(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        methods={"textual_inversion": {"learning_rate": [1e-3]}},
        grid={"max_steps": STEPS, "eval_every": STEPS},
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)
    expected_losses, expected_row = reference_textual_inversion_steps(trial)

    assert [recorder.losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        expected_losses, rel=1e-5
    )
    folder = final_checkpoint(trial)
    trained_row = load_file(folder / "learned_embeds.safetensors")["<robot>"][0]
    torch.testing.assert_close(trained_row, expected_row, rtol=1e-5, atol=1e-7)

    # The saved embedding loads into a plain pipeline under its token, and changes its output.
    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    loaded = pipeline.text_encoder.get_input_embeddings().weight[
        pipeline.tokenizer.convert_tokens_to_ids("<robot>")
    ]
    torch.testing.assert_close(loaded.detach(), expected_row)
    image = pipeline("a photo of <robot> toy", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


PRIOR_WEIGHT = 0.5
CLASS_SETTINGS = {
    "prompt": "a photo of a toy",
    "num_class_images": 3,
    "seed": 0,
    "num_inference_steps": 2,
    "guidance_scale": 7.5,
    "resolution": 64,
    "sampler": "dpm++",
}


def reference_class_images(count: int, steps: int) -> list[Image.Image]:
    """What train_dreambooth.py does to make class images: the base pipeline, a fixed seed each."""
    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return [
        pipeline(
            "a photo of a toy",
            height=64,
            width=64,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        for seed in range(count)
    ]


def reference_dreambooth_steps(trial, class_files: list[Path]) -> tuple[list[float], dict]:
    """train_dreambooth.py with prior preservation, written out by hand: the whole UNet trains;
    each batch is one instance and one class example; loss = instance + weight × class."""
    model = load_base_model("tiny")
    unet, vae, text_encoder, scheduler = (
        model.unet,
        model.vae,
        model.text_encoder,
        model.noise_scheduler,
    )
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=trial.learning_rate, weight_decay=1e-2)
    instance_mean, instance_std = encode_each(vae, trial.image_files)
    class_mean, class_std = encode_each(vae, class_files)
    with torch.no_grad():
        ids = model.tokenizer(
            ["a photo of sks toy", "a photo of a toy"],
            padding="max_length",
            max_length=77,
            return_tensors="pt",
        ).input_ids
        prompts = text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(trial.seed)
    losses = []
    for _ in range(STEPS):
        index = torch.randint(0, trial.num_images, (1,), generator=generator)
        class_index = torch.randint(0, len(class_files), (1,), generator=generator)
        eps = torch.randn((2, 4, 8, 8), generator=generator)
        noise = torch.randn((2, 4, 8, 8), generator=generator)
        timesteps = torch.randint(0, 1000, (2,), generator=generator)
        latents = (
            torch.cat(
                [
                    instance_mean[index] + instance_std[index] * eps[:1],
                    class_mean[class_index] + class_std[class_index] * eps[1:],
                ]
            )
            * 0.18215
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, prompts).sample
        instance_loss = F.mse_loss(prediction[:1], noise[:1])
        prior_loss = F.mse_loss(prediction[1:], noise[1:])
        loss = instance_loss + PRIOR_WEIGHT * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, unet.state_dict()


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_equals_hand_written_steps(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        methods={"dreambooth": {"learning_rate": [1e-4]}},
        grid={"max_steps": STEPS, "eval_every": STEPS},
        train={
            "resolution": 64,
            "prior": {
                "num_class_images": 3,
                "num_inference_steps": 2,
                "prior_loss_weight": PRIOR_WEIGHT,
                "batch_size": 2,  # generated two at a time, yet equal to one at a time
            },
        },
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)

    # The class images were generated once into the cache, as the plain pipeline makes them.
    # (Other tests cache other sets: other prompts, counts, or sampling steps.)
    [class_folder] = [
        folder
        for folder in (cache_root() / "class_images").glob("*/")
        if json.loads((folder / "settings.json").read_text()) == CLASS_SETTINGS
    ]
    class_files = sorted(class_folder.glob("class_*.png"))
    assert len(class_files) == 3
    for path, expected in zip(class_files, reference_class_images(3, 2), strict=True):
        with Image.open(path) as cached:
            pixels = torch.tensor(np.asarray(cached.convert("RGB")), dtype=torch.int16)
        difference = (pixels - torch.tensor(np.asarray(expected), dtype=torch.int16)).abs()
        # Batched and single generation differ only in float rounding: at most a level or two.
        assert difference.max() <= 2 and difference.float().mean() < 0.05

    expected_losses, expected_weights = reference_dreambooth_steps(trial, class_files)
    assert [recorder.losses[s] for s in range(1, STEPS + 1)] == pytest.approx(
        expected_losses, rel=1e-5
    )
    base = load_base_model("tiny").unet.state_dict()
    trained = UNet2DConditionModel.from_pretrained(final_checkpoint(trial) / "unet").state_dict()
    assert trained.keys() == expected_weights.keys()
    for key, expected in expected_weights.items():
        torch.testing.assert_close(trained[key], expected, rtol=1e-5, atol=1e-6)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2  # the whole UNet trains, not a few layers
