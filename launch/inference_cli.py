"""`dreamsweep validate|run|report|status` on an inference spec (`kind: inference`)."""

from __future__ import annotations

import argparse

import yaml
from rich.console import Console

from contract.spec import InferenceSpec, SpecError, inference_warnings
from launch.output import Column, emit

INFERENCE_COMMANDS = ("validate", "run", "report", "status", "cancel")


def _validate(spec: InferenceSpec, console: Console, source: str) -> int:
    from launch.inference import prepare_study

    console.print(
        yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), markup=False, highlight=False
    )
    # Checks every `models:/` name in the registry.
    study = prepare_study(spec, download=False, source=source)
    console.print(
        f"{len(study.combinations)} combinations ({len(spec.models)} model entries → "
        f"{len({c.model.label for c in study.combinations})} models × {len(spec.schedulers)} "
        f"schedulers × {len(spec.num_inference_steps)} step counts × {len(spec.guidance_scale)} "
        f"guidance scales × {len(spec.negative_prompt)} negative prompts) × "
        f"{len(study.prompts)} prompts × {spec.images_per_prompt} images = "
        f"{study.total_images} images in {len(study.shards)} shards. MLflow: {spec.tracking_uri}"
    )
    return 0


def _run(spec: InferenceSpec, console: Console, source: str) -> int:
    from launch.inference import run_inference

    if spec.launcher.kind == "slurm":
        from launch.slurm import queued_job_ids

        queued_job_ids()  # an unreachable SLURM fails (SlurmError) before MLflow is touched
    outcome = run_inference(spec, console=console, source=source)
    return 1 if outcome.failed_shards else 0


def _cancel(spec: InferenceSpec, console: Console) -> int:
    from launch.slurm import cancel_sweep

    if spec.launcher.kind != "slurm":
        raise SpecError(
            "launcher",
            [f"`dreamsweep cancel` is for the slurm launcher, not {spec.launcher.kind!r}"],
        )
    cancelled = cancel_sweep(spec)  # reads the study's slurm/jobs.json, as a sweep's
    console.print(f"Cancelled {len(cancelled)} SLURM jobs: {' '.join(cancelled) or '-'}")
    return 0


def _report(spec: InferenceSpec, console: Console, args: argparse.Namespace) -> int:
    from selection.inference_report import write_inference_report
    from selection.report import ReportError

    output = args.output or spec.resolved_output_dir / "report"
    try:
        page = write_inference_report(
            tracking_uri=spec.tracking_uri,
            experiment=spec.experiment_name,
            study=spec.name,
            weights=spec.selection_weights,
            ranges={k: tuple(v) for k, v in spec.selection.ranges.items()},
            steps_within=spec.selection.steps_within,
            output_dir=output,
        )
    except ReportError as err:  # as the training report: a message, not a traceback
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False)
        return 1
    console.print(f"Report: {page}", markup=False)
    return 0


def _status(spec: InferenceSpec, console: Console, args: argparse.Namespace) -> int:
    from launch.inference import prepare_study, shard_rows

    study = prepare_study(spec, download=False, source=str(args.spec))
    columns = [Column(k) for k in ("shard", "state", "images", "prompts", "holder")]
    emit(
        shard_rows(study),
        columns,
        output_format=args.format,
        console=console,
        title=f"Inference study {spec.name} ({len(study.combinations)} combinations)",
    )
    return 0


def _missing_downloads(spec: InferenceSpec) -> list[str]:
    """Metric weights given as a URL that are neither cached nor reachable from here."""
    from contract.spec.evaluation import is_url
    from evaluation.downloads import download_problem

    sources = spec.metrics.eval_spec(seed=spec.seed).weights_sources
    return [
        problem.replace("eval.", "metrics.", 1)
        for field, source in sources.items()
        if is_url(source) and (problem := download_problem(source, field)) is not None
    ]


def inference_command(spec: InferenceSpec, console: Console, args: argparse.Namespace) -> int:
    """Run `args.command` on an inference spec; raises SpecError for bad input."""
    if args.command not in INFERENCE_COMMANDS:
        raise SpecError(
            str(args.spec),
            [
                f"`dreamsweep {args.command}` is for training sweeps; an inference spec takes "
                f"{', '.join(INFERENCE_COMMANDS)}"
            ],
        )
    if args.command in ("validate", "run"):
        problems = _missing_downloads(spec)
        if problems:
            raise SpecError(str(args.spec), problems)
        for warning in inference_warnings(spec):
            Console(stderr=True, soft_wrap=True).print(f"warning: {warning}", markup=False)
    if args.command == "validate":
        return _validate(spec, console, str(args.spec))
    if args.command == "run":
        return _run(spec, console, str(args.spec))
    if args.command == "report":
        return _report(spec, console, args)
    if args.command == "cancel":
        return _cancel(spec, console)
    return _status(spec, console, args)
