"""Textual inversion: one new token per subject; only its embedding row trains (one row per
text encoder: SDXL's two), all else frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from contract.spec import ExportSpec, SubjectSpec, TextualInversionSpec
from trainers.models import BaseModel, load_pipeline

WEIGHTS_NAME = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")
"""SDXL embeddings' keys (text_encoder, text_encoder_2), as diffusers' SDXL docs load them."""


class TextualInversionMethod:
    """A placeholder token (default `<subject>`) initialised from the class token's embedding."""

    name = "textual_inversion"
    trains_text_encoder = True  # the prompt embedding changes every step: it cannot be cached

    def __init__(
        self,
        options: TextualInversionSpec,
        subject: SubjectSpec,
        export: ExportSpec | None = None,
    ) -> None:
        self.subject = subject
        self.token = options.placeholder_token.format(subject=subject.name)
        self.token_ids: list[int] = []  # the new token's row in each text encoder's embedding
        self.frozen_rows: list[torch.Tensor] = []
        self.embeddings: list[torch.nn.Parameter] = []
        """What trains: each text encoder's input embedding matrix (a pack's member has its own
        copies, trainers/packing.py)."""

    @property
    def subject_token(self) -> str:
        return self.token

    def setup(self, model: BaseModel, *, frozen_dtype: torch.dtype) -> list[torch.nn.Parameter]:
        subject, token = self.subject, self.subject_token
        for module in model.modules.values():
            module.requires_grad_(False)
        model.unet.to(frozen_dtype)
        model.vae.to(frozen_dtype)
        trained = []
        encoders = list(model.text_encoders.values())
        for tokenizer, encoder in zip(model.tokenizers, encoders, strict=True):
            if tokenizer.add_tokens(token) != 1:
                raise ValueError(f"the tokenizer already has the token {token!r}")
            class_ids = tokenizer.encode(subject.class_token, add_special_tokens=False)
            if len(class_ids) != 1:
                raise ValueError(
                    f"subject {subject.name!r}: class_token {subject.class_token!r} is "
                    f"{len(class_ids)} tokens; textual inversion initialises from a single token"
                )
            token_id = tokenizer.convert_tokens_to_ids(token)
            # The whole text encoder stays fp32, as diffusers' textual_inversion.py keeps it:
            # the trained row's gradient flows back through every layer.
            encoder.float()
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = encoder.get_input_embeddings().weight
            with torch.no_grad():
                embedding[token_id] = embedding[class_ids[0]]
            self.token_ids.append(token_id)
            self.frozen_rows.append(embedding.detach().clone())
            embedding.requires_grad_(True)
            trained.append(embedding)
        self.embeddings = trained
        return trained

    def _embeddings(self, model: BaseModel) -> list[torch.nn.Parameter]:
        return self.embeddings

    def after_optimizer_step(self, model: BaseModel) -> None:
        """Put every row but the new token's back: AdamW's weight decay touches them all."""
        with torch.no_grad():
            for embedding, token_id, frozen in zip(
                self._embeddings(model), self.token_ids, self.frozen_rows, strict=True
            ):
                learned = embedding[token_id].clone()
                embedding.copy_(frozen.to(embedding.device))
                embedding[token_id] = learned

    def save_weights(self, model: BaseModel, directory: Path) -> None:
        """diffusers' format, which the pipeline's `load_textual_inversion` loads: `{token: row}`
        for SD 1.x/2.x; for SDXL `{clip_l: row, clip_g: row}` (one per text encoder), the token
        in the file's metadata."""
        rows = [
            embedding[token_id].detach().float().cpu()[None].contiguous()
            for embedding, token_id in zip(self._embeddings(model), self.token_ids, strict=True)
        ]
        if len(rows) == 1:
            save_file({self.subject_token: rows[0]}, directory / WEIGHTS_NAME)
        else:
            tensors = dict(zip(SDXL_KEYS, rows, strict=True))
            save_file(tensors, directory / WEIGHTS_NAME, metadata={"token": self.subject_token})

    @staticmethod
    def load_pipeline(source: str, checkpoint: Path, dtype: torch.dtype) -> DiffusionPipeline:
        pipeline = load_pipeline(source, dtype=dtype)
        load_embeddings(pipeline, checkpoint / WEIGHTS_NAME)
        return pipeline


def load_embeddings(pipeline: DiffusionPipeline, path: Path) -> None:
    """Load a saved embedding the diffusers way: the file as is, or (SDXL) each of its rows
    into its text encoder and tokenizer under the token its metadata names."""
    with safe_open(str(path), framework="pt") as saved:
        token = (saved.metadata() or {}).get("token")
        if token is None:
            pipeline.load_textual_inversion(str(path))
            return
        rows = {key: saved.get_tensor(key) for key in SDXL_KEYS}
    encoders = [
        (pipeline.text_encoder, pipeline.tokenizer),
        (pipeline.text_encoder_2, pipeline.tokenizer_2),
    ]
    for key, (encoder, tokenizer) in zip(SDXL_KEYS, encoders, strict=True):
        pipeline.load_textual_inversion(
            rows[key], token=token, text_encoder=encoder, tokenizer=tokenizer
        )
