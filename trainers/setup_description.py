"""What is really on in a trial, read from the live objects (not from the spec): the trained
parameters and their dtypes, gradient checkpointing, attention kernels, the optimizer and its
wrappers, the offloaded encoders, which trained modules `torch.compile` wraps, the CPU threads.

Logged with the run (`Reporter.on_start(setup=...)`), so a curve can be traced to the precision,
optimizer and kernels that produced it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from accelerate.utils import is_compiled_module

from trainers.models import BaseModel


def _dtypes(parameters: list[torch.nn.Parameter]) -> str:
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in parameters})) or "-"


def describe_setup(
    model: BaseModel,
    optimizer: torch.optim.Optimizer,
    offloaded: list[str],
    prepared: Mapping[str, torch.nn.Module],
) -> dict[str, str]:
    """The setup of `model` trained by `optimizer` (as prepared: wrappers included), with the
    `offloaded` encoders' names and the modules as the steps call them (`prepared`):
    every value a string, as run parameters are."""
    setup = {}
    for name, module in model.modules.items():
        parameters = list(module.parameters())
        trained = [p for p in parameters if p.requires_grad]
        setup[f"{name}.trained_parameters"] = str(sum(p.numel() for p in trained))
        setup[f"{name}.trained_dtype"] = _dtypes(trained)
        setup[f"{name}.frozen_dtype"] = _dtypes([p for p in parameters if not p.requires_grad])
        # transformers 5 renamed the flag; diffusers kept the old name.
        flag = (
            "is_activation_checkpointing"
            if name.startswith("text_encoder")
            else "is_gradient_checkpointing"
        )
        setup[f"{name}.gradient_checkpointing"] = str(bool(getattr(module, flag, False)))
    setup["unet.attention"] = ",".join(
        sorted({type(p).__name__ for p in model.unet.attn_processors.values()})
    )
    chain = [optimizer]  # Accelerate wraps the optimizer (and DeepSpeed wraps it again)
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    inner = chain[-1]
    setup["optimizer"] = f"{type(inner).__module__}.{type(inner).__name__}"
    setup["optimizer_wrappers"] = " > ".join(type(o).__name__ for o in chain[:-1]) or "-"
    setup["offloaded"] = ",".join(offloaded) or "-"
    setup["compiled"] = ",".join(n for n, m in prepared.items() if is_compiled_module(m)) or "-"
    setup["cpu_threads"] = str(torch.get_num_threads())
    return setup
