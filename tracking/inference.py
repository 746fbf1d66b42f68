"""An inference study's runs in MLflow: one experiment, a parent run per study (role
`inference_study`: the number of combinations, the spec as an artifact), a child run per
combination (role `combination`, tagged with its id: params, metric means, timing, the per-image
records table and a sample grid; tagged with the prompt set's and the scoring's digests, so
more prompts or other metric settings log another run). Names are `contract.layout`'s."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from PIL import Image

from contract.inference import Combination
from contract.layout import (
    COMBINATION_RECORDS_FILE,
    COMBINATION_SAMPLES_FILE,
    METRIC_COMBINATIONS,
    NO_NEGATIVE_PROMPT,
    PARAM_COMBINATIONS,
    PARAM_DTYPE,
    PARAM_GUIDANCE_SCALE,
    PARAM_INFERENCE_STEPS,
    PARAM_MODEL,
    PARAM_MODEL_IDENTITY,
    PARAM_NEGATIVE_PROMPT,
    PARAM_NEGATIVE_PROMPT_TEXT,
    PARAM_RESOLUTION,
    PARAM_SCHEDULER,
    PARAM_SCHEDULER_CLASS,
    PARAM_SCHEDULER_CONFIG,
    PARAM_SEED,
    ROLE_COMBINATION,
    ROLE_INFERENCE_STUDY,
    STUDY_COMBINATIONS_FILE,
    STUDY_SPEC_FILE,
    TAG_COMBINATION,
    TAG_MEMORY_SOURCE,
    TAG_PROMPTS_DIGEST,
    TAG_ROLE,
    TAG_SCORING_DIGEST,
    TAG_SWEEP,
)
from tracking.sweep import SweepTracking, _quoted


class InferenceTracking(SweepTracking):
    """The study's experiment, parent run and combination runs."""

    def study_run(
        self,
        study: str,
        *,
        combination_ids: list[str],
        prompts_digest: str,
        spec_yaml: str,
        scoring_digest: str | None = None,
    ) -> str:
        """The study's parent run id, created on first use; each run records the spec and its
        combination ids, prompts and scoring digests (`STUDY_COMBINATIONS_FILE`,
        `METRIC_COMBINATIONS`): the spec may have changed since, and the report reads only the
        current combinations (of that scoring, when recorded)."""
        runs = self._search(
            f"{_quoted(TAG_ROLE)} = '{ROLE_INFERENCE_STUDY}' and {_quoted(TAG_SWEEP)} = '{study}'"
        )
        if runs:
            run_id = min(runs, key=lambda r: r.info.start_time).info.run_id
        else:
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=study,
                tags={TAG_ROLE: ROLE_INFERENCE_STUDY, TAG_SWEEP: study},
            ).info.run_id
            self.client.log_param(run_id, PARAM_COMBINATIONS, str(len(combination_ids)))
        self.client.log_metric(run_id, METRIC_COMBINATIONS, len(combination_ids))
        current = {"prompts_digest": prompts_digest, "combination_ids": sorted(combination_ids)}
        if scoring_digest is not None:
            current["scoring_digest"] = scoring_digest
        self.client.log_dict(run_id, current, STUDY_COMBINATIONS_FILE)
        self.client.log_text(run_id, spec_yaml, STUDY_SPEC_FILE)
        return run_id

    def combination_runs(
        self, parent_run_id: str, prompts_digest: str, scoring_digest: str
    ) -> dict[str, Run]:
        """combination id → its child run over these prompts, scored so (the earliest, should
        two ever exist)."""
        runs = self._search(
            f"{_quoted(MLFLOW_PARENT_RUN_ID)} = '{parent_run_id}' and "
            f"{_quoted(TAG_PROMPTS_DIGEST)} = '{prompts_digest}' and "
            f"{_quoted(TAG_SCORING_DIGEST)} = '{scoring_digest}'"
        )
        found: dict[str, Run] = {}
        for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
            combination_id = run.data.tags.get(TAG_COMBINATION)
            if combination_id:
                found[combination_id] = run
        return found

    def finished_combinations(
        self, parent_run_id: str, prompts_digest: str, scoring_digest: str
    ) -> set[str]:
        finished = RunStatus.to_string(RunStatus.FINISHED)
        runs = self.combination_runs(parent_run_id, prompts_digest, scoring_digest)
        return {cid for cid, run in runs.items() if run.info.status == finished}

    def log_combination(
        self,
        parent_run_id: str,
        study: str,
        combination: Combination,
        *,
        prompts_digest: str,
        scoring_digest: str,
        metrics: dict[str, float],
        records: list[dict[str, Any]],
        grid: Image.Image,
        memory_source: str,
    ) -> str:
        """The combination's child run, written whole and closed FINISHED. A run left open by
        an interrupted finish is reused and completed (params and artifacts overwrite)."""
        cid = combination.combination_id
        existing = self.combination_runs(parent_run_id, prompts_digest, scoring_digest).get(cid)
        if existing is not None:
            run_id = existing.info.run_id
        else:
            run_id = self.client.create_run(
                self.experiment_id,
                run_name=combination.label,
                tags={
                    MLFLOW_PARENT_RUN_ID: parent_run_id,
                    MLFLOW_RUN_NAME: combination.label,
                    TAG_ROLE: ROLE_COMBINATION,
                    TAG_SWEEP: study,
                    TAG_COMBINATION: cid,
                    TAG_PROMPTS_DIGEST: prompts_digest,
                    TAG_SCORING_DIGEST: scoring_digest,
                },
            ).info.run_id
        params = {
            PARAM_MODEL: combination.model.label,
            PARAM_SCHEDULER: combination.scheduler.label,
            PARAM_INFERENCE_STEPS: combination.num_inference_steps,
            PARAM_GUIDANCE_SCALE: combination.guidance_scale,
            # Without a negative prompt is always `none`, whatever the spec named it: the
            # report pairs every negative prompt with it.
            PARAM_NEGATIVE_PROMPT: (
                NO_NEGATIVE_PROMPT
                if combination.negative_prompt is None
                else combination.negative_name
            ),
            PARAM_NEGATIVE_PROMPT_TEXT: combination.negative_prompt or "",
            PARAM_MODEL_IDENTITY: combination.model.identity,
            PARAM_SCHEDULER_CLASS: combination.scheduler.class_name,
            PARAM_SCHEDULER_CONFIG: combination.scheduler.config,
            PARAM_RESOLUTION: combination.resolution,
            PARAM_DTYPE: combination.dtype,
            PARAM_SEED: combination.seed,
        }
        logged = existing.data.params if existing is not None else {}
        new_params = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        already = set(existing.data.metrics) if existing is not None else set()
        now = int(time.time() * 1000)
        new_metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items() if k not in already]
        self.client.log_batch(run_id, params=new_params, metrics=new_metrics)
        self.client.set_tag(run_id, TAG_MEMORY_SOURCE, memory_source)
        # log_table appends to a table already there: a run an interrupted finish left open may
        # hold the records already.
        records_dir = COMBINATION_RECORDS_FILE.rsplit("/", 1)[0]
        present = {a.path for a in self.client.list_artifacts(run_id, records_dir)}
        if COMBINATION_RECORDS_FILE not in present:
            self.client.log_table(
                run_id, data=pd.DataFrame(records), artifact_file=COMBINATION_RECORDS_FILE
            )
        self.client.log_image(run_id, grid, COMBINATION_SAMPLES_FILE)
        self.client.set_terminated(run_id, "FINISHED")
        return run_id
