"""What the UNet is conditioned on, per family: the prompts' token ids, their embeddings, and
SDXL's extra inputs.

SD 1.x/2.x: the text encoder's last hidden state (SD 2's saved config already stops at the
penultimate layer of OpenCLIP-H). SDXL, as diffusers' `train_dreambooth_lora_sdxl.py` and its
pipeline build them: the penultimate hidden states of both encoders concatenated, the second's
pooled projection, and the `add_time_ids` (original size, crop top-left, target size). Training
images are square crops at the training resolution and evaluation samples at it, so training
conditions on (resolution, resolution), (0, 0), (resolution, resolution): what the pipeline
passes when sampling at that size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainers.models import BaseModel


@dataclass
class PromptEmbeddings:
    """The embeddings of some prompts: `hidden` `[prompts, tokens, width]`, and (SDXL) the
    pooled projection `[prompts, width_2]`."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def repeat_rows(self, rows: int) -> PromptEmbeddings:
        """Each prompt's embedding `rows` times over (prompt 0's rows first)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(rows, dim=0)
        return PromptEmbeddings(self.hidden.repeat_interleave(rows, dim=0), pooled)


def tokenize(model: BaseModel, prompts: list[str]) -> list[torch.Tensor]:
    """The prompts' token ids from each of the model's tokenizers (padded to their length)."""
    return [
        tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in model.tokenizers
    ]


def encode_prompts(
    family: str, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]
) -> PromptEmbeddings:
    """The embeddings the UNet trains on, from `text_encoders` (the model's, in its order; a
    trained one may be Accelerate's wrapper) applied to the token ids of `tokenize`."""
    if family != "sdxl":
        return PromptEmbeddings(text_encoders[0](ids[0])[0])
    hidden = []
    for encoder, tokens in zip(text_encoders, ids, strict=True):
        output = encoder(tokens, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    # The pooled output of the last (projected) encoder: its `text_embeds`.
    return PromptEmbeddings(torch.cat(hidden, dim=-1), output[0])


def unet_conditioning(
    family: str, embeddings: PromptEmbeddings, resolution: int
) -> dict[str, object]:
    """The keyword arguments of the UNet's forward pass besides the latents and timesteps."""
    conditioning: dict[str, object] = {"encoder_hidden_states": embeddings.hidden}
    if family == "sdxl":
        rows = embeddings.hidden.shape[0]
        size = [resolution, resolution]
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32)
        conditioning["added_cond_kwargs"] = {
            "text_embeds": embeddings.pooled,
            "time_ids": time_ids.to(embeddings.hidden.device).repeat(rows, 1),
        }
    return conditioning
