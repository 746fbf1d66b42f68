"""The pretraining stages, each trained on the toy world from (seed, step) and exported in the
format its loader reads: vae (a diffusers `AutoencoderKL` folder), clip (a `CLIPModel` folder
with the CLIP BPE tokenizer and image processor), unet (the whole `StableDiffusionPipeline`
folder), aesthetic (the LAION head's state dict), oracle (the oracle's CNN, safetensors).

Each returns its build record (steps, final loss, timings, what it measured on held-out draws).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from evaluation.aesthetics import AestheticHead
from evaluation.clip import CLIP_MEAN, CLIP_STD
from evaluation.tokenizer import write_clip_tokenizer
from toyworld.architectures import (
    PROJECTION_DIM,
    make_clip,
    make_noise_scheduler,
    make_unet,
    make_vae,
    parameter_count,
    text_encoder_of,
)
from toyworld.checkpoint import StageSettings, atomic_save, run_stage, step_generator
from toyworld.oracle import save_attribute_net, train_attribute_net
from toyworld.scene import CLASSES, caption, pretraining_scene, scene_rng
from toyworld.world import (
    CAPTION_STREAM,
    corrupted_image,
    grid,
    images_to_tensor,
    pretraining_samples,
    tensor_to_images,
)

WORK = "work"
"""Checkpoints, the latent pool, the VAE alone: what resuming needs, not what is shipped (the
VAE ships inside `toy-sd/`)."""
VAE_FOLDER = f"{WORK}/vae"
POOL_CHUNK = 512
VALIDATION_START = 10**9
"""Validation draws: indices no training step reaches."""
CAPTION_DROPOUT = 0.1
"""Share of empty captions in UNet training: the unconditional branch of classifier-free
guidance."""
KL_WEIGHT = 1e-6
CLEAN_SCORE, CORRUPTION_PENALTY = 8.0, 6.0
"""Aesthetic targets: a clean render scores 8, one corrupted at severity s scores 8 − 6 s."""
Log = Callable[[str], None]


def _publish(staging: Path, target: Path) -> None:
    """Move a finished export into place (a reader never sees half of one)."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _half(module: torch.nn.Module) -> torch.nn.Module:
    """Stored in float16 (the 40 MB budget); loaders upcast with `torch_dtype`."""
    return module.to(torch.float16)


def vae_stage(out: Path, settings: StageSettings, seed: int, log: Log) -> dict[str, object]:
    torch.manual_seed(seed)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.learning_rate)

    def step(index: int) -> float:
        samples = pretraining_samples(seed, index * settings.batch_size, settings.batch_size)
        pixels = images_to_tensor([s.image for s in samples])
        posterior = vae.encode(pixels).latent_dist
        decoded = vae.decode(posterior.sample(generator=step_generator(seed, index))).sample
        loss = F.mse_loss(decoded, pixels) + 0.2 * F.l1_loss(decoded, pixels)
        loss = loss + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = run_stage(
        "vae",
        out / WORK / "checkpoints" / "vae.pt",
        settings,
        {"vae": vae},
        optimizer,
        step,
        log=log,
    )
    validation = pretraining_samples(seed, VALIDATION_START, 64)
    with torch.no_grad():
        pixels = images_to_tensor([s.image for s in validation])
        latents = vae.encode(pixels).latent_dist.mode()
        decoded = vae.decode(latents).sample.clamp(-1, 1)
    scaling = float(1.0 / latents.std())  # unit-variance latents, as SD's 0.18215 makes them
    vae.register_to_config(scaling_factor=scaling)
    originals, copies = tensor_to_images(pixels[:16]), tensor_to_images(decoded[:16])
    grid(originals + copies, columns=16).save(out / "vae_reconstructions.png")
    staging = out / WORK / ".vae.partial"
    _half(vae).save_pretrained(staging)
    _publish(staging, out / VAE_FOLDER)
    return {
        **vars(result),
        "parameters": parameter_count(vae),
        "scaling_factor": scaling,
        "validation_mse": float(F.mse_loss(decoded, pixels)),
    }


def _clip_pixels(images: list) -> torch.Tensor:
    """What `CLIPImageProcessorPil` makes of a 64 px image: 0–1, then CLIP's mean and std."""
    pixels = (images_to_tensor(images) + 1) / 2
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (pixels - mean) / std


def _tokens(tokenizer: CLIPTokenizer, texts: list[str], *, pad_to_max: bool) -> dict:
    return tokenizer(
        texts,
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    )


