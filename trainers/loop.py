"""The one training loop every method plugs into. Reads top to bottom:

load base model (and class images) → method picks trainable weights → memory features → cached
inputs → optimizer → resume from the newest complete checkpoint → evaluate step 0 → train,
evaluating and checkpointing on the step grid → finish.

A method only says which parameters train, how its prompt reads and how its weights are saved.
The loop knows nothing of MLflow, SLURM or Ray: it reports through a `Reporter`, and runs under
the `Accelerator` its caller made (`cluster.accelerator.make_accelerator`).
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from diffusers.optimization import get_scheduler

from contract.trial import TrialConfig
from evaluation.evaluator import Evaluation, Evaluator
from evaluation.sampling import fill_prompt, make_sampler
from trainers.caching import (
    ImageSet,
    cached_prompt_embeddings,
    latent_shape,
    load_images,
    tokenize,
)
from trainers.checkpoint import (
    CheckpointWriteError,
    begin_checkpoint,
    checkpoints_root,
    clean_leftovers,
    complete_checkpoints,
    latest_checkpoint,
    publish_checkpoint,
    remove_checkpoint,
    staging_dir,
    steps_to_remove,
)
from trainers.memory import enable_gradient_checkpointing, make_optimizer, set_attention
from trainers.methods import make_method
from trainers.models import BaseModel, assemble_pipeline, load_base_model
from trainers.prior import class_images, class_prompt

PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRAINER_STATE = "trainer_state.pt"
OPTIMIZER_SHARD = "optimizer.rank{rank:03d}.pt"  # one per rank under DeepSpeed ZeRO
OPTIMIZER_SHARDS = "optimizer.rank*.pt"
INSTANCE_PROMPT = "a photo of {token} {class}"  # DreamBooth's instance prompt


class Reporter(Protocol):
    """Where the loop's progress goes (MLflow, a progress bar, …)."""

    def on_start(self, *, start_step: int, max_steps: int, setup: dict[str, str]) -> None: ...
    def on_train_step(self, step: int, *, loss: float, lr: float) -> None: ...
    def on_evaluation(self, step: int, evaluation: Evaluation) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_checkpoint_removed(self, step: int) -> None: ...
    def on_early_stop(self, step: int, reason: str) -> None: ...
    def on_finish(self) -> None: ...


Stopper = Callable[[int, dict[str, float]], str | None]
"""After each evaluation: (step, metrics) → why the trial should stop now, or None."""


class TrialPaused(Exception):
    """The trial checkpointed `step` and stopped, to be resumed later (requeue, preemption)."""

    def __init__(self, step: int) -> None:
        super().__init__(f"paused after checkpointing step {step}")
        self.step = step


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


def trained_parameters(model: BaseModel) -> dict[str, torch.nn.Parameter]:
    """Every parameter that trains, by a stable name: what a checkpoint must restore."""
    named = {}
    for prefix, module in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        for name, parameter in module.named_parameters():
            if parameter.requires_grad:
                named[f"{prefix}.{name}"] = parameter
    return named


def _dtypes(parameters: list[torch.nn.Parameter]) -> str:
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in parameters})) or "-"


