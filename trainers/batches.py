"""What each optimizer step trains on: which images (and class images) fill its micro-batches,
the noise their posteriors are sampled with, the noise added and the timesteps.

One CPU generator (`batch_generator`) draws every batch, noise and timestep: identical on all
ranks and on any device, and its state is checkpointed so a resumed trial draws the same numbers.
Each optimizer step draws its whole effective batch (micro-batches × processes × batch) at once,
so gradient accumulation and data parallelism see the same examples as one big batch would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from contract.spec import TrainSpec
from trainers.caching import ImageSet
from trainers.conditioning import PromptEmbeddings
from trainers.models import BaseModel


def batch_generator(seed: int) -> torch.Generator:
    """The trial's one stream of batches, noise and timesteps, seeded with the trial's seed."""
    return torch.Generator("cpu").manual_seed(seed)


@dataclass
class TrainingData:
    """What the steps train on, computed once: the instance images, the class images (prior
    preservation only), and the prompts (instance, then class) as token ids and, when cached,
    as the frozen text encoders' embeddings."""

    instance_images: ImageSet
    class_images: ImageSet | None
    prompt_ids: list[torch.Tensor]  # one tensor per tokenizer (two for SDXL)
    cached_embeddings: PromptEmbeddings | None


@dataclass(frozen=True)
class BatchLayout:
    """How an effective batch is split: micro-batch m of rank r trains on rows
    [(m·P + r)·b, (m·P + r + 1)·b), P processes of b rows each."""

    batch: int
    processes: int
    rank: int
    micro_batches: int

    @classmethod
    def of(cls, train: TrainSpec, accelerator: Accelerator) -> BatchLayout:
        return cls(
            batch=train.batch_size,
            processes=accelerator.num_processes,
            rank=accelerator.process_index,
            micro_batches=train.gradient_accumulation_steps,
        )

    @property
    def effective(self) -> int:
        return self.batch * self.processes * self.micro_batches

    def rows(self, micro: int) -> torch.Tensor:
        """This rank's rows of micro-batch `micro`."""
        start = (micro * self.processes + self.rank) * self.batch
        return torch.arange(start, start + self.batch)


@dataclass(frozen=True)
class StepDraws:
    """One optimizer step's draws for its whole effective batch: instance rows, then (prior
    preservation) as many class rows."""

    index: torch.Tensor
    class_index: torch.Tensor | None
    sample_noise: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def draw_step(
    generator: torch.Generator,
    layout: BatchLayout,
    data: TrainingData,
    *,
    shape: tuple[int, int, int],
    num_train_timesteps: int,
) -> StepDraws:
    """Draw one step's images, posterior noise, added noise and timesteps, in that order (the
    order is the stream: changing it changes every trial's batches)."""
    effective = layout.effective
    index = torch.randint(0, len(data.instance_images), (effective,), generator=generator)
    rows = effective
    class_index = None
    if data.class_images is not None:
        class_index = torch.randint(0, len(data.class_images), (effective,), generator=generator)
        rows = 2 * effective  # instance rows, then class rows
    sample_noise = torch.randn((rows, *shape), generator=generator)
    noise = torch.randn((rows, *shape), generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (rows,), generator=generator)
    return StepDraws(index, class_index, sample_noise, noise, timesteps)


@dataclass(frozen=True)
class MicroBatch:
    """One rank's micro-batch on the accelerator: instance rows, then class rows."""

    noisy: torch.Tensor  # noised latents
    timesteps: torch.Tensor
    target: torch.Tensor  # what the UNet should predict (the noise, or the velocity)


def micro_batch(
    draws: StepDraws,
    micro: int,
    *,
    layout: BatchLayout,
    data: TrainingData,
    model: BaseModel,
    device: torch.device,
) -> MicroBatch:
    """This rank's rows of micro-batch `micro`: sampled latents, noised at their timesteps."""
    mine = layout.rows(micro)
    latents = data.instance_images.latents(
        model, draws.index[mine], draws.sample_noise[mine], device
    )
    if data.class_images is not None:
        theirs = mine + layout.effective
        class_latents = data.class_images.latents(
            model, draws.class_index[mine], draws.sample_noise[theirs], device
        )
        latents = torch.cat([latents, class_latents])
        mine = torch.cat([mine, theirs])
    noise, timesteps = draws.noise[mine].to(device), draws.timesteps[mine].to(device)
    noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
    if model.noise_scheduler.config.prediction_type == "v_prediction":
        target = model.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return MicroBatch(noisy, timesteps, target)
