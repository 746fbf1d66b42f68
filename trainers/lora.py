"""LoRA DreamBooth: low-rank adapters on the UNet's attention (and optionally the text
encoder's); all base weights frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from contract.spec import LoRASpec, SubjectSpec
from trainers.models import BaseModel


class LoRAMethod:
    """Adapters with B = 0 at the start, so step 0 is exactly the base model."""

    name = "lora"

    def __init__(self, options: LoRASpec, subject: SubjectSpec) -> None:
        self.options = options
        self.subject = subject
        self.trains_text_encoder = options.train_text_encoder
        self.alpha = options.alpha if options.alpha is not None else float(options.rank)

    @property
    def subject_token(self) -> str:
        return self.subject.identifier

    def _adapter(self, targets: list[str]) -> LoraConfig:
        return LoraConfig(
            r=self.options.rank,
            lora_alpha=self.alpha,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        # Base weights in the low precision first; the adapters added after are cast to fp32.
        for module in (model.unet, model.vae, model.text_encoder):
            module.requires_grad_(False).to(frozen_dtype)
        model.unet.add_adapter(self._adapter(self.options.target_modules))
        adapted = [model.unet]
        if self.trains_text_encoder:
            model.text_encoder.add_adapter(self._adapter(self.options.text_encoder_target_modules))
            adapted.append(model.text_encoder)
        trainable = [p for module in adapted for p in module.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.data = parameter.data.float()
        return trainable

    def after_optimizer_step(self, model: BaseModel) -> None:
        pass

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers' LoRA format, which `StableDiffusionPipeline.load_lora_weights` loads.

        Each adapter's config goes in the file's metadata: without it the loader takes alpha to
        be the rank, and an adapter trained with another `alpha` would load at the wrong scale.
        """
        text_encoder_layers = text_encoder_config = None
        if self.trains_text_encoder:
            # The adapters never touch the embeddings; peft's default ("auto") would look the
            # base model's vocabulary up, a hub request per checkpoint, to decide that again.
            text_encoder_layers = convert_state_dict_to_diffusers(
                get_peft_model_state_dict(model.text_encoder, save_embedding_layers=False)
            )
            text_encoder_config = model.text_encoder.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            directory,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet)),
            text_encoder_lora_layers=text_encoder_layers,
            unet_lora_adapter_metadata=model.unet.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_encoder_config,
            safe_serialization=True,
        )

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
        pipeline = StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        pipeline.load_lora_weights(checkpoint)
        return pipeline
