"""Pretrain the `toy` models on the toy world: `python -m toyworld.build OUT_DIR [--stage S]`.

Stages, in order (each resumable after a kill, from `OUT_DIR/work/checkpoints/<stage>.pt`):

1. `vae`: the factor-8 `AutoencoderKL` on the world's images → `OUT_DIR/work/vae/`;
2. `clip`: a `CLIPModel`, contrastive on images + captions → `OUT_DIR/clip/` (`clip_model`);
3. `unet`: the SD UNet on the VAE's latents (of a pool of draws encoded once), cross-attending
   to the frozen CLIP text tower → `OUT_DIR/toy-sd/` (`base_model`: an ordinary diffusers
   folder) and `samples.png`;
4. `aesthetic`: the LAION head on frozen toy-CLIP embeddings, clean vs corrupted renders →
   `OUT_DIR/aesthetic_head.pth` (`aesthetics_head`);
5. `oracle`: the oracle's attribute CNN, on renders and their VAE round trips →
   `OUT_DIR/oracle.safetensors`.

Deterministic from `--seed`. A stage whose record in `build.json` already has its steps is
skipped; asked for more steps, it continues from its checkpoint. `OUT_DIR/README.md` says how
everything was built, on what, the sizes and the final losses. Everything but `work/` is what
ships (`work/`: checkpoints, the latent pool, the VAE alone, the tokenizer files).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from toyworld.checkpoint import StageSettings, write_json
from toyworld.scene import HELD_OUT, SUBJECTS, WORLD_VERSION
from toyworld.stages import (
    VAE_FOLDER,
    aesthetic_stage,
    clip_stage,
    oracle_stage,
    unet_stage,
    vae_stage,
)

STAGES = ("vae", "clip", "unet", "aesthetic", "oracle")
# Sized for the 90-minute CPU budget. Measured per step on one thread of this 2-core machine
# while shared (load ~3.5; 2026-12-02): vae 1.19 s, clip 1.10 s, unet 0.91 s, aesthetic 0.19 s
# (two threads there were 4× slower: set OMP_NUM_THREADS=1 on a busy machine). That is
# 142 minutes shared; a quiet machine runs one thread about twice as fast.
DEFAULT_SETTINGS = {
    "vae": StageSettings(steps=1500, batch_size=32, learning_rate=1e-3, save_every=200),
    "clip": StageSettings(steps=2000, batch_size=128, learning_rate=5e-4, save_every=200),
    "unet": StageSettings(steps=5000, batch_size=64, learning_rate=4e-4, save_every=200),
    "aesthetic": StageSettings(steps=400, batch_size=64, learning_rate=1e-3, save_every=100),
    "oracle": StageSettings(steps=1600, batch_size=64, learning_rate=3e-3, save_every=1600),
}
POOL_SIZE = 24576
"""Draws whose latents the UNet trains on (each seen about 13 times at the default steps)."""
EXPORTS = {
    "vae": VAE_FOLDER,
    "clip": "clip",
    "unet": "toy-sd",
    "aesthetic": "aesthetic_head.pth",
    "oracle": "oracle.safetensors",
}
UPSTREAM = {"unet": ("vae", "clip"), "aesthetic": ("clip",), "oracle": ("vae",)}


def _records(out: Path) -> dict[str, dict]:
    path = out / "build.json"
    return json.loads(path.read_text(encoding="utf-8"))["stages"] if path.is_file() else {}


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 2)


def build(
    out: Path,
    stages: tuple[str, ...] = STAGES,
    *,
    seed: int = 0,
    settings: dict[str, StageSettings] | None = None,
    pool_size: int = POOL_SIZE,
    preview_steps: int = 25,
    log: Callable[[str], None] = print,
) -> dict[str, dict]:
    """Run `stages` (in pipeline order) into `out`; returns every stage's record.

    `pool_size`: draws in the UNet's latent pool; `preview_steps`: the sampler's steps for
    `samples.png`."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stages are {list(STAGES)}")
    chosen = {**DEFAULT_SETTINGS, **(settings or {})}
    out.mkdir(parents=True, exist_ok=True)
    records = _records(out)
    for stage in (s for s in STAGES if s in stages):
        wanted = chosen[stage]
        done = records.get(stage)
        missing = [u for u in UPSTREAM.get(stage, ()) if u not in records]
        if missing:
            raise RuntimeError(f"stage {stage} needs {missing} built first in {out}")
        inputs = {
            u: {"steps": records[u]["steps"], "seed": records[u]["seed"]}
            for u in UPSTREAM.get(stage, ())
        }
        if (
            done
            and done.get("seed") == seed
            and done["settings"] == asdict(wanted)
            and done.get("inputs", {}) == inputs
            and (out / EXPORTS[stage]).exists()
        ):
            log(f"{stage}: built ({done['steps']} steps), skipped")
            continue
        log(f"{stage}: {wanted}")
        began = time.monotonic()
        if stage == "vae":
            record = vae_stage(out, wanted, seed, log)
        elif stage == "clip":
            record = clip_stage(out, wanted, seed, log)
        elif stage == "unet":
            record = unet_stage(out, wanted, seed, log, inputs, pool_size, preview_steps)
        elif stage == "aesthetic":
            record = aesthetic_stage(out, wanted, seed, log, inputs)
        else:
            record = oracle_stage(out, wanted, seed, log)
        records[stage] = {
            **record,
            "seed": seed,
            "settings": asdict(wanted),
            "inputs": inputs,
            "wall_seconds": round(time.monotonic() - began, 1),
            "size_mb": _size_mb(out / EXPORTS[stage]),
        }
        write_json({"world": WORLD_VERSION, "stages": records}, out / "build.json")
        write_readme(out, records)
    return records


