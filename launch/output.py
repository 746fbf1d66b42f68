"""Rows a person and a script can read: a table, CSV or JSON, from the same rows and columns.

`dreamsweep select` and `dreamsweep status` print their rows (defined at the end) through
`emit`. On a terminal the table fits the window; piped or logged it is printed at its full
width, every value whole (rich would otherwise cut it to 80 columns). `--format csv` and
`--format json` print the raw values (full float precision, None as an empty cell / null) under
stable keys, and nothing else on stdout.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from launch.status import SweepStatus
    from selection.select import SweepSelection

FORMATS = ("table", "csv", "json")
Format = Literal["table", "csv", "json"]


def plain(value: Any) -> str:
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Column:
    key: str
    """The CSV header and JSON key (stable: scripts read it)."""
    header: str | None = None
    """The table's heading; None: the key, `_` read as a space."""
    numeric: bool = False
    """Right-aligned in the table."""
    text: Callable[[Any], str] = plain
    """How the table shows a value (CSV and JSON get the value itself)."""
    table: bool = True
    """Shown in the table."""
    data: bool = True
    """Written to CSV and JSON."""

    @property
    def heading(self) -> str:
        return self.header if self.header is not None else self.key.replace("_", " ")


def decimals(places: int) -> Callable[[Any], str]:
    """A table text for a float with `places` decimals ("-" for none)."""
    return lambda value: "-" if value is None else f"{value:.{places}f}"


def _data_value(value: Any) -> Any:
    """JSON-ready: NaN and infinities, which JSON has no words for, become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _csv_cell(value: Any) -> str:
    value = _data_value(value)
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)  # a float's str is its shortest exact repr


def emit(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[Column],
    *,
    output_format: Format,
    console: Console,
    title: str | None = None,
) -> None:
    """Print `rows` (column key → value) as a table, CSV or JSON on `console`'s file."""
    if output_format == "json":
        data = [{c.key: _data_value(row.get(c.key)) for c in columns if c.data} for row in rows]
        console.file.write(json.dumps(data, indent=2) + "\n")
    elif output_format == "csv":
        writer = csv.writer(console.file, lineterminator="\n")
        writer.writerow([c.key for c in columns if c.data])
        for row in rows:
            writer.writerow([_csv_cell(row.get(c.key)) for c in columns if c.data])
    else:
        _table(rows, [c for c in columns if c.table], console, title)
    console.file.flush()


def _table(
    rows: Sequence[dict[str, Any]], columns: list[Column], console: Console, title: str | None
) -> None:
    whole = not console.is_terminal
    # Piped or logged, the title goes on its own line: rich would wrap it to the table's width.
    table = Table(title=None if whole or title is None else Text(title))
    for column in columns:
        # On a terminal a long value folds within its cell (rich's default cuts it to "…").
        table.add_column(
            column.heading,
            justify="right" if column.numeric else "left",
            no_wrap=whole,
            overflow="fold",
        )
    for row in rows:
        # Text, not markup: a label or a path with brackets stays as it is.
        table.add_row(*(Text(column.text(row.get(column.key))) for column in columns))
    if not whole:
        console.print(table)
        return
    # No window to fit: as wide as the table needs, so no cell is cut or wrapped.
    wide = Console(file=console.file, width=1_000_000, color_system=None, highlight=False)
    if title is not None:
        wide.print(title, markup=False, soft_wrap=True)
    wide.print(table)


# The commands' rows. Keys are stable: scripts read them.


def selection_columns(weighted: list[str]) -> list[Column]:
    """`dreamsweep select`: one row per trial, a column per weighted metric."""
    return [
        Column("trial"),
        Column("run_id", table=False),
        Column("subject", table=False),
        Column("method", table=False),
        Column("num_images", table=False),
        Column("best_step", numeric=True),
        Column("score", numeric=True, text=decimals(3)),
        Column("collapse", numeric=True, data=False),
        Column("collapse_step", table=False),
        Column("collapse_metric", table=False),
        *(Column(metric, metric, numeric=True, text=decimals(4)) for metric in weighted),
        Column("checkpoint", table=False),
        Column("registrable_step", table=False),
        Column("registrable_checkpoint", table=False),
        Column("registered_model", table=False),
        Column("registered_version", table=False),
    ]


def selection_rows(outcome: SweepSelection) -> list[dict[str, Any]]:
    registered = {r.candidate.run_id: r for r in outcome.registered}
    rows = []
    for s in outcome.trials:
        collapse_step, collapse_metric = s.collapse if s.collapse is not None else (None, None)
        kept, model = s.registrable, registered.get(s.run_id)
        rows.append(
            {
                "trial": s.label,
                "run_id": s.run_id,
                "subject": s.subject,
                "method": s.method,
                "num_images": s.num_images,
                "best_step": s.best_step,
                "score": s.best_score,
                "collapse": None if s.collapse is None else f"{collapse_metric} @ {collapse_step}",
                "collapse_step": collapse_step,
                "collapse_metric": collapse_metric,
                **{metric: s.metrics[metric] for metric in outcome.weights},
                "checkpoint": s.checkpoint,
                "registrable_step": None if kept is None else kept.step,
                "registrable_checkpoint": None if kept is None else kept.folder,
                "registered_model": None if model is None else model.uri,
                "registered_version": None if model is None else model.version,
            }
        )
    return rows


def status_columns(status: SweepStatus) -> list[Column]:
    """`dreamsweep status`: one row per trial; the SLURM columns for a sweep with SLURM jobs."""
    slurm = status.slurm
    return [
        Column("trial"),
        Column("trial_id", table=False),
        Column("state"),
        Column("last_step", numeric=True),
        *(Column(metric, metric, numeric=True, text=decimals(4)) for metric in status.metrics),
        Column("unsynced_writes", header="unsynced", numeric=True),
        Column("worker"),
        *(
            [Column("job_id", header="job"), Column("slurm_state", header="slurm state")]
            if slurm
            else []
        ),
        Column("folder", header="folder (logs)"),
        *([Column("slurm_logs", header="slurm logs")] if slurm else []),
    ]


def status_rows(status: SweepStatus) -> list[dict[str, Any]]:
    return [
        {
            "trial": t.label,
            "trial_id": t.trial_id,
            "state": t.state,
            "last_step": t.last_step,
            **{metric: t.metrics.get(metric) for metric in status.metrics},
            "unsynced_writes": t.unsynced_writes,
            "worker": t.worker,
            "job_id": t.job_id,
            "slurm_state": t.slurm_state,
            "folder": t.folder,
            "slurm_logs": t.slurm_logs,
        }
        for t in status.trials
    ]
