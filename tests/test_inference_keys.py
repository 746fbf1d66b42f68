"""What keys an inference study's images: the combination id leaves the prompt set out (raising
`prompts.n` keeps every combination and every existing image's file name), each image's file
name carries its prompt's digest, and the fresh noise of ancestral steps is its own stream."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from contract.inference import StudyPrompt, image_key, image_seed, step_noise_seed
from contract.spec import load_any_spec
from inference.shard import step_noise_generator
from launch.inference import prepare_study


def prepared(folder: Path, n: int):
    spec = {
        "kind": "inference",
        "name": "keys",
        "output_dir": str(folder / "run"),
        "models": ["tiny"],
        "schedulers": ["ddim", "euler_a"],
        "num_inference_steps": [2],
        "negative_prompt": {"none": None, "lowq": "blurry"},
        "resolution": 64,
        "prompts": {"template": "object", "n": n, "token": "sks", "class_token": "toy"},
        "metrics": {"names": ["aesthetics"], "clip_model": "tiny", "aesthetics_head": "tiny"},
        "shards": {"prompts_per_shard": 100},
    }
    path = folder / f"n{n}.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return prepare_study(load_any_spec(path), download=False)


def test_more_prompts_keep_the_combinations_and_the_first_prompts_images(tmp_path: Path) -> None:
    fewer, more = prepared(tmp_path, 3), prepared(tmp_path, 5)
    assert [c.combination_id for c in fewer.combinations] == [
        c.combination_id for c in more.combinations
    ]
    assert more.prompts[:3] == fewer.prompts  # the template's prefix-stable draw
    assert [image_key(p, 0) for p in more.prompts[:3]] == [image_key(p, 0) for p in fewer.prompts]
    assert fewer.prompts_digest != more.prompts_digest  # their runs are over other prompts


def test_an_image_key_changes_with_its_prompts_text_only() -> None:
    prompt = StudyPrompt(index=3, text="a {token} {class} at dusk", phrases={"light": "at dusk"})
    same = StudyPrompt(index=3, text="a {token} {class} at dusk", phrases={"light": "at dusk"})
    edited = prompt.model_copy(update={"text": "a {token} {class} at dawn"})
    assert image_key(prompt, 1) == image_key(same, 1)
    assert image_key(prompt, 1).startswith("p000003_i001_")
    assert image_key(edited, 1) != image_key(prompt, 1)  # regenerated, never reused


def test_step_noise_is_not_the_initial_latents_and_is_per_prompt_and_image() -> None:
    shape = (1, 4, 8, 8)
    initial = torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(0, 3, 1)))
    first_step = torch.randn(shape, generator=step_noise_generator(0, 3, 1))
    assert not torch.allclose(first_step, initial)
    again = torch.randn(shape, generator=step_noise_generator(0, 3, 1))
    assert torch.equal(first_step, again)  # independent of batch, shard and run
    assert step_noise_seed(0, 3, 1) != step_noise_seed(0, 1, 3) != step_noise_seed(1, 3, 1)
