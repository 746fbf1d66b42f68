"""How K trials share one frozen base model: each sample goes through its own trial's weights.

LoRA: every member's adapter sits in the same UNet (and text encoders) under its own peft name;
each LoRA linear layer computes its frozen base once over all rows, and each member's adapter
over that member's rows (a slice: members' rows are contiguous), so a row adds only its own
adapter's output and a member's adapter gets gradient from its rows alone. peft's own per-sample
routing (its `adapter_names` argument) does the same with a gather and a scatter per member and
layer, which made a pack of one 25–50% slower than a lone trial (measured with
bench/throughput.py); it is kept for LoRA layers other than linear ones (convolutions, when
targeted).

Textual inversion: every member has its own copy of each text encoder's input embedding matrix
(a lone trial trains the whole matrix, its weight decay and gradient clipping included, and puts
the other rows back after each step), and a routed embedding looks each prompt row's tokens up in
its member's copy. The members' tokens all go into the shared tokenizer; in its member's copy a
token sits in the row it has alone (the first after the base vocabulary).

Which rows belong to whom is held by the `Router` for the current forward (and backward: with
gradient checkpointing the forward is recomputed there) pass, per component: the UNet's rows
(latents) and the text encoders' rows (prompts) differ.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from contract.trial import TrialConfig
from trainers.lora import LoRAMethod, freeze_base
from trainers.models import BaseModel
from trainers.textual_inversion import TextualInversionMethod

UNET = "unet"
TEXT = "text"
Rows = str | Sequence[str] | None
"""Whose each row is: one member's name for every row, a name per row, or None (no routing)."""


