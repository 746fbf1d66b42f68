"""How close the metric-based stop step is to the true best, on the toy world.

Run: python bench/stop_accuracy.py [--work /tmp/dreamsweep-stop-accuracy] [--report-only]

A grid on the toy world (4 subjects × DreamBooth and LoRA × 1, 2 and 4 images × 2 learning
rates; the quickstart's evaluation, `oracle` included) is run and selected with the CLI, then,
per trial: the step the spec's weighted selection chooses (the study's weights on similarity,
aesthetics and diversity, the quickstart's ranges), the oracle-best step (`oracle/score`, which
the selection never sees) and the oracle score at each, beside the naive rules "last step" and
"100 × images". Writes bench/results/stop_accuracy.{md,json}. A finished trial is not trained
again: rerun after a kill and it goes on; `--report-only` rereads the finished sweep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from toyworld_trials import naive_stops, oracle_stop, read_trials, weighted_stop

from contract.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SUBJECTS = {"robot": "toy", "mug": "cup", "cabin": "house", "pine": "tree"}
METHODS = {"dreambooth": [2.0e-4, 5.0e-4], "lora": [2.0e-3, 1.0e-2]}
NUM_IMAGES = [1, 2, 4]
RULES = ("weighted selection", "last step", "100 × images")


def write_spec(work: Path) -> Path:
    """The bench's sweep: the quickstart's evaluation and selection on the bench's grid."""
    spec = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text(encoding="utf-8"))
    spec["name"] = "stop_accuracy"
    spec["output_dir"] = str(work / "runs")
    spec["subjects"] = [
        {
            "name": name,
            "images": str(REPO / "configs" / "subjects" / "toyworld" / name),
            "class_token": class_token,
            "identifier": "sks",
        }
        for name, class_token in SUBJECTS.items()
    ]
    spec["methods"] = {
        "dreambooth": {"learning_rate": METHODS["dreambooth"]},
        "lora": {"learning_rate": METHODS["lora"], "rank": 4},
    }
    spec["grid"]["num_images"] = NUM_IMAGES
    path = work / "stop_accuracy.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def measure(spec_path: Path) -> dict[str, object]:
    spec = load_spec(spec_path)
    interval = spec.grid.eval_every
    rows = []
    for trial in read_trials(spec):
        score = trial.curves["oracle/score"]
        best = oracle_stop(trial)
        stops = {"weighted selection": weighted_stop(trial, spec), **naive_stops(trial)}
        rows.append(
            {
                "trial": trial.label,
                "oracle_best_step": best,
                "oracle_best_score": score[best],
                "stops": stops,
                "oracle_at_stop": {rule: score[step] for rule, step in stops.items()},
                "within_one_interval": {
                    rule: abs(step - best) <= interval for rule, step in stops.items()
                },
                "share_of_best": {
                    rule: score[step] / score[best] if score[best] > 0 else 1.0
                    for rule, step in stops.items()
                },
            }
        )
    summary = {
        rule: {
            "within_one_interval": statistics.mean(r["within_one_interval"][rule] for r in rows),
            "mean_share_of_oracle_best": statistics.mean(r["share_of_best"][rule] for r in rows),
            "mean_oracle_score": statistics.mean(r["oracle_at_stop"][rule] for r in rows),
        }
        for rule in RULES
    }
    return {"trials": rows, "summary": summary, "eval_every": interval, "count": len(rows)}


def markdown(result: dict[str, object], command: str, seconds: float | None) -> str:
    interval = result["eval_every"]
    lines = [
        "# Stop-point accuracy on the toy world",
        "",
        f"`{command}` ({result['count']} trials: {len(SUBJECTS)} subjects × "
        f"{' and '.join(METHODS)} × {NUM_IMAGES} images × 2 learning rates, each evaluated "
        f"every {interval} steps; "
        + (f"{seconds / 60:.0f} min on this machine's 2 CPU cores)." if seconds else "reread).")
        + " The weighted selection sees similarity, aesthetics and diversity (the study's "
        "weights, the quickstart's ranges); the oracle score (`oracle/score`: subject × prompt × "
        "clean, judged against the toy world's ground truth) is what it is scored on and never "
        "sees.",
        "",
        "| rule | within one interval of the oracle-best step | mean oracle score at its step "
        "/ oracle-best | mean oracle score |",
        "|---|---|---|---|",
    ]
    for rule, figures in result["summary"].items():
        lines.append(
            f"| {rule} | {figures['within_one_interval']:.0%} | "
            f"{figures['mean_share_of_oracle_best']:.0%} | {figures['mean_oracle_score']:.3f} |"
        )
    lines += [
        "",
        "| trial | oracle-best step (score) | weighted selection | last step | 100 × images |",
        "|---|---|---|---|---|",
    ]
    for row in result["trials"]:
        cells = [
            f"{row['stops'][rule]} ({row['oracle_at_stop'][rule]:.3f})"
            + (" ✓" if row["within_one_interval"][rule] else "")
            for rule in RULES
        ]
        lines.append(
            f"| {row['trial']} | {row['oracle_best_step']} ({row['oracle_best_score']:.3f}) | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", f"✓: within one evaluation interval ({interval} steps) of the oracle-best step."]
    return "\n".join(lines) + "\n"


def main() -> None:  # pragma: no cover - the benchmark, run by hand
    from launch.cli import main as dreamsweep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dreamsweep-stop-accuracy"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    spec_path = write_spec(args.work)
    seconds = None
    if not args.report_only:
        started = time.monotonic()
        for command in ("run", "select"):
            if dreamsweep([command, str(spec_path)]) != 0:
                raise SystemExit(f"dreamsweep {command} {spec_path} failed")
        seconds = time.monotonic() - started
    result = measure(spec_path)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stop_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    command = "python bench/stop_accuracy.py"
    (RESULTS / "stop_accuracy.md").write_text(markdown(result, command, seconds))
    print((RESULTS / "stop_accuracy.md").read_text())


if __name__ == "__main__":
    main()