def describe_setup(
    model: BaseModel, optimizer: torch.optim.Optimizer, offloaded: list[str]
) -> dict[str, str]:
    """What is really on, read from the live objects (not from the spec): logged with the run,
    so a curve can be traced to the precision, optimizer and kernels that produced it."""
    setup = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(model, name)
        parameters = list(module.parameters())
        trained = [p for p in parameters if p.requires_grad]
        setup[f"{name}.trained_parameters"] = str(sum(p.numel() for p in trained))
        setup[f"{name}.trained_dtype"] = _dtypes(trained)
        setup[f"{name}.frozen_dtype"] = _dtypes([p for p in parameters if not p.requires_grad])
        # transformers 5 renamed the flag; diffusers kept the old name.
        flag = (
            "is_activation_checkpointing" if name == "text_encoder" else "is_gradient_checkpointing"
        )
        setup[f"{name}.gradient_checkpointing"] = str(bool(getattr(module, flag, False)))
    setup["unet.attention"] = ",".join(
        sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    )
    chain = [optimizer]  # Accelerate wraps the optimizer (and DeepSpeed wraps it again)
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    inner = chain[-1]
    setup["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
    setup["optimizer_wrappers"] = " > ".join(type(o).__name__ for o in chain[:-1]) or "-"
    setup["offloaded"] = ",".join(offloaded) or "-"
    setup["cpu_threads"] = str(torch.get_num_threads())
    return setup


def train_trial(
    config: TrialConfig,
    reporter: Reporter,
    *,
    accelerator: Accelerator,
    stopper: Stopper | None = None,
    should_pause: Callable[[], bool] | None = None,
) -> None:
    """Train one trajectory to `max_steps`, evaluating and checkpointing on the step grid;
    `stopper` may end it at an evaluated step (early stopping); when `should_pause()` turns
    true (a scheduler's signal), the current step is checkpointed and `TrialPaused` raised."""
    train = config.train
    device = accelerator.device
    frozen_dtype = PRECISION[train.mixed_precision]

    # Base model, and the class images prior preservation needs. The node's main process goes
    # first: it builds or downloads into the shared caches once, the other ranks then read.
    with accelerator.local_main_process_first():
        model = load_base_model(config.base_model)
        class_files = []
        if config.uses_prior:
            class_files = class_images(
                model,
                train.prior,
                class_token=config.subject.class_token,
                resolution=train.resolution,
                device=device,
            )

    # The method freezes the base (in the low precision) and adds what trains (in fp32).
    method = make_method(config.method, config.options, config.subject)
    set_seed(config.seed)  # the method's new weights (adapter init) draw from the global RNG
    trainable = method.setup(model, frozen_dtype=frozen_dtype)
    set_attention(model.unet, train.attention)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(
            model.unet, model.text_encoder, text_encoder_trains=method.trains_text_encoder
        )
    for module in (model.unet, model.vae, model.text_encoder):
        module.to(device)

    # Inputs computed once: VAE posteriors and frozen-text-encoder prompt embeddings, from the
    # disk cache. Whatever is cached no longer needs its encoder on the accelerator.
    with accelerator.local_main_process_first():
        instance_images = load_images(
            model,
            config.image_files,
            resolution=train.resolution,
            cache=train.cache_latents,
            device=device,
        )
        class_set: ImageSet | None = None
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
        prompt_ids = tokenize(model, prompts).to(device)
        cached_embeddings = None
        if train.cache_text_embeddings and not method.trains_text_encoder:
            cached_embeddings = cached_prompt_embeddings(model, prompts, device)
    offloaded = []
    if train.cache_latents:
        offloaded.append(("vae", model.vae))
    if cached_embeddings is not None:
        offloaded.append(("text_encoder", model.text_encoder))
    for _, module in offloaded:
        module.to("cpu")

    # Optimizer and schedule. Accelerate steps a prepared scheduler once per process (and only
    # on optimizer steps): scale its horizon to match.
    optimizer = make_optimizer(train, trainable, config.learning_rate)
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
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

    # Resume from the newest COMPLETE checkpoint: weights, optimizer, schedule, RNG. Under
    # DeepSpeed ZeRO every rank holds its own partition of the optimizer state, so every rank
    # saves and loads its own file; otherwise the main process saves the one state.
    root = checkpoints_root(config)
    named_trainable = trained_parameters(model)
    sharded_optimizer = accelerator.distributed_type == DistributedType.DEEPSPEED
    start_step = 0
    if accelerator.is_main_process:
        clean_leftovers(root)
    accelerator.wait_for_everyone()
    resumed = latest_checkpoint(root)
    if resumed is not None:
        start_step, folder = resumed
        state = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, parameter in named_trainable.items():
                parameter.copy_(state["trainable"][name])
        if sharded_optimizer:
            shard_files = sorted(folder.glob(OPTIMIZER_SHARDS))
            if len(shard_files) != accelerator.num_processes:
                raise RuntimeError(
                    f"{folder} holds the optimizer state of {len(shard_files)} DeepSpeed "
                    f"processes, and this trial runs {accelerator.num_processes}: resume it with "
                    "the same launcher.processes_per_trial"
                )
            # ZeRO reads every rank's shard and takes its own; the fp32 master partitions come
            # from the shards, not from the (possibly low-precision) module weights.
            shards = [torch.load(f, map_location="cpu", weights_only=False) for f in shard_files]
            optimizer.optimizer.load_state_dict(shards, load_from_fp32_weights=True)
        else:
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
            reference_files=config.image_files,
            resolution=train.resolution,
            device=device,
        )
        setup = describe_setup(model, optimizer, [name for name, _ in offloaded])
        reporter.on_start(start_step=start_step, max_steps=config.max_steps, setup=setup)

    def evaluate(step: int) -> dict[str, float]:
        """Evaluate (main process) and return the metrics; other processes get {}."""
        metrics: dict[str, float] = {}
        if evaluator is not None:
            pipeline = assemble_pipeline(
                model, make_sampler(config.eval.scheduler, model.noise_scheduler.config)
            )
            for module in modules.values():
                module.eval()
            on_accelerator = on_device([module for _, module in offloaded], device)
            with on_accelerator, torch.no_grad(), accelerator.autocast():
                evaluation = evaluator(pipeline)
            reporter.on_evaluation(step, evaluation)
            metrics = evaluation.metrics
            for name in trained:
                modules[name].train()
        accelerator.wait_for_everyone()
        return metrics

    def save(step: int) -> None:
        """Stage every rank's part, then the main process publishes the step atomically."""
        if accelerator.is_main_process:
            begin_checkpoint(root, step)
        accelerator.wait_for_everyone()
        staging = staging_dir(root, step)
        if sharded_optimizer:
            shard = OPTIMIZER_SHARD.format(rank=accelerator.process_index)
            torch.save(optimizer.state_dict(), staging / shard)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                method.save_weights(model, staging)
                state = {
                    "step": step,
                    "trainable": {k: p.detach().cpu().clone() for k, p in named_trainable.items()},
                    "optimizer": None if sharded_optimizer else optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                }
                torch.save(state, staging / TRAINER_STATE)
                published = publish_checkpoint(root, step)
            except Exception as err:  # torch and safetensors report a full disk in their own types
                shutil.rmtree(staging, ignore_errors=True)  # give the space back
                raise CheckpointWriteError(root, step, err) from err
            reporter.on_checkpoint(step, published)
            retain(step)
        accelerator.wait_for_everyone()

    def retain(newest: int) -> None:
        """Apply the retention policy; only the newest checkpoint keeps the resume state."""
        policy = train.checkpoints
        existing = complete_checkpoints(root)
        protected = set(config.eval_steps) if policy.keep_eval_steps else set()
        doomed = set(
            steps_to_remove(
                [s for s, _ in existing], keep_last=policy.keep_last, protected=protected
            )
        )
        for step, folder in existing:
            if step in doomed:
                remove_checkpoint(folder)
                reporter.on_checkpoint_removed(step)
            elif step != newest:
                for resume_file in (TRAINER_STATE, OPTIMIZER_SHARDS):
                    for path in folder.glob(resume_file):
                        path.unlink()

    if start_step == 0:
        baseline = evaluate(0)  # the base model's value: the baseline each curve starts from
        if stopper is not None and accelerator.is_main_process:
            stopper(0, baseline)

    # Each optimizer step draws its whole effective batch (micro-batches × processes × batch)
    # at once, so gradient accumulation and data parallelism see the same examples as one big
    # batch would; micro-batch m of rank r trains on rows [(m·P + r)·b, (m·P + r + 1)·b).
    batch, processes = train.batch_size, accelerator.num_processes
    micro_batches = train.gradient_accumulation_steps
    effective = batch * processes * micro_batches
    shape = latent_shape(model, train.resolution)
    prior_weight = train.prior.prior_loss_weight
    checkpoint_steps = set(config.checkpoint_steps)
    for name in trained:
        modules[name].train()
    for step in range(start_step + 1, config.max_steps + 1):
        index = torch.randint(0, len(instance_images), (effective,), generator=generator)
        rows = effective
        if class_set is not None:
            class_index = torch.randint(0, len(class_set), (effective,), generator=generator)
            rows = 2 * effective  # instance rows, then class rows
        sample_noise = torch.randn((rows, *shape), generator=generator)
        noise = torch.randn((rows, *shape), generator=generator)
        timesteps = torch.randint(
            0, model.noise_scheduler.config.num_train_timesteps, (rows,), generator=generator
        )
        losses = []
        for micro in range(micro_batches):
            start = (micro * processes + accelerator.process_index) * batch
            mine = torch.arange(start, start + batch)
            latents = instance_images.latents(model, index[mine], sample_noise[mine], device)
            if class_set is not None:
                theirs = mine + effective
                class_latents = class_set.latents(
                    model, class_index[mine], sample_noise[theirs], device
                )
                latents = torch.cat([latents, class_latents])
                mine = torch.cat([mine, theirs])
            step_noise, step_timesteps = noise[mine].to(device), timesteps[mine].to(device)
            noisy = model.noise_scheduler.add_noise(latents, step_noise, step_timesteps)
            if model.noise_scheduler.config.prediction_type == "v_prediction":
                target = model.noise_scheduler.get_velocity(latents, step_noise, step_timesteps)
            else:
                target = step_noise
            # Forward passes inside `accumulate` (DDP skips the gradient sync of all but the
            # last micro-batch) and under autocast, which covers the frozen modules too: under
            # mixed precision a trained fp32 module meets a frozen low-precision one.
            with accelerator.accumulate(*wrapped):
                with accelerator.autocast():
                    # One embedding per prompt (instance, then class), repeated over its rows.
                    if method.trains_text_encoder:
                        embeddings = text_encoder(prompt_ids)[0]
                    elif cached_embeddings is not None:
                        embeddings = cached_embeddings
                    else:
                        with torch.no_grad():
                            embeddings = model.text_encoder(prompt_ids)[0]
                    encoder_states = embeddings.repeat_interleave(batch, dim=0)
                    prediction = unet(noisy.to(frozen_dtype), step_timesteps, encoder_states)
                    prediction = prediction.sample.float()
                    loss = F.mse_loss(prediction[:batch], target[:batch].float())
                    if class_set is not None:
                        prior_loss = F.mse_loss(prediction[batch:], target[batch:].float())
                        loss = loss + prior_weight * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, train.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        method.after_optimizer_step(model)

        step_loss = torch.stack(losses).mean()
        mean_loss = accelerator.reduce(step_loss, reduction="mean").item()
        if accelerator.is_main_process:
            reporter.on_train_step(step, loss=mean_loss, lr=lr_scheduler.get_last_lr()[0])
        metrics = evaluate(step) if step % config.eval_every == 0 else None
        if step in checkpoint_steps:
            save(step)
        if metrics is not None and config.selection.early_stop is not None:
            # The main process decides (only it holds the stopper); the trigger is a collective
            # every process joins, so all stop together (after this step's checkpoint).
            reason = stopper(step, metrics) if stopper is not None else None
            if reason is not None:
                accelerator.set_trigger()
            if accelerator.check_trigger():
                if accelerator.is_main_process:
                    reporter.on_early_stop(step, reason)
                break
        if should_pause is not None:
            # A time limit or preemption is coming: every process checkpoints this step.
            if should_pause():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                if step not in checkpoint_steps:
                    save(step)
                raise TrialPaused(step)

    if accelerator.is_main_process:
        reporter.on_finish()
    # Drop the DDP wrappers while the process group is alive. A DDP Reducer freed after
    # destroy_process_group (when this function returns) destroys the gloo group from its
    # deallocator while holding the GIL, and gloo's worker thread, waiting for the GIL, holds
    # the lock that destructor needs: a deadlock seen on 2-node CPU runs (torch 2.13).
    modules.clear()
    wrapped.clear()
    unet = text_encoder = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
