"""The one-way architecture, read from the source: who may import whom, and module size.

Data flows spec → launch → cluster (workers) → trainers / evaluation → tracking → selection, on
the contract at the bottom. Every import statement counts, including those inside functions,
so a late import cannot hide a back-arrow; an import under `if TYPE_CHECKING:` counts too,
except where TYPE_ONLY allows it for annotations.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = tuple(
    sorted(
        {
            name.split(".")[0]
            for name in tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))[
                "tool"
            ]["setuptools"]["packages"]
        }
    )
)
"""The project's packages, as pyproject.toml ships them: a new one is checked from the start."""
FOLDERS = (*PACKAGES, "bench", "tests", "configs")
MAX_LINES = 450

FORBIDDEN: dict[str, set[str]] = {
    # The contract every stage shares imports nothing of the project but itself.
    "contract": set(FOLDERS) - {"contract"},
    # Workers and what they run never reach back into the launchers.
    "cluster": {"launch"},
    "trainers": {"launch", "cluster", "tracking", "selection", "inference"},
    "evaluation": {"launch", "cluster", "trainers", "tracking", "selection", "inference"},
    # Generation for inference studies: on the contract, evaluation and trainers, like trainers.
    "inference": {"launch", "cluster", "tracking", "selection"},
    "tracking": {"launch", "cluster", "trainers", "selection", "evaluation", "inference"},
    # The toy world builds models (on the contract, evaluation and trainers' code), nothing more.
    "toyworld": {"launch", "cluster", "tracking", "selection", "inference"},
    "selection": {"launch", "trainers", "cluster", "evaluation"},
    "launch": set(),
}
"""Package → the project's top-level packages it must not import."""
TYPE_ONLY = {"tracking": {"evaluation"}}
"""Package → packages it may import under `if TYPE_CHECKING:` only (for annotations)."""
SCRIPT_FOLDERS = ("bench", "tests")
"""Nobody imports these, by package or by a module put on sys.path (`from conftest import`)."""


def script_modules(root: Path) -> dict[str, str]:
    """Module name → its folder, for the modules of bench/ and tests/ (importable by stem once
    their folder is on sys.path)."""
    return {p.stem: folder for folder in SCRIPT_FOLDERS for p in (root / folder).glob("*.py")}


def python_files(*folders: str, root: Path = REPO) -> list[Path]:
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py"))


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the imports under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for statement in node.body:
                lines |= {n.lineno for n in ast.walk(statement) if hasattr(n, "lineno")}
    return lines


def imported_modules(path: Path, root: Path) -> list[tuple[int, str, bool]]:
    """(line, module, for type checking only) of every import in the file, relative imports
    resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = path.relative_to(root).parent.parts
    type_only = type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, node.lineno in type_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module, node.lineno in type_only))
    return found


def import_violations(root: Path = REPO) -> list[str]:
    scripts = script_modules(root)
    problems = []
    for path in python_files(*FOLDERS, root=root):
        relative = path.relative_to(root)
        owner = relative.parts[0]
        for line, module, type_only in imported_modules(path, root):
            top = module.split(".")[0]
            top = scripts.get(top, top)  # a script module stands for its folder
            if top == owner or (type_only and top in TYPE_ONLY.get(owner, set())):
                continue
            if top in FORBIDDEN.get(owner, set()) or top in SCRIPT_FOLDERS:
                problems.append(f"{relative}:{line}: {owner} imports {module}")
    return problems


def test_every_import_follows_the_one_way_architecture() -> None:
    problems = import_violations()
    assert not problems, "imports against the architecture:\n" + "\n".join(problems)


def test_the_checker_finds_late_relative_and_type_checking_imports(tmp_path: Path) -> None:
    """The checker itself, on a made-up tree: each kind of back-arrow is found, by file:line."""
    files = {
        "contract/spec.py": "import yaml\n\ndef f():\n    from trainers.loop import train_trial\n",
        "cluster/worker.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import launch.local\n"
        ),
        "trainers/loop.py": "from ..launch import cli\nfrom . import models\n",
        "selection/report.py": "from tracking.sweep import SweepTracking\nimport bench.memory\n",
        "tracking/reporter.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from evaluation.evaluator import Evaluation\nfrom evaluation import metrics\n"
        ),
        "bench/load.py": "from conftest import small_spec\n",
        "tests/conftest.py": "from load import run\n",
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source, encoding="utf-8")
    assert import_violations(tmp_path) == [
        "bench/load.py:1: bench imports conftest",
        "cluster/worker.py:3: cluster imports launch.local",
        "contract/spec.py:4: contract imports trainers.loop",
        "selection/report.py:2: selection imports bench.memory",
        "tests/conftest.py:1: tests imports load",
        "tracking/reporter.py:4: tracking imports evaluation",
        "trainers/loop.py:1: trainers imports launch",
    ]


def first_comment(path: Path) -> str:
    """The module docstring, or the leading comment lines."""
    text = path.read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(text)) or ""
    comments = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        comments.append(line)
    return docstring + "\n".join(comments)


@pytest.mark.parametrize("folder", [*PACKAGES, "bench", "configs"])
def test_no_module_is_over_450_lines_unless_it_says_why(folder: str) -> None:
    too_long = []
    for path in python_files(folder):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES and f"over {MAX_LINES} lines" not in first_comment(path):
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not too_long, (
        f"modules over {MAX_LINES} lines (split by concern, or say why in the first comment "
        f"with the words 'over {MAX_LINES} lines'):\n" + "\n".join(too_long)
    )


def test_the_mlflow_folder_is_no_package() -> None:
    """`mlflow/` holds the tracking-server scripts: an __init__.py would shadow the real mlflow."""
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_the_contract_imports_without_torch_or_mlflow() -> None:
    """The contract is what every stage (and `dreamsweep validate`) reads first: light."""
    heavy = ("torch", "mlflow", "diffusers", "transformers", "ray", "submitit", "optuna")
    modules = [f"contract.{p.stem}" for p in (REPO / "contract").glob("*.py")] + ["contract.spec"]
    code = (
        f"import sys; import {', '.join(sorted(modules))}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
