"""The evaluation section of the sweep spec: `EvalSpec`, its prompt template and its defaults
(the default prompts, the face classes, the LAION aesthetic head)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from contract.spec.base import PROMPT_SLOTS, TINY, Metric, _check_slots, _resolve, _Strict
from contract.toy_models import TOY, toy_model_problem

FACE_CLASSES = frozenset(
    {"man", "woman", "person", "boy", "girl", "child", "kid", "baby", "face", "people"}
)
LAION_AESTHETIC_HEAD = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac+logos+ava1-l14-linearMSE.pth"
)
INCEPTION_WEIGHTS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
"""torch-fidelity's Inception-v3 for FID and KID (the TensorFlow FID network, converted)."""
FID_MIN_IMAGES = 2048
"""FID's usual minimum of images per step (the width of Inception's features): below it FID is
biased upwards and noisy, on any features."""
DEFAULT_PROMPTS = [
    "a photo of {token} {class}",
    "a {token} {class} on the beach",
    "a painting of {token} {class} in the style of van gogh",
    "a {token} {class} in the snow",
]


def is_url(source: str) -> bool:
    """A weights source to download (http or https), rather than a file or `tiny`."""
    return source.startswith(("http://", "https://"))


class PromptTemplateSpec(_Strict):
    """Validation prompts drawn from a prompt template (shipped: `configs/prompts/`)."""

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
    folder, `tiny` (random init), or `toy` (trained on the toy world: `contract.toy_models`)."""
    dino_model: str = "facebook/dino-vits16"
    """DINO ViT for `encoder: dino`: a hub id, a local folder, or `tiny`."""
    aesthetics_head: str = LAION_AESTHETIC_HEAD
    """The LAION aesthetic predictor's MLP weights (`sac+logos+ava1-l14-linearMSE.pth`): a URL
    (downloaded once), a file (relative to the spec), `tiny`, or `toy` (the head trained on the
    toy CLIP, for `clip_model: toy`). Its input width must equal `clip_model`'s embedding width
    (768 for ViT-L/14)."""
    oracle_model: str = TOY
    """`oracle` (toy world only): the attribute classifier that judges each image against the
    world's ground truth, `toy` (the committed one) or a safetensors file of its layout."""
    in_domain: Literal["auto", "face", "zero_shot"] = "auto"
    """How `in_domain` decides: `face` detection (dlib's HOG detector when `dreamsweep[faces]` is
    installed, else OpenCV's Haar cascade; the trial records which ran), CLIP `zero_shot` against
    `distractor_classes`, or `auto`: `face` when the class token is one of FACE_CLASSES."""
    distractor_classes: list[str] = Field(
        default=["person", "dog", "cat", "car", "building", "tree", "flower", "chair", "food"],
        min_length=1,
    )
    """Zero-shot `in_domain`: the classes an image's own class must beat (the subject's class is
    left out if listed)."""
    fid_reference: Path | None = None
    """`fid`, `kid`: a folder of reference images the generated images are compared with."""
    fid_features: Literal["inception", "clip", "dino"] = "inception"
    """`fid`, `kid`: the features, Inception-v3 pool3 (the usual FID, weights from
    `fid_weights`) or the CLIP / DINO embeddings of `clip_model` / `dino_model`
    (un-normalised)."""
    fid_weights: str = INCEPTION_WEIGHTS
    """`fid_features: inception`: torch-fidelity's Inception-v3 state dict
    (`weights-inception-2015-12-05-6726825d.pth`), a file (relative to the spec; runs offline)
    or a URL (downloaded once to the cache)."""
    kid_subsets: int = Field(default=100, ge=1)
    """`kid`: the number of random subsets KID is averaged over (torchmetrics' default)."""
    kid_subset_size: int = Field(default=1000, ge=2)
    """`kid`: images per subset (torchmetrics' default), capped at the smaller of the variant's
    images and the reference images."""
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

    @field_validator("fid_weights", "aesthetics_head", "oracle_model")
    @classmethod
    def _resolve_weights_file(cls, source: str, info: ValidationInfo) -> str:
        # A string still: trial configs travel to workers as JSON.
        if source in (TINY, TOY) or is_url(source):
            return source
        return str(_resolve(Path(source), info))

    @model_validator(mode="after")
    def _consistent(self) -> EvalSpec:
        problems = []
        if self.prompt_template is not None and self.prompts is not None:
            problems.append("set eval.prompts or eval.prompt_template, not both")
        if "diversity" in self.metrics and self.images_per_step < 2:
            problems.append("diversity needs at least 2 evaluation images per step")
        if self.compare_negative and self.negative_prompt is None:
            problems.append("eval.compare_negative needs eval.negative_prompt")
        for metric in ("fid", "kid"):
            if metric in self.metrics and self.fid_reference is None:
                problems.append(f"metric {metric!r} needs eval.fid_reference (a folder of images)")
            if metric in self.metrics and self.images_per_step < 2:
                problems.append(f"{metric} needs at least 2 evaluation images per step")
        if self.fid_weights in (TINY, TOY):
            problems.append(
                f"eval.fid_weights: no `{self.fid_weights}` Inception; give a file or a URL"
            )
        if self.oracle_model == TINY or is_url(self.oracle_model):
            problems.append(
                f"eval.oracle_model: {self.oracle_model!r}; the oracle is `toy` or a file"
            )
        problems += self.toy_problems()
        repeated = sorted({m for m in self.metrics if self.metrics.count(m) > 1})
        if repeated:
            problems.append(f"eval.metrics: repeated {repeated}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def weights_sources(self) -> dict[str, str]:
        """`eval.<field>` → the weights file or URL that the chosen metrics load (not `tiny`)."""
        sources = {}
        if self.fid_features == "inception" and {"fid", "kid"} & set(self.metrics):
            sources["eval.fid_weights"] = self.fid_weights
        if "aesthetics" in self.metrics and self.aesthetics_head not in (TINY, TOY):
            sources["eval.aesthetics_head"] = self.aesthetics_head
        if "oracle" in self.metrics and self.oracle_model != TOY:
            sources["eval.oracle_model"] = self.oracle_model
        return sources

    def toy_problems(self) -> list[str]:
        """Why a `toy` model this section uses cannot be found here (none when all can)."""
        used = {
            "clip_model": self.clip_model == TOY,
            "aesthetics_head": self.aesthetics_head == TOY and "aesthetics" in self.metrics,
            "oracle_model": self.oracle_model == TOY and "oracle" in self.metrics,
        }
        found = {field: toy_model_problem(field) for field, toy in used.items() if toy}
        return [f"eval.{field}: {problem}" for field, problem in found.items() if problem]

    @property
    def images_per_step(self) -> int:
        """Images generated per evaluation step and per negative-prompt variant."""
        prompts = self.prompt_template.n_validation if self.prompts is None else len(self.prompts)
        return prompts * self.images_per_prompt
