"""Loading the base model's components: a hub id, a local diffusers folder, a built-in random-init
model (`tiny`, `tiny-sd2`, `tiny-sdxl`: `trainers.tiny`) or the toy world's pretrained `toy`
(a committed folder: `contract.toy_models`).

All go through the same `from_pretrained` calls. The family (`contract.families`) is read from
the folder's configs, never from the name: it decides whether there is a second text encoder
(SDXL) and which pipeline the parts assemble into.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from contract.cache import build_once
from contract.families import BUILTIN_MODELS, family_of_folder
from contract.toy_models import TOY, toy_model_path
from trainers.tiny import BUILDERS

PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
"""Family → the diffusers pipeline class that runs it."""


@dataclass
class BaseModel:
    """The pipeline parts a trial trains against."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    """Where the weights came from (hub id or folder)."""
    family: str = "sd1"
    text_encoder_2: CLIPTextModelWithProjection | None = None
    """SDXL's second (projected) text encoder; None for SD 1.x/2.x."""
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = field(default=True)
    """SDXL: an empty negative prompt is zeros (the pipeline's own default)."""

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by component name (one, or two for SDXL)."""
        encoders = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            encoders["text_encoder_2"] = self.text_encoder_2
        return encoders

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every module with weights, by component name."""
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders}


def resolve_model_source(base_model: str) -> str:
    """A built-in model → its folder (`tiny`s built on first use, `toy` committed); a hub id or
    folder is passed through."""
    if base_model == TOY:
        return str(toy_model_path("base_model"))
    if base_model in BUILTIN_MODELS:
        name, build = BUILDERS[base_model]
        return str(build_once(name, build, isolate=True))
    return base_model


def model_folder(base_model: str) -> Path:
    """The local folder of a built-in model, folder or hub id (a hub id's snapshot, resolved
    and downloaded into the Hugging Face cache as `from_pretrained` would)."""
    source = resolve_model_source(base_model)
    if Path(source).is_dir():
        return Path(source)
    return Path(DiffusionPipeline.download(source))


def load_base_model(base_model: str, *, dtype: torch.dtype = torch.float32) -> BaseModel:
    """Load a model's parts (UNet, VAE, text encoder(s), tokenizer(s), noise scheduler) from a
    built-in name, hub id or folder.

    Hub credentials, when needed, come from the environment (`HF_TOKEN`), never from the spec.
    """
    folder = model_folder(base_model)
    family = family_of_folder(folder)
    source = resolve_model_source(base_model)  # a hub id stays one: caches are keyed by it
    extra = {}
    if family == "sdxl":
        extra = {
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype
            ),
            "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
            "force_zeros_for_empty_prompt": StableDiffusionXLPipeline.load_config(folder).get(
                "force_zeros_for_empty_prompt", True
            ),
        }
    return BaseModel(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype
        ),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        source=source,
        family=family,
        **extra,
    )


def assemble_pipeline(model: BaseModel, sampler: object) -> DiffusionPipeline:
    """The family's pipeline over the model's own modules (shared, not copied), no safety
    checker and no watermark."""
    if model.family == "sdxl":
        pipeline = StableDiffusionXLPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer,
            tokenizer_2=model.tokenizer_2,
            unet=model.unet,
            scheduler=sampler,
            force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(
    base_model: str, *, dtype: torch.dtype = torch.float32, **components: object
) -> DiffusionPipeline:
    """The base model's own pipeline of its family, through `from_pretrained` (`components`
    replace its parts, e.g. a trained `unet`), without safety checker or watermark."""
    folder = model_folder(base_model)
    family = family_of_folder(folder)
    options: dict[str, object] = {"torch_dtype": dtype, **components}
    if family == "sdxl":
        options["add_watermarker"] = False
    else:
        options |= {"safety_checker": None, "requires_safety_checker": False}
    pipeline = PIPELINES[family].from_pretrained(folder, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
