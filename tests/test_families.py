"""Model families (`contract.families`): detected from a folder's configs, never its name; each
built-in toy model loads through `load_base_model` and generates through its family's pipeline;
the conditioning the loop trains SDXL on is what its pipeline samples with; a VAE that overflows
in fp16 stays fp32. (Every method's SDXL checkpoint loading the diffusers way: in
test_base_models.py; the kohya copy: test_kohya_export.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_spec, write_spec
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection

from contract.families import (
    BUILTIN_MODELS,
    BUILTIN_RESOLUTION_MULTIPLES,
    FAMILIES,
    UnsupportedModel,
    family_of_folder,
    prediction_type,
    resolution_multiple,
)
from contract.spec import load_spec
from evaluation.sampling import make_sampler
from launch.grid import expand_grid
from trainers.conditioning import encode_prompts, tokenize, unet_conditioning
from trainers.models import assemble_pipeline, load_base_model, load_pipeline, resolve_model_source


def configs_only(source: Path, destination: Path) -> Path:
    """A copy of a pipeline folder's JSON configs (no weights) under another name."""
    for config in source.rglob("*.json"):
        target = destination / config.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(config, target)
    return destination


def test_family_is_read_from_the_configs_not_the_name(tmp_path: Path) -> None:
    expected = {"tiny": ("sd1", 8, "epsilon"), "tiny-sd2": ("sd2", 8, "v_prediction")}
    expected["tiny-sdxl"] = ("sdxl", 8, "epsilon")  # the VAE's factor: 2 ** (4 blocks - 1)
    expected["toy"] = ("sd1", 8, "epsilon")  # the toy world's pretrained pipeline, committed
    assert BUILTIN_MODELS == {name: family for name, (family, _, _) in expected.items()}
    for name, (family, multiple, prediction) in expected.items():
        folder = Path(resolve_model_source(name))
        assert family_of_folder(folder) == family
        # The multiple validation uses for a toy model without building it is its folder's.
        assert resolution_multiple(folder) == BUILTIN_RESOLUTION_MULTIPLES[name] == multiple
        assert prediction_type(folder) == prediction
    # A folder's name means nothing: SD 1.x's configs under an SDXL-sounding name are SD 1.x.
    renamed = configs_only(Path(resolve_model_source("tiny")), tmp_path / "sdxl-base-1.0")
    assert family_of_folder(renamed) == "sd1"
    assert FAMILIES["sd2"].default_resolution("v_prediction") == 768
    assert FAMILIES["sd2"].default_resolution("epsilon") == 512
    assert FAMILIES["sdxl"].default_resolution() == 1024
    assert FAMILIES["sdxl"].pipeline == "StableDiffusionXLPipeline"


def test_a_folder_that_is_not_a_supported_pipeline_is_refused(tmp_path: Path) -> None:
    not_a_pipeline = tmp_path / "photos"
    not_a_pipeline.mkdir()
    with pytest.raises(UnsupportedModel) as refused:
        family_of_folder(not_a_pipeline)
    message = str(refused.value)
    assert str(not_a_pipeline) in message and "model_index.json" in message
    assert all(name in message for name in FAMILIES)

    other = configs_only(Path(resolve_model_source("tiny")), tmp_path / "sd3")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"})
    )
    with pytest.raises(UnsupportedModel) as refused:
        family_of_folder(other)
    message = str(refused.value)
    assert str(other) in message and "'StableDiffusion3Pipeline'" in message
    assert (
        "sdxl (StableDiffusionXLPipeline)" in message and "sd1 (StableDiffusionPipeline)" in message
    )
    # A VAE config without its levels: no made-up multiple of 1, a refusal naming the file.
    vae_config = other / "vae" / "config.json"
    vae_config.write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UnsupportedModel, match="block_out_channels") as refused:
        resolution_multiple(other)
    assert str(vae_config) in str(refused.value)
    # JSON that is not an object: a refusal naming the file, not an AttributeError.
    (other / "model_index.json").write_text("[]")
    with pytest.raises(UnsupportedModel, match="holds a JSON list, not the object") as refused:
        family_of_folder(other)
    assert str(other / "model_index.json") in str(refused.value)


