"""K trials (a pack) trained together on one frozen base model, each as it trains alone.

The recipe of `trainers.loop`, for K members: setup_model once → setup_members (each member's
LoRA adapter or token embeddings in the shared model, `trainers.packing`) → setup_data and
setup_optimizer per member → each member resumes from its own newest checkpoint → evaluate step
0 of the members that start there → train: every step draws each member's batch from its own
generator, runs ONE forward and backward pass over all members' rows (each row through its own
member's weights), and steps each member's own optimizer and schedule; then each member reports,
evaluates, checkpoints and may stop on its own step grid. A member that finishes or stops early
leaves the pack; the others go on.

A member's losses, curves, checkpoints and weights are those of the same trial alone (up to the
rounding of batched matrix products), under the same id, folder and MLflow run. Packing is for
one process (world size 1); `contract.packs.unpackable_reason` says which trials train alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from contract.packs import pack_key, unpackable_reason
from contract.trial import TrialConfig
from trainers.batches import BatchLayout, batch_generator, draw_step, micro_batch
from trainers.caching import latent_shape
from trainers.conditioning import PromptEmbeddings, encode_prompts, unet_conditioning
from trainers.loop import (
    PRECISION,
    offload_cached_encoders,
    release,
    setup_data,
    setup_evaluator,
    setup_model,
)
from trainers.memory import enable_gradient_checkpointing, make_optimizer, set_attention
from trainers.pack_evaluation import evaluate_members
from trainers.packing import (
    Router,
    add_lora_members,
    add_textual_inversion_members,
    member_name,
    named_member_parameters,
)
from trainers.prior import class_images
from trainers.reporting import Reporter, Stopper, TrialPaused
from trainers.resume import TrialCheckpoints
from trainers.setup_description import describe_setup
from trainers.state import Training, TrialState


class PackPaused(TrialPaused):
    """Every unfinished member checkpointed its current step and the pack stopped, to be
    resumed later; `steps`: trial id → that step."""

    def __init__(self, steps: dict[str, int]) -> None:
        super().__init__(min(steps.values(), default=0))
        self.steps = steps


@dataclass
class Member:
    """One trial of the pack: its state as a lone trial's recipe holds it, and where it is."""

    name: str  # its adapter's / embedding's name in the shared model
    state: TrialState
    checkpoints: TrialCheckpoints
    stopper: Stopper | None
    step: int = 0

    @property
    def config(self) -> TrialConfig:
        return self.state.config


def check_pack(configs: Sequence[TrialConfig]) -> None:
    """Refuse a pack whose members cannot share a base model or train in one process."""
    problems = [
        f"{c.label}: {reason}" for c in configs if (reason := unpackable_reason(c)) is not None
    ]
    if configs and len({pack_key(c) for c in configs}) > 1:
        shared = [json.loads(pack_key(c)) for c in configs]
        differing = sorted(k for k in shared[0] if len({json.dumps(s[k]) for s in shared}) > 1)
        problems.append(f"members differ in {', '.join(differing)} (a pack shares them)")
    if len({c.trial_id for c in configs}) != len(configs):
        problems.append("a trial appears twice")
    if not configs:
        problems.append("no members")
    if problems:
        raise ValueError("these trials cannot train as one pack: " + "; ".join(problems))


def setup_members(
    configs: Sequence[TrialConfig], accelerator: Accelerator, router: Router
) -> tuple[object, list, list]:
    """The shared base model with every member's trained weights in it; per member its method
    and parameters, and the class images of its class (prior preservation)."""
    first = configs[0]
    model, first_class_files = setup_model(first, accelerator)
    # Class images come from the base model alone: before any member's weights are in it
    # (`setup_model` made the first member's).
    class_files = [first_class_files] + [
        class_images(
            model,
            c.train.prior,
            class_token=c.subject.class_token,
            resolution=c.train.resolution,
            device=accelerator.device,
        )
        if c.uses_prior
        else []
        for c in configs[1:]
    ]
    frozen_dtype = PRECISION[first.train.mixed_precision]
    add = add_lora_members if first.method == "lora" else add_textual_inversion_members
    members = add(configs, model, router, frozen_dtype)
    train = first.train
    set_attention(model.unet, train.attention)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(
            model.unet,
            list(model.text_encoders.values()),
            text_encoder_trains=members[0][0].trains_text_encoder,
        )
    for module in model.modules.values():
        module.to(accelerator.device)
    return model, members, class_files


