"""The Ray trainable's pure parts: the score it reports, and a checkpoint copied back from Tune's
storage (a retry on a node that does not see the trial's folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import small_spec, write_spec

from cluster.ray_trial import copy_back, step_score
from contract.spec import load_spec
from launch.grid import expand_grid
from trainers.checkpoint import COMPLETE, latest_checkpoint, write_checkpoint


def test_the_reported_score_is_the_selection_score_of_that_step(tmp_path: Path) -> None:
    spec = small_spec(
        tmp_path,
        selection={
            "weights": {"similarity": 1.0, "diversity": 3.0},
            "ranges": {"similarity": [0.5, 1.0], "diversity": [0.0, 0.1], "aesthetics": [0, 1]},
        },
    )
    [trial] = expand_grid(load_spec(write_spec(tmp_path, spec)))
    # similarity scales to 0.5, diversity to 1.0 (clipped from 2.0): (1·0.5 + 3·1.0) / 4
    assert step_score(trial, {"similarity": 0.75, "diversity": 0.2}) == pytest.approx(0.875)
    assert step_score(trial, {"similarity": 0.75}) is None  # a weighted metric is missing


def test_a_checkpoint_from_tune_storage_is_published_only_when_newer(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    stored = write_checkpoint(tmp_path / "tune", 8, lambda f: (f / "weights.bin").write_bytes(b"8"))
    assert copy_back(stored, root) == 8
    step, folder = latest_checkpoint(root)
    assert step == 8 and (folder / "weights.bin").read_bytes() == b"8"
    assert (folder / COMPLETE).read_text() == "8\n"
    shutil.rmtree(tmp_path / "tune")
    older = write_checkpoint(tmp_path / "tune", 4, lambda f: (f / "weights.bin").write_bytes(b"4"))
    assert copy_back(older, root) is None  # the local folder already holds a newer step
    assert latest_checkpoint(root)[0] == 8
