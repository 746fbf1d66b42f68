"""The toy world's dynamics, measured on the finished quickstart (issue 18's figures).

Run: make quickstart && python bench/toyworld_figures.py [--spec configs/quickstart.yaml]

Reads the sweep's MLflow store (the curves, and the best and collapse steps `dreamsweep select`
logged) and writes bench/results/toyworld_quickstart.md and toyworld.json: per trial, similarity
at step 0 and at the selected step, diversity at step 0 and at the last, the selected and
oracle-best steps, the collapse select reported; then the figures: the share of DreamBooth and
LoRA trials that learn (similarity +0.05, diversity falls), the trials with an interior best
step, the fitted `steps = k × images` and whether more images take at least as many steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from PIL import Image
from toyworld_trials import TrialCurves, oracle_stop, read_trials

from contract.layout import METRIC_BEST_STEP, METRIC_COLLAPSE_STEP
from contract.scoring import first_collapse
from contract.spec import STUDY_RANGES, SweepSpec, load_spec
from selection.report import fit_steps_per_image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
LEARNS_BY = 0.05
"""Similarity gain (toy CLIP cosine) at the selected step over step 0 that counts as learning."""


def trial_row(trial: TrialCurves, spec: SweepSpec) -> dict[str, object]:
    steps = trial.steps
    first, last = steps[0], steps[-1]
    best = int(trial.selected[METRIC_BEST_STEP])
    similarity, diversity = trial.curves["similarity"], trial.curves["diversity"]
    # What select reports, and the issue's own test on the two curves it names.
    ranges, threshold = spec.selection.ranges, spec.selection.collapse.threshold
    quality = [m for m in ("aesthetics", "oracle/clean") if m in trial.curves]
    # The study's ranges where the spec names none (a spec's ranges replace them whole).
    fell = first_collapse(trial.curves, quality, {**STUDY_RANGES, **ranges}, threshold)
    return {
        "trial": trial.label,
        "method": trial.method,
        "subject": trial.subject,
        "num_images": trial.num_images,
        "learning_rate": trial.learning_rate,
        "best_step": best,
        "oracle_best_step": oracle_stop(trial) if "oracle/score" in trial.curves else None,
        "similarity_0": similarity[first],
        "similarity_best": similarity[best],
        "diversity_0": diversity[first],
        "diversity_last": diversity[last],
        "learns": similarity[best] - similarity[first] >= LEARNS_BY
        and diversity[last] < diversity[first],
        "interior_best": first < best < last,
        "collapse_reported": int(trial.selected[METRIC_COLLAPSE_STEP])
        if METRIC_COLLAPSE_STEP in trial.selected
        else None,
        "quality_collapse": None if fell is None else {"step": fell[0], "curve": fell[1]},
    }


def more_images_more_steps(rows: list[dict[str, object]]) -> dict[str, object]:
    """Per subject × method × learning rate: is the best step with the most images at least the
    best step with the fewest?"""
    groups: dict[str, dict[int, int]] = {}
    for r in rows:
        key = f"{r['subject']}/{r['method']}/lr={r['learning_rate']:g}"
        groups.setdefault(key, {})[r["num_images"]] = r["best_step"]
    verdict = {
        key: by_n[max(by_n)] >= by_n[min(by_n)] for key, by_n in groups.items() if len(by_n) > 1
    }
    return {"groups": verdict, "share": statistics.mean(verdict.values()) if verdict else None}


def figures(spec: SweepSpec, trials: list[TrialCurves]) -> dict[str, object]:
    rows = [trial_row(t, spec) for t in trials]
    fine_tunes = [r for r in rows if r["method"] in ("dreambooth", "lora")]
    return {
        "trials": rows,
        "learning_share_dreambooth_lora": statistics.mean(r["learns"] for r in fine_tunes),
        "interior_best_share": statistics.mean(r["interior_best"] for r in rows),
        "collapsed_reported": [r["trial"] for r in rows if r["collapse_reported"] is not None],
        "quality_collapsed": [r["trial"] for r in rows if r["quality_collapse"] is not None],
        # Least squares `steps = k × images` through the origin, as the report's fit table.
        "fitted_k": fit_steps_per_image([(r["num_images"], r["best_step"]) for r in rows]),
        "more_images_more_steps": more_images_more_steps(rows),
    }


def markdown(result: dict[str, object], command: str) -> str:
    monotone = result["more_images_more_steps"]
    calibration = result.get("range_calibration")
    lines = [
        "## The quickstart's curves",
        "",
        f"`{command}`, on `configs/quickstart.yaml` after `make quickstart`.",
        "",
        f"- DreamBooth and LoRA trials that learn (similarity at the selected step ≥ step 0 + "
        f"{LEARNS_BY}, diversity at the last step below step 0's): "
        f"**{result['learning_share_dreambooth_lora']:.0%}**",
        f"- trials with an interior best step: **{result['interior_best_share']:.0%}**",
        f"- collapse reported by `select`: {len(result['collapsed_reported'])} trials "
        f"({', '.join(result['collapsed_reported']) or 'none'}); aesthetics or oracle/clean "
        f"fallen ≥ 20% of its range below its running best: "
        f"{', '.join(result['quality_collapsed']) or 'none'}",
        f"- fitted `steps = k × images`: k = **{result['fitted_k']:.1f}**",
        f"- best step with 4 images ≥ with 2, per subject × method × learning rate: "
        f"**{sum(monotone['groups'].values())} of {len(monotone['groups'])}**",
        "",
        "| trial | similarity 0 → selected | diversity 0 → last | selected step | oracle-best "
        "step | collapse (select) |",
        "|---|---|---|---|---|---|",
    ]
    if calibration:
        lines[-3:-3] = [
            "",
            "Ranges (`range_calibration`, toy CLIP and head): "
            + "; ".join(
                f"{name}: fresh renders {c['similarity_fresh_renders']:.2f}, world renders "
                f"{c['similarity_world_renders']:.2f}, "
                f"own diversity {c['diversity_own_images']:.2f}"
                for name, c in calibration["subjects"].items()
            )
            + f"; world diversity {calibration['diversity_world']:.2f}; aesthetics clean "
            f"{calibration['aesthetics_clean_renders']:.3f}, corrupted "
            f"{calibration['aesthetics_corrupted_renders']:.3f}.",
        ]
    for r in result["trials"]:
        lines.append(
            f"| {r['trial']} | {r['similarity_0']:.3f} → {r['similarity_best']:.3f} | "
            f"{r['diversity_0']:.3f} → {r['diversity_last']:.3f} | {r['best_step']} | "
            f"{r['oracle_best_step']} | {r['collapse_reported'] or '–'} |"
        )
    return "\n".join(lines) + "\n"


SHOWN = ("robot/dreambooth/n=2", "mug/lora/n=2/lr=0.01", "mug/textual_inversion/n=4")
"""The trials the sample figure shows: one that learns, one that collapses, a new token."""
SHOWN_STEPS = (0, 120, 240, 400)
SHOWN_IMAGES = 4


def sample_figure(spec: SweepSpec, trials: list[TrialCurves], path: Path) -> None:
    """A row per shown trial: its first sample images at each of SHOWN_STEPS, side by side."""
    from mlflow.artifacts import download_artifacts

    from contract.layout import samples_file

    rows = []
    for prefix in SHOWN:
        trial = next(t for t in trials if t.label.startswith(prefix))
        row = []
        for step in SHOWN_STEPS:
            local = download_artifacts(
                run_id=trial.run_id,
                artifact_path=samples_file(step),
                tracking_uri=spec.tracking_uri,
            )
            grid = Image.open(local).convert("RGB")
            row += [grid.crop((64 * i, 0, 64 * (i + 1), 64)) for i in range(SHOWN_IMAGES)]
        rows.append(row)
    gap = 8
    width = len(SHOWN_STEPS) * (SHOWN_IMAGES * 64 + gap) - gap
    sheet = Image.new("RGB", (width, len(rows) * (64 + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            block, within = divmod(i, SHOWN_IMAGES)
            sheet.paste(image, (block * (SHOWN_IMAGES * 64 + gap) + within * 64, r * (64 + gap)))
    sheet.save(path, optimize=True)


def range_calibration() -> dict[str, object]:
    """What the quickstart's ranges were set from, on the toy encoders: per subject, its folder's
    similarity to fresh renders of it (the top) and to renders of the world (the bottom), its
    folder's own diversity and the world's; the aesthetic head on clean and corrupted renders."""
    import torch

    from evaluation import metrics
    from evaluation.aesthetics import load_aesthetic_head
    from evaluation.clip import Clip
    from toyworld.scene import SUBJECTS
    from toyworld.world import corrupted_image, pretraining_sample, subject_sample

    clip, head = Clip("toy"), load_aesthetic_head("toy")
    world = clip.embed_images([pretraining_sample(1, i).image for i in range(64)])
    subjects = {}
    for name in SUBJECTS:
        folder = sorted((REPO / "configs" / "subjects" / "toyworld" / name).glob("*.png"))
        own = clip.embed_images([Image.open(path) for path in folder])
        fresh = clip.embed_images([subject_sample(name, 5, i).image for i in range(16)])
        subjects[name] = {
            "similarity_fresh_renders": metrics.similarity(fresh, own),
            "similarity_world_renders": metrics.similarity(world, own),
            "diversity_own_images": metrics.diversity(own),
        }
    corrupted = [corrupted_image(1, i)[0] for i in range(64)]
    with torch.no_grad():
        clean_score = float(head(world).mean()) / 10
        corrupted_score = float(head(clip.embed_images(corrupted)).mean()) / 10
    return {
        "subjects": subjects,
        "diversity_world": metrics.diversity(world),
        "aesthetics_clean_renders": clean_score,
        "aesthetics_corrupted_renders": corrupted_score,
    }


def main() -> None:  # pragma: no cover - the benchmark, run by hand
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=REPO / "configs" / "quickstart.yaml")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    trials = read_trials(spec)  # one read of the store for the figures and the samples
    result = figures(spec, trials) | {"range_calibration": range_calibration()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    sample_figure(spec, trials, RESULTS / "toyworld_samples.png")
    (RESULTS / "toyworld.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, "python bench/toyworld_figures.py")
    (RESULTS / "toyworld_quickstart.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
