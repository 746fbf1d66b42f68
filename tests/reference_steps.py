"""The hand-written reference steps that test_reference_step, test_precision and
test_text_encoder_training compare the loop with, and what they share: the step count and
prompts, the VAE posteriors, noised latents and optimizer steps the diffusers scripts compute,
the steps of train_dreambooth_lora.py (any precision, with or without the text encoder) and of
train_dreambooth.py, and where the loop puts the last checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, run_trial, small_spec, write_spec
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from contract.spec import load_spec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from trainers.checkpoint import checkpoints_root
from trainers.data import load_subject_pixels
from trainers.models import BaseModel, load_base_model

STEPS = 3
INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def train_with_the_loop(tmp_path: Path, **overrides: object) -> tuple[TrialConfig, Recorder]:
    """The small spec's one trial (`overrides` merged in as `small_spec` merges them), trained
    by the loop in this process for STEPS steps and evaluated only after the last."""
    # Evaluation is not compared: the least of it (one image, one sampling step, one metric).
    least = {"images_per_prompt": 1, "num_inference_steps": 1, "metrics": ["similarity"]}
    overrides["eval"] = {**least, "records": False, **overrides.get("eval", {})}
    spec = small_spec(tmp_path, grid={"max_steps": STEPS, "eval_every": STEPS}, **overrides)
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    recorder = Recorder()
    run_trial(trial, recorder)
    return trial, recorder


def assert_same_losses(recorder: Recorder, expected: list[float]) -> None:
    """The loop's loss of each step is the hand-written steps' to float tolerance."""
    losses = [recorder.losses[s] for s in range(1, STEPS + 1)]
    assert losses == pytest.approx(expected, rel=1e-5), (losses, expected)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def encode_each(
    vae, files: list[Path], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each image in fp32, one image per forward pass in `dtype`
    (as the diffusers scripts do with --cache_latents and batch size 1)."""
    with torch.no_grad():
        posteriors = [vae.encode(load_subject_pixels([f], 64).to(dtype)).latent_dist for f in files]
    mean = torch.cat([p.mean for p in posteriors]).float()
    return mean, torch.cat([p.std for p in posteriors]).float()


def noised_latents(generator, scheduler, images: list[tuple[torch.Tensor, torch.Tensor]]):
    """One row per (mean, std) set (instance, then class), drawn in the order the loop draws
    (trainers/batches.py): an image of each set, then the posterior noise, the added noise and
    the timesteps of all rows."""
    latents, noise, timesteps = sampled_latents(generator, images)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def noised_latents_and_target(
    generator, scheduler, images: list[tuple[torch.Tensor, torch.Tensor]], scaling: float
):
    """`noised_latents` with the VAE's `scaling`, and the loss target as the diffusers scripts
    choose it: the noise for epsilon prediction, the velocity for v-prediction."""
    latents, noise, timesteps = sampled_latents(generator, images, scaling)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return scheduler.add_noise(latents, noise, timesteps), target, timesteps


def sampled_latents(generator, images, scaling: float = 0.18215):
    """The draws of `noised_latents`: scaled latents sampled from the posteriors, the noise
    and the timesteps."""
    index = [torch.randint(0, len(mean), (1,), generator=generator) for mean, _ in images]
    rows = len(images)
    eps = torch.randn((rows, 4, 8, 8), generator=generator)
    noise = torch.randn((rows, 4, 8, 8), generator=generator)
    timesteps = torch.randint(0, 1000, (rows,), generator=generator)
    mean = torch.cat([means[i] for (means, _), i in zip(images, index, strict=True)])
    std = torch.cat([stds[i] for (_, stds), i in zip(images, index, strict=True)])
    return (mean + std * eps) * scaling, noise, timesteps


def diffusers_lora_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's adapter weights under the names diffusers' LoRA files use."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def saved_unet_lora_weights(trial: TrialConfig) -> dict[str, torch.Tensor]:
    """The UNet's adapter weights in the last checkpoint's native file (what
    `load_lora_weights` reads), named as `diffusers_lora_weights` names them."""
    saved = load_file(final_checkpoint(trial) / "pytorch_lora_weights.safetensors")
    return {k.removeprefix("unet."): v for k, v in saved.items()}


def lora_config(targets: list[str], rank: int, alpha: float) -> LoraConfig:
    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets
    )