class Router:
    """Whose rows the current forward pass holds, per component (`UNET`, `TEXT`)."""

    def __init__(self) -> None:
        self._rows: dict[str, Rows] = {UNET: None, TEXT: None}
        self._runs: dict[tuple[str, int], list[tuple[str, int, int]]] = {}

    @contextmanager
    def routing(self, *, unet: Rows = None, text: Rows = None) -> Iterator[None]:
        previous = dict(self._rows)
        self._rows, self._runs = {UNET: unet, TEXT: text}, {}
        try:
            yield
        finally:
            self._rows, self._runs = previous, {}

    def rows(self, component: str, batch: int) -> list[str]:
        rows = self._rows[component]
        if rows is None:
            raise RuntimeError(
                f"a packed model's {component} ran without routing: every row must say whose "
                "weights it goes through"
            )
        if isinstance(rows, str):
            return [rows] * batch
        if batch % len(rows):
            raise RuntimeError(f"{len(rows)} routed rows for a batch of {batch}")
        # A pipeline's classifier-free guidance runs the rows twice over (unconditional, then
        # conditional), in the same order.
        return list(rows) * (batch // len(rows))

    def runs(self, component: str, batch: int) -> list[tuple[str, int, int]]:
        """The rows as runs of one member's: (member, start, stop); computed once per routing
        and batch size (every layer asks)."""
        cached = self._runs.get((component, batch))
        if cached is not None:
            return cached
        runs: list[tuple[str, int, int]] = []
        for index, name in enumerate(self.rows(component, batch)):
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1], index + 1)
            else:
                runs.append((name, index, index + 1))
        self._runs[(component, batch)] = runs
        return runs

    def attach_lora(self, module: torch.nn.Module, component: str) -> None:
        """Route every peft LoRA layer of `module` by `component`'s rows."""

        def pass_adapter_names(layer, args, kwargs):  # a torch forward pre-hook
            kwargs["adapter_names"] = self.rows(component, args[0].shape[0])
            return args, kwargs

        for layer in module.modules():
            if isinstance(layer, LoraLinear) and not layer.lora_variant:
                # The layer's own forward, replaced on this instance only (as Accelerate wraps a
                # prepared model's): the adapters stay where peft and its state dicts have them.
                layer.forward = partial(self._linear_forward, layer, component)
            elif isinstance(layer, LoraLayer):
                layer.register_forward_pre_hook(pass_adapter_names, with_kwargs=True)

    def _linear_forward(
        self, layer: LoraLinear, component: str, x: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """peft's LoRA linear forward (base + B·A·dropout(x)·scaling), each run of rows through
        its own member's adapter."""
        if layer.merged or layer.disable_adapters:
            return type(layer).forward(layer, x, *args, **kwargs)  # peft's own handling
        result = layer.base_layer(x, *args, **kwargs)
        pieces = []
        for name, start, stop in self.runs(component, x.shape[0]):
            base = result[start:stop]
            if name not in layer.lora_A:
                pieces.append(base)
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            rows = layer.lora_dropout[name](x[start:stop].to(lora_a.weight.dtype))
            pieces.append((base + lora_b(lora_a(rows)) * layer.scaling[name]).to(result.dtype))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class RoutedEmbedding(torch.nn.Module):
    """A text encoder's token embedding with a matrix per member: row r of the input is looked
    up in its member's matrix, the member's token id (in the shared tokenizer) mapped to the row
    it has alone."""

    def __init__(self, router: Router, base_vocabulary: int) -> None:
        super().__init__()
        self.router = router
        self.base_vocabulary = base_vocabulary
        self.matrices = torch.nn.ParameterDict()
        self.shared_ids: dict[str, int] = {}

    def add_member(self, name: str, matrix: torch.nn.Parameter, shared_id: int) -> None:
        self.matrices[name] = matrix
        self.shared_ids[name] = shared_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        names = self.router.rows(TEXT, input_ids.shape[0])
        pieces = []
        for name in dict.fromkeys(names):  # each member once, in order of first row
            rows = [i for i, owner in enumerate(names) if owner == name]
            ids = input_ids[rows]
            ids = torch.where(ids == self.shared_ids[name], self.base_vocabulary, ids)
            pieces.append((rows, F.embedding(ids, self.matrices[name])))
        if len(pieces) == 1:
            return pieces[0][1]
        width = pieces[0][1].shape[-1]
        output = pieces[0][1].new_empty((input_ids.shape[0], input_ids.shape[1], width))
        for rows, embedded in pieces:
            output[rows] = embedded
        return output


def member_name(index: int) -> str:
    """A member's adapter / embedding name in the shared model."""
    return f"member{index}"


def add_lora_members(
    configs: Sequence[TrialConfig], model: BaseModel, router: Router, frozen_dtype: torch.dtype
) -> list[tuple[LoRAMethod, list[torch.nn.Parameter]]]:
    """Each member's adapters in the one frozen model, initialised from its own seed as alone."""
    from accelerate.utils import set_seed

    freeze_base(model, frozen_dtype)
    members = []
    for index, config in enumerate(configs):
        method = LoRAMethod(
            config.options, config.subject, config.export, adapter_name=member_name(index)
        )
        set_seed(config.seed)  # as a lone trial draws its adapters' initial weights
        members.append((method, method.add_adapters(model)))
    for _, trainable in members:
        for parameter in trainable:  # each add turned the earlier members' gradients off
            parameter.requires_grad_(True)
    router.attach_lora(model.unet, UNET)
    if members and members[0][0].trains_text_encoder:
        for encoder in model.text_encoders.values():
            router.attach_lora(encoder, TEXT)
    return members


def add_textual_inversion_members(
    configs: Sequence[TrialConfig], model: BaseModel, router: Router, frozen_dtype: torch.dtype
) -> list[tuple[TextualInversionMethod, list[torch.nn.Parameter]]]:
    """Each member's token in the shared tokenizers, and its own copy of each text encoder's
    input embeddings with that token in the row it has alone."""
    for module in model.modules.values():
        module.requires_grad_(False)
    model.unet.to(frozen_dtype)
    model.vae.to(frozen_dtype)
    methods = [
        TextualInversionMethod(config.options, config.subject, config.export) for config in configs
    ]
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders.values(), strict=True):
        encoder.float()  # fp32, as a lone trial keeps it
        base = encoder.get_input_embeddings().weight.detach()
        vocabulary = len(tokenizer)
        if base.shape[0] != vocabulary:
            raise ValueError(
                f"{model.source}: the text encoder has {base.shape[0]} token embeddings and its "
                f"tokenizer {vocabulary} tokens; packed textual inversion needs them equal"
            )
        routed = RoutedEmbedding(router, vocabulary)
        tokens = sorted({m.subject_token for m in methods})
        if tokenizer.add_tokens(tokens) != len(tokens):
            present = [t for t in tokens if t in tokenizer.get_vocab()]
            raise ValueError(f"the tokenizer already has the token(s) {present}")
        for index, method in enumerate(methods):
            class_ids = tokenizer.encode(method.subject.class_token, add_special_tokens=False)
            if len(class_ids) != 1:
                raise ValueError(
                    f"subject {method.subject.name!r}: class_token {method.subject.class_token!r} "
                    f"is {len(class_ids)} tokens; textual inversion initialises from a single token"
                )
            matrix = torch.nn.Parameter(torch.cat([base, base[class_ids[0]][None]]).float())
            routed.add_member(
                member_name(index), matrix, tokenizer.convert_tokens_to_ids(method.subject_token)
            )
            method.token_ids.append(vocabulary)
            method.frozen_rows.append(matrix.detach().clone())
            method.embeddings.append(matrix)
        encoder.set_input_embeddings(routed)
    return [(method, list(method.embeddings)) for method in methods]


def named_member_parameters(
    method: LoRAMethod | TextualInversionMethod, model: BaseModel
) -> dict[str, torch.nn.Parameter]:
    """A member's trained parameters under the names a lone trial's checkpoint gives them."""
    if isinstance(method, LoRAMethod):
        return method.named_parameters(model)
    names = {}
    for (prefix, encoder), matrix in zip(
        model.text_encoders.items(), method.embeddings, strict=True
    ):
        routed = encoder.get_input_embeddings()
        path = next(n for n, m in encoder.named_modules() if m is routed)
        names[f"{prefix}.{path}.weight"] = matrix
    return names
