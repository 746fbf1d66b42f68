"""`dreamsweep`: validate a sweep spec, run it, and choose each trial's stop step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from rich.console import Console

from contract.spec import (
    SELECTABLE_METRICS,
    InferenceSpec,
    SpecError,
    SweepSpec,
    load_any_spec,
    logged_curves,
)
from launch.output import (
    FORMATS,
    emit,
    selection_columns,
    selection_rows,
    status_columns,
    status_rows,
)
from launch.preflight import (
    evaluation_warnings,
    face_problems,
    missing_compiler,
    missing_device,
    missing_downloads,
    missing_packages,
    model_warnings,
    network_warnings,
    oracle_problems,
    tracking_warnings,
)
from launch.slurm import SlurmError


def _validate(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from contract.packs import packing_notes
    from launch.grid import expand_grid

    resolved = spec.model_dump(mode="json")
    console.print(yaml.safe_dump(resolved, sort_keys=False), markup=False, highlight=False)
    trials = expand_grid(spec)
    # The step grid as the trials have it (every trial of a spec shares it).
    steps = [str(s) for s in trials[0].eval_steps]
    if len(steps) == 1:
        evaluated = f"step {steps[0]}"
    elif len(steps) <= 4:  # short enough to list every step
        evaluated = f"steps {', '.join(steps[:-1])} and {steps[-1]}"
    else:
        evaluated = f"steps {steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} evaluations)"
    if spec.search.kind == "optuna":  # each trial of the grid is a group, with its own study
        planned = (
            f"{len(trials)} group{'s' if len(trials) != 1 else ''} × {spec.search.n_trials} "
            f"sampled trials (search: optuna, {spec.search.sampler})"
        )
    else:
        planned = f"{len(trials)} trial{'s' if len(trials) != 1 else ''}"
    console.print(
        f"{planned}; each trains {spec.grid.max_steps} steps, evaluated at {evaluated}. "
        f"MLflow: {spec.tracking_uri}"
    )
    if spec.compares_models:  # each model's trials train at its own resolution and precision
        models = ", ".join(
            f"{m.id} ({m.family or 'family read once fetched'}, {m.resolution} px, "
            f"{m.mixed_precision})"
            for m in spec.base_models
        )
        console.print(f"Base models compared: {models}.", markup=False, highlight=False)
    for note in packing_notes(trials, spec.launcher.pack):  # none unless launcher.pack > 1
        console.print(note, markup=False, highlight=False)
    if spec.search.kind == "optuna":
        console.print(f"Sampled over {', '.join(spec.search.space)}, one Optuna study per group.")
    return 0


def _run(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from launch.local import run_local

    if spec.search.kind == "optuna":
        from launch.search import run_search

        return 1 if run_search(spec, console=console).failed else 0
    if spec.launcher.kind == "slurm":
        from launch.slurm import submit_slurm

        submit_slurm(spec, console=console)
        return 0
    if spec.launcher.kind == "ray":
        from launch.ray import run_ray

        return 1 if run_ray(spec, console=console).failed else 0

    outcome = run_local(spec, console=console)
    return 1 if outcome.failed else 0


def parse_weights(text: str, spec: SweepSpec) -> dict[str, float]:
    """`similarity=1,aesthetics=1,diversity=0.5` → weights; raises SpecError naming each problem."""
    weights, problems = {}, []
    measured = [m for m in logged_curves(spec.eval.metrics) if m in SELECTABLE_METRICS]
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in measured:
            problems.append(
                f"--weights: {name!r} is not a measured, weightable metric; allowed: {measured}"
            )
            continue
        try:
            weights[name] = float(value)
        except ValueError:
            problems.append(f"--weights: {item!r} must be METRIC=NUMBER")
            continue
        if weights[name] < 0:
            problems.append(f"--weights: {name} must be >= 0, got {weights[name]}")
        if name not in spec.selection.ranges:
            problems.append(f"--weights: {name} has no range in selection.ranges")
    if not problems and not any(weights.values()):
        problems.append(f"--weights: at least one weight must be > 0, got {text!r}")
    if problems:
        raise SpecError("dreamsweep select", problems)
    return weights


def _select(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from selection.select import SelectionError, select_sweep

    weights = None if args.weights is None else parse_weights(args.weights, spec)
    try:
        outcome = select_sweep(spec, weights=weights)
    except SelectionError as err:
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False)
        return 1
    weights = outcome.weights
    emit(
        selection_rows(outcome),
        selection_columns(list(weights)),
        output_format=args.format,
        console=console,
        title=f"Stop steps of sweep {spec.name} (weights {weights})",
    )
    if args.format != "table":  # stdout carries the data alone: the notes go to stderr
        console = Console(stderr=True, soft_wrap=True)
    console.print("Checkpoints at the best steps:")
    for s in outcome.trials:
        console.print(f"  {s.label}: {s.checkpoint_note()}", markup=False)
    if outcome.registered:
        console.print("Registered best checkpoints (selection.registry.download_best loads them):")
        for r in outcome.registered:
            console.print(
                f"  {r.uri} → version {r.version}: {r.candidate.label}, step {r.candidate.step} "
                f"(score {r.candidate.score:.4f})",
                markup=False,
            )
    console.print(f"Curves: mlflow ui --backend-store-uri {spec.tracking_uri} --host 127.0.0.1")
    return 0


def _report(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from selection.report import ReportError, build_report

    output = args.output or spec.resolved_output_dir / "report"
    try:
        page = build_report(spec, output)
    except ReportError as err:
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False)
        return 1
    console.print(f"Report: {page} (with curves/*.png and the tables as CSV)", markup=False)
    return 0


def _sync(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from cluster.claims import TrialClaimed, claim_trial
    from launch.sweep_run import close_parent_run, prepare_sweep
    from tracking.journal import journal_path, replay_journal, unreachable

    sweep_run = prepare_sweep(spec)
    journaled = [t for t in sweep_run.trials if journal_path(t.output_dir).exists()]
    left = 0
    for trial in journaled:
        try:
            with claim_trial(trial.output_dir):
                writes = replay_journal(sweep_run.tracking.client, trial.output_dir)
            console.print(f"{trial.label}: replayed {writes} MLflow write(s)", markup=False)
        except TrialClaimed as claimed:  # its worker replays it itself
            console.print(f"{trial.label}: running ({claimed.holder}); left to it", markup=False)
        except Exception as err:
            if not unreachable(err):
                raise
            left += 1
            console.print(f"{trial.label}: MLflow still unreachable ({err})", markup=False)
    if not left:
        close_parent_run(
            sweep_run.tracking, sweep_run.parent_run_id, sweep_run.trials, failed=False
        )
    console.print(
        f"Sweep {spec.name}: {len(journaled) - left} journal(s) replayed, {left} left.",
        markup=False,
    )
    return 1 if left else 0


def _status(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from launch.status import sweep_status

    status = sweep_status(spec)
    warnings = Console(stderr=True, soft_wrap=True)
    if status.slurm_error is not None:
        warnings.print(
            f"warning: SLURM: {status.slurm_error}; job states unknown, states from MLflow, "
            "claims and journals",
            markup=False,
        )
    if status.mlflow_error is not None:
        warnings.print(
            f"warning: MLflow: {status.mlflow_error}; states from the trials' claims and "
            "journals only",
            markup=False,
        )
    emit(
        status_rows(status),
        status_columns(status),
        output_format=args.format,
        console=console,
        title=f"Sweep {spec.name} ({spec.launcher.kind} launcher)",
    )
    return 0


def _cancel(spec: SweepSpec, console: Console, args: argparse.Namespace) -> int:
    from launch.slurm import cancel_sweep

    cancelled = cancel_sweep(spec)
    console.print(f"Cancelled {len(cancelled)} job(s): {' '.join(cancelled) or '-'}")
    return 0


COMMANDS = {
    "validate": (_validate, "check a spec and print it resolved, with its number of trials"),
    "run": (_run, "run every unfinished trial of a spec"),
    "select": (_select, "choose each trial's stop step from its curves in MLflow"),
    "status": (_status, "each trial's state, last step, metrics and worker (any launcher)"),
    "cancel": (_cancel, "cancel the sweep's queued and running SLURM jobs"),
    "sync": (_sync, "replay the MLflow writes trials journaled while the server was down"),
    "report": (_report, "write the study report: one self-contained HTML page, PNGs and CSVs"),
}


def _prompts(args: argparse.Namespace) -> int:
    """Expand a prompt template to JSON lines: index, prompt, phrases (for inference studies)."""
    from contract.prompts import PromptTemplateError, expand, load_template, template_path

    path = template_path(args.template, base_dir=Path.cwd())
    try:
        prompts = expand(load_template(path), args.n, seed=args.seed)
    except (PromptTemplateError, ValueError) as err:
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False, highlight=False)
        return 2
    lines = [
        json.dumps(
            {
                "index": index,
                "prompt": prompt.render(token=args.token, class_token=args.class_token),
                "phrases": prompt.phrases,
            }
        )
        for index, prompt in enumerate(prompts)
    ]
    text = "\n".join(lines) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamsweep", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("spec", type=Path, help="sweep spec (YAML)")
        if name == "report":
            command.add_argument("--output", type=Path, help="folder (default OUTPUT_DIR/report)")
        if name == "select":
            command.add_argument(
                "--weights",
                help="override selection.weights, e.g. similarity=1,aesthetics=1,diversity=0.5",
            )
        if name in ("select", "status"):
            command.add_argument(
                "--format",
                choices=FORMATS,
                default="table",
                help="table (default; full width when piped), or csv / json for scripts",
            )
    prompts = commands.add_parser("prompts", help="expand a prompt template to JSON lines")
    prompts.add_argument("template", help="a shipped template (portrait, object) or a YAML path")
    prompts.add_argument("--n", type=int, required=True, help="number of distinct prompts")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    prompts.add_argument("--token", default="{token}", help="the subject's identifier")
    prompts.add_argument("--class", dest="class_token", default="{class}", help="class token")
    prompts.add_argument("--output", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    if args.command == "prompts":
        return _prompts(args)
    console = Console(soft_wrap=True)  # long paths and URIs stay on one line, copy-pasteable
    from tracking.journal import fail_fast_over_http

    fail_fast_over_http()  # a dead tracking server is reported in seconds, not minutes
    try:
        spec = load_any_spec(args.spec)
        if isinstance(spec, InferenceSpec):
            from launch.inference_cli import inference_command

            return inference_command(spec, console, args)
        problems = missing_packages(spec)
        if args.command in ("validate", "run"):
            # select, status, report read a sweep back anywhere
            problems += missing_device(spec) + missing_compiler(spec) + face_problems(spec)
            problems += oracle_problems(spec)
            problems += missing_downloads(spec)
        if problems:
            raise SpecError(str(args.spec), problems)
        if args.command in ("validate", "run"):
            warnings = tracking_warnings(spec) + network_warnings(spec) + model_warnings(spec)
            for warning in warnings + evaluation_warnings(spec):
                Console(stderr=True, soft_wrap=True).print(f"warning: {warning}", markup=False)
        handler, _ = COMMANDS[args.command]
        return handler(spec, console, args)
    except SpecError as err:
        # soft_wrap: a long path stays on one line, copy-pasteable
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False, highlight=False)
        return 2
    except SlurmError as err:
        Console(stderr=True, soft_wrap=True).print(f"error: {err}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
