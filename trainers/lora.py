"""LoRA DreamBooth: low-rank adapters on the UNet's attention (and optionally the text
encoders'); all base weights frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from contract.spec import ExportSpec, LoRASpec, SubjectSpec
from trainers.models import PIPELINES, BaseModel, load_pipeline

KOHYA_WEIGHTS_NAME = "lora_kohya.safetensors"
"""The kohya-format copy (`export.lora_format: [.., kohya]`) beside diffusers' file."""


def freeze_base(model: BaseModel, frozen_dtype: torch.dtype) -> None:
    """Every base weight frozen, in the frozen precision."""
    for module in model.modules.values():
        module.requires_grad_(False).to(frozen_dtype)


class LoRAMethod:
    """Adapters with B = 0 at the start, so step 0 is exactly the base model."""

    name = "lora"

    def __init__(
        self,
        options: LoRASpec,
        subject: SubjectSpec,
        export: ExportSpec | None = None,
        *,
        adapter_name: str = "default",
    ) -> None:
        self.options = options
        self.adapter_name = adapter_name
        """peft's name for this trial's adapters: "default" alone; a pack's members each have
        their own in one model (trainers/packing.py)."""
        self.subject = subject
        self.formats = (export or ExportSpec()).lora_format
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

    def _adapted(self, model: BaseModel) -> dict[str, torch.nn.Module]:
        """The modules with adapters, by component name: the UNet, then the text encoders."""
        adapted = {"unet": model.unet}
        if self.trains_text_encoder:
            adapted |= model.text_encoders
        return adapted

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        # Base weights in the low precision first; the adapters added after are cast to fp32.
        freeze_base(model, frozen_dtype)
        return self.add_adapters(model)

    def add_adapters(self, model: BaseModel) -> list[torch.nn.Parameter]:
        """Add this trial's adapters (in fp32) to the frozen base; returns their parameters."""
        adapted = self._adapted(model)
        encoder_targets = self.options.text_encoder_target_modules
        for name, module in adapted.items():  # each text encoder too, as diffusers' SDXL script
            targets = self.options.target_modules if name == "unet" else encoder_targets
            module.add_adapter(self._adapter(targets), adapter_name=self.adapter_name)
        trainable = list(self.named_parameters(model).values())
        for parameter in trainable:
            parameter.data = parameter.data.float()
            # peft trains only the active adapter: adding another one to the same model (a
            # pack's next member) turns the earlier ones' gradients off, so say it here.
            parameter.requires_grad_(True)
        return trainable

    def named_parameters(self, model: BaseModel) -> dict[str, torch.nn.Parameter]:
        """This trial's adapter weights, named as a lone trial's checkpoint names them (the
        adapter's name replaced by peft's "default")."""
        marker = f".{self.adapter_name}."
        return {
            f"{prefix}.{name}".replace(marker, ".default."): parameter
            for prefix, module in self._adapted(model).items()
            for name, parameter in module.named_parameters()
            if marker in name
        }

    def after_optimizer_step(self, model: BaseModel) -> None:
        pass

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers' LoRA format, which the family pipeline's `load_lora_weights` loads (and,
        with `kohya` in `export.lora_format`, the kohya-format copy beside it).

        Each adapter's config goes in the file's metadata: without it the loader takes alpha to
        be the rank, and an adapter trained with another `alpha` would load at the wrong scale.
        """
        layers, metadata = {}, {}
        peft_weights = {}
        for name, module in self._adapted(model).items():
            # The adapters never touch the embeddings; peft's default ("auto") would look the
            # base model's vocabulary up, a hub request per checkpoint, to decide that again.
            weights = get_peft_model_state_dict(
                module, adapter_name=self.adapter_name, save_embedding_layers=False
            )
            peft_weights |= {f"{name}.{key}": value for key, value in weights.items()}
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(weights)
            metadata[f"{name}_lora_adapter_metadata"] = module.peft_config[
                self.adapter_name
            ].to_dict()
        PIPELINES[model.family].save_lora_weights(
            directory, **layers, **metadata, safe_serialization=True
        )
        if "kohya" in self.formats:
            save_file(self._kohya(model, peft_weights), directory / KOHYA_WEIGHTS_NAME)

    def _kohya(self, model: BaseModel, peft_weights: dict) -> dict[str, torch.Tensor]:
        """diffusers' public peft → kohya conversion (`lora_unet_…`, `lora_te…` keys), with
        each module's `alpha` as trained (the conversion writes alpha = rank)."""
        converted = convert_state_dict_to_kohya(peft_weights)
        single_encoder = model.text_encoder_2 is None
        kohya = {}
        for key, value in converted.items():
            if key.startswith("lora_te") and "_text_model_" not in key:
                # transformers 5's CLIP text model has no `text_model` level; kohya's keys
                # (and the UIs that read them) name it, as transformers 4 did.
                prefix, rest = key.split("_", 2)[:2], key.split("_", 2)[2]
                key = "_".join([*prefix, "text_model", rest])
            if single_encoder:  # SD 1.x/2.x: kohya's own `lora_te_` (`te1`/`te2` are SDXL's)
                key = key.replace("lora_te1_", "lora_te_", 1)
            if key.endswith(".alpha"):
                value = torch.tensor(self.alpha)
            kohya[key] = value.detach().cpu().contiguous()
        return kohya

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> DiffusionPipeline:
        pipeline = load_pipeline(source, dtype=dtype)
        pipeline.load_lora_weights(checkpoint)
        return pipeline
