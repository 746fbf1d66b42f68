"""An inference study's driver: resolve it (models, prompts, combinations, shards), run its
shards (locally: one worker process per shard, `launcher.max_parallel` at a time, a progress
bar per shard and for the study; on SLURM as one job array, launch/inference_slurm.py; on Ray
as tasks, launch/inference_ray.py; the driver waits for them in every case), then finish it:
per combination the set-level metrics and the means of the per-image ones, logged as a child
run of the study's parent run.

Every launcher runs a shard as `python -m cluster.inference_shard <shard.json>` (the files
`prepare_study` writes under `<output_dir>/shards/`), then `finish_study` logs what is done.
Re-running a finished study generates and logs nothing: images on disk are reused, and a
combination with a FINISHED child run is not logged again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from cluster.cpu_threads import thread_environment
from cluster.forked_worker import forked_worker
from cluster.worker import read_output
from contract.inference import (
    SHARD_DONE,
    SHARD_JSON,
    SHARD_LOG,
    Combination,
    ResolvedScheduler,
    Shard,
    StudyPrompt,
    prompts_digest,
    scoring_digest,
    shard_folder,
    write_shard,
)
from contract.prompts import expand, load_template
from contract.spec import InferenceSpec, subject_image_files
from contract.spec.inference import SET_LEVEL_METRICS
from launch.inference_models import resolve_models
from tracking.inference import InferenceTracking

SHARD_ENTRY = ("-m", "cluster.inference_shard")


@dataclass
class Study:
    """A resolved study: what every shard and the finish read."""

    spec: InferenceSpec
    prompts: list[StudyPrompt]
    combinations: list[Combination]
    shards: list[Shard]

    @property
    def total_images(self) -> int:
        return sum(s.total_images for s in self.shards)

    @property
    def prompts_digest(self) -> str:
        return prompts_digest(self.prompts)

    @property
    def scoring_digest(self) -> str:
        """What its combinations' runs are scored with (every shard shares the settings)."""
        return scoring_digest(self.shards[0].eval, self.shards[0].reference_files)

    def finished_combinations(self, tracking: InferenceTracking, parent_run_id: str) -> set[str]:
        """The combination ids with a FINISHED run over these prompts, with this scoring."""
        return tracking.finished_combinations(
            parent_run_id, self.prompts_digest, self.scoring_digest
        )


@dataclass
class StudyOutcome:
    study: Study
    failed_shards: list[int] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)
    """Combination ids logged to MLflow by this run."""


def study_prompts(spec: InferenceSpec) -> list[StudyPrompt]:
    """The template's first `n` prompts of its seeded draw, or the file's prompts."""
    prompts = spec.prompts
    if prompts.template is not None:
        assert prompts.n is not None
        drawn = expand(load_template(prompts.template), prompts.n, seed=prompts.seed)
        return [StudyPrompt(index=i, text=p.text, phrases=p.phrases) for i, p in enumerate(drawn)]
    assert prompts.file is not None
    lines = [line for line in prompts.file.read_text(encoding="utf-8").splitlines() if line]
    found = []
    for index, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            found.append(
                StudyPrompt(index=index, text=row["prompt"], phrases=row.get("phrases", {}))
            )
        else:
            found.append(StudyPrompt(index=index, text=line.strip()))
    return found


def prepare_study(spec: InferenceSpec, *, download: bool = True, source: str = "spec") -> Study:
    """Resolve the study and write each shard's `shard.json`; raises `SpecError` (a missing
    `models:/` name, its source the spec's file) before anything is generated."""
    models = resolve_models(spec, download=download, source=source)
    prompts = study_prompts(spec)
    combinations = [
        Combination(
            model=model,
            scheduler=ResolvedScheduler(
                label=scheduler.shown,
                class_name=scheduler.class_name,
                config=scheduler.resolved_config,
            ),
            num_inference_steps=steps,
            guidance_scale=guidance,
            negative_name=negative_name,
            negative_prompt=negative_text,
            resolution=spec.resolution,
            dtype=spec.dtype,
            seed=spec.seed,
        )
        for model, scheduler, steps, guidance, (negative_name, negative_text) in itertools.product(
            models, spec.schedulers, spec.num_inference_steps, spec.guidance_scale, spec.negatives()
        )
    ]
    names = spec.metrics.names
    references = (
        [] if spec.metrics.references is None else subject_image_files(spec.metrics.references)
    )
    size = spec.shards.prompts_per_shard
    shards = [
        Shard(
            study=spec.name,
            index=index,
            study_dir=spec.resolved_output_dir,
            prompts=prompts[start : start + size],
            images_per_prompt=spec.images_per_prompt,
            combinations=combinations,
            eval=spec.metrics.eval_spec(seed=spec.seed),
            per_image_metrics=[m for m in names if m not in SET_LEVEL_METRICS],
            reference_files=references,
        )
        for index, start in enumerate(range(0, len(prompts), size))
    ]
    if download:
        for shard in shards:
            write_shard(shard)
    return Study(spec, prompts, combinations, shards)


