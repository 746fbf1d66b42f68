"""DreamBooth: the whole UNet trains (and optionally the whole text encoders); the VAE is
frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from contract.spec import DreamBoothSpec, ExportSpec, SubjectSpec
from trainers.models import BaseModel, load_pipeline

# The trained text encoders' folders, as the pipeline names its components.
TEXT_ENCODER_CLASSES = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,  # SDXL's second
}


class DreamBoothMethod:
    """Full fine-tune; the saved `unet/` (and `text_encoder/`, `text_encoder_2/`) folders replace
    the base model's."""

    name = "dreambooth"

    def __init__(
        self, options: DreamBoothSpec, subject: SubjectSpec, export: ExportSpec | None = None
    ) -> None:
        self.subject = subject
        self.trains_text_encoder = options.train_text_encoder

    @property
    def subject_token(self) -> str:
        return self.subject.identifier

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        model.vae.requires_grad_(False).to(frozen_dtype)
        model.unet.requires_grad_(True).float()
        trained = [model.unet]
        for encoder in model.text_encoders.values():
            if self.trains_text_encoder:
                encoder.requires_grad_(True).float()
                trained.append(encoder)
            else:
                encoder.requires_grad_(False).to(frozen_dtype)
        return [p for module in trained for p in module.parameters()]

    def after_optimizer_step(self, model: BaseModel) -> None:
        pass

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers folders: `UNet2DConditionModel.from_pretrained(checkpoint / "unet")`."""
        model.unet.save_pretrained(directory / "unet", safe_serialization=True)
        if self.trains_text_encoder:
            for name, encoder in model.text_encoders.items():
                encoder.save_pretrained(directory / name, safe_serialization=True)

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> DiffusionPipeline:
        """The base pipeline with the checkpoint's UNet (and text encoders) in place of its own."""
        trained = {
            "unet": UNet2DConditionModel.from_pretrained(checkpoint / "unet", torch_dtype=dtype)
        }
        for name, encoder_class in TEXT_ENCODER_CLASSES.items():
            if (checkpoint / name).is_dir():
                trained[name] = encoder_class.from_pretrained(checkpoint / name, torch_dtype=dtype)
        return load_pipeline(source, dtype=dtype, **trained)
