"""The training sections of the sweep spec: subjects, the grid, the methods and their options,
prior preservation, DeepSpeed, checkpoints and `TrainSpec`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from contract.families import BUILTIN_MODELS, check_folder, family_of_folder
from contract.spec.base import SAFE_NAME, _check_slots, _folder_problem, _resolve, _Strict
from contract.toy_models import TOY, toy_model_problem

MixedPrecision = Literal["no", "fp16", "bf16"]
LearningRates = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]
Method = Literal["dreambooth", "lora", "textual_inversion"]


class BaseModelSpec(_Strict):
    """One base model of the sweep (`base_model` takes one, or a list: a grid axis like
    `seed`), and what its trials train differently from `train`. In YAML an id alone, or a
    mapping such as `{id: tiny-sdxl, resolution: 64, mixed_precision: bf16}`."""

    id: str
    """Diffusers weights: a hub id, a local pipeline folder (its family read from its configs),
    a random-init toy model built offline on first use (`tiny`, `tiny-sd2`, `tiny-sdxl`), or
    `toy`: the toy world's pretrained pipeline (64 px; `contract.toy_models`)."""
    resolution: int | None = Field(default=None, ge=8, multiple_of=8)
    """Training resolution of this model's trials; unset: `train.resolution` when the spec sets
    it, else a folder's family's native resolution (SD 1.x 512, SD 2.x 512 or 768 for
    v-prediction, SDXL 1024), 64 for `toy`, `tiny-sd2` and `tiny-sdxl`, else (a hub id,
    `tiny`) `train.resolution`'s default."""
    mixed_precision: MixedPrecision | None = None
    """Precision of this model's trials; unset: `train.mixed_precision`."""

    @model_validator(mode="before")
    @classmethod
    def _id_alone(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("id")
    @classmethod
    def _local_or_hub(cls, model: str, info: ValidationInfo) -> str:
        if model == TOY and (problem := toy_model_problem("base_model")):
            raise ValueError(problem)
        if model in BUILTIN_MODELS or not model.startswith((".", "/", "~")):
            return model  # a hub id: its family is not knowable offline
        path = _resolve(Path(model), info)
        problem = _folder_problem(path)
        if problem:
            raise ValueError(f"local model {problem}")
        # Every config validation reads: a folder without one fails here, on this entry's id.
        check_folder(path)  # raises UnsupportedModel (a ValueError) naming what it found
        return str(path)

    @property
    def is_folder(self) -> bool:
        return self.id not in BUILTIN_MODELS and Path(self.id).is_absolute()

    @property
    def family(self) -> str | None:
        """`sd1`, `sd2` or `sdxl` for a built-in model or a folder; None for a hub id."""
        if self.id in BUILTIN_MODELS:
            return BUILTIN_MODELS[self.id]
        return family_of_folder(Path(self.id)) if self.is_folder else None


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

    learning_rate: LearningRates = Field(default=[5e-6])
    """Learning rates to try (diffusers' train_dreambooth.py uses 5e-6)."""
    train_text_encoder: bool = False
    """Also fine-tune the whole text encoder."""
    prior_preservation: bool = True
    """Add the class loss on generated class images (settings in `train.prior`)."""


class LoRASpec(_Strict):
    """Low-rank adapters on the UNet's attention (and optionally the text encoder's)."""

    learning_rate: LearningRates = Field(default=[1e-4])
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

    learning_rate: LearningRates = Field(default=[5e-4])
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

    @model_serializer(mode="wrap")
    def _only_chosen(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A method left out is not written as `name: null`: in YAML that chooses it.
        return {name: options for name, options in handler(self).items() if options is not None}

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


LoRAFormat = Literal["diffusers", "kohya"]


class ExportSpec(_Strict):
    """The formats trained weights are saved in, beside the checkpoint's own."""

    lora_format: list[LoRAFormat] = Field(default=["diffusers"], min_length=1)
    """LoRA files each checkpoint gets: `diffusers` (`pytorch_lora_weights.safetensors`, what
    `load_lora_weights` reads; always listed: evaluation loads it) and optionally `kohya`
    (`lora_unet_…`/`lora_te_…` keys, what ComfyUI and AUTOMATIC1111 load). The format does not
    change training: not part of a trial's id."""

    @field_validator("lora_format")
    @classmethod
    def _diffusers_once_each(cls, formats: list[str]) -> list[str]:
        repeated = sorted({f for f in formats if formats.count(f) > 1})
        if repeated:
            raise ValueError(f"formats are listed more than once: {repeated}")
        if "diffusers" not in formats:
            # Evaluation and `load_trained_pipeline` load diffusers' file: it is always written.
            raise ValueError(
                "'diffusers' is left out, the file evaluation and load_trained_pipeline "
                "load; list it, e.g. [diffusers, kohya]"
            )
        return formats


# TrainSpec fields that say how the steps run, not what trains (the same trajectory to rounding):
# outside a trial's id (contract/trial.py), so no search axis either (contract/spec/search.py).
EXECUTION_ONLY_FIELDS = ("compile", "compile_mode")


class TrainSpec(_Strict):
    """How each trajectory trains."""

    resolution: int = Field(default=512, ge=8, multiple_of=8)
    """Square training resolution in pixels (images are resized and centre-cropped)."""
    batch_size: int = Field(default=1, ge=1)
    """Images per micro-batch, per process (with prior preservation, as many class images too)."""
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    mixed_precision: MixedPrecision = "no"
    """Precision of the frozen weights and forward passes; trained weights stay fp32. fp16 needs
    a GPU (Accelerate autocasts and scales fp16 only there): refused on a machine without one;
    bf16 runs on CPUs too."""
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
    compile: Literal["no", "inductor", "aot_eager"] = "no"
    """`torch.compile` backend for the trained modules' training passes (Accelerate's
    `dynamo_backend`; evaluation stays eager). `inductor` fuses kernels: faster steps after a
    one-off compilation per architecture and process (minutes on a CPU, cached on disk for the
    next trial on the machine); `aot_eager` traces without generating code (to check a setup
    compiles)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """Inductor's mode: `reduce-overhead` replays CUDA graphs (a GPU's launch-bound small
    steps), `max-autotune` also tunes kernels (a longer compilation)."""
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

    @field_validator("compile", mode="before")
    @classmethod
    def _unquoted_no(cls, value: object) -> object:
        # YAML 1.1 reads an unquoted `compile: no` as false: it means "no".
        return "no" if value is False else value
