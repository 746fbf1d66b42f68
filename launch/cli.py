"""`dreamsweep`: validate a sweep spec, run it, and choose each trial's stop step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from launch.preflight import missing_packages
from launch.spec import SpecError, SweepSpec, load_spec


def _validate(spec: SweepSpec, console: Console) -> int:
    from launch.grid import expand_grid

    resolved = spec.model_dump(mode="json")
    console.print(yaml.safe_dump(resolved, sort_keys=False), markup=False, highlight=False)
    trials = expand_grid(spec)
    console.print(
        f"{len(trials)} trials; each trains {spec.grid.max_steps} steps, evaluated at steps "
        f"0, {spec.grid.eval_every}, …, {spec.grid.max_steps}. MLflow: {spec.tracking_uri}"
    )
    return 0


def _run(spec: SweepSpec, console: Console) -> int:
    from launch.local import run_local

    outcome = run_local(spec, console=console)
    return 1 if outcome.failed else 0


def _select(spec: SweepSpec, console: Console) -> int:
    from selection.select import SelectionError, select_sweep

    try:
        selections = select_sweep(spec)
    except SelectionError as err:
        console.print(f"[red]{err}[/]")
        return 1
    weights = spec.selection_weights
    table = Table(title=f"Stop steps of sweep {spec.name} (weights {weights})")
    table.add_column("trial", no_wrap=True)
    table.add_column("best step", justify="right")
    table.add_column("score", justify="right")
    for metric in weights:
        table.add_column(metric, justify="right")
    for s in selections:
        table.add_row(
            s.label,
            str(s.best_step),
            f"{s.best_score:.3f}",
            *(f"{s.metrics[m]:.4f}" for m in weights),
        )
    console.print(table)
    console.print("Checkpoints at the best steps:")
    for s in selections:
        console.print(f"  {s.label}: {s.checkpoint or 'the base model (step 0)'}", markup=False)
    console.print(f"Curves: mlflow ui --backend-store-uri {spec.tracking_uri} --host 127.0.0.1")
    return 0


COMMANDS = {
    "validate": (_validate, "check a spec and print it resolved, with its number of trials"),
    "run": (_run, "run every unfinished trial of a spec"),
    "select": (_select, "choose each trial's stop step from its curves in MLflow"),
}


def _prompts(args: argparse.Namespace) -> int:
    """Expand a prompt template to JSON lines: index, prompt, phrases (for inference studies)."""
    from evaluation.prompts import PromptTemplateError, expand, load_template, template_path

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
    try:
        spec = load_spec(args.spec)
        problems = missing_packages(spec)
        if problems:
            raise SpecError(str(args.spec), problems)
    except SpecError as err:
        Console(stderr=True).print(f"error: {err}", markup=False, highlight=False)
        return 2
    handler, _ = COMMANDS[args.command]
    return handler(spec, console)


if __name__ == "__main__":
    sys.exit(main())
