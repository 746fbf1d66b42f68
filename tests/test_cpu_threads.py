"""Workers that share a machine split its cores; a user's OMP_NUM_THREADS stands."""

from __future__ import annotations

import os

import pytest

from cluster.cpu_threads import thread_environment, usable_cores


def test_processes_side_by_side_get_an_equal_share_of_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_environment(2, cores=8) == {
        "OMP_NUM_THREADS": "4",
        "MKL_NUM_THREADS": "4",
        "TORCHINDUCTOR_COMPILE_THREADS": "4",  # inductor's compile pool (train.compile)
    }
    assert thread_environment(1, cores=8)["OMP_NUM_THREADS"] == "8"
    assert thread_environment(3, cores=2)["OMP_NUM_THREADS"] == "1"  # never zero


def test_the_users_thread_count_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_environment(2, cores=8) == {}


def test_a_slurm_task_counts_only_the_cpus_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert usable_cores() == 1
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert usable_cores() == len(os.sched_getaffinity(0))
