"""Generated sweep specs: each one is valid, or refused with a clear message, never a traceback.

Hypothesis mutates a valid spec (drops keys, swaps values for other types, plausible
alternatives and hostile strings such as `../../etc`, adds unknown keys) and also feeds raw text
and bytes. Every case goes through the real entry point, `dreamsweep validate` (in-process), whose
exit status must be 0 (valid, and then every trial folder lies inside the output folder) or 2
(refused, with every problem naming its field). The draws are derandomised
so CI sees the same 1,000 specs on every run; a failure prints the spec that caused it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import small_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.spec import SpecError, load_spec
from launch import cli
from launch.grid import expand_grid

# What a refusal looks like: "<file>: N problem(s) in the sweep spec:" then "  - field: why".
HEADER = re.compile(r"^error: (?P<file>.+): (?P<count>\d+) problems? in the sweep spec:$")
PROBLEM = re.compile(r"^  - (<top>|[A-Za-z_][\w.\[\]-]*|[^:]+\.yaml|cannot read|not valid YAML)")

SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE_STRINGS = [
    "",
    " ",
    "../../etc",
    "/",
    "a\x00b",
    "~nobody/x",
    "{token}",
    "{",
    "é" * 70,
    "x" * 5000,
    "C:\\Windows",
    "-1",
    ".nan",
]
PLAUSIBLE = [
    0,
    1,
    2,
    -1,
    64,
    1e-4,
    0.5,
    True,
    False,
    None,
    "lora",
    "dreambooth",
    "textual_inversion",
    "fp16",
    "bf16",
    "no",
    "local",
    "slurm",
    "ray",
    "asha",
    "similarity",
    "tiny",
    [1, 2],
    [],
    {},
    {"kind": "slurm", "partition": "debug"},
    {"kind": "ray", "scheduler": "asha"},
    {"lora": {"rank": 4}},
]
# Valid alternatives for known keys, so that many generated specs are valid ones too.
ALTERNATIVES: dict[str, list[Any]] = {
    "max_steps": [4, 8, 12],
    "eval_every": [1, 2, 4],
    "resolution": [32, 64, 128],
    "seed": [[0], [0, 1], [7]],
    "num_images": [[1], [2], [1, 2]],
    "learning_rate": [[1e-4], [1e-3, 1e-4]],
    "images_per_prompt": [1, 2, 3],
    "num_inference_steps": [1, 2, 3],
    "num_class_images": [1, 3],
    "class_token": ["dog", "man", "toy"],
    "name": ["robot", "a-b_c.1"],
    "methods": [["lora"], ["dreambooth", "lora"], {"textual_inversion": None}],
    "launcher": [
        "local",
        {"kind": "local", "max_parallel": 2},
        {"kind": "slurm", "partition": "debug", "time_min": 30},
        {"kind": "ray", "scheduler": {"kind": "asha", "grace_period": 2}},
    ],
    "tracking": [{"uri": "sqlite:///elsewhere.db"}, {"experiment": "other"}],
    "mixed_precision": ["no", "fp16", "bf16"],
    "metrics": [["similarity"], ["similarity", "aesthetics", "diversity"]],
}
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(PLAUSIBLE),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths_of(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a YAML tree (dict keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths_of(value, (*prefix, index))
    return found


def mutate(tree: Any, path: tuple, action: str, value: Any) -> Any:
    """A copy of `tree` with the node at `path` dropped, replaced, or given an extra key."""
    if not path:
        return tree
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        copy = dict(tree)
    else:
        copy = list(tree)
    if rest:
        copy[head] = mutate(copy[head], rest, action, value)
    elif isinstance(copy, dict) and head not in copy:  # a new top-level section
        copy[head] = value
    elif action == "drop":
        del copy[head]
    elif action == "extra" and isinstance(copy[head], dict):
        copy[head] = {**copy[head], "unexpected_key": value}
    else:
        copy[head] = value
    return copy


@st.composite
def mutated_specs(draw: st.DrawFn, base: dict) -> dict:
    spec = base
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = paths_of(spec)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["drop", "replace", "extra", "alternative"]))
        if action == "alternative":
            key = draw(st.sampled_from(sorted(ALTERNATIVES)))
            known = [p for p in paths if p[-1] == key] or [(key,)]
            path = draw(st.sampled_from(known))
            spec = mutate(spec, path, "replace", draw(st.sampled_from(ALTERNATIVES[key])))
        else:
            spec = mutate(spec, path, action, draw(values))
    return spec


def check_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `dreamsweep validate` in-process; an escaping exception fails the test with it."""
    status = cli.main(["validate", str(path)])
    captured = capsys.readouterr()
    assert status in (0, 2), (status, captured.err)
    if status == 2:
        lines = captured.err.strip().splitlines()
        header = HEADER.match(lines[0])
        assert header and header["file"] == str(path), captured.err
        listed = [line for line in lines[1:] if line.startswith("  - ")]
        assert len(listed) == int(header["count"]), captured.err
        for line in listed:
            assert PROBLEM.match(line), line
    return status, captured.err


@pytest.fixture
def base_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, small_spec(folder)


@pytest.fixture
def outcomes() -> dict[str, int]:
    """Counts of each outcome; afterwards, both must have occurred many times (the mutations
    are neither all fatal nor all harmless)."""
    counts = {"valid": 0, "refused": 0}
    yield counts
    assert sum(counts.values()) >= 1000, counts
    assert counts["valid"] >= 50 and counts["refused"] >= 500, counts


@SETTINGS
@given(data=st.data())
def test_mutated_specs_are_valid_or_clearly_refused(
    data: st.DataObject,
    base_spec: tuple[Path, dict],
    outcomes: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder, base = base_spec
    spec = data.draw(mutated_specs(base))
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    status, _ = check_validate(path, capsys)
    outcomes["valid" if status == 0 else "refused"] += 1
    if status == 0:  # every folder a valid spec builds stays inside its output folder
        valid = load_spec(path)
        root = valid.resolved_output_dir.resolve()
        for trial in expand_grid(valid):
            assert trial.output_dir.resolve().is_relative_to(root), trial.output_dir


@settings(SETTINGS, max_examples=200)
@given(raw=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_raw_text_and_bytes_are_refused_cleanly(
    raw: str | bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "raw.yaml"
    if isinstance(raw, str):
        path.write_text(raw, encoding="utf-8")
    else:
        path.write_bytes(raw)
    with pytest.raises(SpecError) as raised:
        load_spec(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert raised.value.problems and all(p.strip() for p in raised.value.problems)
