"""A search's groups and their Optuna studies: storage, sampler, distributions, the
sampled trial of a sample, the objective, and each group's best logged to the parent run.

**One study per group.** The fixed axes stay a grid: each subject × method × num_images × seed
(× a learning rate of the method's list, when it is not searched) is a group, and each group
has a study of its own, of `search.n_trials` trials over the part of `search.space` that
applies to it (`methods.<its method>.*`, `train.*`, `grid.max_steps`). Not one study with the
fixed axes as fixed params: the methods' spaces differ (a LoRA rank means nothing to textual
inversion), their good learning rates lie orders of magnitude apart, and a subject's best
setting is the question a group answers; one study per group keeps each sampler's model about
one objective, gives each group its full budget and its own best, and lets groups be resumed
and reported on their own. A study's name is `<sweep>.<subject>.<method>.n<images>.seed<seed>`
and a digest of the group's own trial (model, images' content, training and evaluation
settings), its space, sampler and seed: changing any of those starts a new study, growing
`n_trials` continues the old one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow.entities import Run

from cluster.optuna_trial import make_pruner
from contract.layout import search_best_file, search_best_score, search_best_tag
from contract.scoring import best_step, weighted_scores
from contract.spec import Distribution, SearchSpec, SweepSpec, logged_curves
from contract.spec.search import applies_to, open_storage, study_storage, with_values
from contract.trial import TrialConfig
from launch.grid import expand_grid
from tracking.sweep import SweepTracking

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class SearchGroup:
    """A group of the fixed axes and its study."""

    base: TrialConfig
    """The grid's trial of the group (the spec's own values of the searched fields)."""
    space: dict[str, Distribution]
    study: str


def group_space(spec: SweepSpec, method: str) -> dict[str, Distribution]:
    """The part of the space a method's groups search."""
    return {p: d for p, d in spec.search.space.items() if applies_to(p, method)}


def search_groups(spec: SweepSpec) -> list[SearchGroup]:
    """One group per trial of the grid (whose searched fields keep the spec's values)."""
    groups = []
    for base in expand_grid(spec):
        space = group_space(spec, base.method)
        identity = {
            "trial": base.trial_id,
            "space": {path: d.model_dump() for path, d in sorted(space.items())},
            "sampler": spec.search.sampler,
            "seed": spec.search.seed,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{spec.name}.{base.subject.name}.{base.method}.n{base.num_images}"
        groups.append(SearchGroup(base, space, f"{name}.seed{base.seed}-{digest}"))
    return groups


def sampled_trial(spec: SweepSpec, base: TrialConfig, params: dict[str, Any]) -> TrialConfig:
    """The ordinary trial of a sample: the spec cut to the group, the sampled values set at
    their paths, validated and expanded like any grid (so its id follows from its config)."""
    data = spec.model_dump()
    data["subjects"] = [s for s in data["subjects"] if s["name"] == base.subject.name]
    # The group's own base model, as the written spec has it (its resolution and precision
    # where they differ from train's).
    models = data["base_model"] if isinstance(data["base_model"], list) else [data["base_model"]]
    data["base_model"] = next(
        m for m in models if (m if isinstance(m, str) else m["id"]) == base.base_model
    )
    data["methods"] = {base.method: data["methods"][base.method]}
    data["methods"][base.method]["learning_rate"] = [base.learning_rate]
    data["grid"] |= {"num_images": [base.num_images], "seed": [base.seed]}
    data["search"] = {}  # the one trial, as a grid
    (trial,) = expand_grid(SweepSpec.model_validate(with_values(data, params)))
    return trial.model_copy(update={"model_name": base.model_name})  # labelled as its group


def optuna_distributions(
    space: dict[str, Distribution],
) -> dict[str, optuna.distributions.BaseDistribution]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    made: dict[str, optuna.distributions.BaseDistribution] = {}
    for path, d in space.items():
        if d.type == "categorical":
            made[path] = CategoricalDistribution(d.choices or [])
        elif d.type == "int":
            assert d.low is not None and d.high is not None
            step = int(d.step or 1)
            made[path] = IntDistribution(int(d.low), int(d.high), log=d.log, step=step)
        else:
            assert d.low is not None and d.high is not None
            made[path] = FloatDistribution(d.low, d.high, log=d.log, step=d.step)
    return made


def make_sampler(search: SearchSpec, *, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler. TPE and GP explore at random for half the budget (at most 10 trials,
    Optuna's default), so a small study is not random search throughout."""
    import optuna

    assert search.n_trials is not None
    startup = min(10, max(1, search.n_trials // 2))
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            n_startup_trials=startup,
            constant_liar=search.max_parallel > 1,  # trials in flight count as poor
        )
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if search.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


def storage_url(spec: SweepSpec) -> str:
    return study_storage(spec.search, spec.resolved_output_dir)


def open_study(spec: SweepSpec, group: SearchGroup) -> optuna.Study:
    """The group's study, created on first use; its sampler seeded past the trials it holds."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=group.study,
        storage=open_storage(storage_url(spec)),
        pruner=make_pruner(
            spec.search.pruner, eval_every=spec.grid.eval_every, max_steps=spec.grid.max_steps
        ),
        direction="maximize",
        load_if_exists=True,
    )
    held = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(spec.search, seed=spec.search.seed + held)
    return study


def run_score(tracking: SweepTracking, run: Run, trial: TrialConfig) -> float | None:
    """The objective: the trial's best weighted score over its trained steps. Not step 0: it is
    the base model, the same for every trial of the group, so every trial worse than the base
    would tie at its score."""
    histories = tracking.histories(run.info.run_id, logged_curves(trial.eval.metrics))
    weights = trial.selection.weights_for(trial.eval.metrics)
    scores = weighted_scores(histories, weights, trial.selection.ranges)
    trained = {step: score for step, score in scores.items() if step > 0}
    return best_step(trained)[1] if trained else None


def log_best(
    spec: SweepSpec,
    tracking: SweepTracking,
    parent_run_id: str,
    group: SearchGroup,
    study: optuna.Study,
) -> dict[str, Any] | None:
    """The group's best trial so far, logged to the parent run (tags, a metric whose step is
    the trials told, and `search/<study>.json`); None while no trial completed."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    found = {
        "study": group.study,
        "number": best.number,
        "trial_id": sampled_trial(spec, group.base, best.params).trial_id,
        "score": best.value,
        "params": best.params,
        "trials": len(study.get_trials(deepcopy=False)),
    }
    tags = {search_best_tag(group.study, path): str(v) for path, v in best.params.items()}
    tags |= {
        search_best_tag(group.study, "number"): str(best.number),
        search_best_tag(group.study, "trial_id"): str(found["trial_id"]),
    }
    client = tracking.client
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, value)
    assert best.value is not None
    client.log_metric(parent_run_id, search_best_score(group.study), best.value, step=len(complete))
    client.log_dict(parent_run_id, found, search_best_file(group.study))
    return found
