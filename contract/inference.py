"""An inference study resolved: its combinations (model × scheduler × steps × guidance ×
negative prompt), each with a stable id, and its shards (the prompts a worker generates every
combination for), written as `shard.json` by the driver and read back by the worker.

A combination's id hashes what decides its images but the prompts: the model's content identity
(a checkpoint's trial id and step, or the base model's id), the scheduler and its config, steps,
guidance, the negative text, resolution, dtype, seed and the subject's tokens. Paths, labels and
launchers are not part of it, so a re-run (or another launcher) finds the images already
generated. The prompts are not either: each image's file name carries its prompt's digest
(`image_key`), so raising `prompts.n` (a prefix-stable draw) generates only the new prompts, and
a prompt whose text changed gets a new image.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contract.spec import EvalSpec

SHARD_JSON = "shard.json"
SHARD_DONE = "done.json"
"""Written by a shard's worker once every combination of its prompts is generated and scored:
`Shard.done_record`, which the driver compares with the shard it resolves now."""
SHARD_LOG = "worker.log"
IMAGES_DIR = "images"
TIMING_DIR = "timing"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image `image_index` of prompt `prompt_index`'s initial latents: a function of
    the three only, shared by every combination and unchanged when the prompt set grows."""
    return int(_digest([seed, prompt_index, image_index])[:15], 16)


def step_noise_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of the fresh noise ancestral and DDPM steps draw for one image: per (prompt,
    image) as `image_seed`, so an image does not depend on its batch or shard, but another
    stream, or the first step's noise would equal the initial latents."""
    return int(_digest(["step_noise", seed, prompt_index, image_index])[:15], 16)


SET_LEVEL_SETTINGS = frozenset(
    {"metrics", "fid_reference", "fid_features", "fid_weights", "kid_subsets", "kid_subset_size"}
)
"""`EvalSpec` fields that decide only the set-level scores (FID, KID) or name every metric:
changing one rescores no image (`Shard.image_scoring_digest` leaves them out)."""


TRAINING_ONLY_SETTINGS = ("oracle_model",)
"""`EvalSpec` settings an inference study never reads (its checks refuse `oracle`): left out of
its digests, so the studies run before the field existed still find their runs and sidecars."""


def scoring_digest(eval_spec: EvalSpec, reference_files: list[Path]) -> str:
    """sha256 of what decides a combination's scores beside its images: every metric and its
    settings (the `EvalSpec`) and the subject's reference images (by path). A combination's run
    is for one scoring (`contract.layout.TAG_SCORING_DIGEST`): changed settings log it again."""
    settings = eval_spec.model_dump(mode="json", exclude=set(TRAINING_ONLY_SETTINGS))
    return _digest([settings, [str(p) for p in reference_files]])


def image_key(prompt: StudyPrompt, image_index: int) -> str:
    """The file stem of one image (and its sidecar) inside its combination's folder: the
    prompt's index, the image's, and the prompt's digest (a changed text is another image)."""
    return f"p{prompt.index:06d}_i{image_index:03d}_{prompt.digest[:12]}"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudyPrompt(_Frozen):
    """One prompt of the study, its subject slots still open."""

    index: int
    text: str
    """With `{token}` and `{class}` open."""
    phrases: dict[str, str] = Field(default_factory=dict)

    @property
    def digest(self) -> str:
        """sha256 of its text and phrases: what, beside the combination, decides its images."""
        return _digest([self.text, self.phrases])

    def render(self, token: str, class_token: str) -> str:
        filled = self.text.format(token=token, **{"class": class_token})
        return " ".join(filled.split())


class ResolvedModel(_Frozen):
    """A model entry resolved to something a worker loads without MLflow."""

    label: str
    base_model: str
    """The base model (`tiny`, a hub id or folder) the pipeline is built from."""
    method: str | None = None
    """A trained checkpoint's method (`dreambooth`, `lora`, `textual_inversion`), else None."""
    checkpoint: Path | None = None
    """The checkpoint folder (downloaded from the registry), else None."""
    identity: str
    """Content identity: `<trial id>@<step>` for a checkpoint, the base model's id otherwise."""
    token: str
    class_token: str


