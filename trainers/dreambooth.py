"""DreamBooth: the whole UNet trains (and optionally the whole text encoder); the VAE is frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from contract.spec import DreamBoothSpec, SubjectSpec
from trainers.models import BaseModel


class DreamBoothMethod:
    """Full fine-tune; the saved `unet/` (and `text_encoder/`) folders replace the base model's."""

    name = "dreambooth"

    def __init__(self, options: DreamBoothSpec, subject: SubjectSpec) -> None:
        self.subject = subject
        self.trains_text_encoder = options.train_text_encoder

    @property
    def subject_token(self) -> str:
        return self.subject.identifier

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        model.vae.requires_grad_(False).to(frozen_dtype)
        model.unet.requires_grad_(True).float()
        trained = [model.unet]
        if self.trains_text_encoder:
            model.text_encoder.requires_grad_(True).float()
            trained.append(model.text_encoder)
        else:
            model.text_encoder.requires_grad_(False).to(frozen_dtype)
        return [p for module in trained for p in module.parameters()]

    def after_optimizer_step(self, model: BaseModel) -> None:
        pass

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers folders: `UNet2DConditionModel.from_pretrained(checkpoint / "unet")`."""
        model.unet.save_pretrained(directory / "unet", safe_serialization=True)
        if self.trains_text_encoder:
            model.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
        """The base pipeline with the checkpoint's UNet (and text encoder) in place of its own."""
        trained = {
            "unet": UNet2DConditionModel.from_pretrained(checkpoint / "unet", torch_dtype=dtype)
        }
        if (checkpoint / "text_encoder").is_dir():
            trained["text_encoder"] = CLIPTextModel.from_pretrained(
                checkpoint / "text_encoder", torch_dtype=dtype
            )
        return StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype, **trained)
