"""An inference shard's worker: `python -m cluster.inference_shard SHARD_JSON`.

Every launcher runs a shard with this one command line: the local launcher as a process per
shard, a SLURM array task or a Ray task with the shard's `shard.json` (written by the driver in
`<output_dir>/shards/shard_NNNN/`, on a filesystem the node shares). The worker claims the shard
itself (`cluster.claims`: an exclusive flock on the shard folder's `claim.lock`, dropped by the
kernel when the process ends), so two submissions never generate it at once: the second exits
with status 0 and a `claimed` event. It then generates and scores what is not on disk yet
(`inference.shard`) and writes `done.json`. Exit status: 0 done (or claimed elsewhere), 1 error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.cpu_threads import usable_cores
from cluster.signals import DIE_WITH_PARENT, die_with_parent

if TYPE_CHECKING:
    from contract.inference import Shard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.inference_shard", description=__doc__)
    parser.add_argument("shard_json", type=Path, help="shard.json written by the study's driver")
    args = parser.parse_args(argv)
    if os.environ.get(DIE_WITH_PARENT):
        die_with_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cluster import events
    from cluster.claims import TrialClaimed, claim_trial
    from contract.inference import read_shard

    shard = read_shard(args.shard_json)
    try:
        # Claimed before the heavy imports: a shard another submission holds costs a second.
        with claim_trial(shard.folder):
            generated = _generate(shard)
    except TrialClaimed as claimed:
        events.emit("claimed", shard=shard.index, holder=claimed.holder)
        print(f"shard {shard.index}: not run here, another submission holds it: {claimed.holder}")
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    events.emit("done", shard=shard.index, generated=generated)
    return 0


def _generate(shard: Shard) -> int:
    import diffusers
    import torch
    import transformers

    from cluster import events
    from inference.shard import run_shard

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if "OMP_NUM_THREADS" not in os.environ:
        # A SLURM or Ray task started without a thread count: PyTorch would size its pool to
        # the whole node, which other tasks share; use the CPUs this task was given.
        torch.set_num_threads(usable_cores())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    events.emit("start", shard=shard.index, total=shard.total_images)
    return run_shard(
        shard,
        device=device,
        progress=lambda done, total: events.emit(
            "images", shard=shard.index, done=done, total=total
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
