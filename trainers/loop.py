"""The one training loop every method plugs into, written as a recipe: `train_trial` reads top to
bottom as its steps.

setup_model (base model, class images) → setup_method (the method picks trainable weights;
memory features) → setup_data (cached inputs) → offload_cached_encoders → setup_optimizer →
resume from the newest complete checkpoint → evaluate step 0 → train, evaluating and
checkpointing on the step grid → finish.

Beside it: `trainers.batches` draws each step's images, noise and timesteps; `trainers.resume`
resumes, saves and retains checkpoints; `trainers.setup_description` reads what is really on.
A method only says which parameters train, how its prompt reads and how its weights are saved.
The loop knows nothing of MLflow, SLURM or Ray: it reports through a `Reporter`, and runs under
the `Accelerator` its caller made (`cluster.accelerator.make_accelerator`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler

from contract.spec import TrainSpec
from contract.trial import TrialConfig
from evaluation.evaluator import Evaluator
from evaluation.sampling import fill_prompt, make_sampler
from trainers.batches import (
    BatchLayout,
    MicroBatch,
    TrainingData,
    batch_generator,
    draw_step,
    micro_batch,
)
from trainers.caching import cached_prompt_embeddings, latent_shape, load_images
from trainers.conditioning import PromptEmbeddings, encode_prompts, tokenize, unet_conditioning
from trainers.memory import enable_gradient_checkpointing, make_optimizer, set_attention
from trainers.methods import TrainingMethod, make_method
from trainers.models import BaseModel, assemble_pipeline, load_base_model
from trainers.prior import class_images, class_prompt
from trainers.reporting import Reporter, Stopper, TrialPaused
from trainers.resume import (
    TrialCheckpoints,
    WorldSizeMismatch,
)
from trainers.setup_description import describe_setup
from trainers.state import Training, TrialState

# What callers and tests import from here (several names now live in the modules beside it).
__all__ = ["INSTANCE_PROMPT", "PRECISION", "on_device", "train_trial"]

PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INSTANCE_PROMPT = "a photo of {token} {class}"  # DreamBooth's instance prompt


@contextmanager
def on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Bring offloaded modules to `device` for a while (evaluation), then send them back."""
    previous = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, where in zip(modules, previous, strict=True):
            module.to(where)


def setup_model(config: TrialConfig, accelerator: Accelerator) -> tuple[BaseModel, list[Path]]:
    """The base model, and the class images prior preservation needs. The node's main process
    goes first: it builds or downloads into the shared caches once, the other ranks then read."""
    with accelerator.local_main_process_first():
        model = load_base_model(config.base_model)
        class_files = []
        if config.uses_prior:
            class_files = class_images(
                model,
                config.train.prior,
                class_token=config.subject.class_token,
                resolution=config.train.resolution,
                device=accelerator.device,
            )
    return model, class_files


def setup_method(
    config: TrialConfig, model: BaseModel, *, frozen_dtype: torch.dtype, device: torch.device
) -> tuple[TrainingMethod, list[torch.nn.Parameter]]:
    """The method freezes the base (in the low precision) and adds what trains (in fp32); then
    the memory features, and the model onto the accelerator. Returns the method and what trains."""
    train = config.train
    method = make_method(config.method, config.options, config.subject, config.export)
    set_seed(config.seed)  # the method's new weights (adapter init) draw from the global RNG
    trainable = method.setup(model, frozen_dtype=frozen_dtype)
    if frozen_dtype == torch.float16 and model.vae.config.get("force_upcast", False):
        # A VAE that overflows in fp16 (SDXL's; its pipeline decodes it in fp32) stays fp32, as
        # diffusers' SDXL training scripts keep it. bf16 has fp32's range: no overflow.
        model.vae.float()
    set_attention(model.unet, train.attention)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(
            model.unet,
            list(model.text_encoders.values()),
            text_encoder_trains=method.trains_text_encoder,
        )
    for module in model.modules.values():
        module.to(device)
    return method, trainable