def setup_optimizers(
    configs: Sequence[TrialConfig], model, trainables: Sequence[list], accelerator: Accelerator
) -> list[Training]:
    """Each member's optimizer and schedule (as `trainers.loop.setup_optimizer` makes a lone
    trial's), all prepared with the shared trained modules."""
    modules = {"unet": model.unet, **model.text_encoders}
    trained = [n for n, m in modules.items() if any(p.requires_grad for p in m.parameters())]
    optimizers, schedulers = [], []
    for config, trainable in zip(configs, trainables, strict=True):
        optimizer = make_optimizer(config.train, trainable, config.learning_rate)
        optimizers.append(optimizer)
        schedulers.append(
            get_scheduler(
                config.train.lr_scheduler,
                optimizer=optimizer,
                num_warmup_steps=config.train.lr_warmup_steps,
                num_training_steps=config.max_steps,
            )
        )
    prepared = accelerator.prepare(*(modules[n] for n in trained), *optimizers, *schedulers)
    if not isinstance(prepared, tuple):
        prepared = (prepared,)
    wrapped = list(prepared[: len(trained)])
    modules.update(zip(trained, wrapped, strict=True))
    optimizers = prepared[len(trained) : len(trained) + len(configs)]
    schedulers = prepared[len(trained) + len(configs) :]
    return [
        Training(trainable, modules, trained, wrapped, optimizer, scheduler)
        for trainable, optimizer, scheduler in zip(trainables, optimizers, schedulers, strict=True)
    ]


def train_pack(
    configs: Sequence[TrialConfig],
    reporters: Sequence[Reporter],
    *,
    accelerator: Accelerator,
    stoppers: Sequence[Stopper | None],
    should_pause: Callable[[], bool] | None = None,
) -> None:
    """Train every member to its `max_steps` (or its early stop), each on its own step grid as
    alone; when `should_pause()` turns true, every unfinished member checkpoints its step and
    `PackPaused` is raised."""
    check_pack(configs)
    if accelerator.num_processes != 1:
        raise ValueError(f"a pack trains in one process; this run has {accelerator.num_processes}")
    router = Router()
    model, methods, class_files = setup_members(configs, accelerator, router)
    data = []
    for index, (config, (method, _)) in enumerate(zip(configs, methods, strict=True)):
        with router.routing(text=member_name(index)):  # the frozen encoders' cached embeddings
            data.append(setup_data(config, model, method, class_files[index], accelerator))
    offloaded = offload_cached_encoders(configs[0].train, model, data[0])
    trainings = setup_optimizers(configs, model, [t for _, t in methods], accelerator)

    members = []
    for index, config in enumerate(configs):
        method = methods[index][0]
        generator = batch_generator(config.seed)
        state = TrialState(
            config=config,
            accelerator=accelerator,
            reporter=reporters[index],
            model=model,
            method=method,
            data=data[index],
            training=trainings[index],
            offloaded=offloaded,
            generator=generator,
            evaluator=setup_evaluator(config, method, accelerator),
        )
        checkpoints = TrialCheckpoints(
            config=config,
            accelerator=accelerator,
            reporter=reporters[index],
            method=method,
            model=model,
            optimizer=trainings[index].optimizer,
            lr_scheduler=trainings[index].lr_scheduler,
            generator=generator,
            named_trainable=named_member_parameters(method, model),
        )
        member = Member(member_name(index), state, checkpoints, stoppers[index])
        member.step = checkpoints.resume()
        members.append(member)
    for member in members:
        training = member.state.training
        setup = describe_setup(
            model, training.optimizer, [n for n, _ in offloaded], training.modules
        )
        if member.state.evaluator is not None:
            setup |= member.state.evaluator.setup
        setup |= _member_parameter_counts(member, model)
        setup["pack_members"] = str(len(members))
        member.state.reporter.on_start(
            start_step=member.step, max_steps=member.config.max_steps, setup=setup
        )

    active = [m for m in members if m.step < m.config.max_steps]
    starting = [m for m in members if m.step == 0]
    baselines = evaluate_members(starting, router) if starting else {}
    for member in starting:
        if member.stopper is not None:  # the base model's values: where each curve starts
            member.stopper(0, baselines[member.name])
    for member in members:
        if member not in active:
            member.state.reporter.on_finish()
    trainings[0].train_mode()
    while active:
        losses = train_pack_step(active, router)
        for member, loss in zip(active, losses, strict=True):
            member.step += 1
            lr = member.state.training.lr_scheduler.get_last_lr()[0]
            member.state.reporter.on_train_step(member.step, loss=loss, lr=lr)
        due = [m for m in active if m.step % m.config.eval_every == 0]
        metrics = evaluate_members(due, router) if due else {}
        for member in list(active):
            if not _after_step(member, metrics.get(member.name)):
                active.remove(member)
                member.state.reporter.on_finish()
        if active and should_pause is not None and should_pause():
            for member in active:
                if member.step not in set(member.config.checkpoint_steps):
                    member.checkpoints.save(member.step)
            raise PackPaused({m.config.trial_id: m.step for m in active})
    release(members[0].state)


def _member_parameter_counts(member: Member, model) -> dict[str, str]:
    """The trained-parameter counts a lone trial's setup tags show: this member's own (the
    shared model holds every member's)."""
    counts = dict.fromkeys(model.modules, 0)
    for name, parameter in member.checkpoints.named_trainable.items():
        counts[name.split(".", 1)[0]] += parameter.numel()
    return {f"{name}.trained_parameters": str(count) for name, count in counts.items()}


