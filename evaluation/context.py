"""What the metrics share, so each expensive thing is loaded or computed once.

`TrialContext` lives for a trial: the spec, the image jobs, the encoders (CLIP, DINO) and the
subject's reference embeddings. `GeneratedImages` lives for one evaluation: the images and their
CLIP and subject-encoder embeddings. Embeddings are computed on first use and cached, so two
metrics on the same encoder share one pass over the images.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from PIL import Image

from contract.spec import EvalSpec
from evaluation.clip import Clip
from evaluation.dino import Dino
from evaluation.encoders import ImageEncoder, reference_embeddings
from evaluation.jobs import ImageJob

ENCODERS = ("clip", "dino")
"""The shared encoders a metric can name in `needs`, in the order they are loaded."""


class TrialContext:
    """A trial's evaluation setup and the encoders its metrics asked for."""

    def __init__(
        self,
        spec: EvalSpec,
        *,
        class_token: str,
        reference_files: list[Path],
        jobs: list[ImageJob],
        variants: list[str],
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.class_token = class_token
        self.reference_files = reference_files
        self.jobs = jobs
        self.variants = variants
        self.device = device
        self._clip: Clip | None = None
        self._dino: Dino | None = None

    def load_encoders(self, names: set[str]) -> None:
        """Load the named encoders, in `ENCODERS` order whoever asked first.

        A fixed order keeps what loading draws from the global RNG, and so the rest of the
        trial, independent of which metrics are chosen in which order.
        """
        unknown = names - set(ENCODERS)
        if unknown:
            raise ValueError(f"unknown encoders {sorted(unknown)}; known: {list(ENCODERS)}")
        if "clip" in names:
            self._clip = Clip(self.spec.clip_model, device=self.device)
        if "dino" in names:
            self._dino = Dino(self.spec.dino_model, device=self.device)

    @property
    def clip(self) -> Clip:
        if self._clip is None:
            raise RuntimeError("CLIP is not loaded: a metric that uses it names 'clip' in needs()")
        return self._clip

    @property
    def dino(self) -> Dino:
        if self._dino is None:
            raise RuntimeError("DINO is not loaded: a metric that uses it names 'dino' in needs()")
        return self._dino

    @property
    def subject_encoder(self) -> ImageEncoder:
        """`eval.encoder`: what subject fidelity (similarity) and diversity are measured on."""
        return self.clip if self.spec.encoder == "clip" else self.dino

    @cached_property
    def subject_reference(self) -> torch.Tensor:
        """The subject's reference images on the subject encoder (L2-normalised, disk-cached)."""
        return reference_embeddings(self.subject_encoder, self.reference_files, normalize=True)

    def variant_rows(self) -> list[tuple[str, list[int]]]:
        """(variant, the indices of its jobs), in variant order."""
        return [
            (variant, [i for i, job in enumerate(self.jobs) if job.variant == variant])
            for variant in self.variants
        ]


class GeneratedImages:
    """One evaluation's images (in job order) and their embeddings, each computed once."""

    def __init__(self, trial: TrialContext, images: list[Image.Image]) -> None:
        self.trial = trial
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def clip_embeddings(self) -> torch.Tensor:
        """CLIP image embeddings `[N, D]`, L2-normalised, batched as `eval.batch_size`."""
        return self.trial.clip.embed_images(self.images, batch_size=self.trial.spec.batch_size)

    @cached_property
    def subject_embeddings(self) -> torch.Tensor:
        """The subject encoder's embeddings `[N, D]`; with CLIP, the same tensor as above."""
        if self.trial.spec.encoder == "clip":
            return self.clip_embeddings
        return self.trial.dino.embed_images(self.images, batch_size=self.trial.spec.batch_size)
