"""LoRA DreamBooth: low-rank adapters on the UNet's attention projections; all else frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from launch.spec import SubjectSpec, TrainSpec
from trainers.models import BaseModel

# The attention projections diffusers' train_dreambooth_lora.py adapts.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class LoRAMethod:
    """Adapters with B = 0 at the start, so step 0 is exactly the base model."""

    name = "lora"
    trains_text_encoder = False

    def __init__(self, train: TrainSpec, subject: SubjectSpec) -> None:
        self.subject = subject
        self.rank = train.lora_rank
        self.alpha = train.lora_alpha if train.lora_alpha is not None else float(train.lora_rank)

    @property
    def subject_token(self) -> str:
        return self.subject.identifier

    def setup(self, model: BaseModel) -> list[torch.nn.Parameter]:
        for module in (model.unet, model.vae, model.text_encoder):
            module.requires_grad_(False)
        model.unet.add_adapter(
            LoraConfig(
                r=self.rank,
                lora_alpha=self.alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
            )
        )
        trainable = [p for p in model.unet.parameters() if p.requires_grad]
        for parameter in trainable:  # trained weights in fp32, whatever the frozen precision
            parameter.data = parameter.data.float()
        return trainable

    def after_optimizer_step(self, model: BaseModel) -> None:
        pass

    def trainable_state(self, model: BaseModel) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(model.unet)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_trainable_state(self, model: BaseModel, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(model.unet, state)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint has unexpected LoRA keys: {result.unexpected_keys[:5]}")

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers' LoRA format, which `StableDiffusionPipeline.load_lora_weights` loads."""
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=layers, safe_serialization=True
        )
