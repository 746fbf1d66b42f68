"""The sweep spec: one pydantic model tree, loaded from YAML and validated before anything runs.

Every default lives here, once. Relative paths in a spec resolve against the spec file's folder.
`load_spec` collects every problem (schema first, then the files the spec points at) and raises
one `SpecError` naming the file, the field, the value and what is allowed.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from contract.images import image_problem

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PROMPT_SLOTS = ("token", "class")
LearningRates = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]
TINY = "tiny"

Method = Literal["dreambooth", "lora", "textual_inversion"]
Metric = Literal["similarity", "aesthetics", "diversity", "clip_t", "in_domain", "fid"]
# Curves whose value rises with quality, so a stop step can be chosen on them. FID compares
# models (lower is better, unbounded) and is reported, not weighted.
SELECTABLE_METRICS = ("similarity", "aesthetics", "diversity", "clip_t", "in_domain")
FACE_CLASSES = frozenset(
    {"man", "woman", "person", "boy", "girl", "child", "kid", "baby", "face", "people"}
)
LAION_AESTHETIC_HEAD = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)

# Min–max ranges; scores are clipped to [0, 1] after scaling. Similarity, aesthetics (the LAION
# score / 10) and diversity are the portrait study's; clip_t spans what DreamBench reports for
# CLIP ViT-B/32 to L/14 (about 0.2 to 0.35); in_domain is a rate.
STUDY_RANGES: dict[str, tuple[float, float]] = {
    "similarity": (0.45, 0.85),
    "aesthetics": (0.3, 0.7),
    "diversity": (0.5, 0.75),
    "clip_t": (0.2, 0.35),
    "in_domain": (0.0, 1.0),
}
STUDY_WEIGHTS: dict[str, float] = {"similarity": 1.0, "aesthetics": 1.0, "diversity": 0.5}
DEFAULT_PROMPTS = [
    "a photo of {token} {class}",
    "a {token} {class} on the beach",
    "a painting of {token} {class} in the style of van gogh",
    "a {token} {class} in the snow",
]


class SpecError(ValueError):
    """A spec that cannot run; `problems` lists every reason, each naming its field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the sweep spec:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_slots(template: str, allowed: tuple[str, ...]) -> str:
    """Raise unless `template` is a format string using only the `allowed` slots."""
    try:
        slots = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as err:
        raise ValueError(f"{template!r} is not a valid template: {err}") from None
    unknown = slots - set(allowed)
    if unknown:
        raise ValueError(
            f"{template!r} uses unknown slot(s) {sorted(unknown)}; allowed: "
            + ", ".join("{" + s + "}" for s in allowed)
        )
    return template


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return path.resolve() if base is not None else path


class SubjectSpec(_Strict):
    """One subject to personalise the model on."""

    name: str
    """Short name, used in folder names and run names: letters, digits, `_`, `.`, `-`."""
    images: Path
    """Folder of the subject's images (PNG, JPEG, WebP, BMP); files are taken in name order."""
    class_token: str
    """The subject's class noun, e.g. `man`, `woman`, `dog`."""
    identifier: str = "sks"
    """The rare token that comes to mean this subject, e.g. `sks`."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not SAFE_NAME.match(name) or name in {".", ".."}:
            raise ValueError(
                "must be a safe path component: 1-64 of letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return name

    @field_validator("images")
    @classmethod
    def _resolve_images(cls, images: Path, info: ValidationInfo) -> Path:
        return _resolve(images, info)

    @field_validator("class_token", "identifier")
    @classmethod
    def _one_word(cls, word: str) -> str:
        if not word.strip() or any(c in word for c in "{}\n"):
            raise ValueError("must be a non-empty word without braces or newlines")
        return word.strip()


class GridSpec(_Strict):
    """The axes every subject × method × learning rate is crossed with, and the step grid."""

    num_images: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    """Numbers of the subject's images to train on (the first N in name order)."""
    seed: list[int] = Field(default=[0], min_length=1)
    """Training seeds to try."""
    max_steps: int = Field(ge=1)
    """Length of each training trajectory, in optimizer steps."""
    eval_every: int = Field(ge=1)
    """Evaluate every this many steps (and at step 0): these points are the step grid."""

    @model_validator(mode="after")
    def _eval_divides(self) -> GridSpec:
        if self.max_steps % self.eval_every:
            raise ValueError(
                f"eval_every ({self.eval_every}) must divide max_steps ({self.max_steps}) so the "
                "last step is evaluated"
            )
        return self


