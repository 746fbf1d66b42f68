"""Every launcher's start and end of a sweep: its parent run in MLflow, opened and closed.

Each launcher (local, SLURM, Ray) and `dreamsweep sync` starts with `prepare_sweep`: the grid's
trials, the sweep's parent run (found, or created by the first submission), and which trials are
done (FINISHED in MLflow) or still to run. A launcher that waits for its trials ends with
`close_parent_run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from filelock import FileLock

from contract.layout import (
    PARAM_BASE_MODEL,
    PARAM_TRIALS,
)
from contract.spec import SweepSpec
from contract.trial import TrialConfig
from launch.grid import expand_grid
from tracking.journal import unreachable
from tracking.sweep import SweepTracking


@dataclass(frozen=True)
class PreparedSweep:
    """A sweep about to run: its trials, its tracking and parent run, what is left to do."""

    trials: list[TrialConfig]
    """Every trial of the grid, in the grid's order."""
    tracking: SweepTracking
    parent_run_id: str
    """The sweep's parent run: each trial's run is its child."""
    done: list[TrialConfig]
    """Trials FINISHED in MLflow already: launchers skip them."""
    pending: list[TrialConfig]
    """The other trials, still to run."""


def prepare_sweep(spec: SweepSpec, *, planned_trials: int | None = None) -> PreparedSweep:
    """Every launcher's start: the trials, the sweep's parent run, and which trials are done
    (FINISHED in MLflow) or still to run. `planned_trials`: the parent run's trial count when
    the grid's trials are not the sweep's (a search's: groups × n_trials)."""
    trials = expand_grid(spec)
    output_dir = spec.resolved_output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    # Two submissions at once must find (or create) the same parent run, not one each.
    with FileLock(output_dir / ".sweep.lock"):
        tracking = SweepTracking(
            spec.tracking_uri, spec.experiment_name, artifact_root=output_dir / "mlartifacts"
        )
        parent_run_id = tracking.parent_run(
            spec.name,
            params={
                PARAM_TRIALS: str(planned_trials or len(trials)),
                PARAM_BASE_MODEL: ", ".join(model.id for model in spec.base_model),
            },
        )
    finished = tracking.finished_trials(parent_run_id)
    return PreparedSweep(
        trials=trials,
        tracking=tracking,
        parent_run_id=parent_run_id,
        done=[t for t in trials if t.trial_id in finished],
        pending=[t for t in trials if t.trial_id not in finished],
    )


def close_parent_run(
    tracking: SweepTracking, parent_run_id: str, trials: list[TrialConfig], *, failed: bool
) -> bool:
    """End the sweep's parent run: FAILED when a trial failed here, FINISHED when every trial is
    done; otherwise another submission is still training some, and it closes the run. Returns
    False when the tracking store cannot be reached (`dreamsweep sync` closes it later)."""
    try:
        if failed:
            tracking.client.set_terminated(parent_run_id, "FAILED")
        elif {t.trial_id for t in trials} <= tracking.finished_trials(parent_run_id):
            tracking.client.set_terminated(parent_run_id, "FINISHED")
    except Exception as err:
        if not unreachable(err):
            raise
        return False
    return True
