"""The fork server's preload (cluster/forked_worker.py): everything a trial worker and an
inference shard's worker import (the shard's add about 15 ms to the trial's).

Imported once, by the server, never by a launcher. Libraries that warn on import (bitsandbytes
without its optional kernels, transformers without torchvision) are quieted first: the server
writes to the launcher's terminal, where those lines would be noise; a worker logs to its own
file.
"""

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()

import cluster.accelerator  # noqa: E402
import cluster.inference_shard  # noqa: E402
import cluster.reporters  # noqa: E402
import cluster.trial  # noqa: E402
import inference.shard  # noqa: E402, F401
import selection.stopping  # noqa: E402, F401
import tracking.journal  # noqa: E402
import tracking.reporter  # noqa: E402
import tracking.sweep  # noqa: E402, F401
import trainers.loop  # noqa: E402, F401

cluster.trial._quiet_libraries()