class DreamBoothSpec(_Strict):
    """Full fine-tune of the UNet, with class-specific prior preservation (DreamBooth)."""

    learning_rate: LearningRates = [5e-6]
    """Learning rates to try (diffusers' train_dreambooth.py uses 5e-6)."""
    train_text_encoder: bool = False
    """Also fine-tune the whole text encoder."""
    prior_preservation: bool = True
    """Add the class loss on generated class images (settings in `train.prior`)."""


class LoRASpec(_Strict):
    """Low-rank adapters on the UNet's attention (and optionally the text encoder's)."""

    learning_rate: LearningRates = [1e-4]
    """Learning rates to try (diffusers' train_dreambooth_lora.py uses 1e-4)."""
    rank: int = Field(default=4, ge=1)
    """Adapter rank."""
    alpha: float | None = Field(default=None, gt=0)
    """Adapter alpha; unset means equal to the rank (scale 1)."""
    target_modules: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    """UNet modules that get adapters (names as in diffusers' attention blocks)."""
    train_text_encoder: bool = False
    """Also put adapters on the text encoder's attention."""
    text_encoder_target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "out_proj"], min_length=1
    )
    """Text-encoder modules that get adapters when `train_text_encoder` is on."""
    prior_preservation: bool = False
    """Add the class loss on generated class images (settings in `train.prior`)."""


class TextualInversionSpec(_Strict):
    """One new token per subject; only its embedding row trains."""

    learning_rate: LearningRates = [5e-4]
    """Learning rates to try."""
    placeholder_token: str = "<{subject}>"
    """The new token; `{subject}` is the subject's name."""

    @field_validator("placeholder_token")
    @classmethod
    def _subject_slot_only(cls, token: str) -> str:
        _check_slots(token, ("subject",))
        if not token.strip() or any(c.isspace() for c in token):
            raise ValueError("must be one word without spaces")
        return token


MethodOptions = DreamBoothSpec | LoRASpec | TextualInversionSpec
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "dreambooth": DreamBoothSpec,
    "lora": LoRASpec,
    "textual_inversion": TextualInversionSpec,
}


class MethodsSpec(_Strict):
    """The methods to compare, each with its options. In YAML either a list of names (each with
    its defaults), e.g. `[dreambooth, lora]`, or a mapping of name → options."""

    dreambooth: DreamBoothSpec | None = None
    lora: LoRASpec | None = None
    textual_inversion: TextualInversionSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _names_or_mapping(cls, value: Any) -> Any:
        if isinstance(value, list):
            repeated = sorted({m for m in value if isinstance(m, str) and value.count(m) > 1})
            if repeated:
                raise ValueError(f"methods are listed more than once: {repeated}")
            unknown = [m for m in value if not isinstance(m, str) or m not in METHOD_OPTIONS]
            if unknown:
                raise ValueError(
                    f"unknown method(s) {unknown}; allowed: {', '.join(METHOD_OPTIONS)}"
                )
            return {name: {} for name in value}
        if isinstance(value, dict):  # `lora:` with no options means its defaults
            return {name: {} if options is None else options for name, options in value.items()}
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> MethodsSpec:
        if not self.enabled:
            raise ValueError(f"name at least one method; allowed: {', '.join(METHOD_OPTIONS)}")
        return self

    @property
    def enabled(self) -> list[tuple[Method, MethodOptions]]:
        """(name, options) of each chosen method, in a fixed order (dreambooth, lora, TI)."""
        return [(n, o) for n in METHOD_OPTIONS if (o := getattr(self, n)) is not None]


class PriorPreservationSpec(_Strict):
    """Class images for prior preservation: generated once by the base model and cached on disk,
    shared by every trial and subject of the same class (and by later sweeps)."""

    class_prompt: str = "a photo of a {class}"
    """Prompt of the class images and of the class loss; `{class}` is the subject's class token."""
    num_class_images: int = Field(default=100, ge=1)
    """Class images generated per class."""
    prior_loss_weight: float = Field(default=1.0, ge=0)
    """Loss = instance loss + this × class loss."""
    seed: int = 0
    """Seed of the first class image (image i uses seed + i)."""
    num_inference_steps: int = Field(default=25, ge=1)
    """Denoising steps per class image (DPM-Solver++)."""
    guidance_scale: float = Field(default=7.5, ge=0)
    """Classifier-free guidance scale of the class images."""
    batch_size: int = Field(default=4, ge=1)
    """Class images generated per pipeline call."""

    @field_validator("class_prompt")
    @classmethod
    def _class_slot_only(cls, prompt: str) -> str:
        return _check_slots(prompt, ("class",))


class DeepSpeedSpec(_Strict):
    """DeepSpeed ZeRO through Accelerate; the DeepSpeed config is generated from the spec."""

    zero_stage: Literal[1, 2] = 2
    """ZeRO stage. Stage 3 is not offered: evaluation generates with the whole UNet in place."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep the optimizer states (and step) in CPU memory."""