def setup_data(
    config: TrialConfig,
    model: BaseModel,
    method: TrainingMethod,
    class_files: list[Path],
    accelerator: Accelerator,
) -> TrainingData:
    """Inputs computed once: VAE posteriors and frozen-text-encoder prompt embeddings, from the
    disk cache (the node's main process first, as in `setup_model`)."""
    train, device = config.train, accelerator.device
    with accelerator.local_main_process_first():
        instance_images = load_images(
            model,
            config.image_files,
            resolution=train.resolution,
            cache=train.cache_latents,
            device=device,
        )
        class_set = None
        if config.uses_prior:
            class_set = load_images(
                model,
                class_files,
                resolution=train.resolution,
                cache=train.cache_latents,
                device=device,
            )
        prompts = [
            fill_prompt(
                INSTANCE_PROMPT, token=method.subject_token, class_token=config.subject.class_token
            )
        ]
        if config.uses_prior:
            prompts.append(class_prompt(train.prior, config.subject.class_token))
        prompt_ids = [ids.to(device) for ids in tokenize(model, prompts)]
        cached_embeddings = None
        if train.cache_text_embeddings and not method.trains_text_encoder:
            cached_embeddings = cached_prompt_embeddings(model, prompts, device)
    return TrainingData(instance_images, class_set, prompt_ids, cached_embeddings)


def offload_cached_encoders(
    train: TrainSpec, model: BaseModel, data: TrainingData
) -> list[tuple[str, torch.nn.Module]]:
    """Whatever is cached no longer needs its encoder on the accelerator: move those to the CPU
    (evaluation brings them back for a while). Returns them by name."""
    offloaded = []
    if train.cache_latents:
        offloaded.append(("vae", model.vae))
    if data.cached_embeddings is not None:
        offloaded += list(model.text_encoders.items())
    for _, module in offloaded:
        module.to("cpu")
    return offloaded


def setup_optimizer(
    config: TrialConfig,
    model: BaseModel,
    trainable: list[torch.nn.Parameter],
    accelerator: Accelerator,
) -> Training:
    """Optimizer and schedule, prepared with the trained modules. Accelerate steps a prepared
    scheduler once per process (and only on optimizer steps): scale its horizon to match."""
    train = config.train
    optimizer = make_optimizer(train, trainable, config.learning_rate)
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    modules = {"unet": model.unet, **model.text_encoders}
    trained = [n for n, m in modules.items() if any(p.requires_grad for p in m.parameters())]
    *wrapped, optimizer, lr_scheduler = accelerator.prepare(
        *(modules[n] for n in trained), optimizer, lr_scheduler
    )
    modules.update(zip(trained, wrapped, strict=True))
    return Training(trainable, modules, trained, wrapped, optimizer, lr_scheduler)


def setup_evaluator(
    config: TrialConfig, method: TrainingMethod, accelerator: Accelerator
) -> Evaluator | None:
    """The evaluator, on the main process only (the others evaluate nothing)."""
    if not accelerator.is_main_process:
        return None
    return Evaluator(
        config.eval,
        token=method.subject_token,
        class_token=config.subject.class_token,
        reference_files=config.image_files,
        resolution=config.train.resolution,
        device=accelerator.device,
    )


def evaluate(trial: TrialState, step: int) -> dict[str, float]:
    """Evaluate (main process) and return the metrics; other processes get {}."""
    metrics: dict[str, float] = {}
    if trial.evaluator is not None:
        model, accelerator = trial.model, trial.accelerator
        pipeline = assemble_pipeline(
            model, make_sampler(trial.config.eval.scheduler, model.noise_scheduler.config)
        )
        for module in trial.training.modules.values():
            module.eval()
        on_accelerator = on_device([module for _, module in trial.offloaded], accelerator.device)
        with on_accelerator, torch.no_grad(), accelerator.autocast():
            evaluation = trial.evaluator(pipeline)
        trial.reporter.on_evaluation(step, evaluation)
        metrics = evaluation.metrics
        trial.training.train_mode()
    trial.accelerator.wait_for_everyone()
    return metrics


