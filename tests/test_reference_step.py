"""The shared loop against minimal hand-written training steps (plain torch + diffusers), one per
method: same seed, same batch, same losses and same updated weights to float tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from reference_steps import (
    assert_same_losses,
    diffusers_lora_weights,
    encode_each,
    final_checkpoint,
    noised_latents,
    noised_latents_and_target,
    optimizer_steps,
    reference_dreambooth_steps,
    reference_lora_steps,
    reference_sdxl_lora_steps,
    saved_unet_lora_weights,
    sdxl_prompt_embeddings,
    sdxl_time_ids,
    tokenize,
    train_with_the_loop,
)
from safetensors.torch import load_file

from contract.cache import cache_root
from trainers.models import load_base_model, resolve_model_source


@pytest.mark.slow
def test_lora_loop_equals_hand_written_steps(tmp_path: Path, one_thread: None) -> None:
    trial, recorder = train_with_the_loop(tmp_path)
    expected_losses, model = reference_lora_steps(trial)
    expected_weights = diffusers_lora_weights(model.unet)

    assert_same_losses(recorder, expected_losses)
    # The checkpoint's native file (what load_lora_weights reads) holds the same weights.
    saved = saved_unet_lora_weights(trial)
    assert saved.keys() == expected_weights.keys()
    moved = 0
    for key, expected in expected_weights.items():
        torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6)
        moved += int("lora.up" in key and expected.abs().sum() > 0)
    assert moved > 0  # the steps really trained the adapters (B, "up", starts at zero)


def reference_textual_inversion_steps(trial) -> tuple[list[float], torch.Tensor]:
    """What diffusers' textual_inversion.py does per step, written out by hand."""
    model = load_base_model("tiny")
    tokenizer, text_encoder, unet, vae = model.tokenizer, model.text_encoder, model.unet, model.vae
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
    instance = encode_each(vae, trial.image_files)
    ids = tokenize(tokenizer, ["a photo of <robot> toy"])
    generator = torch.Generator().manual_seed(trial.seed)

    def step_loss() -> torch.Tensor:
        noisy, noise, timesteps = noised_latents(generator, model.noise_scheduler, [instance])
        return F.mse_loss(unet(noisy, timesteps, text_encoder(ids)[0]).sample, noise)

    def keep_other_rows() -> None:
        with torch.no_grad():  # only the new token's row may change
            keep = torch.arange(len(tokenizer)) != token_id
            embedding[keep] = original[keep]

    losses = optimizer_steps(
        [embedding], trial.learning_rate, step_loss, after_step=keep_other_rows
    )
    return losses, embedding[token_id].detach().clone()


