"""DreamBooth and LoRA with `train_text_encoder: true` against hand-written steps, written the
way diffusers' train_dreambooth.py and train_dreambooth_lora.py run with --train_text_encoder
(one optimizer over the UNet's and the text encoder's trained weights, the prompt encoded anew
every step); then their checkpoints through diffusers' own loaders, which must generate what the
trained models generate, and not what the base model does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from reference_steps import (
    INSTANCE_PROMPT,
    assert_same_losses,
    diffusers_lora_weights,
    final_checkpoint,
    reference_dreambooth_steps,
    reference_lora_steps,
    tokenize,
    train_with_the_loop,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel

from trainers.models import load_base_model, resolve_model_source
from trainers.prior import class_images
from trainers.resume import TRAINER_STATE


def trained_state(trial) -> dict[str, torch.Tensor]:
    """Every weight the loop trained, by name ("unet.…", "text_encoder.…"), as its last
    checkpoint's resume state holds them."""
    state = torch.load(final_checkpoint(trial) / TRAINER_STATE, weights_only=True)
    return state["trainable"]


def trained_by_name(unet, text_encoder) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.{name}": parameter.detach()
        for prefix, module in (("unet", unet), ("text_encoder", text_encoder))
        for name, parameter in module.named_parameters()
        if parameter.requires_grad
    }


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


def generate(pipeline: StableDiffusionPipeline) -> np.ndarray:
    """The instance prompt, two DDPM steps at 64 px, one fixed seed; floats in [0, 1]."""
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipeline(
            INSTANCE_PROMPT,
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]


def swapped(pipeline: StableDiffusionPipeline, unet, text_encoder) -> StableDiffusionPipeline:
    """`pipeline`'s other components (VAE, tokenizer, scheduler) around these two modules."""
    return StableDiffusionPipeline(
        **{**pipeline.components, "unet": unet, "text_encoder": text_encoder},
        requires_safety_checker=False,
    )


def embed(text_encoder, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return text_encoder(tokenize(tokenizer, [INSTANCE_PROMPT]))[0]


@pytest.mark.slow
def test_dreambooth_training_the_text_encoder_equals_hand_written_steps(
    tmp_path: Path, one_thread: None
) -> None:
    trial, recorder = train_with_the_loop(
        tmp_path, methods={"dreambooth": {"learning_rate": [1e-4], "train_text_encoder": True}}
    )
    class_files = class_images(  # the set the trial generated, read back from the cache
        load_base_model("tiny"),
        trial.train.prior,
        class_token="toy",
        resolution=64,
        device=torch.device("cpu"),
    )
    expected_losses, model = reference_dreambooth_steps(trial, class_files, train_text_encoder=True)
    unet, text_encoder = model.unet, model.text_encoder

    assert_same_losses(recorder, expected_losses)
    # Every weight of both modules trains, and ends as the hand-written steps leave it.
    expected = trained_by_name(unet, text_encoder)
    assert_same_weights(trained_state(trial), expected)
    folder = final_checkpoint(trial)
    saved_unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    saved_text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    assert_same_weights(trained_by_name(saved_unet, saved_text_encoder), expected)
    source = resolve_model_source("tiny")
    base = StableDiffusionPipeline.from_pretrained(source)
    base_text_encoder = base.text_encoder.state_dict()
    changed = [
        k
        for k, v in saved_text_encoder.state_dict().items()
        if not torch.equal(v, base_text_encoder[k])
    ]
    assert len(changed) > len(base_text_encoder) // 2  # the whole text encoder, not a few rows

    # The checkpoint's folders in a plain pipeline, as diffusers loads them: the trained
    # models' image, not the base model's, and not the trained UNet's beside the base encoder.
    loaded = generate(
        StableDiffusionPipeline.from_pretrained(
            source, unet=saved_unet, text_encoder=saved_text_encoder
        )
    )
    np.testing.assert_allclose(loaded, generate(swapped(base, unet, text_encoder)), atol=1e-4)
    base_image = generate(base)
    unet_only = generate(swapped(base, saved_unet, base.text_encoder))
    assert np.abs(loaded - base_image).max() > 1e-2
    assert np.abs(loaded - unet_only).max() > 1e-3


LORA_RANK, LORA_ALPHA = 4, 8.0  # alpha ≠ rank: the scale must survive the save and the load


@pytest.mark.slow
def test_lora_training_the_text_encoder_equals_hand_written_steps(
    tmp_path: Path, one_thread: None
) -> None:
    options = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "train_text_encoder": True}
    trial, recorder = train_with_the_loop(
        tmp_path, methods={"lora": {"learning_rate": [1e-3], **options}}
    )
    expected_losses, model = reference_lora_steps(
        trial, rank=LORA_RANK, alpha=LORA_ALPHA, train_text_encoder=True
    )
    unet, text_encoder, tokenizer = model.unet, model.text_encoder, model.tokenizer

    assert_same_losses(recorder, expected_losses)
    # Exactly the adapters train (the base weights stay frozen), and end as by hand.
    assert_same_weights(trained_state(trial), trained_by_name(unet, text_encoder))
    # The native file (what load_lora_weights reads) holds both adapters in diffusers' names.
    folder = final_checkpoint(trial)
    saved = load_file(folder / "pytorch_lora_weights.safetensors")
    expected = {
        f"{prefix}.{key}": value
        for prefix, module in (("unet", unet), ("text_encoder", text_encoder))
        for key, value in diffusers_lora_weights(module).items()
    }
    assert_same_weights(saved, expected)
    for prefix in ("unet.", "text_encoder."):
        # B ("up") starts at zero: nonzero means the steps trained this module's adapters.
        assert any(
            k.startswith(prefix) and k.endswith("up.weight") and v.abs().sum() > 0
            for k, v in saved.items()
        ), prefix

    # diffusers' loader puts both adapters, at their trained scale, into a plain pipeline.
    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_source("tiny"))
    base_embedding, base_image = embed(pipeline.text_encoder, tokenizer), generate(pipeline)
    pipeline.load_lora_weights(folder)
    loaded_embedding = embed(pipeline.text_encoder, tokenizer)
    torch.testing.assert_close(loaded_embedding, embed(text_encoder, tokenizer), atol=1e-5, rtol=0)
    assert (loaded_embedding - base_embedding).abs().max() > 1e-3
    loaded = generate(pipeline)
    np.testing.assert_allclose(loaded, generate(swapped(pipeline, unet, text_encoder)), atol=1e-4)
    assert np.abs(loaded - base_image).max() > 1e-2
