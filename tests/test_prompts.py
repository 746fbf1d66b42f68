"""Prompt templates: deterministic expansion, phrases kept per prompt, errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import dreamsweep, small_spec, write_spec

from contract.prompts import (
    PromptTemplate,
    PromptTemplateError,
    expand,
    load_template,
    shipped_templates,
    template_path,
)
from contract.spec import SpecError, load_spec
from evaluation.jobs import validation_prompts

TEMPLATE = PromptTemplate(
    template="{style} of {token} {class} {place}",
    slots={"style": ["a photo", "a painting"], "place": ["at home", "outside", "in space"]},
)


def test_expansion_is_seeded_distinct_and_a_prefix_of_larger_draws() -> None:
    six = expand(TEMPLATE, 6, seed=3)
    assert [p.text for p in six] == [p.text for p in expand(TEMPLATE, 6, seed=3)]
    assert len({p.text for p in six}) == 6  # every combination, once
    assert [p.text for p in expand(TEMPLATE, 2, seed=3)] == [p.text for p in six[:2]]
    assert [p.text for p in expand(TEMPLATE, 6, seed=4)] != [p.text for p in six]


def test_each_prompt_keeps_its_phrases_and_renders_with_or_without_the_identifier() -> None:
    for prompt in expand(TEMPLATE, 6, seed=0):
        style, place = prompt.phrases["style"], prompt.phrases["place"]
        assert prompt.render(token="sks", class_token="dog") == f"{style} of sks dog {place}"
        # DreamBench's CLIP-T prompt: the identifier removed, no double space left behind.
        assert prompt.render(token="", class_token="dog") == f"{style} of dog {place}"


def test_asking_for_more_prompts_than_combinations_is_an_error() -> None:
    with pytest.raises(
        ValueError, match="asked for 7 distinct prompts, but the template has only 6"
    ):
        expand(TEMPLATE, 7, seed=0)


def test_shipped_templates_load_and_cover_a_validation_set_of_100() -> None:
    assert shipped_templates() == ["object", "portrait", "toyworld"]
    # The study's templates are large; the toy world's has the world's own phrases only.
    sizes = {"object": 1000, "portrait": 1000, "toyworld": 150}
    for name in shipped_templates():
        template = load_template(template_path(name))
        prompts = expand(template, 100, seed=0)
        assert all("{token}" in p.text and "{class}" in p.text for p in prompts)
        assert template.combinations >= sizes[name]


def test_a_bad_template_file_names_the_file_and_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "template: '{style} of {class} {mood}'\n"
        "slots:\n  style: [a photo, a photo]\n  light: [soft]\n  token: [x]\n",
        encoding="utf-8",
    )
    with pytest.raises(PromptTemplateError) as caught:
        load_template(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: invalid prompt template")
    for problem in (
        "must contain {token}",
        "slot(s) ['mood'] that `slots` does not define",
        "slots ['light', 'token'] are not used by the template",
        "slots ['token'] are reserved for the subject",
        "slots.style: repeated phrase(s) ['a photo']",
    ):
        assert problem in message


def test_the_spec_draws_validation_prompts_from_a_template(tmp_path: Path) -> None:
    spec_dict = small_spec(tmp_path)
    del spec_dict["eval"]["prompts"]
    spec_dict["eval"]["prompt_template"] = {"template": "portrait", "n_validation": 5, "seed": 7}
    spec = load_spec(write_spec(tmp_path, spec_dict))
    template = load_template(template_path("portrait"))
    assert validation_prompts(spec.eval) == expand(template, 5, seed=7)
    assert spec.eval.images_per_step == 5 * spec.eval.images_per_prompt


def test_template_spec_errors_are_collected_before_any_work(tmp_path: Path) -> None:
    spec_dict = small_spec(tmp_path)  # keeps eval.prompts: both set is an error
    spec_dict["eval"]["prompt_template"] = {"template": "landscape"}
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec_dict))
    assert "shipped templates: object, portrait" in str(caught.value)

    spec_dict["eval"]["prompt_template"] = {"template": "object", "n_validation": 5000}
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec_dict))
    problems = "\n".join(caught.value.problems)
    assert "set eval.prompts or eval.prompt_template, not both" in problems
    del spec_dict["eval"]["prompts"]
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, spec_dict))
    assert caught.value.problems == [
        f"eval.prompt_template.n_validation: 5000 prompts asked, but "
        f"{str(template_path('object'))!r} has only 1500 phrase combinations"
    ]


@pytest.mark.slow
def test_cli_expands_a_template_for_an_inference_study(tmp_path: Path) -> None:
    out = tmp_path / "prompts.jsonl"
    args = ("prompts", "portrait", "--n", "300", "--seed", "2", "--token", "sks", "--class", "man")
    result = dreamsweep(*args, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = expand(load_template(template_path("portrait")), 300, seed=2)
    assert [line["index"] for line in lines] == list(range(300))
    assert [line["phrases"] for line in lines] == [p.phrases for p in expected]
    assert lines[0]["prompt"] == expected[0].render(token="sks", class_token="man")

    too_many = dreamsweep("prompts", "object", "--n", "2000", cwd=tmp_path)
    assert too_many.returncode == 2
    assert "asked for 2000 distinct prompts, but the template has only 1500" in too_many.stderr


def test_trial_id_follows_the_templates_content_not_its_location(tmp_path: Path) -> None:
    from contract.trial import TrialConfig
    from launch.grid import expand_grid

    def trial_for(template: Path) -> TrialConfig:
        spec_dict = small_spec(tmp_path)
        del spec_dict["eval"]["prompts"]
        spec_dict["eval"]["prompt_template"] = {"template": str(template), "n_validation": 2}
        [trial] = expand_grid(load_spec(write_spec(tmp_path, spec_dict)))
        # Trials travel to workers as JSON and must come back equal.
        assert TrialConfig.model_validate_json(trial.model_dump_json()) == trial
        return trial

    first, second = tmp_path / "a" / "object.yaml", tmp_path / "b" / "mine.yaml"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(template_path("object").read_bytes())
    assert trial_for(first).trial_id == trial_for(second).trial_id
    second.write_text(
        second.read_text(encoding="utf-8").replace("at night", "at midnight"), encoding="utf-8"
    )
    assert trial_for(first).trial_id != trial_for(second).trial_id
