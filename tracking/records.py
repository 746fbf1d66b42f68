"""Per-image evaluation records of a trial (prompt, phrases, seed, per-image metrics), read back
from MLflow for analysis, e.g. which style or lighting phrase lowers similarity."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from contract.layout import RECORDS_DIR


def _read_table(path: Path) -> pd.DataFrame:
    """A table `MlflowClient.log_table` wrote (its JSON layout: columns and data)."""
    layout = json.loads(path.read_text(encoding="utf-8"))
    return pd.DataFrame(layout["data"], columns=layout["columns"])


def load_table(client: MlflowClient, run_id: str, artifact_file: str) -> pd.DataFrame | None:
    """The table `log_table` wrote to `artifact_file` of a run, or None when it has none
    (`mlflow.load_table` reads the global tracking URI only, not a client's)."""
    folder, _, _ = artifact_file.rpartition("/")
    if not any(a.path == artifact_file for a in client.list_artifacts(run_id, folder or None)):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        return _read_table(Path(client.download_artifacts(run_id, artifact_file, scratch)))


def load_records(client: MlflowClient, run_id: str) -> pd.DataFrame:
    """Every evaluated step's records of one trial run, as one table with a `step` column."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(client.download_artifacts(run_id, RECORDS_DIR, scratch))
        tables = [_read_table(path) for path in sorted(folder.glob("step_*.json"))]
    if not tables:
        raise LookupError(f"run {run_id} has no per-image records under {RECORDS_DIR}/")
    return pd.concat(tables, ignore_index=True)


def per_phrase_means(records: pd.DataFrame, metric: str, *, step: int) -> pd.DataFrame:
    """Mean of `metric` at `step` for every (slot, phrase), as in the study's per-component
    analysis: columns slot, phrase, mean, images."""
    at_step = records[records["step"] == step]
    rows = []
    for column in (c for c in at_step.columns if c.startswith("phrase.")):
        grouped = at_step.groupby(column)[metric].agg(["mean", "size"])
        for phrase, values in grouped.iterrows():
            rows.append(
                {
                    "slot": column.removeprefix("phrase."),
                    "phrase": phrase,
                    "mean": values["mean"],
                    "images": int(values["size"]),
                }
            )
    return pd.DataFrame(rows, columns=["slot", "phrase", "mean", "images"])