def shard_is_done(shard: Shard) -> bool:
    """Its worker finished it as it is now: the same combinations, the same images (more
    prompts in a last shard, other images per prompt or shard sizes change them) and the same
    per-image scoring; any change makes it pending again (what exists is reused)."""
    marker = shard.folder / SHARD_DONE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text(encoding="utf-8"))
    return all(done.get(key) == value for key, value in shard.done_record().items())


class ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("- img/s" if speed is None else f"{speed:.2f} img/s")


def study_progress(console: Console) -> Progress:
    """A bar per running shard and one for the study: images done / total, images/s, ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        ImagesPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _run_shard_worker(
    shard: Shard, env: dict[str, str], progress: Progress, shard_task: Any, study_task: Any
) -> int:
    """One shard in a process of its own; its events drive the bars. Returns its exit status."""
    seen = 0

    def on_event(event: dict[str, Any]) -> None:
        nonlocal seen
        if event["event"] == "images":
            progress.update(shard_task, completed=event["done"], visible=True)
            progress.advance(study_task, event["done"] - seen)
            seen = event["done"]
        elif event["event"] == "claimed":
            progress.console.print(
                f"- shard {shard.index} not run here: another submission holds it "
                f"({event['holder']})",
                markup=False,
            )

    # Forked from the fork server that imported the worker's code once (cluster/forked_worker.py):
    # a fresh interpreter spends more on its imports than a small shard on its images.
    worker = forked_worker([str(shard.folder / SHARD_JSON)], env, None, entry=SHARD_ENTRY[-1])
    with open(shard.folder / SHARD_LOG, "a", encoding="utf-8") as log:
        with worker as running:
            tail = read_output(running.output, log, on_event)
            returncode = running.wait()
    if returncode != 0:
        progress.console.print(
            f"[red]✗ shard {shard.index} failed[/] (exit status {returncode}); log: "
            f"{shard.folder / SHARD_LOG}; its last lines:"
        )
        for line in tail:
            progress.console.print(f"    {line}", markup=False, highlight=False)
    return returncode


def run_shards_local(study: Study, console: Console) -> list[int]:
    """Every shard not done, as worker processes here; returns the indices of failed ones."""
    pending = [s for s in study.shards if not shard_is_done(s)]
    if not pending:
        return []
    parallel = min(study.spec.launcher.max_parallel, len(pending))
    env = {**os.environ, **thread_environment(parallel), "PYTHONUNBUFFERED": "1"}
    failed = []
    with study_progress(console) as progress:
        study_task = progress.add_task(f"study {study.spec.name}: images", total=study.total_images)
        progress.update(
            study_task,
            completed=sum(s.total_images for s in study.shards if shard_is_done(s)),
        )
        tasks = {
            s.index: progress.add_task(f"shard {s.index}", total=s.total_images, visible=False)
            for s in pending
        }
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = {
                s.index: pool.submit(
                    _run_shard_worker, s, env, progress, tasks[s.index], study_task
                )
                for s in pending
            }
            for index, future in futures.items():
                if future.result() != 0:
                    failed.append(index)
                progress.update(tasks[index], visible=False)
    return failed


def run_shards(study: Study, console: Console) -> list[int]:
    """The study's unfinished shards on its launcher, waited for; the indices of failed ones."""
    kind = study.spec.launcher.kind
    if kind == "slurm":
        from launch.inference_slurm import run_shards_slurm

        return run_shards_slurm(study, console)
    if kind == "ray":
        from launch.inference_ray import run_shards_ray

        return run_shards_ray(study, console)
    return run_shards_local(study, console)


def finish_study(study: Study, tracking: InferenceTracking, parent_run_id: str) -> list[str]:
    """Log every combination whose shards are all done and that has no FINISHED run yet."""
    if not all(shard_is_done(s) for s in study.shards):
        return []
    import torch

    from inference.summary import SetScorer, summarize_combination

    spec = study.spec
    finished = study.finished_combinations(tracking, parent_run_id)
    todo = [c for c in study.combinations if c.combination_id not in finished]
    if not todo:
        return []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_names = [m for m in spec.metrics.names if m in SET_LEVEL_METRICS]
    images = len(study.prompts) * spec.images_per_prompt
    eval_spec = study.shards[0].eval
    scorer = SetScorer(eval_spec, set_names, images, device) if set_names else None
    per_image = study.shards[0].per_image_metrics
    logged = []
    for combination in todo:
        summary = summarize_combination(
            spec.resolved_output_dir,
            combination,
            study.prompts,
            spec.images_per_prompt,
            per_image_metrics=per_image,
            set_scorer=scorer,
        )
        tracking.log_combination(
            parent_run_id,
            spec.name,
            combination,
            prompts_digest=study.prompts_digest,
            scoring_digest=study.scoring_digest,
            metrics=summary.metrics,
            records=summary.records,
            grid=summary.grid,
            memory_source=summary.memory_source,
        )
        logged.append(combination.combination_id)
    return logged