def optimizer_steps(
    params: list[torch.nn.Parameter],
    learning_rate: float,
    step_loss: Callable[[], torch.Tensor],
    *,
    training: Sequence[torch.nn.Module] = (),
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """STEPS steps of the scripts' AdamW (weight decay 1e-2) with gradients clipped to norm 1:
    `step_loss` computes a step's loss, `after_step` runs after each optimizer step; the
    `training` modules are in train mode meanwhile (and in eval mode after). Returns the
    losses."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    for module in training:
        module.train()
    losses = []
    for _ in range(STEPS):
        loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
    for module in training:
        module.eval()
    return losses


def prompt_embeddings(
    text_encoder, ids: torch.Tensor, *, trains: bool
) -> Callable[[], torch.Tensor]:
    """The prompts' embeddings for each step: a frozen text encoder's computed once now, a
    trained one's anew every step (with gradients)."""
    if trains:
        return lambda: text_encoder(ids)[0]
    with torch.no_grad():
        frozen = text_encoder(ids)[0]
    return lambda: frozen


def reference_lora_steps(
    trial,
    *,
    base_model: str = "tiny",
    dtype: torch.dtype = torch.float32,
    rank: int = 4,
    alpha: float = 4.0,
    train_text_encoder: bool = False,
) -> tuple[list[float], BaseModel]:
    """train_dreambooth_lora.py (`--mixed_precision` as `dtype`, `--train_text_encoder`),
    written out by hand: every base weight frozen in `dtype`; adapters on the UNet's attention,
    then on the text encoder's, drawn from the seeded RNG in that order and upcast to fp32
    (`cast_training_params`); one optimizer over all adapters' weights (the UNet's first); the
    UNet's forward pass under autocast unless `dtype` is fp32, the loss in fp32 against the
    noise, or the velocity for a v-prediction model (`base_model` `tiny-sd2`). Returns the
    losses and the model as the steps leave it (in eval mode)."""
    model = load_base_model(base_model)
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).to(dtype)
    torch.manual_seed(trial.seed)
    unet.add_adapter(lora_config(UNET_LORA_TARGETS, rank, alpha))
    trained = [unet]
    if train_text_encoder:
        text_encoder.add_adapter(lora_config(TEXT_ENCODER_LORA_TARGETS, rank, alpha))
        trained.append(text_encoder)
    cast_training_params(trained, dtype=torch.float32)
    params = [p for module in trained for p in module.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}
    instance = encode_each(vae, trial.image_files, dtype)
    prompt = prompt_embeddings(
        text_encoder, tokenize(model.tokenizer, [INSTANCE_PROMPT]), trains=train_text_encoder
    )
    autocast = (
        contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    )
    generator = torch.Generator().manual_seed(trial.seed)

    def step_loss() -> torch.Tensor:
        noisy, target, timesteps = noised_latents_and_target(
            generator, model.noise_scheduler, [instance], vae.config.scaling_factor
        )
        embedding = prompt()
        with autocast:
            prediction = unet(noisy.to(dtype), timesteps, embedding).sample
        return F.mse_loss(prediction.float(), target.float())

    return optimizer_steps(params, trial.learning_rate, step_loss, training=trained), model


def sdxl_prompt_embeddings(model: BaseModel, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """train_dreambooth_lora_sdxl.py's `encode_prompt`: each encoder's penultimate hidden
    states, concatenated; the pooled output of the last (projected) one."""
    hidden = []
    for tokenizer, encoder in (
        (model.tokenizer, model.text_encoder),
        (model.tokenizer_2, model.text_encoder_2),
    ):
        output = encoder(
            tokenize(tokenizer, [prompt]), output_hidden_states=True, return_dict=False
        )
        pooled = output[0]
        hidden.append(output[-1][-2])
    return torch.cat(hidden, dim=-1), pooled


def sdxl_time_ids(resolution: int = 64) -> torch.Tensor:
    """The script's `compute_time_ids`: original size + crop top-left + target size (square
    crops at the training resolution: the size the pipeline samples at)."""
    return torch.tensor(
        [[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32
    )


def reference_sdxl_lora_steps(trial) -> tuple[list[float], BaseModel]:
    """train_dreambooth_lora_sdxl.py, by hand (fp32, UNet adapters only): the prompt embedded
    once by both frozen encoders, the UNet called with `added_cond_kwargs` (pooled embedding and
    time ids). Returns the losses and the model as the steps leave it (in eval mode)."""
    model = load_base_model("tiny-sdxl")
    unet, vae = model.unet, model.vae
    for module in (unet, vae, model.text_encoder, model.text_encoder_2):
        module.requires_grad_(False)
    torch.manual_seed(trial.seed)
    unet.add_adapter(lora_config(UNET_LORA_TARGETS, 4, 4.0))
    params = [p for p in unet.parameters() if p.requires_grad]
    instance = encode_each(vae, trial.image_files)
    with torch.no_grad():
        hidden, pooled = sdxl_prompt_embeddings(model, INSTANCE_PROMPT)
    added = {"text_embeds": pooled, "time_ids": sdxl_time_ids()}
    generator = torch.Generator().manual_seed(trial.seed)

    def step_loss() -> torch.Tensor:
        noisy, target, timesteps = noised_latents_and_target(
            generator, model.noise_scheduler, [instance], vae.config.scaling_factor
        )
        prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        return F.mse_loss(prediction, target)

    return optimizer_steps(params, trial.learning_rate, step_loss, training=[unet]), model


def reference_dreambooth_steps(
    trial, class_files: list[Path], *, train_text_encoder: bool = False
) -> tuple[list[float], BaseModel]:
    """train_dreambooth.py --with_prior_preservation (and --train_text_encoder), by hand: the
    whole UNet (and the whole text encoder) trains under one optimizer, UNet first; each batch
    is one instance and one class example; loss = instance + prior_loss_weight × class. Returns
    the losses and the model as the steps leave it (in eval mode)."""
    model = load_base_model("tiny")
    unet, vae, text_encoder = model.unet, model.vae, model.text_encoder
    vae.requires_grad_(False)
    text_encoder.requires_grad_(train_text_encoder)
    trained = [unet, text_encoder] if train_text_encoder else [unet]
    params = [p for module in trained for p in module.parameters()]
    instance, classes = encode_each(vae, trial.image_files), encode_each(vae, class_files)
    prompts = prompt_embeddings(
        text_encoder,
        tokenize(model.tokenizer, [INSTANCE_PROMPT, CLASS_PROMPT]),
        trains=train_text_encoder,
    )
    weight = trial.train.prior.prior_loss_weight
    generator = torch.Generator().manual_seed(trial.seed)

    def step_loss() -> torch.Tensor:
        noisy, noise, timesteps = noised_latents(
            generator, model.noise_scheduler, [instance, classes]
        )
        prediction = unet(noisy, timesteps, prompts()).sample
        return F.mse_loss(prediction[:1], noise[:1]) + weight * F.mse_loss(
            prediction[1:], noise[1:]
        )

    return optimizer_steps(params, trial.learning_rate, step_loss, training=trained), model


def final_checkpoint(trial) -> Path:
    return checkpoints_root(trial) / f"step_{STEPS:06d}"