def clip_stage(out: Path, settings: StageSettings, seed: int, log: Log) -> dict[str, object]:
    torch.manual_seed(seed)
    clip = make_clip()
    tokenizer = write_clip_tokenizer(out / WORK / "tokenizer")
    optimizer = torch.optim.AdamW(clip.parameters(), lr=settings.learning_rate, weight_decay=0.1)

    def step(index: int) -> float:
        samples = pretraining_samples(seed + 1, index * settings.batch_size, settings.batch_size)
        tokens = _tokens(tokenizer, [s.caption for s in samples], pad_to_max=False)
        output = clip(
            **tokens, pixel_values=_clip_pixels([s.image for s in samples]), return_loss=True
        )
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        return float(output.loss.detach())

    result = run_stage(
        "clip",
        out / WORK / "checkpoints" / "clip.pt",
        settings,
        {"clip": clip},
        optimizer,
        step,
        log=log,
    )
    validation = pretraining_samples(seed + 1, VALIDATION_START, 128)
    with torch.no_grad():
        images = F.normalize(
            clip.get_image_features(
                pixel_values=_clip_pixels([s.image for s in validation])
            ).pooler_output,
            dim=-1,
        )
        texts = F.normalize(
            clip.get_text_features(
                **_tokens(tokenizer, [s.caption for s in validation], pad_to_max=False)
            ).pooler_output,
            dim=-1,
        )
        classes = F.normalize(
            clip.get_text_features(
                **_tokens(tokenizer, [f"a photo of a {c}" for c in CLASSES], pad_to_max=False)
            ).pooler_output,
            dim=-1,
        )
    truth = torch.tensor([CLASSES.index(s.labels["object_class"]) for s in validation])
    retrieval = (images @ texts.T).argmax(1) == torch.arange(len(validation))
    zero_shot = (images @ classes.T).argmax(1) == truth
    staging = out / ".clip.partial"
    _half(clip).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    CLIPImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(staging)
    _publish(staging, out / "clip")
    return {
        **vars(result),
        "parameters": parameter_count(clip),
        "validation_retrieval_top1_of_128": float(retrieval.float().mean()),
        "validation_zero_shot_class": float(zero_shot.float().mean()),
    }


def _load_clip(out: Path) -> tuple[CLIPModel, CLIPTokenizer]:
    if not (out / "clip").is_dir():
        raise FileNotFoundError(f"{out / 'clip'}: build the clip stage first")
    clip = CLIPModel.from_pretrained(out / "clip", torch_dtype=torch.float32).eval()
    return clip.requires_grad_(False), CLIPTokenizer.from_pretrained(out / "clip")


SAMPLE_PROMPTS = [
    "a photo of a red boxy toy on a blue background",
    "a photo of a green tall cup on a pink background",
    "a cartoon of a yellow pointed house on a green background",
    "a photo of a orange round tree on a cream background",
    "a photo of a small purple toy, on the left",
    "a photo of a large black cup, at the top",
    "a cartoon of a blue flat house with a red roof",
    "a photo of a brown pointed tree on a grey background",
]


