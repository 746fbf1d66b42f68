"""The one training loop every method plugs into. Reads top to bottom:

load base model → method picks trainable weights → cache latents and text embeddings → optimizer
→ resume from the newest complete checkpoint → evaluate step 0 → train, evaluating and
checkpointing every `eval_every` steps → finish.

A method only says which parameters train, how its prompt reads and how its weights are saved.
The loop knows nothing of MLflow, SLURM or Ray: it reports through a `Reporter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import StableDiffusionPipeline
from diffusers.optimization import get_scheduler

from evaluation.evaluator import Evaluation, Evaluator, fill_prompt, make_sampler
from launch.grid import TrialConfig
from trainers.checkpoint import latest_checkpoint, write_checkpoint
from trainers.data import load_rgb, load_subject_pixels
from trainers.methods import make_method
from trainers.models import load_base_model

PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRAINER_STATE = "trainer_state.pt"
INSTANCE_PROMPT = "a photo of {token} {class}"  # DreamBooth's instance prompt


class Reporter(Protocol):
    """Where the loop's progress goes (MLflow, a progress bar, …)."""

    def on_start(self, *, start_step: int, max_steps: int) -> None: ...
    def on_train_step(self, step: int, *, loss: float, lr: float) -> None: ...
    def on_evaluation(self, step: int, evaluation: Evaluation) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_finish(self) -> None: ...


def checkpoints_root(config: TrialConfig) -> Path:
    return config.output_dir / "checkpoints"


def train_trial(config: TrialConfig, reporter: Reporter) -> None:
    """Train one trajectory to `max_steps`, evaluating and checkpointing on the step grid."""
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision)
    device = accelerator.device
    weight_dtype = PRECISION[config.train.mixed_precision]

    # Base model and method: frozen weights in the low precision, trained weights in fp32.
    # The node's main process loads first: it builds or downloads into the shared cache once
    # (transformers writes weights from rank 0 only), and the other ranks then read the result.
    with accelerator.local_main_process_first():
        model = load_base_model(config.base_model, dtype=weight_dtype)
    method = make_method(config.method, config.train, config.subject)
    set_seed(config.seed)  # the method's new weights (adapter init) draw from the global RNG
    trainable = method.setup(model)
    if config.train.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(device)

    # Cached inputs: the VAE posterior of each image is computed once and every step samples
    # a latent from it; the instance prompt's embedding too, unless the method trains it.
    pixels = load_subject_pixels(config.image_files, config.train.resolution)
    instance_prompt = fill_prompt(
        INSTANCE_PROMPT, token=method.subject_token, class_token=config.subject.class_token
    )
    prompt_ids = model.tokenizer(
        instance_prompt,
        padding="max_length",
        max_length=model.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.no_grad():
        posterior = model.vae.encode(pixels.to(device, weight_dtype)).latent_dist
        latent_mean, latent_std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        cached_prompt_embedding = (
            None if method.trains_text_encoder else model.text_encoder(prompt_ids)[0]
        )
    scaling = model.vae.config.scaling_factor
    scheduler = model.noise_scheduler

    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.train.adam_weight_decay
    )
    # Accelerate steps a prepared scheduler once per process: scale its horizon to match.
    lr_scheduler = get_scheduler(
        config.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    # Only modules with trained weights are wrapped (DDP refuses a module with none);
    # `model.unet` / `model.text_encoder` stay the plain modules, sharing the same weights.
    modules = {"unet": model.unet, "text_encoder": model.text_encoder}
    trained = [n for n, m in modules.items() if any(p.requires_grad for p in m.parameters())]
    *wrapped, optimizer, lr_scheduler = accelerator.prepare(
        *(modules[n] for n in trained), optimizer, lr_scheduler
    )
    modules.update(zip(trained, wrapped, strict=True))
    unet, text_encoder = modules["unet"], modules["text_encoder"]
    # One CPU generator draws every batch, noise and timestep: identical on all ranks and on
    # any device, and its state is checkpointed so a resumed trial draws the same numbers.
    generator = torch.Generator("cpu").manual_seed(config.seed)

    start_step = 0
    resumed = latest_checkpoint(checkpoints_root(config))
    if resumed is not None:
        start_step, folder = resumed
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        method.load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    evaluator = None
    if accelerator.is_main_process:
        evaluator = Evaluator(
            config.eval,
            token=method.subject_token,
            class_token=config.subject.class_token,
            reference_images=[load_rgb(p) for p in config.image_files],
            resolution=config.train.resolution,
            device=device,
        )
        reporter.on_start(start_step=start_step, max_steps=config.max_steps)

    def evaluate(step: int) -> None:
        if evaluator is not None:
            pipeline = StableDiffusionPipeline(
                vae=model.vae,
                text_encoder=model.text_encoder,
                tokenizer=model.tokenizer,
                unet=model.unet,
                scheduler=make_sampler(config.eval.scheduler, scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipeline.set_progress_bar_config(disable=True)
            for module in modules.values():
                module.eval()
            with torch.no_grad(), accelerator.autocast():
                reporter.on_evaluation(step, evaluator(pipeline))
            for name in trained:
                modules[name].train()
        accelerator.wait_for_everyone()

    def save(step: int) -> None:
        if accelerator.is_main_process:

            def write(folder: Path) -> None:
                method.save_weights(model, folder)
                state = {
                    "step": step,
                    "trainable": method.trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                }
                torch.save(state, folder / TRAINER_STATE)

            reporter.on_checkpoint(step, write_checkpoint(checkpoints_root(config), step, write))
        accelerator.wait_for_everyone()

    if start_step == 0:
        evaluate(0)  # the base model's value: the baseline each curve starts from

    batch = config.train.batch_size
    rank_slice = slice(accelerator.process_index * batch, (accelerator.process_index + 1) * batch)
    global_batch = batch * accelerator.num_processes
    latent_shape = latent_mean.shape[1:]
    for name in trained:
        modules[name].train()
    for step in range(start_step + 1, config.max_steps + 1):
        # The global batch is drawn everywhere; each rank trains on its own slice of it.
        index = torch.randint(0, latent_mean.shape[0], (global_batch,), generator=generator)
        sample_noise = torch.randn((global_batch, *latent_shape), generator=generator)
        noise = torch.randn((global_batch, *latent_shape), generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (global_batch,), generator=generator
        )
        latents = (latent_mean[index] + latent_std[index] * sample_noise) * scaling
        latents, noise, timesteps = (t[rank_slice].to(device) for t in (latents, noise, timesteps))
        noisy = scheduler.add_noise(latents, noise, timesteps).to(weight_dtype)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if method.trains_text_encoder:
            prompt_embedding = text_encoder(prompt_ids)[0]
        else:
            prompt_embedding = cached_prompt_embedding
        encoder_states = prompt_embedding.expand(noisy.shape[0], -1, -1)
        prediction = unet(noisy, timesteps, encoder_states).sample
        loss = F.mse_loss(prediction.float(), target.float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, config.train.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)

        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        if accelerator.is_main_process:
            reporter.on_train_step(step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0])
        if step % config.eval_every == 0:
            evaluate(step)
            save(step)

    if accelerator.is_main_process:
        reporter.on_finish()
    accelerator.end_training()
