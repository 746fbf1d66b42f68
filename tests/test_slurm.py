"""The SLURM launcher: golden sbatch text (fast), and behaviour on a REAL local SLURM cluster
(munge, slurmctld, two slurmd daemons), brought up by `cluster/dev_slurm.sh` in a temporary
folder of its own when root."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    REPO,
    assert_same_curves,
    dreamsweep,
    quickstart_slice,
    small_spec,
    trial_histories,
    write_spec,
)
from mlflow.tracking import MlflowClient
from rich.console import Console

from contract.spec import SpecError, load_spec
from launch.grid import expand_grid
from launch.local import run_local
from launch.slurm import submit_slurm
from trainers.checkpoint import checkpoints_root, latest_checkpoint
from trainers.resume import TRAINER_STATE

GOLDEN = Path(__file__).parent / "golden"


FAKE_SLURM = {
    # submitit looks for `srun` before it submits anything; `squeue` holds nothing.
    "srun": "exit 0",
    "squeue": "exit 0",
    # What SLURM received, kept; answered as sbatch answers an accepted array.
    "sbatch": 'cat "$1" > "$(dirname "$0")/submitted.sbatch"\necho "Submitted batch job 4242"',
}


def test_sbatch_text_matches_the_golden_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sbatch file submitit writes for a 10-trial array, submitted by `submit_slurm` to
    stand-ins for SLURM's commands (no cluster needed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    launcher = {
        "kind": "slurm",
        "partition": "gpu",
        "account": "vision",
        "qos": "normal",
        "time_min": 240,
        "nodes": 2,
        "processes_per_node": 4,
        "gpus_per_node": 4,
        "cpus_per_task": 32,
        "mem_gb": 256,
        "array_parallelism": 4,
        "signal_delay_s": 180,
        "setup": ["module load cuda/12.4"],
        "sbatch": {"constraint": "a100", "exclusive": True},
    }
    grid = {"seed": list(range(10))}
    spec = load_spec(write_spec(tmp_path, small_spec(tmp_path, launcher=launcher, grid=grid)))
    submission = submit_slurm(spec, console=Console(file=io.StringIO()))
    assert sorted(submission.submitted.values()) == sorted(f"4242_{i}" for i in range(10))
    text = (bin_dir / "submitted.sbatch").read_text(encoding="utf-8")
    # The array's folder is that of the first job; its submission file is the one submitted.
    assert (spec.resolved_output_dir / "slurm" / "4242" / "4242_submission.sh").read_text(
        encoding="utf-8"
    ) == text
    folder = shlex.quote(str(spec.resolved_output_dir / "slurm" / "%j"))
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {folder}"
    assert command in text
    text = text.replace(command, "<python> -u -m submitit.core._submit <folder>")
    assert text.replace(str(tmp_path), "<tmp>") == (GOLDEN / "sbatch_two_nodes.txt").read_text(
        encoding="utf-8"
    )


def test_slurm_fields_are_checked_with_the_allowed_keys(tmp_path: Path) -> None:
    launcher = {"kind": "slurm", "node": 2, "sbatch": {"time": "1:00:00", "partition": "x"}}
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, small_spec(tmp_path, launcher=launcher)))
    problems = caught.value.problems
    assert any(
        p.startswith("launcher.node: unknown key; allowed keys: kind, partition") for p in problems
    )
    assert (
        "launcher.sbatch: these options have their own fields; set them there instead: "
        "partition → launcher.partition, time → launcher.time_min"
    ) in "\n".join(problems)


# --- on a real cluster ------------------------------------------------------------------------


ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "TIMEOUT",
}


def wait_for_jobs(job_ids: list[str], *, timeout: float = 400) -> None:
    """Until every job has ended (completed, failed or cancelled). SLURM lists an ended job for
    MinJobAge seconds with `--states=all`; a job it no longer lists at all has ended too. A
    failed squeue (the controller busy) is asked again, never read as "nothing queued"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(
            ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T"],
            capture_output=True,
            text=True,
        )
        if listed.returncode == 0:
            states = dict(line.split() for line in listed.stdout.splitlines() if line.strip())
            arrays = {job.split("_")[0] for job in job_ids}
            held = {job: state for job, state in states.items() if job.split("_")[0] in arrays}
            if all(state in ENDED for state in held.values()):
                return
        time.sleep(1)
    raise AssertionError(f"SLURM jobs {job_ids} still queued after {timeout} s")


