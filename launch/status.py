"""`dreamsweep status`: each trial's state, whichever launcher ran it.

A trial's state is read from what every launcher leaves behind: MLflow holds its run's outcome
and curves; its claim (cluster/claims.py) says whether a worker trains it right now; its
journal holds the MLflow writes made while the tracking server was down, which `dreamsweep
sync` replays, so MLflow may be behind it. The SLURM launcher adds each trial's job and SLURM's
state of it while SLURM still holds it (from `squeue`).

Whatever cannot be read (MLflow down, no `squeue` here, a trial folder on another machine's disk)
is said, and the rest is shown from what can be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run

from cluster.claims import claim_holder
from contract.layout import PARAM_OUTPUT_DIR, TAG_OPTUNA_STUDY, TAG_PRUNED
from contract.spec import SweepSpec, logged_curves
from launch.grid import expand_grid
from launch.slurm import SlurmError, read_jobs, slurm_states
from tracking.journal import read_journal, unreachable
from tracking.sweep import SweepTracking

FINISHED = "FINISHED"
RUNNING = "RUNNING"
RUNNING_PER_MLFLOW = "RUNNING (per MLflow; trial folder not visible here)"
"""Its run is open and its folder (its claim) is on another machine: a Ray cluster reached
through `ray://`, SLURM nodes' local disks. Whether a worker still trains it cannot be told here."""
QUEUED = "QUEUED"
ENDED_UNFINISHED = "ENDED UNFINISHED"
"""Its run was opened but never closed, and nothing trains it: killed before it could say so
(the next `dreamsweep run` resumes it)."""
NOT_STARTED = "NOT STARTED"
PRUNED = "PRUNED@{step}"
"""A sampled trial its Optuna pruner (or Ray's scheduler, in a search) stopped at that step."""
STUDY_NOT_STARTED = "NOT STARTED (study)"
"""A search group whose study has no trial in MLflow yet: its row stands for the whole group."""
UNKNOWN = "UNKNOWN"
"""MLflow (or SLURM, for a trial with a job) could not be reached and nothing on disk tells."""
SLURM_RUNNING = {"CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SIGNALING", "STAGE_OUT"}
"""SLURM's states of a job whose nodes are allocated to it: booting them (CONFIGURING), running,
or ending (COMPLETING: its epilog)."""
SLURM_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
"""Its states while waiting for nodes (again, after a requeue). Any other (SUSPENDED, or an ended
job squeue still lists) leaves the trial's state to its claim and MLflow."""


def slurm_trial_state(slurm_state: str) -> str | None:
    """RUNNING or QUEUED for a job SLURM runs or queues; None when its state tells neither."""
    if slurm_state in SLURM_RUNNING:
        return RUNNING
    if slurm_state in SLURM_QUEUED:
        return QUEUED
    return None


@dataclass(frozen=True)
class TrialStatus:
    label: str
    trial_id: str
    state: str
    """FINISHED, PRUNED@<step>, FAILED or KILLED (its run's outcome), RUNNING (a worker holds
    its claim, or its SLURM job runs), RUNNING_PER_MLFLOW, QUEUED (SLURM holds its job, not
    running yet), ENDED UNFINISHED, NOT STARTED, NOT STARTED (study) or UNKNOWN."""
    last_step: int | None
    """The last step whose loss was logged, to MLflow or to the journal."""
    metrics: dict[str, float]
    """The eval metrics' latest values."""
    worker: str | None
    """Who holds the trial's claim (host, pid, since when) while a worker trains it."""
    unsynced_writes: int | None
    """MLflow writes waiting in the trial's journal for `dreamsweep sync`; None when its folder
    is not visible here."""
    folder: str
    """The trial's folder: checkpoints and the worker's log."""
    job_id: str | None = None
    slurm_state: str | None = None
    """SLURM's state of the job while SLURM holds it."""
    slurm_logs: str | None = None


@dataclass
class SweepStatus:
    trials: list[TrialStatus]
    slurm: bool
    """Whether the sweep has SLURM jobs (or is a SLURM sweep): the job columns apply."""
    mlflow_error: str | None = None
    """Why MLflow could not be read, when it could not."""
    slurm_error: str | None = None
    """Why SLURM's job states could not be read, when the sweep has jobs and they could not."""
    metrics: list[str] = field(default_factory=list)


