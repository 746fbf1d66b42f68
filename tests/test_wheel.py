"""The project installs as a package: the wheel holds every module and every file the code reads
beside itself, declares every third-party package it imports, and its `dreamsweep` works from a
folder outside the repository."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from contract.prompts import expand, load_template, template_path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
TOP_LEVEL = sorted({name.split(".")[0] for name in PYPROJECT["tool"]["setuptools"]["packages"]})
# Data folders kept elsewhere in the checkout that the wheel carries inside a package
# (configs/prompts → contract/prompt_templates).
MAPPED = PYPROJECT["tool"]["setuptools"]["package-dir"]
# What a checkout holds that is not source: caches, environments, runs, build outputs.
NOT_SOURCE = shutil.ignore_patterns(
    ".*", "runs", "mlruns", "build", "dist", "*.egg-info", "__pycache__", "test-artifacts", "*.out"
)


def shipped_files() -> set[str]:
    """Every file of the project's packages in the checkout (modules and the data beside them),
    as their paths in the wheel."""
    in_packages = {
        path.relative_to(REPO).as_posix()
        for package in TOP_LEVEL
        for path in (REPO / package).rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        # The toy world's intermediate weights are the build's input, not the package's.
        and not path.is_relative_to(REPO / "toyworld" / "pretrained")
    }
    mapped = {
        f"{package.replace('.', '/')}/{path.name}"
        for package, folder in MAPPED.items()
        for path in (REPO / folder).iterdir()
        if path.is_file()
    }
    return in_packages | mapped


def test_every_package_of_the_checkout_is_listed_in_pyproject() -> None:
    folders = sorted(p.parent.name for p in REPO.glob("*/__init__.py"))
    assert folders == TOP_LEVEL
    subpackages = sorted(
        ".".join(p.parent.relative_to(REPO).parts)
        for package in TOP_LEVEL
        for p in (REPO / package).rglob("__init__.py")
    )
    listed = [p for p in PYPROJECT["tool"]["setuptools"]["packages"] if p not in MAPPED]
    assert subpackages == sorted(listed)


def test_every_imported_third_party_package_is_declared() -> None:
    """Each distribution the packages import (at any depth, optional ones included) is a
    dependency or an extra of pyproject.toml: a missing one breaks a plain `pip install`."""
    project = PYPROJECT["project"]
    declared = {
        canonicalize_name(Requirement(text).name)
        for text in [
            *project["dependencies"],
            *(r for extra in project["optional-dependencies"].values() for r in extra),
        ]
    }
    distributions = packages_distributions()
    undeclared: dict[str, set[str]] = {}
    for package in TOP_LEVEL:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in {n.split(".")[0] for n in names}:
                    if name in sys.stdlib_module_names or name in TOP_LEVEL:
                        continue
                    # One of the distributions that provide it (mlflow: mlflow, mlflow-skinny);
                    # none when it is not installed here (an optional accelerator such as
                    # xformers): nothing to check it against.
                    providers = {canonicalize_name(d) for d in distributions.get(name, [])}
                    if providers and not providers & declared:
                        undeclared.setdefault(name, set()).add(path.relative_to(REPO).as_posix())
    assert undeclared == {}


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    # Built from a copy: an in-tree build writes build/ and *.egg-info into the checkout. Without
    # build isolation: the build backend is the project venv's setuptools, no index needed.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)]
    subprocess.run([*pip, *build], check=True, capture_output=True, text=True)
    [wheel] = wheels.glob("dreamsweep-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name for name in archive.namelist() if name.split("/")[0] in TOP_LEVEL}
    assert in_wheel == shipped_files()  # modules, prompt templates, vocabulary, page, scripts

    # A fresh venv with the wheel installed into it. Its dependencies (torch and the rest, the
    # pinned versions) come from the project venv through a .pth line rather than a second
    # multi-GB install: a plain path line, so the .pth files of that site-packages are not
    # run and the editable install of dreamsweep there stays inactive. The wheel is installed
    # before that line exists, so pip sees no dreamsweep already installed.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = ["--python", str(venv_python(venv)), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run([*pip, *install], check=True, capture_output=True, text=True)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(
        subprocess.run(
            [str(venv_python(venv)), "-c", purelib], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    project_site = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "project_venv_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in sorted(project_site)), encoding="utf-8"
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "configs" / "tiny_quickstart.yaml", elsewhere)
    shutil.copy(REPO / "configs" / "quickstart.yaml", elsewhere)
    shutil.copytree(REPO / "configs" / "subjects", elsewhere / "subjects")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
        )

    imported = run(str(venv_python(venv)), "-c", "import contract, torch; print(contract.__file__)")
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(site_packages)

    dreamsweep = str(venv / "bin" / "dreamsweep")
    validated = run(dreamsweep, "validate", "tiny_quickstart.yaml")
    assert validated.returncode == 0, validated.stderr
    assert "12 trials; each trains 30 steps" in validated.stdout
    assert str(site_packages / "contract" / "prompt_templates" / "object.yaml") in validated.stdout

    # The toy world's models are not in the wheel: the toy quickstart names where to point.
    toy = run(dreamsweep, "validate", "quickstart.yaml")
    assert toy.returncode != 0
    assert "base_model: 'toy' needs" in toy.stderr and "DREAMSWEEP_TOY_MODELS" in toy.stderr
    env["DREAMSWEEP_TOY_MODELS"] = str(REPO / "toyworld" / "pretrained")
    toy = run(dreamsweep, "validate", "quickstart.yaml")
    assert toy.returncode == 0, toy.stderr
    assert "16 trials; each trains 400 steps" in toy.stdout
    assert str(site_packages / "contract" / "prompt_templates" / "toyworld.yaml") in toy.stdout

    expanded = run(dreamsweep, "prompts", "object", "--n", "3")
    assert expanded.returncode == 0, expanded.stderr
    lines = [json.loads(line) for line in expanded.stdout.splitlines()]
    expected = expand(load_template(template_path("object")), 3, seed=0)
    assert [line["phrases"] for line in lines] == [p.phrases for p in expected]