def latent_pool(
    out: Path, vae: AutoencoderKL, seed: int, size: int, log: Log, vae_tag: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posteriors (mean, std: float16 [size, 4, 8, 8]) of draws 0…size-1: rendered and
    encoded once, in chunks saved as they are done (a kill loses one chunk), then sampled by
    every UNet step, so the UNet's steps spend no time on rendering or the VAE encoder.
    `vae_tag` names the VAE (its build): another VAE's pool is never reused."""
    means, stds = [], []
    for start in range(0, size, POOL_CHUNK):
        count = min(POOL_CHUNK, size - start)
        path = out / WORK / "latents" / vae_tag / f"seed{seed}-{start:07d}-{count}.pt"
        if not path.is_file():
            samples = pretraining_samples(seed, start, count)
            with torch.no_grad():
                posterior = vae.encode(images_to_tensor([s.image for s in samples])).latent_dist
            atomic_save({"mean": posterior.mean.half(), "std": posterior.std.half()}, path)
            log(f"unet: latent pool {start + count}/{size}")
        chunk = torch.load(path, weights_only=True)
        means.append(chunk["mean"])
        stds.append(chunk["std"])
    return torch.cat(means)[:size], torch.cat(stds)[:size]


def unet_stage(
    out: Path,
    settings: StageSettings,
    seed: int,
    log: Log,
    inputs: dict[str, object],
    pool_size: int,
    preview_steps: int = 25,
) -> dict[str, object]:
    if not (out / VAE_FOLDER).is_dir():
        raise FileNotFoundError(f"{out / VAE_FOLDER}: build the vae stage first")
    vae = AutoencoderKL.from_pretrained(out / VAE_FOLDER, torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    clip, tokenizer = _load_clip(out)
    text_encoder = text_encoder_of(clip).requires_grad_(False)
    torch.manual_seed(seed)
    unet = make_unet()
    scheduler = make_noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)

    vae_build = inputs["vae"]
    pool_mean, pool_std = latent_pool(
        out, vae, seed + 2, pool_size, log, f"vae-seed{vae_build['seed']}-{vae_build['steps']}"
    )

    def step(index: int) -> float:
        generator = step_generator(seed, index, stream=2)
        picks = torch.randint(0, pool_size, (settings.batch_size,), generator=generator)
        # A fresh caption of the pooled draw at each visit: the grammar's phrases vary.
        captions = [
            caption(pretraining_scene(seed + 2, pick), scene_rng(seed, index, CAPTION_STREAM + j))
            for j, pick in enumerate(picks.tolist())
        ]
        drop = torch.rand(len(captions), generator=generator) < CAPTION_DROPOUT
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        mean, std = pool_mean[picks].float(), pool_std[picks].float()
        noise_z = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * noise_z) * vae.config.scaling_factor
        with torch.no_grad():
            hidden = text_encoder(_tokens(tokenizer, captions, pad_to_max=True).input_ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(captions),), generator=generator
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, hidden).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = run_stage(
        "unet",
        out / WORK / "checkpoints" / "unet.pt",
        settings,
        {"unet": unet},
        optimizer,
        step,
        inputs=inputs,
        log=log,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    sampler = DDIMScheduler.from_config(scheduler.config)
    preview = StableDiffusionPipeline(**{**pipeline.components, "scheduler": sampler})
    preview.set_progress_bar_config(disable=True)
    images = preview(
        SAMPLE_PROMPTS * 2,
        num_inference_steps=preview_steps,
        guidance_scale=4.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images
    grid(images, columns=8).save(out / "samples.png")
    staging = out / ".toy-sd.partial"
    for module in (vae, text_encoder, unet):
        _half(module)
    pipeline.save_pretrained(staging)
    _publish(staging, out / "toy-sd")
    return {
        **vars(result),
        "parameters": parameter_count(unet),
        "sample_prompts": SAMPLE_PROMPTS,
        "sampler": f"DDIM, {preview_steps} steps, guidance 4",
    }


def aesthetic_stage(
    out: Path, settings: StageSettings, seed: int, log: Log, inputs: dict[str, object]
) -> dict[str, object]:
    clip, _ = _load_clip(out)
    torch.manual_seed(seed)
    head = AestheticHead(PROJECTION_DIM)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate)

    def batch(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Even draws clean, odd draws corrupted: embeddings and target scores."""
        images, targets = [], []
        for index in range(start, start + count):
            if index % 2 == 0:
                images.append(pretraining_samples(seed + 3, index, 1)[0].image)
                targets.append(CLEAN_SCORE)
            else:
                image, _, severity = corrupted_image(seed + 3, index)
                images.append(image)
                targets.append(CLEAN_SCORE - CORRUPTION_PENALTY * severity)
        with torch.no_grad():
            features = clip.get_image_features(pixel_values=_clip_pixels(images)).pooler_output
        return F.normalize(features, dim=-1), torch.tensor(targets)

    def step(index: int) -> float:
        embeddings, targets = batch(index * settings.batch_size, settings.batch_size)
        loss = F.mse_loss(head(embeddings), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = run_stage(
        "aesthetic",
        out / WORK / "checkpoints" / "aesthetic.pt",
        settings,
        {"head": head},
        optimizer,
        step,
        inputs=inputs,
        log=log,
    )
    embeddings, targets = batch(VALIDATION_START, 128)
    with torch.no_grad():
        scores = head(embeddings)
    clean = targets == CLEAN_SCORE
    partial = out / "aesthetic_head.pth.partial"
    torch.save(head.state_dict(), partial)  # the layout `evaluation.aesthetics` loads
    partial.replace(out / "aesthetic_head.pth")
    return {
        **vars(result),
        "parameters": parameter_count(head),
        "validation_mean_clean": float(scores[clean].mean()),
        "validation_mean_corrupted": float(scores[~clean].mean()),
        "validation_correlation": float(torch.corrcoef(torch.stack([scores, targets]))[0, 1]),
    }


def vae_round_trip(vae: AutoencoderKL) -> Callable[[list], list]:
    """Images → as the VAE decodes their latents (the posterior's mean): what a generated
    image is at best."""

    def decode(images: list) -> list:
        with torch.no_grad():
            latents = vae.encode(images_to_tensor(images)).latent_dist.mode()
            return tensor_to_images(vae.decode(latents).sample)

    return decode


def oracle_stage(out: Path, settings: StageSettings, seed: int, log: Log) -> dict[str, object]:
    # At most 4000 renders, each seen about 28 times at the build's 1600 × 64 (the CNN is not
    # resumable: it takes 1.5 min); at least 64 (32 held out for validation) for a tiny build.
    count = max(64, min(4000, settings.steps * settings.batch_size // 8))
    vae = AutoencoderKL.from_pretrained(out / VAE_FOLDER, torch_dtype=torch.float32).eval()
    net, record = train_attribute_net(
        seed=seed,
        steps=settings.steps,
        batch_size=settings.batch_size,
        count=count,
        learning_rate=settings.learning_rate,
        decode=vae_round_trip(vae),
    )
    save_attribute_net(net, record, out / "oracle.safetensors")
    log(f"oracle: {record}")
    return record
