"""How a sweep is laid out in MLflow, defined once: every name a stage writes or reads.

One experiment per sweep (`SweepSpec.experiment_name`), a parent run per sweep (role `sweep`),
a child run per trial (role `trial`, tagged with its trial id). Launchers, workers, selection
and the report use these names only through this module, so renaming one is one edit. Plain
strings, no MLflow import: the contract stays importable without heavy dependencies.
"""

from __future__ import annotations

# Tags of every dreamsweep run.
TAG_ROLE = "dreamsweep.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
TAG_SWEEP = "dreamsweep.sweep"
TAG_TRIAL = "dreamsweep.trial_id"

# Tags a trial's worker writes.
TAG_CHECKPOINT = "dreamsweep.checkpoint.step_{step:06d}"
"""A checkpoint's folder, one tag per kept step (removed when retention deletes it)."""
TAG_ERROR = "dreamsweep.error"
TAG_RESUMED_AFTER_ERROR = "dreamsweep.resumed_after_error"
"""The error of the attempt this run resumed after (history; no longer the run's error)."""
TAG_RESUMED_FROM_STEP = "dreamsweep.resumed_from_step"
TAG_SETUP_PREFIX = "dreamsweep.setup."
"""What is really on (dtypes, optimizer, kernels, threads): `dreamsweep.setup.<key>`."""
SETUP_FACE_DETECTOR = "face_detector"
TAG_FACE_DETECTOR = f"{TAG_SETUP_PREFIX}{SETUP_FACE_DETECTOR}"
"""The face detector in_domain and identity ran: `dlib_hog`, `dlib_mmod` or `opencv_haar`
(dlib when installed, the Haar cascade otherwise)."""
SETUP_ORACLE_SUBJECT = "oracle_subject"
"""Which toy-world subject the `oracle` judged the trial's images against (and how well the
subject's own images match it)."""
TAG_PAUSED = "dreamsweep.paused_at_step"
"""Checkpointed and stopped by the scheduler's signal, to be requeued."""
TAG_EARLY_STOP_STEP = "dreamsweep.early_stop.step"
TAG_EARLY_STOP_REASON = "dreamsweep.early_stop.reason"
TAG_PRUNED = "dreamsweep.pruned"
"""An Optuna pruner stopped the trial at this step (it also carries the early-stop tags)."""
TAG_OPTUNA_STUDY = "dreamsweep.optuna.study"
TAG_OPTUNA_TRIAL = "dreamsweep.optuna.trial"
"""A sampled trial's Optuna study and trial number (`search.kind: optuna`)."""

# Tags and metrics `dreamsweep select` writes to a trial's run, and the registry's tags.
TAG_SELECTION_WEIGHTS = "dreamsweep.selection_weights"
TAG_BEST_CHECKPOINT = "dreamsweep.best_checkpoint"
TAG_COLLAPSE = "dreamsweep.collapse"
METRIC_BEST_STEP = "best_step"
METRIC_BEST_SCORE = "best_score"
METRIC_COLLAPSE_STEP = "collapse_step"
BEST_ALIAS = "best"
"""The registered model's alias of the best checkpoint: `models:/<name>@best`."""

# Params. A trial's run holds its config's fields (also `method.<option>`, `train.<field>`,
# `eval.<field>`); these are the ones read back. The parent run holds the grid's size.
PARAM_SUBJECT = "subject"
PARAM_CLASS_TOKEN = "class_token"
PARAM_METHOD = "method"
PARAM_NUM_IMAGES = "num_images"
PARAM_OUTPUT_DIR = "output_dir"
"""The trial's folder (checkpoints, worker log, claim, journal)."""
PARAM_BASE_MODEL = "base_model"
PARAM_IDENTIFIER = "identifier"
"""The subject's identifier (DreamBooth, LoRA): an inference study's prompt token."""


def method_param(option: str) -> str:
    """A trial run's param of one method option: `method.<option>`."""
    return f"method.{option}"


PARAM_PLACEHOLDER_TOKEN = method_param("placeholder_token")
"""Textual inversion's token pattern (`<{subject}>`): formatted with the subject."""
PARAM_TRIALS = "trials"

# Tags of a registered model version: which trial's step it is, and its score.
VERSION_TAG_TRIAL_ID = "trial_id"
VERSION_TAG_TRIAL = "trial"
VERSION_TAG_STEP = "step"
VERSION_TAG_SCORE = "score"

# Curves a trial logs (evaluation metrics are logged under their own names).
METRIC_LOSS = "loss"
METRIC_LR = "lr"
METRIC_EVAL_SECONDS = "eval_seconds"
NO_NEGATIVE = "no_negative"
"""The variant generated without `eval.negative_prompt`: its curves are `<metric>/no_negative`."""

# Artifacts of a trial's run.
EVAL_PROMPTS_FILE = "eval_prompts.json"
RECORDS_DIR = "records"
"""Per-image records, one JSON table (mlflow.load_table's layout) per evaluated step."""


def records_file(step: int) -> str:
    return f"{RECORDS_DIR}/step_{step:06d}.json"


def samples_file(step: int) -> str:
    """The grid of an evaluation's sample images."""
    return f"samples/step_{step:06d}.png"


