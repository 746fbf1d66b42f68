"""Textual inversion: one new token per subject; only its embedding row trains, all else frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from contract.spec import SubjectSpec, TextualInversionSpec
from trainers.models import BaseModel

WEIGHTS_NAME = "learned_embeds.safetensors"


class TextualInversionMethod:
    """A placeholder token (default `<subject>`) initialised from the class token's embedding."""

    name = "textual_inversion"
    trains_text_encoder = True  # the prompt embedding changes every step: it cannot be cached

    def __init__(self, options: TextualInversionSpec, subject: SubjectSpec) -> None:
        self.subject = subject
        self.token = options.placeholder_token.format(subject=subject.name)
        self.token_id: int | None = None
        self.frozen_rows: torch.Tensor | None = None

    @property
    def subject_token(self) -> str:
        return self.token

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        subject = self.subject
        for module in (model.unet, model.vae, model.text_encoder):
            module.requires_grad_(False)
        model.unet.to(frozen_dtype)
        model.vae.to(frozen_dtype)
        token = self.subject_token
        if model.tokenizer.add_tokens(token) != 1:
            raise ValueError(f"the tokenizer already has the token {token!r}")
        class_ids = model.tokenizer.encode(subject.class_token, add_special_tokens=False)
        if len(class_ids) != 1:
            raise ValueError(
                f"subject {subject.name!r}: class_token {subject.class_token!r} is "
                f"{len(class_ids)} tokens; textual inversion initialises from a single token"
            )
        self.token_id = model.tokenizer.convert_tokens_to_ids(token)
        # The whole text encoder stays fp32, as diffusers' textual_inversion.py keeps it: the
        # trained row's gradient flows back through every layer.
        model.text_encoder.float()
        model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
        embedding = model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            embedding[self.token_id] = embedding[class_ids[0]]
        self.frozen_rows = embedding.detach().clone()
        embedding.requires_grad_(True)
        return [embedding]

    def after_optimizer_step(self, model: BaseModel) -> None:
        """Put every row but the new token's back: AdamW's weight decay touches them all."""
        embedding = model.text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            learned = embedding[self.token_id].clone()
            embedding.copy_(self.frozen_rows.to(embedding.device))
            embedding[self.token_id] = learned

    def _row(self, model: BaseModel) -> torch.Tensor:
        return model.text_encoder.get_input_embeddings().weight[self.token_id]

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers' format, which `StableDiffusionPipeline.load_textual_inversion` loads."""
        row = self._row(model).detach().float().cpu()[None].contiguous()
        save_file({self.subject_token: row}, directory / WEIGHTS_NAME)

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
        pipeline = StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
        pipeline.load_textual_inversion(str(checkpoint / WEIGHTS_NAME))
        return pipeline