def sweep_status(spec: SweepSpec) -> SweepStatus:
    """Each trial's state, last logged step, latest metrics, worker and unsynced writes; with
    SLURM's job and state where the sweep was submitted to SLURM. The grid's trials first, then
    the sweep's other trials in MLflow (sampled by a search, or from an earlier spec), as
    `select` reads them all. A search (`search.kind: optuna`) never runs its grid's trials (a
    group's base, the spec's own values): it lists the sampled trials MLflow holds, and one
    row per group whose study has none yet. When MLflow or (for a sweep with SLURM jobs)
    `squeue` does not answer, goes on with what can be read and says why in `mlflow_error` /
    `slurm_error`."""
    jobs = read_jobs(spec)
    slurm_state: dict[str, str] = {}
    slurm_error = None
    try:
        slurm_state = slurm_states([j["job_id"] for j in jobs.values()])
    except SlurmError as err:
        slurm_error = str(err)
    runs: dict[str, Run] = {}
    last_logged: dict[str, int] = {}
    mlflow_error = None
    try:
        tracking = SweepTracking(spec.tracking_uri, spec.experiment_name)
        parent = tracking.find_parent_run(spec.name)
        runs = tracking.trial_runs(parent.info.run_id) if parent is not None else {}
        for trial_id, run in runs.items():
            if "loss" in run.data.metrics:
                last_logged[trial_id] = max(
                    m.step for m in tracking.client.get_metric_history(run.info.run_id, "loss")
                )
    except Exception as err:
        if not unreachable(err):
            raise
        mlflow_error = f"{spec.tracking_uri} did not answer ({err})"
    metrics = logged_curves(spec.eval.metrics)
    searched = spec.search.kind == "optuna"
    grid = {} if searched else {t.trial_id: (t.label, t.output_dir) for t in expand_grid(spec)}
    others = {
        trial_id: (run.info.run_name or trial_id, Path(run.data.params[PARAM_OUTPUT_DIR]))
        for trial_id, run in runs.items()
        if trial_id not in grid and PARAM_OUTPUT_DIR in run.data.params
    }
    trials = []
    for trial_id, (label, folder) in (grid | others).items():
        job = jobs.get(trial_id, {})
        job_id = job.get("job_id")
        trials.append(
            _trial_status(
                label,
                trial_id,
                folder,
                runs.get(trial_id),
                last_logged.get(trial_id),
                metrics,
                job_id=job_id,
                slurm_state=slurm_state.get(job_id) if job_id else None,
                slurm_logs=job.get("submitit_folder"),
                mlflow_known=mlflow_error is None,
                slurm_known=slurm_error is None,
            )
        )
    if searched and mlflow_error is None:
        trials += _unstarted_studies(spec, runs)
    return SweepStatus(
        trials=trials,
        slurm=spec.launcher.kind == "slurm" or bool(jobs),
        mlflow_error=mlflow_error,
        slurm_error=slurm_error,
        metrics=metrics,
    )


def _unstarted_studies(spec: SweepSpec, runs: dict[str, Run]) -> list[TrialStatus]:
    """One row per search group none of whose sampled trials has a run yet, named by its
    group's label and its study."""
    from launch.search_study import search_groups

    started = {run.data.tags.get(TAG_OPTUNA_STUDY) for run in runs.values()}
    return [
        TrialStatus(
            label=group.base.label,
            trial_id=group.study,
            state=STUDY_NOT_STARTED,
            last_step=None,
            metrics={},
            worker=None,
            unsynced_writes=None,
            folder=str(spec.resolved_output_dir),
        )
        for group in search_groups(spec)
        if group.study not in started
    ]


def _trial_status(
    label: str,
    trial_id: str,
    folder: Path,
    run: Run | None,
    last_logged: int | None,
    metrics: list[str],
    *,
    job_id: str | None,
    slurm_state: str | None,
    slurm_logs: str | None,
    mlflow_known: bool,
    slurm_known: bool,
) -> TrialStatus:
    visible = folder.is_dir()
    journal = read_journal(folder)
    # The journal's end is newer than MLflow's: the worker closed its run while MLflow was down.
    outcome = journal.terminated or (run.info.status if run is not None else None)
    # SLURM answered and no longer holds the trial's job: nothing runs it, wherever its folder.
    job_ended = job_id is not None and slurm_known and slurm_state is None
    worker = None
    by_slurm = slurm_trial_state(slurm_state) if slurm_state is not None else None
    if by_slurm is not None:  # SLURM says; its worker is claiming the trial now
        state = by_slurm
    elif outcome == FINISHED:  # a finished trial is never claimed again
        pruned_at = run.data.tags.get(TAG_PRUNED) if run is not None else None
        state = FINISHED if pruned_at is None else PRUNED.format(step=pruned_at)
    elif visible and (worker := claim_holder(folder)) is not None:
        state = RUNNING
    elif outcome not in (None, RUNNING):
        state = outcome  # FAILED, KILLED
    elif outcome == RUNNING:
        # An open run with nobody holding its claim ended unfinished; with its claim out of
        # sight, MLflow's word is the best there is.
        state = ENDED_UNFINISHED if visible or job_ended else RUNNING_PER_MLFLOW
    elif job_id is not None:  # submitted, no run opened
        state = ENDED_UNFINISHED if slurm_known else UNKNOWN  # or still queued, for all we know
    else:
        state = NOT_STARTED if mlflow_known else UNKNOWN
    logged = dict(run.data.metrics) if run is not None else {}
    logged |= {key: value for key, (_, value) in journal.metrics.items()}
    steps = [s for s in (last_logged, journal.last_loss_step) if s is not None]
    return TrialStatus(
        label=label,
        trial_id=trial_id,
        state=state,
        last_step=max(steps) if steps else None,
        metrics={m: logged[m] for m in metrics if m in logged},
        worker=worker,
        unsynced_writes=journal.writes if visible else None,
        folder=str(folder),
        job_id=job_id,
        slurm_state=slurm_state,
        slurm_logs=slurm_logs,
    )
