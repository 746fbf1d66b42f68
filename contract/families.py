"""The model families dreamsweep trains, and how a diffusers folder says which one it is.

The family is read from the folder's configs (`model_index.json`'s `_class_name`, the UNet's
`use_linear_projection`), never from the model's name: a renamed or mirrored checkpoint is still
detected. Light on purpose (stdlib + json): the spec's validation reads it before any torch
import; the trainers use the same definitions to build the family's pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    """One supported family: which diffusers pipeline runs it and its native resolution."""

    name: str
    pipeline: str
    """The diffusers pipeline class (as `model_index.json` names it)."""
    description: str
    resolution: int
    """Native resolution (for SD 2.x that of its epsilon models; see `default_resolution`)."""
    v_prediction_resolution: int | None = None
    """Native resolution of the family's v-prediction models, where it differs."""

    def default_resolution(self, prediction_type: str = "epsilon") -> int:
        """The resolution the family's models were trained at (SD 2.x: 768 for its 768-v
        v-prediction models, 512 for the 512 epsilon base)."""
        if prediction_type == "v_prediction" and self.v_prediction_resolution is not None:
            return self.v_prediction_resolution
        return self.resolution


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        "sd1",
        "StableDiffusionPipeline",
        "Stable Diffusion 1.x: one CLIP ViT-L text encoder (last layer), epsilon prediction",
        512,
    ),
    "sd2": Family(
        "sd2",
        "StableDiffusionPipeline",
        "Stable Diffusion 2.x: OpenCLIP-H text encoder (penultimate layer), linear projections, "
        "v-prediction (768-v) or epsilon (512 base)",
        512,
        v_prediction_resolution=768,
    ),
    "sdxl": Family(
        "sdxl",
        "StableDiffusionXLPipeline",
        "Stable Diffusion XL: two text encoders (CLIP-L + OpenCLIP-bigG, pooled), "
        "size and crop conditioning",
        1024,
    ),
}

BUILTIN_MODELS: dict[str, str] = {
    "tiny": "sd1",
    "tiny-sd2": "sd2",
    "tiny-sdxl": "sdxl",
    "toy": "sd1",
}
"""The offline models → their family: the `tiny` ones random-init (built on first use, the real
CLIP tokenizer), `toy` pretrained on the toy world (committed: `contract.toy_models`)."""

BUILTIN_RESOLUTION_MULTIPLES: dict[str, int] = {"tiny": 8, "tiny-sd2": 8, "tiny-sdxl": 8, "toy": 8}
"""The pixel multiple each toy model takes (`resolution_multiple` of its built folder: its VAE's
factor 8), known without building it."""

BUILTIN_DEFAULT_RESOLUTIONS: dict[str, int] = {"tiny-sd2": 64, "tiny-sdxl": 64, "toy": 64}
"""Training resolution of a toy model whose entry and `train` set none: 64 px, not its family's
768 or 1024 (toys at that size only cost time; `toy` was trained at 64 px). `tiny` is not
listed: it trains at `train.resolution`'s default, as before model families, so those trials
keep their ids."""


class UnsupportedModel(ValueError):
    """A folder that is not a pipeline of a supported family."""


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.pipeline})" for f in FAMILIES.values())


def _read_config(folder: Path, relative: str) -> dict:
    path = folder / relative
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnsupportedModel(
            f"{folder} is not a diffusers pipeline folder: it has no {relative}; supported "
            f"families: {_supported()}"
        ) from None
    except (OSError, ValueError) as err:
        raise UnsupportedModel(f"{path} cannot be read as JSON ({err})") from None
    if not isinstance(config, dict):
        raise UnsupportedModel(
            f"{path} holds a JSON {type(config).__name__}, not the object (keys and values) "
            "of a diffusers config"
        )
    return config


def family_of_folder(folder: Path) -> str:
    """The family (`sd1`, `sd2`, `sdxl`) of a diffusers pipeline folder, from its configs.

    Raises `UnsupportedModel` naming the folder, what it found and the supported families."""
    folder = Path(folder)
    class_name = _read_config(folder, "model_index.json").get("_class_name")
    if class_name == "StableDiffusionXLPipeline":
        return "sdxl"
    if class_name == "StableDiffusionPipeline":
        unet = _read_config(folder, "unet/config.json")
        return "sd2" if unet.get("use_linear_projection") else "sd1"
    raise UnsupportedModel(
        f"{folder}: model_index.json's _class_name is {class_name!r}, not a supported family; "
        f"supported: {_supported()}"
    )


def check_folder(folder: Path) -> str:
    """The family of a pipeline folder, once every config validation reads is there and
    readable (model index, UNet, VAE, scheduler); raises `UnsupportedModel` otherwise."""
    family = family_of_folder(folder)
    resolution_multiple(folder)
    prediction_type(folder)
    return family


def _levels(config: dict, key: str, path: Path) -> int:
    levels = config.get(key)
    if not isinstance(levels, list) or not levels:
        raise UnsupportedModel(
            f"{path} has no list {key!r}: its downsampling factor (the resolutions the model "
            "can take) cannot be read"
        )
    return len(levels)


def resolution_multiple(folder: Path) -> int:
    """The pixel multiple a model takes: its VAE's downsampling factor (2 per block but the
    last), read from its config, as diffusers' pipelines require of `height` and `width`. The
    UNet asks for no more: it interpolates its skip connections to any latent size
    (`UNet2DConditionModel` sets `forward_upsample_size` when the size is not a multiple of its
    own factor). The UNet's config is still read, so a folder without one is refused."""
    folder = Path(folder)
    vae = _read_config(folder, "vae/config.json")
    unet = _read_config(folder, "unet/config.json")
    _levels(unet, "down_block_types", folder / "unet/config.json")
    return 2 ** (_levels(vae, "block_out_channels", folder / "vae/config.json") - 1)


def prediction_type(folder: Path) -> str:
    """What the UNet predicts (`epsilon`, `v_prediction`), from the scheduler's config."""
    scheduler = _read_config(Path(folder), "scheduler/scheduler_config.json")
    return scheduler.get("prediction_type", "epsilon")
