"""The line protocol a trial worker uses to tell its launcher how it is doing.

Workers print one JSON object per line, prefixed with `PREFIX`, on stdout; everything else a
worker prints is its log. Those that read a worker's stdout read it with
`cluster.worker.read_output`: the local launcher turns the events into progress bars, the Ray
trainable into Tune's reports; the SLURM task writes the output to its log as it is.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

PREFIX = "@dreamsweep "


def emit(event: str, stream: TextIO = sys.stdout, **fields: Any) -> None:
    stream.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    stream.flush()


def parse(line: str) -> dict[str, Any] | None:
    """The event on this line, or None for an ordinary log line."""
    if not line.startswith(PREFIX):
        return None
    try:
        return json.loads(line[len(PREFIX) :])
    except json.JSONDecodeError:
        return None