@pytest.mark.slow
def test_textual_inversion_loop_equals_hand_written_steps(tmp_path: Path) -> None:
    trial, recorder = train_with_the_loop(
        tmp_path, methods={"textual_inversion": {"learning_rate": [1e-3]}}
    )
    expected_losses, expected_row = reference_textual_inversion_steps(trial)

    assert_same_losses(recorder, expected_losses)
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


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_equals_hand_written_steps(tmp_path: Path) -> None:
    trial, recorder = train_with_the_loop(
        tmp_path,
        methods={"dreambooth": {"learning_rate": [1e-4]}},
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

    expected_losses, model = reference_dreambooth_steps(trial, class_files)
    expected_weights = model.unet.state_dict()
    assert_same_losses(recorder, expected_losses)
    base = load_base_model("tiny").unet.state_dict()
    trained = UNet2DConditionModel.from_pretrained(final_checkpoint(trial) / "unet").state_dict()
    assert trained.keys() == expected_weights.keys()
    for key, expected in expected_weights.items():
        torch.testing.assert_close(trained[key], expected, rtol=1e-5, atol=1e-6)
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2  # the whole UNet trains, not a few layers


def assert_same_unet_lora(trial, expected_unet: torch.nn.Module) -> None:
    """The checkpoint's diffusers file holds the hand-trained UNet adapters, and they moved."""
    expected_weights = diffusers_lora_weights(expected_unet)
    saved = saved_unet_lora_weights(trial)
    assert saved.keys() == expected_weights.keys()
    for key, expected in expected_weights.items():
        torch.testing.assert_close(saved[key], expected, rtol=1e-5, atol=1e-6)
    assert any("lora.up" in k and v.abs().sum() > 0 for k, v in expected_weights.items())


@pytest.mark.slow
def test_sd2_v_prediction_lora_trains_on_the_velocity(tmp_path: Path, one_thread: None) -> None:
    """On a v-prediction model the loss target is the velocity (`get_velocity`), as in
    train_dreambooth_lora.py; predicting the noise instead would give other losses."""
    trial, recorder = train_with_the_loop(tmp_path, base_model="tiny-sd2")
    expected_losses, model = reference_lora_steps(trial, base_model="tiny-sd2")
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    assert_same_losses(recorder, expected_losses)
    assert_same_unet_lora(trial, model.unet)


@pytest.mark.slow
def test_sdxl_lora_loop_equals_hand_written_steps(tmp_path: Path, one_thread: None) -> None:
    trial, recorder = train_with_the_loop(tmp_path, base_model="tiny-sdxl")
    expected_losses, model = reference_sdxl_lora_steps(trial)
    assert_same_losses(recorder, expected_losses)
    assert_same_unet_lora(trial, model.unet)


def reference_sdxl_textual_inversion_steps(trial) -> tuple[list[float], list[torch.Tensor]]:
    """diffusers' textual_inversion_sdxl.py per step, by hand: the token added to both
    tokenizers, each encoder's new row initialised from the class token's and trained (one
    optimizer over both embedding matrices), every other row restored after each step."""
    model = load_base_model("tiny-sdxl")
    for module in model.modules.values():
        module.requires_grad_(False)
    pairs = [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]
    token_ids, embeddings, originals = [], [], []
    for tokenizer, encoder in pairs:
        tokenizer.add_tokens("<robot>")
        token_ids.append(tokenizer.convert_tokens_to_ids("<robot>"))
        [class_id] = tokenizer.encode("toy", add_special_tokens=False)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embedding = encoder.get_input_embeddings().weight
        with torch.no_grad():
            embedding[token_ids[-1]] = embedding[class_id]
        originals.append(embedding.detach().clone())
        embedding.requires_grad_(True)
        embeddings.append(embedding)
    instance = encode_each(model.vae, trial.image_files)
    generator = torch.Generator().manual_seed(trial.seed)
    scaling = model.vae.config.scaling_factor

    def step_loss() -> torch.Tensor:
        noisy, target, timesteps = noised_latents_and_target(
            generator, model.noise_scheduler, [instance], scaling
        )
        hidden, pooled = sdxl_prompt_embeddings(model, "a photo of <robot> toy")
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids()}
        return F.mse_loss(
            model.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample, target
        )

    def keep_other_rows() -> None:
        with torch.no_grad():
            for embedding, original, token_id in zip(embeddings, originals, token_ids, strict=True):
                keep = torch.arange(len(embedding)) != token_id
                embedding[keep] = original[keep]

    losses = optimizer_steps(embeddings, trial.learning_rate, step_loss, after_step=keep_other_rows)
    return losses, [e[t].detach().clone() for e, t in zip(embeddings, token_ids, strict=True)]


@pytest.mark.slow
def test_sdxl_textual_inversion_loop_equals_hand_written_steps(tmp_path: Path) -> None:
    trial, recorder = train_with_the_loop(
        tmp_path, base_model="tiny-sdxl", methods={"textual_inversion": {"learning_rate": [1e-3]}}
    )
    expected_losses, expected_rows = reference_sdxl_textual_inversion_steps(trial)
    assert_same_losses(recorder, expected_losses)

    # Saved as diffusers' SDXL embeddings are: one row per text encoder, `clip_l` / `clip_g`.
    path = final_checkpoint(trial) / "learned_embeds.safetensors"
    saved = load_file(path)
    assert saved.keys() == {"clip_l", "clip_g"}
    for key, expected in zip(("clip_l", "clip_g"), expected_rows, strict=True):
        torch.testing.assert_close(saved[key][0], expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(expected_rows[0], expected_rows[1])  # two encoders, two rows
    # Loading it the diffusers way (both tokens): test_base_models.py, on the sweep's checkpoint.