def _after_step(member: Member, metrics: dict[str, float] | None) -> bool:
    """What a lone trial does after its step's evaluation: checkpoint, maybe stop. False when
    the member leaves the pack (finished or stopped)."""
    config, step = member.config, member.step
    if step in set(config.checkpoint_steps):
        member.checkpoints.save(step, evaluation=metrics)
    if (
        metrics is not None
        and member.stopper is not None
        and config.selection.early_stop is not None
    ):
        reason = member.stopper(step, metrics)
        if reason is not None:
            member.state.reporter.on_early_stop(step, reason)
            return False
    return step < config.max_steps


def _embeddings(members: Sequence[Member], router: Router) -> list[PromptEmbeddings]:
    """Each member's prompt embeddings (instance, then class): cached, or encoded in one pass
    over every member's prompts through its own trained weights."""
    first = members[0].state
    if not first.method.trains_text_encoder:
        return [
            m.state.data.cached_embeddings
            if m.state.data.cached_embeddings is not None
            else _frozen(m, router)
            for m in members
        ]
    model = first.model
    counts = [len(m.state.data.prompt_ids[0]) for m in members]
    ids = [
        torch.cat([m.state.data.prompt_ids[t] for m in members])
        for t in range(len(model.tokenizers))
    ]
    encoders = [first.training.modules[name] for name in model.text_encoders]
    # Routed by the caller's `text_owners`, held through the backward pass: a checkpointed text
    # encoder runs its forward again there.
    joint = encode_prompts(model.family, encoders, ids)
    out, start = [], 0
    for count in counts:
        pooled = None if joint.pooled is None else joint.pooled[start : start + count]
        out.append(PromptEmbeddings(joint.hidden[start : start + count], pooled))
        start += count
    return out


def text_owners(members: Sequence[Member]) -> list[str]:
    """Whose each prompt row is when the members' prompts are encoded together."""
    return [m.name for m in members for _ in range(len(m.state.data.prompt_ids[0]))]


def _frozen(member: Member, router: Router) -> PromptEmbeddings:
    model, data = member.state.model, member.state.data
    with torch.no_grad(), router.routing(text=member.name):
        return encode_prompts(model.family, list(model.text_encoders.values()), data.prompt_ids)


def train_pack_step(members: Sequence[Member], router: Router) -> list[float]:
    """One optimizer step of every member: each member's draws from its own generator, one
    forward and backward pass over all their rows per micro-batch, each member's own clipping,
    optimizer and schedule. Returns each member's mean loss over its micro-batches."""
    first = members[0].state
    model, accelerator, train = first.model, first.accelerator, first.config.train
    shape = latent_shape(model, train.resolution)
    steps = model.noise_scheduler.config.num_train_timesteps
    layouts = [BatchLayout.of(m.config.train, accelerator) for m in members]
    draws = [
        draw_step(m.state.generator, layout, m.state.data, shape=shape, num_train_timesteps=steps)
        for m, layout in zip(members, layouts, strict=True)
    ]
    losses: list[list[torch.Tensor]] = [[] for _ in members]
    for micro in range(layouts[0].micro_batches):
        batches = [
            micro_batch(
                d, micro, layout=layout, data=m.state.data, model=model, device=accelerator.device
            )
            for m, d, layout in zip(members, draws, layouts, strict=True)
        ]
        owners = [
            m.name for m, b in zip(members, batches, strict=True) for _ in range(len(b.noisy))
        ]
        with (
            accelerator.accumulate(*first.training.wrapped),
            router.routing(unet=owners, text=text_owners(members)),
        ):
            with accelerator.autocast():
                embeddings = _embeddings(members, router)
                conditioning = [
                    e.repeat_rows(m.config.train.batch_size)
                    for m, e in zip(members, embeddings, strict=True)
                ]
                hidden = torch.cat([c.hidden for c in conditioning])
                pooled = (
                    None
                    if conditioning[0].pooled is None
                    else torch.cat([c.pooled for c in conditioning])
                )
                prediction = first.training.modules["unet"](
                    torch.cat([b.noisy for b in batches]).to(PRECISION[train.mixed_precision]),
                    torch.cat([b.timesteps for b in batches]),
                    **unet_conditioning(
                        model.family, PromptEmbeddings(hidden, pooled), train.resolution
                    ),
                ).sample.float()
                member_losses, start = [], 0
                for m, b in zip(members, batches, strict=True):
                    rows, count = m.config.train.batch_size, len(b.noisy)
                    mine = prediction[start : start + count]
                    loss = F.mse_loss(mine[:rows], b.target[:rows].float())
                    if m.state.data.class_images is not None:
                        prior = F.mse_loss(mine[rows:], b.target[rows:].float())
                        loss = loss + m.config.train.prior.prior_loss_weight * prior
                    member_losses.append(loss)
                    start += count
            accelerator.backward(torch.stack(member_losses).sum())
            for m in members:
                training = m.state.training
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(training.trainable, m.config.train.max_grad_norm)
                training.optimizer.step()
                training.lr_scheduler.step()
                training.optimizer.zero_grad(set_to_none=True)
        for index, loss in enumerate(member_losses):
            losses[index].append(loss.detach())
    for m in members:
        m.state.method.after_optimizer_step(model)
    return [torch.stack(member).mean().item() for member in losses]