def no_negative_key(metric: str) -> str:
    return f"{metric}/{NO_NEGATIVE}"


def search_best_score(study: str) -> str:
    """The parent run's metric of a search group's best score so far (step: trials told)."""
    return f"search.{study}.best_score"


def search_best_tag(study: str, field: str) -> str:
    """The parent run's tag of a search group's best trial: `trial_id`, `number`, or a
    sampled field's spec path."""
    return f"dreamsweep.search.{study}.best.{field}"


def search_best_file(study: str) -> str:
    """The parent run's artifact of a search group's best trial (params, score, trial id)."""
    return f"search/{study}.json"


def registered_model_name(
    sweep: str, subject: str, method: str, base_model: str | None = None
) -> str:
    """The registry's model of a subject × method's best checkpoint; with `base_model` (a sweep
    that compares several), of a subject × method × base model's (`…<method>.<model name>`)."""
    name = f"{sweep}.{subject}.{method}"
    return name if base_model is None else f"{name}.{model_short_name(base_model)}"


def model_short_name(base_model: str) -> str:
    """A base model's name in labels and registered model names: a folder's name (a spec's
    folders are absolute), a hub id with `--` for `/` (MLflow's names allow no `/` or `:`)."""
    if base_model.startswith("/"):
        return base_model.rstrip("/").rsplit("/", 1)[-1]
    return base_model.replace("/", "--").replace(":", "-")


# Inference studies (`kind: inference`): one experiment per study, a parent run (role
# `inference_study`), a child run per combination (model × scheduler × steps × guidance ×
# negative prompt; role `combination`, tagged with its combination id).
ROLE_INFERENCE_STUDY = "inference_study"
ROLE_COMBINATION = "combination"
TAG_COMBINATION = "dreamsweep.combination_id"
TAG_PROMPTS_DIGEST = "dreamsweep.prompts_digest"
"""On a combination's run: the prompt set its metrics are over (`contract.inference.
prompts_digest`); the same combination over more prompts is another run."""
TAG_SCORING_DIGEST = "dreamsweep.scoring_digest"
"""On a combination's run: the metrics and settings its scores are from (`contract.inference.
scoring_digest`); other metrics, references or encoders are another run, of the same images."""
PARAM_MODEL = "model"
"""The model entry's label (`tiny`, a folder's name, `models:/<name>@best`, …)."""
PARAM_SCHEDULER = "scheduler"
"""The scheduler entry's `label`, else its `name` as the spec gave it (a short name such as
`euler_a`, or a diffusers class name); the class is `PARAM_SCHEDULER_CLASS`."""
PARAM_SCHEDULER_CLASS = "scheduler.class"
PARAM_SCHEDULER_CONFIG = "scheduler.config"
"""The scheduler's config overrides (a dict, as text)."""
PARAM_MODEL_IDENTITY = "model.identity"
"""`<trial id>@<step>` for a checkpoint, the base model's id otherwise."""
PARAM_NEGATIVE_PROMPT_TEXT = "negative_prompt_text"
PARAM_RESOLUTION = "resolution"
PARAM_DTYPE = "dtype"
PARAM_SEED = "seed"
PARAM_INFERENCE_STEPS = "num_inference_steps"
PARAM_GUIDANCE_SCALE = "guidance_scale"
PARAM_NEGATIVE_PROMPT = "negative_prompt"
"""The negative prompt's name in the spec, or `NO_NEGATIVE_PROMPT`."""
NO_NEGATIVE_PROMPT = "none"
PARAM_COMBINATIONS = "combinations"
"""The parent run's number of combinations when it was created (a param never changes: the
current number is `METRIC_COMBINATIONS`, the current ids `STUDY_COMBINATIONS_FILE`)."""
METRIC_COMBINATIONS = "combinations"
"""The parent run's number of combinations of the spec last run (logged each run)."""
STUDY_COMBINATIONS_FILE = "combinations.json"
"""The parent run's list of the combination ids of the spec last run: the report keeps only
these (a changed spec leaves its old combinations' child runs under the same parent)."""
STUDY_SPEC_FILE = "spec.yaml"
TAG_MEMORY_SOURCE = f"{TAG_SETUP_PREFIX}peak_memory_source"
"""`cuda_max_allocated` or `process_peak_rss`: what `METRIC_PEAK_MEMORY_MB` measured."""
METRIC_SECONDS_PER_IMAGE_MEAN = "timing/seconds_per_image_mean"
METRIC_SECONDS_PER_IMAGE_P50 = "timing/seconds_per_image_p50"
METRIC_SECONDS_PER_IMAGE_P90 = "timing/seconds_per_image_p90"
METRIC_DENOISER_ITERATIONS_PER_SECOND = "timing/denoiser_iterations_per_s"
"""Denoising steps per second of the denoising loops only: from the denoiser's first call to
the end of the last step (callback_on_step_end), without text encoding or VAE decoding."""
METRIC_PEAK_MEMORY_MB = "timing/peak_memory_mb"
COMBINATION_RECORDS_FILE = f"{RECORDS_DIR}/images.json"
"""A combination's per-image records (mlflow.load_table's layout): prompt index, image index,
prompt, `phrase.<slot>` columns, seconds, and each per-image metric."""
COMBINATION_SAMPLES_FILE = "samples/grid.png"
