"""How many trials can log to one tracking server at once, with nothing lost or doubled.

Run: python bench/tracking_load.py [--writers 16 32 64] [--steps 50]
     (starts its own SQLite- and PostgreSQL-backed `mlflow/server.sh` on 127.0.0.1; PostgreSQL
     from Debian's package, run as the `postgres` user; needs root and psycopg2)

The load is `tracking.load.run_load` (one writer process per trial, each through the trials' own
write path; see there), on trials of the quickstart spec with as many seeds as writers. Results go
to bench/results/tracking_load.md.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path


def main() -> None:  # pragma: no cover - the benchmark, run by hand
    import tempfile

    from cluster.dev_servers import MlflowServer, PostgresServer
    from contract.spec import load_spec
    from launch.grid import expand_grid
    from tracking.load import STEPS_PER_EVAL, run_load

    repo = Path(__file__).resolve().parents[1]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    lines = [
        "# Concurrent trial writers on one `mlflow/server.sh` (1 worker), on this machine",
        "",
        f"`python bench/tracking_load.py --writers {' '.join(map(str, args.writers))} "
        f"--steps {args.steps}`. Each writer: its child run, {args.steps} steps of loss/lr, "
        f"3 curves + a tag every {STEPS_PER_EVAL} steps, then FINISHED.",
        "",
        "| backend | writers | seconds | journaled writes | (key, step) lost or doubled |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        quickstart = load_spec(repo / "configs" / "tiny_quickstart.yaml")
        seeds = quickstart.grid.model_copy(update={"seed": list(range(max(args.writers)))})
        spec = quickstart.model_copy(update={"grid": seeds, "output_dir": root / "sweep"})
        trials = [t.model_dump_json() for t in expand_grid(spec)]
        for backend in ("sqlite", "postgresql"):
            for writers in args.writers:
                folder = root / f"{backend}-{writers}"
                folder.mkdir()
                postgres = PostgresServer() if backend == "postgresql" else nullcontext()
                with postgres as pg:
                    env = {"MLFLOW_BACKEND_STORE_URI": pg.uri} if pg else {}
                    with MlflowServer(folder / "store", folder / "server.log", env=env) as server:
                        result = run_load(server.uri, trials[:writers], folder, steps=args.steps)
                bad = "none" if not result.problems else "; ".join(result.problems[:3])
                lines.append(
                    f"| {backend} | {writers} | {result.seconds:.1f} | {result.journaled} | {bad} |"
                )
                print(lines[-1], flush=True)
    out = repo / "bench" / "results" / "tracking_load.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