class CheckpointSpec(_Strict):
    """When checkpoints are written and which are kept. The newest checkpoint always keeps the
    optimizer, scheduler and RNG state to resume from; older ones keep only the weights."""

    every: int | None = Field(default=None, ge=1)
    """Also checkpoint every this many steps (for resuming); unset means only at the evaluation
    steps, which are always checkpointed."""
    keep_last: int | None = Field(default=None, ge=1)
    """Keep only the newest N checkpoints (besides those `keep_eval_steps` keeps); unset: all."""
    keep_eval_steps: bool = True
    """Keep every checkpoint on the step grid, whatever `keep_last` says, so any evaluated step
    can be chosen and registered. Turn off for full DreamBooth on a small disk."""


class TrainSpec(_Strict):
    """How each trajectory trains."""

    resolution: int = Field(default=512, ge=8, multiple_of=8)
    """Square training resolution in pixels (images are resized and centre-cropped)."""
    batch_size: int = Field(default=1, ge=1)
    """Images per micro-batch, per process (with prior preservation, as many class images too)."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Precision of the frozen weights and forward passes; trained weights stay fp32."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit` is bitsandbytes' 8-bit AdamW (its states take a quarter of the memory)."""
    adam_weight_decay: float = Field(default=1e-2, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Gradient clipping norm."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """Learning-rate schedule."""
    lr_warmup_steps: int = Field(default=0, ge=0)
    """Warm-up steps of the learning-rate schedule."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (UNet, and text encoder when it trains)."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """Attention kernels: PyTorch's scaled-dot-product attention, or xformers (must be
    installed)."""
    cache_latents: bool = True
    """Encode each image with the VAE once (cached on disk, shared by the subject's trials),
    then keep the VAE off the accelerator except during evaluation."""
    cache_text_embeddings: bool = True
    """Encode the training prompts once when the text encoder is frozen, then keep it off the
    accelerator except during evaluation."""
    deepspeed: DeepSpeedSpec | None = None
    """DeepSpeed ZeRO over the trial's processes (`launcher.processes_per_trial`); unset means
    plain data parallelism."""
    prior: PriorPreservationSpec = PriorPreservationSpec()
    """Class images and weight of the prior-preservation loss, for methods that turn it on."""
    checkpoints: CheckpointSpec = CheckpointSpec()
    """When checkpoints are written and which are kept."""


class PromptTemplateSpec(_Strict):
    """Validation prompts drawn from a prompt template (`configs/prompts/`)."""

    template: Path
    """A shipped template's name (`portrait`, `object`) or the path of a template YAML file."""
    n_validation: int = Field(default=100, ge=1)
    """Prompts used at every evaluation step: the first `n_validation` of the seeded draw (the
    same prompts as the start of `dreamsweep prompts --n 5000` with this seed)."""
    seed: int = 0
    """Seed of the draw of phrase combinations."""

    @field_validator("template", mode="before")
    @classmethod
    def _shipped_or_path(cls, value: Any, info: ValidationInfo) -> Any:
        from contract.prompts import shipped_templates, template_path

        if not isinstance(value, str | Path):
            return value
        base = (info.context or {}).get("base_dir")
        path = template_path(str(value), base_dir=None if base is None else Path(base))
        if not path.is_file():
            raise ValueError(
                f"no prompt template at {str(path)!r}; shipped templates: "
                f"{', '.join(shipped_templates())}, or give the path of a YAML file"
            )
        return str(path)  # a string: trial configs travel to workers as JSON


class EvalSpec(_Strict):
    """What is generated and measured at every point of the step grid."""

    prompts: list[str] | None = Field(default=None, min_length=1)
    """Validation prompts; `{token}` is the subject's identifier, `{class}` its class token.
    Unset, and without `prompt_template`, means DEFAULT_PROMPTS."""
    prompt_template: PromptTemplateSpec | None = None
    """Draw the validation prompts from a template instead of listing them in `prompts`."""
    negative_prompt: str | None = None
    """Negative prompt for every evaluation image; unset means none."""
    compare_negative: bool = False
    """Also generate every image without `negative_prompt` and log its curves with the suffix
    `/no_negative` (the study found negative prompts raise aesthetics but lower similarity)."""
    images_per_prompt: int = Field(default=4, ge=1)
    """Images generated per prompt, each with its own fixed seed."""
    num_inference_steps: int = Field(default=25, ge=1)
    """Denoising steps per image."""
    guidance_scale: float = Field(default=7.5, ge=0)
    """Classifier-free guidance scale."""
    scheduler: Literal["dpm++", "ddim", "euler", "pndm"] = "dpm++"
    """Sampler used for evaluation images."""
    batch_size: int = Field(default=8, ge=1)
    """Images generated (and encoded) per call."""
    seed: int = 0
    """Seed of the first image; the same seeds are used at every evaluation step."""
    metrics: list[Metric] = Field(
        default=["similarity", "aesthetics", "diversity", "clip_t", "in_domain"], min_length=1
    )
    """Curves to compute at each evaluation step."""
    encoder: Literal["clip", "dino"] = "clip"
    """Image embeddings for `similarity` and `diversity`: CLIP image embeddings (CLIP-I) or
    DINO ViT-S/16's class token (DreamBench's DINO score)."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """CLIP for CLIP-I, `aesthetics`, `clip_t` and zero-shot `in_domain`: a hub id, a local
    folder, or `tiny`."""
    dino_model: str = "facebook/dino-vits16"
    """DINO ViT for `encoder: dino`: a hub id, a local folder, or `tiny`."""
    aesthetics_head: str = LAION_AESTHETIC_HEAD
    """The LAION aesthetic predictor's MLP weights: a URL (downloaded once), a file, or `tiny`.
    Its input width must equal `clip_model`'s embedding width (768 for ViT-L/14)."""
    in_domain: Literal["auto", "face", "zero_shot"] = "auto"
    """How `in_domain` decides: `face` detection (OpenCV Haar cascade), CLIP `zero_shot` against
    `distractor_classes`, or `auto`: `face` when the class token is one of FACE_CLASSES."""
    distractor_classes: list[str] = Field(
        default=["person", "dog", "cat", "car", "building", "tree", "flower", "chair", "food"],
        min_length=1,
    )
    """Zero-shot `in_domain`: the classes an image's own class must beat (the subject's class is
    left out if listed)."""
    fid_reference: Path | None = None
    """`fid`: a folder of reference images the generated images are compared with."""
    fid_features: Literal["inception", "clip", "dino"] = "inception"
    """`fid`: the features, Inception-v3 pool3 (the usual FID; needs torch-fidelity) or the
    CLIP / DINO embeddings of `clip_model` / `dino_model` (un-normalised)."""
    records: bool = True
    """Log a table of every generated image (prompt, phrases, seed, per-image metrics)."""

    @model_validator(mode="before")
    @classmethod
    def _default_prompts(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("prompts") is None
            and data.get("prompt_template") is None
        ):
            return {**data, "prompts": DEFAULT_PROMPTS}
        return data

    @field_validator("prompts")
    @classmethod
    def _known_slots(cls, prompts: list[str] | None) -> list[str] | None:
        for prompt in prompts or []:
            _check_slots(prompt, PROMPT_SLOTS)
        return prompts

    @field_validator("fid_reference")
    @classmethod
    def _resolve_fid_reference(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @model_validator(mode="after")
    def _consistent(self) -> EvalSpec:
        problems = []
        if self.prompt_template is not None and self.prompts is not None:
            problems.append("set eval.prompts or eval.prompt_template, not both")
        if "diversity" in self.metrics and self.images_per_step < 2:
            problems.append("diversity needs at least 2 evaluation images per step")
        if self.compare_negative and self.negative_prompt is None:
            problems.append("eval.compare_negative needs eval.negative_prompt")
        if "fid" in self.metrics and self.fid_reference is None:
            problems.append("metric 'fid' needs eval.fid_reference (a folder of images)")
        repeated = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
        if repeated:
            problems.append(f"eval.metrics: repeated {repeated}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def images_per_step(self) -> int:
        """Images generated per evaluation step and per negative-prompt variant."""
        prompts = self.prompt_template.n_validation if self.prompts is None else len(self.prompts)
        return prompts * self.images_per_prompt


class CollapseSpec(_Strict):
    """When a curve is said to collapse: it falls from its running best by more than `threshold`
    (in scaled units: a fraction of its min–max range)."""

    metrics: list[Metric] = ["aesthetics", "diversity"]
    """Curves watched (those of them that are measured): the study read training degeneration
    from drops of aesthetics and diversity."""
    threshold: float = Field(default=0.2, gt=0, le=1)
    """Drop from the running best, as a fraction of the metric's range, that counts as collapse."""


class EarlyStopSpec(_Strict):
    """Stop a trial early, in its worker (every launcher; the trial counts as finished)."""

    patience: int = Field(ge=1)
    """Evaluations without a better weighted score, with a collapse detected, before stopping."""


class SelectionSpec(_Strict):
    """How the stop step is chosen from the curves."""

    weights: dict[Metric, Annotated[float, Field(ge=0)]] | None = None
    """Weight of each metric in the score; unset means the study's weights for the measured ones."""
    ranges: dict[Metric, tuple[float, float]] = Field(default_factory=lambda: dict(STUDY_RANGES))
    """Min–max range per metric; values are scaled to [0, 1] over it and clipped."""
    collapse: CollapseSpec = CollapseSpec()
    """Collapse detection, reported beside the best step."""
    early_stop: EarlyStopSpec | None = None
    """Stop trials whose score stopped improving and whose curves collapsed; unset means never.
    Not part of a trial's identity: a trial already finished is not resumed to go further."""
    register_best: bool = True
    """Register each subject × method's best checkpoint in the MLflow model registry."""

    @field_validator("ranges")
    @classmethod
    def _ordered(cls, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for metric, (low, high) in ranges.items():
            if not low < high:
                raise ValueError(f"range of {metric} must have min < max, got [{low}, {high}]")
        return ranges

    def weights_for(self, measured: list[str]) -> dict[str, float]:
        """The weights: the spec's, or the study's for the measured metrics."""
        if self.weights is not None:
            return dict(self.weights)
        return {m: STUDY_WEIGHTS[m] for m in measured if m in STUDY_WEIGHTS}

    def collapse_metrics(self, measured: list[str]) -> list[str]:
        return [m for m in self.collapse.metrics if m in measured]


class LocalLauncherSpec(_Strict):
    """Run trials as worker processes on this machine."""

    kind: Literal["local"] = "local"
    max_parallel: int = Field(default=1, ge=1)
    """Trials run at once."""
    processes_per_trial: int = Field(default=1, ge=1)
    """Processes per trial (`accelerate launch --num_processes`), e.g. one per GPU."""


SLURM_TYPED_SBATCH = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time_min",
    "nodes": "nodes",
    "gpus-per-node": "gpus_per_node",
    "cpus-per-task": "cpus_per_task",
    "mem": "mem_gb",
    "array": "array_parallelism",
    "signal": "signal_delay_s",
    "requeue": "requeue",
    "no-requeue": "requeue",
    "ntasks-per-node": "(one task per node, always)",
}
"""sbatch options that have a typed field (or are set by dreamsweep): refused in `sbatch`."""


class SlurmLauncherSpec(_Strict):
    """Submit the sweep as one SLURM job array through submitit; `dreamsweep run` returns after
    submitting. Each array task is one trial, on `nodes` nodes."""

    kind: Literal["slurm"]
    partition: str | None = None
    """Partition (`--partition`); unset means the cluster's default."""
    account: str | None = None
    """Account to charge (`--account`)."""
    qos: str | None = None
    """Quality of service (`--qos`)."""
    time_min: int = Field(default=60, ge=1)
    """Time limit of each trial's job, in minutes; a trial that needs longer is checkpointed
    before the limit and requeued."""
    nodes: int = Field(default=1, ge=1)
    """Nodes per trial: one task per node, each starting `processes_per_node` processes."""
    processes_per_node: int = Field(default=1, ge=1)
    """Training processes per node (one per GPU)."""
    gpus_per_node: int = Field(default=0, ge=0)
    """GPUs per node (`--gpus-per-node`)."""
    cpus_per_task: int = Field(default=1, ge=1)
    """CPUs per node-task (`--cpus-per-task`)."""
    mem_gb: float | None = Field(default=None, gt=0)
    """Memory per node in GB (`--mem`); unset means the partition's default."""
    array_parallelism: int = Field(default=16, ge=1)
    """Trials running at once (`--array=…%N`)."""
    signal_delay_s: int = Field(default=120, ge=10)
    """Seconds before the time limit that SLURM signals the trial to checkpoint and requeue (it
    may come up to 60 s earlier)."""
    max_requeues: int = Field(default=3, ge=0)
    """Requeues per trial after time limits or preemption."""
    requeue: bool = True
    """When a node of a trial's job fails, SLURM puts the job back in the queue (`--requeue`)
    and it resumes from the trial's last checkpoint into the same MLflow run, once enough nodes
    answer. False (`--no-requeue`): the job ends, its run FAILED; `dreamsweep run` resumes it."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run in the job before the trial (e.g. `module load cuda`)."""
    sbatch: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra `#SBATCH` options without the leading dashes, e.g. `{constraint: a100}`."""

    @field_validator("sbatch")
    @classmethod
    def _not_typed(cls, sbatch: dict[str, Any]) -> dict[str, Any]:
        typed = {k: SLURM_TYPED_SBATCH[k] for k in sbatch if k in SLURM_TYPED_SBATCH}
        if typed:
            raise ValueError(
                "these options have their own fields; set them there instead: "
                + ", ".join(f"{k} → launcher.{v}" for k, v in sorted(typed.items()))
            )
        return sbatch


class FifoSchedulerSpec(_Strict):
    """Every trial runs to `grid.max_steps` (the plain grid)."""

    kind: Literal["fifo"] = "fifo"


class AshaSchedulerSpec(_Strict):
    """Asynchronous successive halving on the weighted score (mode max): at each rung (grace
    period × reduction factor^k steps) a trial goes on only if its score is in the top
    1/reduction_factor of the scores recorded there. It cannot foresee a later collapse: the stop
    step still comes from `dreamsweep select` on the curves logged."""

    kind: Literal["asha"]
    grace_period: int | None = Field(default=None, ge=1)
    """Training steps before a trial can be stopped; unset means `grid.eval_every`."""
    reduction_factor: float = Field(default=2.0, gt=1)
    """Keep the top 1/reduction_factor at each rung."""
    max_t: int | None = Field(default=None, ge=1)
    """Training steps after which no trial goes on; unset means `grid.max_steps`."""


class MedianSchedulerSpec(_Strict):
    """Stop a trial whose best score so far is below the median of the other trials' running
    means at the same step."""

    kind: Literal["median"]
    grace_period: int | None = Field(default=None, ge=1)
    """Training steps before a trial can be stopped; unset means `grid.eval_every`."""
    min_samples_required: int = Field(default=3, ge=1)
    """Other trials that must have reached the step before the rule decides."""


class RayLauncherSpec(_Strict):
    """Run the grid as a Ray Tune experiment: one trial per grid point, each a function trainable
    that runs the project's worker; the scheduler may stop weak trials early. `dreamsweep run`
    waits for the experiment and, run again after an interruption, restores it."""

    kind: Literal["ray"]
    address: str | None = None
    """Ray cluster to join: `auto` (the cluster this node belongs to, e.g. started by
    cluster/ray_on_slurm.sh), `ray://host:10001`, or `host:6379`; unset means a Ray instance
    started on this machine for the sweep (or RAY_ADDRESS when set)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each trial."""
    gpus_per_trial: float = Field(default=0.0, ge=0)
    """GPUs Ray reserves for each trial (Ray sets CUDA_VISIBLE_DEVICES to them)."""
    processes_per_trial: int = Field(default=1, ge=1)
    """Training processes per trial on its node (torchrun; one per reserved GPU)."""
    max_concurrent_trials: int | None = Field(default=None, ge=1)
    """Trials running at once; unset means as many as the resources allow."""
    scheduler: Annotated[
        FifoSchedulerSpec | AshaSchedulerSpec | MedianSchedulerSpec, Field(discriminator="kind")
    ] = FifoSchedulerSpec()
    """`fifo` (plain grid), `asha` or `median` (stop weak trials early on the weighted score)."""
    max_failures: int = Field(default=2, ge=0)
    """Retries of a failed trial (a crash, a lost node), each from its last checkpoint."""
    keep_checkpoints: int = Field(default=1, ge=1)
    """Checkpoints Ray keeps per trial in its storage (the newest is what a retry resumes)."""

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value


class TrackingSpec(_Strict):
    """Where curves, images and checkpoints are recorded."""

    uri: str | None = None
    """MLflow tracking URI; unset means a SQLite file `mlflow.db` in the output folder."""
    experiment: str | None = None
    """MLflow experiment name; unset means the sweep's name."""


class SweepSpec(_Strict):
    """A sweep: subjects × methods × grid, trained, evaluated, tracked and selected."""

    name: str
    """Sweep name: letters, digits, `_`, `.`, `-`."""
    base_model: str
    """Diffusers Stable Diffusion weights: a hub id, a local folder, or `tiny` (built offline)."""
    output_dir: Path | None = None
    """Where checkpoints, logs and the default MLflow store go; unset means `runs/<name>` beside
    the spec file."""
    subjects: list[SubjectSpec] = Field(min_length=1)
    methods: MethodsSpec = MethodsSpec(lora=LoRASpec())
    """The methods to compare: a list of names, or a mapping of name → options."""
    grid: GridSpec
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    selection: SelectionSpec = SelectionSpec()
    launcher: Annotated[
        LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, Field(discriminator="kind")
    ] = LocalLauncherSpec()
    """Where trials run: `local` (worker processes here), `slurm` (a job array) or `ray` (a Ray
    Tune experiment)."""
    tracking: TrackingSpec = TrackingSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return SubjectSpec._safe_name(name)

    @model_validator(mode="before")
    @classmethod
    def _default_output_dir(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("output_dir") is None
            and isinstance(data.get("name"), str)
        ):
            return {**data, "output_dir": f"runs/{data['name']}"}
        return data

    @field_validator("launcher", mode="before")
    @classmethod
    def _launcher_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @field_validator("base_model")
    @classmethod
    def _local_or_hub(cls, base_model: str, info: ValidationInfo) -> str:
        if base_model == TINY:
            return base_model
        if base_model.startswith((".", "/", "~")):
            path = _resolve(Path(base_model), info)
            if not path.is_dir():
                raise ValueError(f"local model folder {str(path)!r} does not exist")
            return str(path)
        return base_model

    @field_validator("output_dir")
    @classmethod
    def _resolve_output(cls, output_dir: Path | None, info: ValidationInfo) -> Path | None:
        return None if output_dir is None else _resolve(output_dir, info)

    @model_validator(mode="after")
    def _cross_checks(self) -> SweepSpec:
        problems = []
        names = [s.name for s in self.subjects]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"subjects: names must be unique, repeated: {duplicates}")
        if self.selection.weights is not None:
            unmeasured = sorted(set(self.selection.weights) - set(self.eval.metrics))
            if unmeasured:
                problems.append(
                    f"selection.weights: {unmeasured} not in eval.metrics {self.eval.metrics}"
                )
            if "fid" in self.selection.weights:
                problems.append(
                    "selection.weights: 'fid' cannot be weighted (lower is better and it has no "
                    f"fixed range); weight any of {list(SELECTABLE_METRICS)}"
                )
            if not any(self.selection.weights.values()):
                problems.append("selection.weights: at least one weight must be > 0")
        elif not self.selection_weights:
            problems.append(
                f"selection.weights: the default weights {STUDY_WEIGHTS} cover none of "
                f"eval.metrics {self.eval.metrics}; set selection.weights"
            )
        if self.train.optimizer == "adamw8bit" and self.train.deepspeed is not None:
            problems.append(
                "train.optimizer: 'adamw8bit' cannot be combined with train.deepspeed (DeepSpeed "
                "runs its own optimizer); use optimizer: adamw with deepspeed, or drop deepspeed"
            )
        if self.train.deepspeed is not None:
            # Accelerate drives one DeepSpeed engine per trial: one trained module.
            both = [n for n, o in self.methods.enabled if getattr(o, "train_text_encoder", False)]
            if both:
                problems.append(
                    f"train.deepspeed: methods {both} train the UNet and the text encoder, and "
                    "DeepSpeed trains one model per trial; set train_text_encoder: false"
                )
        watched = {*self.selection_weights, *self.selection.collapse_metrics(self.eval.metrics)}
        missing_ranges = sorted(watched - set(self.selection.ranges))
        if missing_ranges:
            problems.append(
                f"selection.ranges: no range for weighted or watched metric(s) {missing_ranges}"
            )
        if self.launcher.kind == "ray" and self.launcher.scheduler.kind != "fifo":
            problems.extend(self._scheduler_problems(self.launcher.scheduler))
        if "fid" in self.selection.collapse.metrics:
            problems.append(
                "selection.collapse.metrics: 'fid' is lower-is-better; it cannot collapse"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _scheduler_problems(self, scheduler: AshaSchedulerSpec | MedianSchedulerSpec) -> list[str]:
        problems, field = [], "launcher.scheduler"
        max_t = getattr(scheduler, "max_t", None)
        if max_t is not None and max_t > self.grid.max_steps:
            problems.append(
                f"{field}.max_t: {max_t} is beyond grid.max_steps ({self.grid.max_steps})"
            )
        horizon = max_t or self.grid.max_steps
        if scheduler.grace_period is not None and scheduler.grace_period >= horizon:
            problems.append(
                f"{field}.grace_period: {scheduler.grace_period} must be below max_t or "
                f"grid.max_steps ({horizon}): no trial could be stopped"
            )
        return problems

    # Derived values: computed here so no caller re-implements a default.
    @property
    def resolved_output_dir(self) -> Path:
        assert self.output_dir is not None, "set by _default_output_dir"
        return self.output_dir

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri is not None:
            return self.tracking.uri
        return f"sqlite:///{self.resolved_output_dir / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def selection_weights(self) -> dict[str, float]:
        return self.selection.weights_for(self.eval.metrics)


def subject_image_files(folder: Path) -> list[Path]:
    """The subject's files in name order (dotfiles such as `.DS_Store` are not images)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def check_subject_files(spec: SweepSpec) -> list[str]:
    """Problems with the image folders the spec points at (every one, not just the first)."""
    problems = []
    needed = max(spec.grid.num_images)
    for index, subject in enumerate(spec.subjects):
        field = f"subjects[{index}].images"
        if not subject.images.is_dir():
            problems.append(f"{field}: folder {str(subject.images)!r} does not exist")
            continue
        files = subject_image_files(subject.images)
        if not files:
            problems.append(f"{field}: folder {str(subject.images)!r} has no images")
            continue
        for path in files:
            reason = image_problem(path)
            if reason:
                problems.append(f"{field}: {str(path)!r} is {reason}")
        if len(files) < needed:
            problems.append(
                f"{field}: folder {str(subject.images)!r} has {len(files)} image(s) but "
                f"grid.num_images asks for up to {needed}"
            )
    return problems


def check_eval_files(spec: SweepSpec) -> list[str]:
    """Problems with the prompt template and FID reference folder the spec points at."""
    from contract.prompts import PromptTemplateError, load_template

    problems = []
    template_spec = spec.eval.prompt_template
    if template_spec is not None:
        try:
            template = load_template(template_spec.template)
        except PromptTemplateError as err:
            problems.append(f"eval.prompt_template.template: {err}")
        else:
            if template_spec.n_validation > template.combinations:
                problems.append(
                    f"eval.prompt_template.n_validation: {template_spec.n_validation} prompts "
                    f"asked, but {str(template_spec.template)!r} has only "
                    f"{template.combinations} phrase combinations"
                )
    folder = spec.eval.fid_reference
    if folder is not None:
        if not folder.is_dir():
            problems.append(f"eval.fid_reference: folder {str(folder)!r} does not exist")
        else:
            files = subject_image_files(folder)
            if len(files) < 2:
                problems.append(
                    f"eval.fid_reference: folder {str(folder)!r} has {len(files)} image(s); "
                    "FID needs at least 2"
                )
            for path in files:
                reason = image_problem(path)
                if reason:
                    problems.append(f"eval.fid_reference: {str(path)!r} is {reason}")
    return problems


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the model found at `loc` (the parent of an unknown key)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = field.annotation
        while get_origin(current) is not None:  # list[X], X | None
            args = [a for a in get_args(current) if a is not type(None)]
            current = next(
                (a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0]
            )
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


# Keys of earlier releases, and where they live now.
MOVED_KEYS = {
    "grid.learning_rate": "methods.<method>.learning_rate",
    "train.lora_rank": "methods.lora.rank",
    "train.lora_alpha": "methods.lora.alpha",
    "eval.image_encoder": "eval.clip_model",
}


SCHEDULERS: dict[str, type[BaseModel]] = {
    "fifo": FifoSchedulerSpec,
    "asha": AshaSchedulerSpec,
    "median": MedianSchedulerSpec,
}
LAUNCHERS: dict[str, type[BaseModel]] = {
    "local": LocalLauncherSpec,
    "slurm": SlurmLauncherSpec,
    "ray": RayLauncherSpec,
}


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    launcher = None
    if len(loc) >= 2 and loc[0] == "launcher" and loc[1] in LAUNCHERS:
        # pydantic puts the union's tag in the location: launcher.slurm.nodes → launcher.nodes
        launcher, loc = LAUNCHERS[loc[1]], (loc[0], *loc[2:])
        if len(loc) >= 3 and loc[1] == "scheduler" and loc[2] in SCHEDULERS:
            launcher, loc = SCHEDULERS[loc[2]], (*loc[:2], *loc[3:])
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        if launcher is not None and len(loc) == (3 if loc[1] == "scheduler" else 2):
            allowed = list(launcher.model_fields)
        else:
            allowed = _allowed_keys(SweepSpec, loc[:-1]) or []
        moved = MOVED_KEYS.get(field)
        hint = f" (it moved to {moved})" if moved else ""
        return f"{field or '<top>'}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    value = error.get("input")
    if isinstance(value, dict):  # a check across fields: the message names them
        return f"{field or '<top>'}: {message}"
    shown = repr(value) if len(repr(value)) < 120 else repr(value)[:117] + "..."
    return f"{field or '<top>'}: {message} (got {shown})"


def parse_spec(data: Any, *, source: str, base_dir: Path) -> SweepSpec:
    """Validate already-parsed YAML; raises `SpecError` listing every schema problem."""
    if not isinstance(data, dict):
        raise SpecError(source, [f"<top>: expected a mapping of fields, got {type(data).__name__}"])
    try:
        return SweepSpec.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise SpecError(source, [_describe(e) for e in err.errors()]) from None


def load_spec(path: str | Path, *, check_files: bool = True) -> SweepSpec:
    """Load, validate and resolve a sweep spec; raises `SpecError` before any work starts."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(source, [f"cannot read the file: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        raise SpecError(
            source, [f"not valid YAML: the file is not UTF-8 text (byte {err.start}: {err.reason})"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(source, [f"not valid YAML: {err}"]) from None
    spec = parse_spec(data, source=source, base_dir=path.resolve().parent)
    if check_files:
        problems = check_subject_files(spec) + check_eval_files(spec)
        if problems:
            raise SpecError(source, problems)
    return spec
