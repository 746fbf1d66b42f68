"""The kohya-format LoRA file (`export.lora_format: [diffusers, kohya]`): written beside
diffusers' file for every family, UNet and text encoders, and equal to it once loaded back the
diffusers way (`load_lora_weights`): the same image, with adapters far from zero (a wrong alpha
would show). SD 2.x's (SD 1.x's key layout) is checked on trained checkpoints in
test_base_models.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from contract.spec import ExportSpec, LoRASpec, SubjectSpec
from trainers.lora import KOHYA_WEIGHTS_NAME, LoRAMethod
from trainers.models import load_base_model, load_pipeline

# Kohya's key prefix of a text encoder: `lora_te_` for one; SDXL's two are `lora_te1_`/`te2_`.
TEXT_ENCODER_PREFIXES = {"tiny": {"lora_te_"}, "tiny-sdxl": {"lora_te1_", "lora_te2_"}}


def text_encoder_prefixes(kohya: dict) -> set[str]:
    """The text encoders' key prefixes (kohya names the CLIP model's `text_model` level)."""
    return {key.split("text_model")[0] for key in kohya if key.startswith("lora_te")}


def image(pipeline) -> np.ndarray:
    return pipeline(
        "a photo of sks toy",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


@pytest.mark.slow
@pytest.mark.parametrize("base_model", ["tiny", "tiny-sdxl"])
def test_kohya_file_loads_as_the_same_lora(base_model: str, tmp_path: Path) -> None:
    subject = SubjectSpec(name="robot", images=tmp_path, class_token="toy")
    options = LoRASpec(rank=2, alpha=3.0, train_text_encoder=True)  # alpha ≠ rank: scale 1.5
    method = LoRAMethod(options, subject, ExportSpec(lora_format=["diffusers", "kohya"]))
    model = load_base_model(base_model)
    torch.manual_seed(0)
    trainable = method.setup(model, frozen_dtype=torch.float32)
    with torch.no_grad():  # as if trained: B starts at zero, which would hide a wrong scale
        for parameter in trainable:
            parameter.add_(0.2 * torch.randn_like(parameter))
    method.save_weights(model, tmp_path)

    kohya = load_file(tmp_path / KOHYA_WEIGHTS_NAME)
    assert text_encoder_prefixes(kohya) == TEXT_ENCODER_PREFIXES[base_model]
    assert any(key.startswith("lora_unet_") for key in kohya)
    alphas = [value for key, value in kohya.items() if key.endswith(".alpha")]
    assert alphas and all(float(alpha) == 3.0 for alpha in alphas)
    downs = [key for key in kohya if key.endswith(".lora_down.weight")]
    assert len(downs) == len(alphas) == len([k for k in kohya if ".lora_up." in k])

    from_diffusers = load_pipeline(base_model)
    from_diffusers.load_lora_weights(tmp_path)
    from_kohya = load_pipeline(base_model)
    from_kohya.load_lora_weights(tmp_path, weight_name=KOHYA_WEIGHTS_NAME)

    expected = image(from_diffusers)
    np.testing.assert_allclose(image(from_kohya), expected, rtol=0, atol=1e-6)
    from_diffusers.disable_lora()
    assert not np.allclose(expected, image(from_diffusers), atol=1e-3)  # the adapters matter
