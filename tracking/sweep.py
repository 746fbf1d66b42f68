"""A sweep's runs in MLflow: one experiment, a parent run per sweep, a child per trial.

Launchers, trial workers and selection all find runs through this class; the names it uses are
`contract.layout`'s. Credentials (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) are read by MLflow
from the environment and never pass through dreamsweep.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Param, Run, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from contract.layout import (
    EVAL_PROMPTS_FILE,
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_IDENTIFIER,
    PARAM_METHOD,
    PARAM_NUM_IMAGES,
    PARAM_OUTPUT_DIR,
    PARAM_SUBJECT,
    ROLE_SWEEP,
    ROLE_TRIAL,
    TAG_ERROR,
    TAG_ROLE,
    TAG_SWEEP,
    TAG_TRIAL,
    method_param,
)
from contract.trial import TrialConfig


def _quoted(tag: str) -> str:
    return f"tags.`{tag}`"


class SweepTracking:
    """The sweep's experiment and runs in one MLflow store."""

    def __init__(self, uri: str, experiment: str, *, artifact_root: Path | None = None) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # A local store keeps artifacts beside the sweep; a server decides for itself.
            local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
            location = artifact_root.resolve().as_uri() if artifact_root and local else None
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location
                )
            except Exception:  # created meanwhile by a concurrent trial or launcher
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id

    def _search(self, filter_string: str) -> list[Run]:
        return self.client.search_runs(
            [self.experiment_id], filter_string=filter_string, max_results=50_000
        )

    def find_parent_run(self, sweep: str) -> Run | None:
        runs = self._search(
            f"{_quoted(TAG_ROLE)} = '{ROLE_SWEEP}' and {_quoted(TAG_SWEEP)} = '{sweep}'"
        )
        return min(runs, key=lambda r: r.info.start_time) if runs else None

    def parent_run(self, sweep: str, *, params: dict[str, str] | None = None) -> str:
        """The sweep's parent run id, created on first use."""
        found = self.find_parent_run(sweep)
        if found is not None:
            return found.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=sweep,
            tags={TAG_ROLE: ROLE_SWEEP, TAG_SWEEP: sweep},
        )
        for key, value in (params or {}).items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def trial_runs(self, parent_run_id: str) -> dict[str, Run]:
        """trial id → its child run (the earliest, should two ever exist)."""
        runs = self._search(f"{_quoted(MLFLOW_PARENT_RUN_ID)} = '{parent_run_id}'")
        by_trial: dict[str, Run] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
            trial_id = run.data.tags.get(TAG_TRIAL)
            if trial_id:
                by_trial[trial_id] = run
        return by_trial

    def histories(self, run_id: str, metrics: list[str]) -> dict[str, dict[int, float]]:
        """metric → step → value, as logged in the run (the newest value of a step wins)."""
        histories: dict[str, dict[int, float]] = {}
        for metric in metrics:
            logged = sorted(
                self.client.get_metric_history(run_id, metric), key=lambda m: m.timestamp
            )
            histories[metric] = {m.step: m.value for m in logged}
        return histories

    def evaluations(self, run_id: str, metrics: list[str]) -> dict[int, dict[str, float]]:
        """step → metric → value for every evaluated step the run has logged."""
        evaluations: dict[int, dict[str, float]] = {}
        for metric, history in self.histories(run_id, metrics).items():
            for step, value in history.items():
                evaluations.setdefault(step, {})[metric] = value
        return evaluations

    def finished_trials(self, parent_run_id: str) -> set[str]:
        return {
            trial_id
            for trial_id, run in self.trial_runs(parent_run_id).items()
            if run.info.status == RunStatus.to_string(RunStatus.FINISHED)
        }

    def mark_failed(self, parent_run_id: str, trial_id: str, reason: str) -> None:
        """Mark a trial's run FAILED when its worker died without saying so (a kill, OOM)."""
        run = self.trial_runs(parent_run_id).get(trial_id)
        if run is not None and run.info.status == "RUNNING":
            self.client.set_tag(run.info.run_id, TAG_ERROR, reason)
            self.client.set_terminated(run.info.run_id, "FAILED")

    def trial_run(self, parent_run_id: str, trial: TrialConfig) -> str:
        """The trial's child run id: the existing one (a retry resumes into it) or a new one."""
        existing = self.trial_runs(parent_run_id).get(trial.trial_id)
        if existing is not None:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial.label,
            tags={
                MLFLOW_PARENT_RUN_ID: parent_run_id,
                MLFLOW_RUN_NAME: trial.label,
                TAG_ROLE: ROLE_TRIAL,
                TAG_SWEEP: trial.sweep,
                TAG_TRIAL: trial.trial_id,
            },
        )
        run_id = run.info.run_id
        params = {
            PARAM_SUBJECT: trial.subject.name,
            PARAM_CLASS_TOKEN: trial.subject.class_token,
            PARAM_IDENTIFIER: trial.subject.identifier,
            PARAM_METHOD: trial.method,
            **{
                method_param(k): v
                for k, v in trial.options.model_dump().items()
                if k != "learning_rate"
            },
            PARAM_NUM_IMAGES: trial.num_images,
            "learning_rate": trial.learning_rate,
            "seed": trial.seed,
            "world_size": trial.world_size,  # part of the id: the global batch follows it
            "max_steps": trial.max_steps,
            "eval_every": trial.eval_every,
            PARAM_BASE_MODEL: trial.base_model,
            PARAM_OUTPUT_DIR: str(trial.output_dir),
            **{f"train.{k}": v for k, v in trial.train.model_dump().items()},
            **{f"eval.{k}": v for k, v in trial.eval.model_dump().items() if k != "prompts"},
        }
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        self.client.log_dict(run_id, {"prompts": trial.eval.prompts}, EVAL_PROMPTS_FILE)
        return run_id
