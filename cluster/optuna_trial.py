"""A sampled trial's side of an Optuna study: its storage, its pruner, and its pruning stopper.

With `search.kind: optuna` the driver (launch/search.py) asks the study for a trial, writes
where that Optuna trial lives (`StudyTrial`, `optuna_trial.json` in the trial's folder) and
passes it to the worker (`--optuna-trial`). The worker's main process reports the weighted score
of every evaluated step to the study and asks the pruner whether to go on: the study's storage
(a journal file in the sweep folder, or an RDB) is reachable from every process, so pruning
works the same wherever the trial lands (here, a SLURM node). A pruned trial stops through the
loop's early-stop path: at that evaluated step, after its checkpoint, its run FINISHED with the
early-stop tags and `dreamsweep.pruned`. The driver alone tells the study a trial's end.

Optuna is imported in the functions, so the worker loads it only for a sampled trial.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.layout import TAG_OPTUNA_STUDY, TAG_OPTUNA_TRIAL, TAG_PRUNED
from contract.scoring import weighted_scores
from contract.spec import PrunerSpec, SelectionSpec
from contract.spec.search import open_storage
from contract.trial import TrialConfig
from trainers.reporting import Stopper

if TYPE_CHECKING:
    import optuna

OPTUNA_TRIAL_JSON = "optuna_trial.json"


@dataclass(frozen=True)
class StudyTrial:
    """Where a sampled trial's Optuna trial lives, as the driver hands it to the worker."""

    storage: str
    """An RDB URL, or the path of the study's journal file."""
    study: str
    number: int
    """The Optuna trial's number in its study."""
    pruner: dict[str, Any]
    """The spec's `search.pruner` (a `PrunerSpec`'s fields)."""
    eval_every: int
    max_steps: int

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / OPTUNA_TRIAL_JSON
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def read(cls, path: Path) -> StudyTrial:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    @property
    def pruner_spec(self) -> PrunerSpec:
        return PrunerSpec.model_validate(self.pruner)


def make_pruner(spec: PrunerSpec, *, eval_every: int, max_steps: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner for the spec; the training step is its clock."""
    import optuna

    min_resource = spec.min_resource or eval_every
    if spec.kind == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps
        )
    if spec.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=spec.reduction_factor
        )
    if spec.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource,
            max_resource=max_steps,
            reduction_factor=spec.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def step_score(
    selection: SelectionSpec, measured: list[str], metrics: Mapping[str, float]
) -> float | None:
    """The weighted, min–max-scaled score of one evaluation; None if a weighted metric is
    missing."""
    histories = {name: {0: value} for name, value in metrics.items()}
    return weighted_scores(histories, selection.weights_for(measured), selection.ranges).get(0)


class PruningStopper:
    """A `Stopper` that reports each evaluation's weighted score to the trial's Optuna trial
    and stops the trial when the pruner says so (never at step 0, the base model)."""

    def __init__(
        self,
        study_trial: StudyTrial,
        selection: SelectionSpec,
        measured: list[str],
        *,
        on_prune: Callable[[int], None],
    ) -> None:
        import optuna

        storage = open_storage(study_trial.storage)
        pruner = make_pruner(
            study_trial.pruner_spec,
            eval_every=study_trial.eval_every,
            max_steps=study_trial.max_steps,
        )
        # Optuna's public storage API, not a hand-built `optuna.trial.Trial` (its docs say not
        # to construct one): the value goes to the storage, the pruner judges the stored trial.
        self.storage, self.pruner = storage, pruner
        self.study = optuna.load_study(study_name=study_trial.study, storage=storage, pruner=pruner)
        study_id = storage.get_study_id_from_name(study_trial.study)
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(
            study_id, study_trial.number
        )
        self.study_trial, self.selection, self.measured = study_trial, selection, measured
        self.on_prune = on_prune

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        score = step_score(self.selection, self.measured, metrics)
        if score is None:
            return None
        # A resumed trial reports its steps again: the first value of a step is kept.
        if step not in self.storage.get_trial(self.trial_id).intermediate_values:
            self.storage.set_trial_intermediate_value(self.trial_id, step, score)
        if step == 0 or not self.pruner.prune(self.study, self.storage.get_trial(self.trial_id)):
            return None
        self.on_prune(step)
        kind = self.study_trial.pruner["kind"]
        return (
            f"pruned by Optuna's {kind} pruner at step {step} (score {score:.4f}; study "
            f"{self.study_trial.study}, trial {self.study_trial.number})"
        )


def first_reason(*stoppers: Stopper) -> Stopper:
    """One stopper of several: each sees every evaluation (they keep histories); the first
    reason given wins."""

    def stop(step: int, metrics: dict[str, float]) -> str | None:
        reasons = [stopper(step, metrics) for stopper in stoppers]
        return next((reason for reason in reasons if reason is not None), None)

    return stop


def sampled_trial_stopper(
    path: Path,
    config: TrialConfig,
    set_tags: Callable[[dict[str, str]], None],
    early: Stopper | None,
) -> Stopper:
    """The worker's stopper for a sampled trial: its run tagged with its study and trial
    number, the pruner consulted at every evaluation (beside the spec's early stop, if on),
    and `dreamsweep.pruned` set when it prunes."""
    study_trial = StudyTrial.read(path)
    set_tags({TAG_OPTUNA_STUDY: study_trial.study, TAG_OPTUNA_TRIAL: str(study_trial.number)})
    pruning = PruningStopper(
        study_trial,
        config.selection,
        config.eval.metrics,
        on_prune=lambda step: set_tags({TAG_PRUNED: str(step)}),
    )
    return pruning if early is None else first_reason(early, pruning)