def open_tracking(study: Study) -> tuple[InferenceTracking, str]:
    spec = study.spec
    output_dir = spec.resolved_output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(output_dir / ".study.lock"):
        tracking = InferenceTracking(
            spec.tracking_uri, spec.experiment_name, artifact_root=output_dir / "mlartifacts"
        )
        spec_yaml = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        parent = tracking.study_run(
            spec.name,
            combination_ids=[c.combination_id for c in study.combinations],
            prompts_digest=study.prompts_digest,
            spec_yaml=spec_yaml,
            scoring_digest=study.scoring_digest,
        )
    return tracking, parent


def run_inference(
    spec: InferenceSpec, *, console: Console | None = None, source: str = "spec"
) -> StudyOutcome:
    """Run the study's unfinished shards on its launcher, wait for them, and log every
    combination they complete; `source` (the spec's file) names the spec in errors."""
    console = console or Console()
    study = prepare_study(spec, source=source)
    tracking, parent = open_tracking(study)
    finished = study.finished_combinations(tracking, parent)
    done = sum(1 for c in study.combinations if c.combination_id in finished)
    console.print(
        f"Study [bold]{spec.name}[/]: {len(study.combinations)} combinations × "
        f"{len(study.prompts)} prompts × {spec.images_per_prompt} images, {len(study.shards)} "
        f"shards; {done} combinations already logged. MLflow: {spec.tracking_uri}"
    )
    outcome = StudyOutcome(study)
    if done == len(study.combinations):
        console.print("Every combination is already logged: nothing to generate.")
        return outcome
    tracking.client.update_run(parent, status="RUNNING")
    try:
        outcome.failed_shards = run_shards(study, console)
        from filelock import FileLock

        # Two submissions that end together must not both log a combination.
        with FileLock(spec.resolved_output_dir / ".finish.lock"):
            outcome.logged = finish_study(study, tracking, parent)
    except BaseException as err:
        # Not left RUNNING (ended as a sweep's parent run is, launch.sweep_run; a rerun reopens
        # it). `err` stays the error to report, should the store not answer either.
        with contextlib.suppress(Exception):
            interrupted = isinstance(err, KeyboardInterrupt)
            tracking.client.set_terminated(parent, "KILLED" if interrupted else "FAILED")
        raise
    complete = study.finished_combinations(tracking, parent) >= {
        c.combination_id for c in study.combinations
    }
    if outcome.failed_shards:
        tracking.client.set_terminated(parent, "FAILED")
    elif complete:
        tracking.client.set_terminated(parent, "FINISHED")
    console.print(
        f"Study [bold]{spec.name}[/]: {len(outcome.logged)} combinations logged, "
        f"{len(outcome.failed_shards)} shards failed."
    )
    return outcome


def shard_rows(study: Study) -> list[dict[str, Any]]:
    """Each shard's state for `dreamsweep status`: DONE, RUNNING (claimed), or images so far."""
    from cluster.claims import claim_holder
    from contract.inference import IMAGES_DIR, combination_folder

    rows = []
    for shard in study.shards:
        holder = claim_holder(shard.folder) if shard.folder.is_dir() else None
        generated = sum(
            (
                combination_folder(shard.study_dir, c.combination_id) / IMAGES_DIR / f"{key}.png"
            ).is_file()
            for c in shard.combinations
            for key in shard.image_keys
        )
        state = (
            "DONE"
            if shard_is_done(shard)
            else "RUNNING"
            if holder
            else ("NOT STARTED" if generated == 0 else "UNFINISHED")
        )
        rows.append(
            {
                "shard": shard.index,
                "state": state,
                "images": f"{generated}/{shard.total_images}",
                "prompts": f"{shard.prompts[0].index}-{shard.prompts[-1].index}",
                "holder": holder or "-",
            }
        )
    return rows


def shard_command(shard_dir: Path) -> list[str]:
    """The command line a SLURM array task or Ray task runs for one shard."""
    return [sys.executable, *SHARD_ENTRY, str(shard_dir / SHARD_JSON)]


__all__ = [
    "Study",
    "StudyOutcome",
    "finish_study",
    "prepare_study",
    "run_inference",
    "shard_command",
    "shard_folder",
    "shard_rows",
]