def prompt_embeddings(trial: TrialState) -> PromptEmbeddings:
    """One embedding per prompt (instance, then class): from the text encoders that train, from
    the cache, or from the frozen text encoders."""
    data, model = trial.data, trial.model
    if trial.method.trains_text_encoder:
        trained = [trial.training.modules[name] for name in model.text_encoders]
        return encode_prompts(model.family, trained, data.prompt_ids)
    if data.cached_embeddings is not None:
        return data.cached_embeddings
    with torch.no_grad():
        return encode_prompts(model.family, list(model.text_encoders.values()), data.prompt_ids)


def train_micro_batch(trial: TrialState, batch: MicroBatch) -> torch.Tensor:
    """Forward, backward and the optimizer's step on one micro-batch; its loss, detached."""
    train, accelerator, training = trial.config.train, trial.accelerator, trial.training
    rows = train.batch_size
    # Forward passes inside `accumulate` (DDP skips the gradient sync of all but the last
    # micro-batch) and under autocast, which covers the frozen modules too: under mixed
    # precision a trained fp32 module meets a frozen low-precision one.
    with accelerator.accumulate(*training.wrapped):
        with accelerator.autocast():
            embeddings = prompt_embeddings(trial).repeat_rows(rows)
            prediction = training.modules["unet"](
                batch.noisy.to(PRECISION[train.mixed_precision]),
                batch.timesteps,
                **unet_conditioning(trial.model.family, embeddings, train.resolution),
            )
            prediction = prediction.sample.float()
            loss = F.mse_loss(prediction[:rows], batch.target[:rows].float())
            if trial.data.class_images is not None:
                prior_loss = F.mse_loss(prediction[rows:], batch.target[rows:].float())
                loss = loss + train.prior.prior_loss_weight * prior_loss
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(training.trainable, train.max_grad_norm)
        training.optimizer.step()
        training.lr_scheduler.step()
        training.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_step(trial: TrialState, layout: BatchLayout, shape: tuple[int, int, int]) -> float:
    """One optimizer step over the micro-batches of one effective batch; the mean loss over
    the micro-batches and the processes."""
    model, accelerator = trial.model, trial.accelerator
    draws = draw_step(
        trial.generator,
        layout,
        trial.data,
        shape=shape,
        num_train_timesteps=model.noise_scheduler.config.num_train_timesteps,
    )
    losses = []
    for micro in range(layout.micro_batches):
        batch = micro_batch(
            draws, micro, layout=layout, data=trial.data, model=model, device=accelerator.device
        )
        losses.append(train_micro_batch(trial, batch))
    trial.method.after_optimizer_step(model)
    step_loss = torch.stack(losses).mean()
    return accelerator.reduce(step_loss, reduction="mean").item()


def train(
    trial: TrialState,
    checkpoints: TrialCheckpoints,
    *,
    start_step: int,
    stopper: Stopper | None,
    should_pause: Callable[[], bool] | None,
    can_stop: bool = False,
) -> None:
    """Train the steps after `start_step` up to `max_steps`, evaluating and checkpointing on
    the step grid; return early when the stopper says so, raise `TrialPaused` when paused."""
    config, accelerator, reporter = trial.config, trial.accelerator, trial.reporter
    layout = BatchLayout.of(config.train, accelerator)
    shape = latent_shape(trial.model, config.train.resolution)
    checkpoint_steps = set(config.checkpoint_steps)
    trial.training.train_mode()
    for step in range(start_step + 1, config.max_steps + 1):
        mean_loss = train_step(trial, layout, shape)
        if accelerator.is_main_process:
            lr = trial.training.lr_scheduler.get_last_lr()[0]
            reporter.on_train_step(step, loss=mean_loss, lr=lr)
        metrics = evaluate(trial, step) if step % config.eval_every == 0 else None
        if step in checkpoint_steps:
            checkpoints.save(step, evaluation=metrics)
        if metrics is not None and (can_stop or config.selection.early_stop is not None):
            # The main process decides (only it holds the stopper); the trigger is a collective
            # every process joins, so all stop together (after this step's checkpoint).
            reason = stopper(step, metrics) if stopper is not None else None
            if reason is not None:
                accelerator.set_trigger()
            if accelerator.check_trigger():
                if accelerator.is_main_process:
                    reporter.on_early_stop(step, reason)
                return
        if should_pause is not None:
            # A time limit or preemption is coming: every process checkpoints this step.
            if should_pause():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                if step not in checkpoint_steps:
                    checkpoints.save(step)
                raise TrialPaused(step)


