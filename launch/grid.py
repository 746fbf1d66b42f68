"""Grid expansion: a spec → trials (`contract.trial.TrialConfig`), each ONE training trajectory
evaluated on the step grid."""

from __future__ import annotations

import itertools
from pathlib import Path

from contract.layout import model_short_name
from contract.spec import (
    LocalLauncherSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    SweepSpec,
    subject_image_files,
)
from contract.trial import TrialConfig, file_digest


def world_size(launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec) -> int:
    """The training processes of each trial under this launcher: one task per node on SLURM,
    each starting `processes_per_node`; one node under the local and Ray launchers."""
    if isinstance(launcher, SlurmLauncherSpec):
        return launcher.nodes * launcher.processes_per_node
    return launcher.processes_per_trial


def expand_grid(spec: SweepSpec) -> list[TrialConfig]:
    """All trials of the spec, in a stable order (subject, base model, method, num_images, lr,
    seed). Each base model's trials train with its resolution and precision."""
    trials = []
    processes = world_size(spec.launcher)
    for subject in spec.subjects:
        files = subject_image_files(subject.images)
        for model, (method, options) in itertools.product(spec.base_models, spec.methods.enabled):
            train = spec.train.model_copy(
                update={"resolution": model.resolution, "mixed_precision": model.mixed_precision}
            )
            for num_images, learning_rate, seed in itertools.product(
                spec.grid.num_images, options.learning_rate, spec.grid.seed
            ):
                chosen = files[:num_images]
                trial = TrialConfig(
                    sweep=spec.name,
                    base_model=model.id,
                    model_name=model_short_name(model.id) if spec.compares_models else None,
                    subject=subject,
                    method=method,
                    options=options,
                    num_images=num_images,
                    learning_rate=learning_rate,
                    seed=seed,
                    max_steps=spec.grid.max_steps,
                    eval_every=spec.grid.eval_every,
                    train=train,
                    export=spec.export,
                    world_size=processes,
                    eval=spec.eval,
                    selection=spec.selection,
                    image_files=chosen,
                    image_digest=file_digest(chosen),
                    output_dir=Path("."),  # placeholder until the id is known
                    tracking_uri=spec.tracking_uri,
                    experiment=spec.experiment_name,
                )
                out = spec.resolved_output_dir / "trials" / f"{subject.name}-{trial.trial_id}"
                trials.append(trial.model_copy(update={"output_dir": out}))
    return trials