def write_readme(out: Path, records: dict[str, dict]) -> None:
    lines = [
        "# The toy world's pretrained models",
        "",
        f"Built by `python -m toyworld.build {out.name}` (`make toyworld`) on the procedural "
        f"world `{WORLD_VERSION}` (`toyworld/`): 64 px renders of toys, cups, houses and trees "
        "in varied contexts, with captions from its grammar. Each stage draws its images from "
        "(seed, step) alone; no draw shows a subject's (class, primary, secondary) colours: "
        f"{sorted(HELD_OUT)} (subjects {sorted(SUBJECTS)}).",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| stage | output | parameters | size (MB) | steps × batch | lr | final loss | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        if stage not in records:
            continue
        r = records[stage]
        s = r["settings"]
        loss = r.get("final_loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, float) else "-"
        lines.append(
            f"| {stage} | `{EXPORTS[stage]}` | {r.get('parameters', '-')} | {r['size_mb']} | "
            f"{s['steps']} × {s['batch_size']} | {s['learning_rate']} | {loss_text} | "
            f"{r['wall_seconds']} |"
        )
    lines += ["", "Measured on held-out draws:", ""]
    for stage in STAGES:
        for key, value in records.get(stage, {}).items():
            if key.startswith("validation") or key == "scaling_factor":
                lines.append(f"- {stage} `{key}`: {value}")
    lines += [
        "",
        "Weights are stored in float16 (the loaders upcast with `torch_dtype`), the aesthetic "
        "head as the LAION predictor's state dict.",
        "",
        "`vae_reconstructions.png`: held-out renders (left half) and their VAE round trips. ",
        "`samples.png`: the pipeline on `build.json`'s `unet.sample_prompts` (twice each).",
        "",
        "Full records (settings, timings, inputs of each stage): `build.json`.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        help="a stage to run (repeatable); default: all, in order",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the chosen stages' steps")
    parser.add_argument("--batch-size", type=int, help="override the chosen stages' batch size")
    parser.add_argument("--save-every", type=int, help="checkpoint every N steps")
    parser.add_argument(
        "--pool-size", type=int, default=POOL_SIZE, help="draws in the UNet's latent pool"
    )
    args = parser.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')} {value}: must be a positive integer"
        for name, value in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("save_every", args.save_every),
            ("pool_size", args.pool_size),
        )
        if value is not None and value < 1
    ]
    if problems:
        parser.error("; ".join(problems))
    stages = tuple(args.stage or STAGES)
    overrides = {
        key: value
        for key, value in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("save_every", args.save_every),
        )
        if value is not None
    }
    settings = {s: replace(DEFAULT_SETTINGS[s], **overrides) for s in stages}
    build(
        args.out_dir,
        stages,
        seed=args.seed,
        settings=settings,
        pool_size=args.pool_size,
        log=lambda line: print(line, flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