class ResolvedScheduler(_Frozen):
    label: str
    class_name: str
    config: dict[str, Any] = Field(default_factory=dict)


class Combination(_Frozen):
    """One point of the study's grid."""

    model: ResolvedModel
    scheduler: ResolvedScheduler
    num_inference_steps: int
    guidance_scale: float
    negative_name: str
    negative_prompt: str | None
    resolution: int
    dtype: str
    seed: int

    @property
    def combination_id(self) -> str:
        return _digest(
            {
                "model": self.model.identity,
                "scheduler": [self.scheduler.class_name, self.scheduler.config],
                "steps": self.num_inference_steps,
                "guidance": self.guidance_scale,
                "negative": self.negative_prompt,
                "resolution": self.resolution,
                "dtype": self.dtype,
                "seed": self.seed,
                "subject": [self.model.token, self.model.class_token],
            }
        )[:16]

    @property
    def label(self) -> str:
        return (
            f"{self.model.label} · {self.scheduler.label} · {self.num_inference_steps} steps · "
            f"cfg {self.guidance_scale:g} · neg {self.negative_name}"
        )


def prompts_digest(prompts: list[StudyPrompt]) -> str:
    """sha256 of the study's prompts in order: a combination's run is for one prompt set."""
    return _digest([p.digest for p in prompts])


def combination_folder(study_dir: Path, combination_id: str) -> Path:
    return study_dir / "combinations" / combination_id


def shard_folder(study_dir: Path, index: int) -> Path:
    return study_dir / "shards" / f"shard_{index:04d}"


class Shard(_Frozen):
    """A worker's unit: every combination, for some of the study's prompts."""

    study: str
    index: int
    study_dir: Path
    prompts: list[StudyPrompt]
    """This shard's prompts (their `index` is the study-wide prompt index)."""
    images_per_prompt: int
    combinations: list[Combination]
    eval: EvalSpec
    """The metric settings (the metric registry reads an `EvalSpec`)."""
    per_image_metrics: list[str]
    """The metrics scored per image in the shard; set-level ones are scored at the end."""
    reference_files: list[Path] = Field(default_factory=list)
    """The subject's images `similarity` and `identity` compare with."""

    @property
    def folder(self) -> Path:
        return shard_folder(self.study_dir, self.index)

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.images_per_prompt * len(self.combinations)

    @property
    def image_keys(self) -> list[str]:
        """The file stems of its images of any combination, prompt by prompt."""
        return [image_key(p, k) for p in self.prompts for k in range(self.images_per_prompt)]

    @property
    def image_scoring_digest(self) -> str:
        """sha256 of what decides an image's per-image scores (its sidecar's): those metrics,
        their settings and the references; a sidecar with another digest is scored again."""
        settings = self.eval.model_dump(
            mode="json", exclude={*SET_LEVEL_SETTINGS, *TRAINING_ONLY_SETTINGS}
        )
        references = [str(p) for p in self.reference_files]
        return _digest([settings, sorted(self.per_image_metrics), references])

    def done_record(self) -> dict[str, Any]:
        """What `done.json` holds: the shard is done for these combinations, these images
        (prompts, images per prompt, how the prompts are cut) and this per-image scoring only."""
        return {
            "combinations": sorted(c.combination_id for c in self.combinations),
            "image_keys": self.image_keys,
            "image_scoring": self.image_scoring_digest,
        }

    @property
    def label(self) -> str:
        """Its name in `slurm/jobs.json` (`launch.slurm.job_record` reads `label`)."""
        return self.folder.name

    @property
    def output_dir(self) -> Path:
        """Where its worker writes its logs and claim: its folder (as a trial's output_dir)."""
        return self.folder


def write_shard(shard: Shard) -> Path:
    """`shard.json` in the shard's folder (atomically: a worker may read it at any time)."""
    folder = shard.folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SHARD_JSON
    staging = path.with_suffix(".json.tmp")
    staging.write_text(shard.model_dump_json(indent=1), encoding="utf-8")
    staging.replace(path)
    return path


def read_shard(path: Path) -> Shard:
    return Shard.model_validate_json(path.read_text(encoding="utf-8"))