def squeue_reason(job: str) -> str:
    return subprocess.run(
        ["squeue", "--noheader", "--format=%T %r", "--jobs", job], capture_output=True, text=True
    ).stdout


@pytest.mark.slow
def test_the_quickstart_runs_as_a_job_array_and_equals_the_local_launcher(
    slurm_cluster, quickstart: dict, tmp_path: Path
) -> None:
    """configs/tiny_quickstart.yaml (a 2-trial slice) with `launcher: slurm`: one array of 2
    tasks on the 2-node cluster, every curve equal to the local launcher's run of the same
    trials."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    path = tmp_path / "configs" / "tiny_quickstart.yaml"
    spec_dict = quickstart_slice(yaml.safe_load(path.read_text()))
    spec_dict["launcher"] = {"kind": "slurm", "time_min": 30}
    path.write_text(yaml.safe_dump(spec_dict, sort_keys=False))
    submitted = dreamsweep("run", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "0 still in SLURM, 2 to submit" in submitted.stdout
    assert "is a SQLite file, and launcher.kind is 'slurm'" in submitted.stderr
    spec = load_spec(path)
    jobs = [line.rsplit("job ", 1)[1] for line in submitted.stdout.splitlines() if ": job " in line]
    assert len(jobs) == 2 and all("_" in j for j in jobs)  # two tasks of one array
    assert len({j.split("_")[0] for j in jobs}) == 1
    wait_for_jobs(jobs, timeout=900)
    status = dreamsweep("status", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert status.stdout.count("FINISHED") == 2, status.stdout

    locally = load_spec(quickstart["root"] / "configs" / "tiny_quickstart.yaml")
    assert_same_curves(
        trial_histories(spec.tracking_uri, spec.experiment_name),
        trial_histories(locally.tracking_uri, locally.experiment_name),
        slice_of_b=True,
    )
    again = dreamsweep("run", "configs/tiny_quickstart.yaml", cwd=tmp_path)
    assert "2 already done, 0 still in SLURM, 0 to submit" in again.stdout
    # the pickles the nodes run are writable by no other user
    assert (spec.resolved_output_dir / "slurm").stat().st_mode & 0o077 == 0
    # Each task's worker sized its threads to the CPUs SLURM gave it (cpus_per_task: 1), not
    # to the node, which the dev cluster does not bind tasks to.
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`dreamsweep.role` = 'trial'")
    assert {r.data.tags["dreamsweep.setup.cpu_threads"] for r in runs} == {"1"}


def lose_node(cluster: Path, node: str, job: str) -> None:
    """What the rest of the cluster sees when a machine dies: its slurmd and every process it
    ran for jobs (step daemon, submitit task, torchrun, workers) gone at once. The dev cluster's
    nodes share this machine: the processes of `job` on `node` carry its SLURM_JOB_ID,
    SLURMD_NODENAME and this cluster's SLURM_CONF in their environment, and the first of them is
    a child of that node's slurmstepd. The slurmd is the one in the cluster's own pid file."""
    doomed = {int((cluster / "run" / f"slurmd-{node}.pid").read_text())}
    ours = {
        f"SLURM_CONF={cluster / 'slurm.conf'}".encode(),
        f"SLURMD_NODENAME={node}".encode(),
    }
    array_job, _, task = job.partition("_")
    for entry in Path("/proc").iterdir():
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_name = Path(f"/proc/{parent}/comm").read_text().strip()
        except (OSError, ValueError):
            continue
        of_job = f"SLURM_JOB_ID={job}".encode() in environ or (
            f"SLURM_ARRAY_JOB_ID={array_job}".encode() in environ
            and f"SLURM_ARRAY_TASK_ID={task}".encode() in environ
        )
        if of_job and ours <= environ:
            doomed.add(int(entry.name))
            if parent_name == "slurmstepd":
                doomed.add(parent)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_two_node_trial_survives_a_lost_node_and_equals_one_process_with_the_same_batch(
    slurm_cluster, tmp_path: Path
) -> None:
    """A 2-node trial (one process per node) loses its second node after its first checkpoint:
    the run fails clearly (FAILED, saying why), SLURM requeues the job (`requeue`, the default),
    and once the node is back the job resumes from that checkpoint into the same run. The trial
    ends with the weights and losses of one process training the same global batch."""
    grid = {"num_images": [4], "max_steps": 8, "eval_every": 2}
    on_slurm = tmp_path / "two"
    on_slurm.mkdir()
    two_nodes = {"kind": "slurm", "nodes": 2, "processes_per_node": 1, "time_min": 10}
    spec_dict = small_spec(on_slurm, grid=grid, train={"batch_size": 1}, launcher=two_nodes)
    spec = load_spec(write_spec(on_slurm, spec_dict))
    [trial] = expand_grid(spec)
    client = MlflowClient(tracking_uri=spec.tracking_uri)
    submission = submit_slurm(spec, console=Console(file=io.StringIO()))
    [job] = submission.submitted.values()

    first_checkpoint = trial.output_dir / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline, "the trial never started training"
        time.sleep(0.05)
    lose_node(slurm_cluster, "node2", job)

    def trial_run():
        experiment = client.get_experiment_by_name(spec.experiment_name)
        [run] = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
        )
        return run

    # The first node's rank finds its peer gone at its next collective and fails the run.
    while trial_run().info.status == "RUNNING":
        assert time.monotonic() < deadline, "the first node never noticed the lost one"
        time.sleep(0.2)
    failed = trial_run()
    assert failed.info.status == "FAILED"
    assert failed.data.tags["dreamsweep.error"].startswith(
        "another process of this trial stopped answering (a lost node"
    )
    lost_at, _ = latest_checkpoint(checkpoints_root(trial))
    assert 2 <= lost_at < 8
    # What slurmctld does itself SlurmdTimeout (300 s by default) after a node fell silent:
    # the node is DOWN, its jobs NODE_FAIL, and a job submitted with --requeue waits again.
    subprocess.run(
        ["scontrol", "update", "nodename=node2", "state=down", "reason=lost"], check=True
    )
    while "PENDING" not in squeue_reason(job):
        assert time.monotonic() < deadline, f"the job was not requeued: {squeue_reason(job)}"
        time.sleep(0.2)
    subprocess.run(["slurmd", "-N", "node2"], check=True)  # back (ReturnToService=2)
    wait_for_jobs([job])
    resumed = trial_run()
    assert resumed.info.run_id == failed.info.run_id
    assert resumed.data.tags["dreamsweep.resumed_from_step"] == str(lost_at)
    assert "dreamsweep.error" not in resumed.data.tags
    assert resumed.data.tags["dreamsweep.resumed_after_error"].startswith("another process")
    _, checkpoint = latest_checkpoint(checkpoints_root(trial))
    parallel = torch.load(checkpoint / TRAINER_STATE, weights_only=True)["trainable"]
    parallel_curves = trial_histories(spec.tracking_uri, spec.experiment_name)

    one = tmp_path / "one"
    one.mkdir()
    single_spec = load_spec(write_spec(one, small_spec(one, grid=grid, train={"batch_size": 2})))
    assert not run_local(single_spec, console=Console(file=io.StringIO())).failed
    [single_trial] = expand_grid(single_spec)
    _, checkpoint = latest_checkpoint(checkpoints_root(single_trial))
    single = torch.load(checkpoint / TRAINER_STATE, weights_only=True)["trainable"]
    single_curves = trial_histories(single_spec.tracking_uri, single_spec.experiment_name)

    [(_, parallel_run)], [(_, single_run)] = parallel_curves.items(), single_curves.items()
    assert sorted(parallel_run["loss"]) == list(range(1, 9))  # rank 0 alone logs, each once
    assert list(parallel_run["loss"].values()) == pytest.approx(
        list(single_run["loss"].values()), rel=1e-5
    )
    assert parallel.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-3, atol=1e-4)
    logs = sorted(p.name for p in on_slurm.rglob("worker-node*.log"))
    assert logs == ["worker-node0.log", "worker-node1.log"]  # one task per node


@pytest.mark.slow
def test_a_signalled_trial_checkpoints_requeues_and_resumes_into_the_same_run(
    slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM's time-limit signal (USR2, as `--signal` sends it; `scancel --signal` delivers it
    now): the trial checkpoints its current step, the job requeues, and the requeued job resumes
    into the same MLflow run. Its curves equal an uninterrupted trial's, with no gap and no
    duplicate step."""
    grid = {"num_images": [2], "max_steps": 12, "eval_every": 4}
    on_slurm = tmp_path / "slurm"
    on_slurm.mkdir()
    path = write_spec(on_slurm, small_spec(on_slurm, grid=grid, launcher={"kind": "slurm"}))
    spec = load_spec(path)
    submission = submit_slurm(spec, console=Console(file=io.StringIO()))
    [job] = submission.submitted.values()
    client = MlflowClient(tracking_uri=spec.tracking_uri)

    def logged_steps() -> list[int]:
        experiment = client.get_experiment_by_name(spec.experiment_name)
        runs = client.search_runs(
            [experiment.experiment_id], filter_string="tags.`dreamsweep.role` = 'trial'"
        )
        return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")]

    # Signalled as soon as its first checkpoint lands (a file, seen at once; MLflow shows the
    # losses only at the next evaluation, by which time a fast trial may be near its end).
    [trial] = expand_grid(spec)
    first_checkpoint = trial.output_dir / "checkpoints" / "step_000004" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline, "the trial never started training"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # SLURM holds a requeued job back for one credential lifetime (BeginTime; 10 s on the dev
    # cluster), then starts it again. Releasing it sooner makes the node refuse it (its old
    # credential is revoked), so wait.
    while "BeginTime" not in squeue_reason(job):
        assert time.monotonic() < deadline + 300, "the job was not requeued"
        time.sleep(0.5)
    wait_for_jobs([job], timeout=300)
    logs = "\n".join(p.read_text() for p in sorted(on_slurm.rglob("*.log*")) if p.is_file())

    [run] = client.search_runs(
        [client.get_experiment_by_name(spec.experiment_name).experiment_id],
        filter_string="tags.`dreamsweep.role` = 'trial'",
    )
    paused = int(run.data.tags["dreamsweep.paused_at_step"])
    assert 3 <= paused < 12
    assert run.data.tags.get("dreamsweep.resumed_from_step") == str(paused), logs
    assert sorted(logged_steps()) == list(range(1, 13))  # no gap, no duplicate

    locally = tmp_path / "local"
    locally.mkdir()
    local_spec = load_spec(write_spec(locally, small_spec(locally, grid=grid)))
    # One thread, as the SLURM task has (cpus_per_task: 1): a float sum over another number of
    # threads adds up in another order, and diversity is a small difference of embeddings.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert not run_local(local_spec, console=Console(file=io.StringIO())).failed
    assert_same_curves(
        trial_histories(spec.tracking_uri, spec.experiment_name),
        trial_histories(local_spec.tracking_uri, local_spec.experiment_name),
    )


@pytest.mark.slow
def test_cancel_stops_what_slurm_still_holds_and_status_says_so(
    slurm_cluster, tmp_path: Path
) -> None:
    grid = {"num_images": [2, 4], "max_steps": 400, "eval_every": 200}
    path = write_spec(tmp_path, small_spec(tmp_path, grid=grid, launcher={"kind": "slurm"}))
    submitted = dreamsweep("run", str(path), cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    jobs = [line.rsplit("job ", 1)[1] for line in submitted.stdout.splitlines() if ": job " in line]
    deadline = time.monotonic() + 120
    while dreamsweep("status", str(path), cwd=tmp_path).stdout.count("RUNNING") < 1:
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(1)
    cancelled = dreamsweep("cancel", str(path), cwd=tmp_path)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"Cancelled 2 job(s): {' '.join(sorted(jobs))}" in cancelled.stdout
    wait_for_jobs(jobs, timeout=60)
    status = dreamsweep("status", str(path), cwd=tmp_path).stdout
    assert "RUNNING" not in status and "PENDING" not in status
    assert "ENDED UNFINISHED" in status  # the started trial's run was never closed