@pytest.mark.parametrize(
    ("base_model", "precision", "vae_dtype"),
    [
        ("tiny-sdxl", "bf16", torch.bfloat16),  # bf16 has fp32's range: it does not overflow
        ("tiny-sdxl", "fp16", torch.float32),  # force_upcast: SDXL's VAE overflows in fp16
        ("tiny", "fp16", torch.float16),  # with force_upcast off
    ],
)
def test_a_vae_that_needs_fp32_stays_fp32_under_fp16(
    tmp_path: Path, base_model: str, precision: str, vae_dtype: torch.dtype
) -> None:
    """Setup only (fp16 training itself needs a GPU): the frozen VAE's dtype after setup."""
    from trainers.loop import PRECISION, setup_method

    spec = small_spec(tmp_path, base_model=base_model, methods=["lora"])
    trial = expand_grid(load_spec(write_spec(tmp_path, spec)))[0]
    model = load_base_model(base_model)
    assert model.vae.config.force_upcast  # diffusers' default, and the toys' configs
    if base_model == "tiny":
        model.vae.register_to_config(force_upcast=False)  # as an fp16-safe VAE's config says
    frozen = PRECISION[precision]
    setup_method(trial, model, frozen_dtype=frozen, device=torch.device("cpu"))
    assert model.vae.dtype == vae_dtype
    assert model.unet.dtype == frozen and model.text_encoder.dtype == frozen


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-sdxl"])
def test_each_tiny_model_loads_and_generates_through_its_pipeline(name: str) -> None:
    model = load_base_model(name)
    assert model.family == BUILTIN_MODELS[name]
    unet = model.unet.config
    if model.family == "sdxl":
        assert isinstance(model.text_encoder_2, CLIPTextModelWithProjection)
        assert model.tokenizer_2.pad_token == "!" and model.tokenizer.pad_token == "<|endoftext|>"
        assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
        text_width = model.text_encoder.config.hidden_size + model.text_encoder_2.config.hidden_size
        assert unet.cross_attention_dim == text_width
        assert unet.projection_class_embeddings_input_dim == (
            6 * unet.addition_time_embed_dim + model.text_encoder_2.config.projection_dim
        )
    else:
        assert model.text_encoder_2 is None and model.tokenizer_2 is None
        assert unet.use_linear_projection == (model.family == "sd2")
    if model.family == "sd2":
        assert model.noise_scheduler.config.prediction_type == "v_prediction"
        assert model.tokenizer.pad_token == "!"
        assert list(unet.attention_head_dim) == [2, 2, 4, 4]

    def generate(pipeline) -> np.ndarray:
        return pipeline(
            "a photo of sks toy",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    # The loop's pipeline (over the loaded parts) and the plain from_pretrained one agree.
    assembled = assemble_pipeline(model, make_sampler("dpm++", model.noise_scheduler.config))
    plain = load_pipeline(name)
    assert type(assembled) is type(plain)
    plain.scheduler = make_sampler("dpm++", plain.scheduler.config)
    image = generate(assembled)
    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image, generate(plain))


def test_sdxl_conditioning_is_what_its_pipeline_samples_with() -> None:
    """Both encoders' penultimate layers concatenated, the second's pooled projection, and the
    size/crop ids: equal to `StableDiffusionXLPipeline.encode_prompt` / `_get_add_time_ids`."""
    model = load_base_model("tiny-sdxl")
    prompts = ["a photo of sks toy", "a photo of a toy"]
    with torch.no_grad():
        ids = tokenize(model, prompts)
        ours = encode_prompts("sdxl", list(model.text_encoders.values()), ids)
        pipeline = assemble_pipeline(model, model.noise_scheduler)
        hidden, _, pooled, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ids[1][0, -1] == 0  # the second tokenizer pads with "!" (id 0)
    torch.testing.assert_close(ours.hidden, hidden, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    conditioning = unet_conditioning("sdxl", ours.repeat_rows(2), 64)
    time_ids = pipeline._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), dtype=torch.float32, text_encoder_projection_dim=32
    )
    assert conditioning["added_cond_kwargs"]["time_ids"].shape == (4, 6)
    torch.testing.assert_close(conditioning["added_cond_kwargs"]["time_ids"][1:2], time_ids)
    assert conditioning["encoder_hidden_states"].shape[0] == 4
    assert isinstance(pipeline, StableDiffusionXLPipeline)
