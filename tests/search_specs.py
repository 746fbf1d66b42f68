"""The small search specs the search tests share."""

from __future__ import annotations

from pathlib import Path

from conftest import small_spec

SPACE = {
    "methods.lora.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "methods.lora.rank": {"type": "int", "low": 2, "high": 8},
}
ONE_METRIC = {"weights": {"similarity": 1.0}, "ranges": {"similarity": [0.0, 1.0]}}


def search_spec(tmp_path: Path, *, store: str | None = None, **search: object) -> dict:
    tracking = {"tracking": {"uri": store}, "name": f"search-{tmp_path.name}"} if store else {}
    return small_spec(
        tmp_path,
        **tracking,
        methods={"lora": {}},
        eval={"metrics": ["similarity"]},
        selection=ONE_METRIC,
        search={"kind": "optuna", "n_trials": 4, "space": SPACE, **search},
    )