def finish(trial: TrialState) -> None:
    """Report the end, and release the accelerator's hold on the modules."""
    if trial.accelerator.is_main_process:
        trial.reporter.on_finish()
    release(trial)


def release(trial: TrialState) -> None:
    """Release the accelerator's hold on the modules (a pack's members share them)."""
    accelerator = trial.accelerator
    # Drop the DDP wrappers while the process group is alive. A DDP Reducer freed after
    # destroy_process_group (when train_trial returns) destroys the gloo group from its
    # deallocator while holding the GIL, and gloo's worker thread, waiting for the GIL, holds
    # the lock that destructor needs: a deadlock seen on 2-node CPU runs (torch 2.13).
    trial.training.release()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def train_trial(
    config: TrialConfig,
    reporter: Reporter,
    *,
    accelerator: Accelerator,
    stopper: Stopper | None = None,
    should_pause: Callable[[], bool] | None = None,
    can_stop: bool = False,
) -> None:
    """Train one trajectory to `max_steps`, evaluating and checkpointing on the step grid;
    `stopper` may end it at an evaluated step (early stopping); when `should_pause()` turns
    true (a scheduler's signal), the current step is checkpointed and `TrialPaused` raised.
    Every process asks at each evaluation whether to stop (a collective) when the spec's early
    stop is on, or when `can_stop` says the main process's stopper may stop it otherwise (an
    Optuna pruner)."""
    if accelerator.num_processes != config.world_size:
        # The trial's id, and its checkpoints' resume check, trust the world size it declares.
        raise WorldSizeMismatch(
            f"trial {config.label} ({config.trial_id}) has world size {config.world_size} (its "
            f"launcher's process count), and this run's is {accelerator.num_processes}: "
            "start it the way its launcher does (`dreamsweep run`), or change the launcher's "
            "process count, which makes it a new trial"
        )
    frozen_dtype = PRECISION[config.train.mixed_precision]
    model, class_files = setup_model(config, accelerator)
    method, trainable = setup_method(
        config, model, frozen_dtype=frozen_dtype, device=accelerator.device
    )
    data = setup_data(config, model, method, class_files, accelerator)
    offloaded = offload_cached_encoders(config.train, model, data)
    training = setup_optimizer(config, model, trainable, accelerator)
    generator = batch_generator(config.seed)

    checkpoints = TrialCheckpoints(
        config=config,
        accelerator=accelerator,
        reporter=reporter,
        method=method,
        model=model,
        optimizer=training.optimizer,
        lr_scheduler=training.lr_scheduler,
        generator=generator,
    )
    start_step = checkpoints.resume()

    trial = TrialState(
        config=config,
        accelerator=accelerator,
        reporter=reporter,
        model=model,
        method=method,
        data=data,
        training=training,
        offloaded=offloaded,
        generator=generator,
        evaluator=setup_evaluator(config, method, accelerator),
    )
    if accelerator.is_main_process:
        setup = describe_setup(
            model, training.optimizer, [name for name, _ in offloaded], training.modules
        )
        if trial.evaluator is not None:
            setup |= trial.evaluator.setup  # what the metrics ran, e.g. the face detector
        reporter.on_start(start_step=start_step, max_steps=config.max_steps, setup=setup)

    if start_step == 0:
        baseline = evaluate(trial, 0)  # the base model's value: the baseline each curve starts from
        if stopper is not None and accelerator.is_main_process:
            stopper(0, baseline)
    train(
        trial,
        checkpoints,
        start_step=start_step,
        stopper=stopper,
        should_pause=should_pause,
        can_stop=can_stop,
    )
    finish(trial)
