"""Where the toy world's pretrained models are: `toy` in `base_model`, `eval.clip_model`,
`eval.aesthetics_head` and `eval.oracle_model`.

They are committed with the source (`toyworld/pretrained/`, built by `make toyworld`: see its
README), not built on first use like `tiny`: they took hours of CPU to train. A wheel does not
carry them (35 MB); an installed dreamsweep finds them through `DREAMSWEEP_TOY_MODELS`, a folder
of the same layout (a checkout's `toyworld/pretrained`, or `make toyworld`'s output).
"""

from __future__ import annotations

import os
from pathlib import Path

TOY = "toy"
TOY_MODELS_ENV = "DREAMSWEEP_TOY_MODELS"
TOY_PARTS: dict[str, str] = {
    "base_model": "toy-sd",
    "clip_model": "clip",
    "aesthetics_head": "aesthetic_head.pth",
    "oracle_model": "oracle.safetensors",
}
"""Spec field → its file or folder in the toy models' folder."""
_CHECKOUT_FOLDER = Path(__file__).resolve().parents[1] / "toyworld" / "pretrained"


def toy_models_folder() -> Path:
    """`DREAMSWEEP_TOY_MODELS` when set, else the checkout's `toyworld/pretrained`."""
    override = os.environ.get(TOY_MODELS_ENV)
    return Path(override).expanduser() if override else _CHECKOUT_FOLDER


def toy_model_problem(field: str) -> str | None:
    """Why `field: toy` cannot load here (its file or folder is missing), or None; the caller
    names the field."""
    path = toy_models_folder() / TOY_PARTS[field]
    if path.exists():
        return None
    where = (
        f"{TOY_MODELS_ENV}={os.environ[TOY_MODELS_ENV]!r}"
        if os.environ.get(TOY_MODELS_ENV)
        else "the source checkout's toyworld/pretrained (a wheel does not carry it)"
    )
    return (
        f"'toy' needs {str(path)!r}, which does not exist; the toy world's models are "
        f"read from {where}: set {TOY_MODELS_ENV} to a folder of them (`make toyworld` builds "
        "one)"
    )


def toy_model_path(field: str) -> Path:
    """The file or folder of `field: toy`; raises FileNotFoundError saying where to get it."""
    problem = toy_model_problem(field)
    if problem:
        raise FileNotFoundError(f"{field}: {problem}")
    return toy_models_folder() / TOY_PARTS[field]
