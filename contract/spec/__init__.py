"""The sweep spec: one pydantic model tree, loaded from YAML and validated before anything runs.

Every default lives in this package, once. Relative paths in a spec resolve against the spec
file's folder. `load_spec` collects every problem at once (the schema's, those across sections and
those of the files the spec points at, the last two for every section that validated) and raises
one `SpecError` naming the file, the field, the value and what is allowed.

The package's modules, each importing only those above it:

- `base`: `SpecError`, the strict base model, slot and path helpers, shared names;
- `train`: subjects, grid, methods and their options, prior preservation, DeepSpeed,
  checkpoints, `TrainSpec`;
- `evaluation`: the prompt template, `EvalSpec` and its defaults;
- `selection`: the study's weights and ranges, collapse, early stop, `SelectionSpec`;
- `launchers`: the local, SLURM and Ray launchers, Ray's schedulers, tracking;
- `search`: grid or Optuna search, its space of distributions by spec path, its pruner;
- `sweep`: `SweepSpec` and its checks across sections;
- `loading`: YAML loading, error rewriting, and the checks of the files a spec points at;
- `inference_entries`: an inference spec's model and scheduler entries, what is known offline;
- `inference`: `InferenceSpec` (`kind: inference`), its prompts, metrics, selection, shards;
- `kinds`: either kind of spec from a file (`load_any_spec`), the inference spec's checks.

Import from `contract.spec` itself; the modules are its layout, not its interface.
"""

from contract.spec.base import (
    ORACLE_CURVES,
    PROMPT_SLOTS,
    SAFE_NAME,
    TINY,
    Curve,
    Metric,
    SpecError,
    logged_curves,
)
from contract.spec.evaluation import (
    DEFAULT_PROMPTS,
    FACE_CLASSES,
    LAION_AESTHETIC_HEAD,
    EvalSpec,
    PromptTemplateSpec,
)
from contract.spec.inference import InferenceSpec, ModelSpec, SchedulerSpec
from contract.spec.kinds import SPEC_KINDS, AnySpec, inference_warnings, load_any_spec
from contract.spec.launchers import (
    LAUNCHERS,
    SCHEDULERS,
    SLURM_TYPED_SBATCH,
    AshaSchedulerSpec,
    FifoSchedulerSpec,
    LocalLauncherSpec,
    MedianSchedulerSpec,
    RayLauncherSpec,
    SlurmLauncherSpec,
    TrackingSpec,
)
from contract.spec.loading import (
    MOVED_KEYS,
    check_eval_files,
    check_subject_files,
    load_spec,
    parse_spec,
    subject_image_files,
)
from contract.spec.search import Distribution, PrunerSpec, SearchSpec
from contract.spec.selection import (
    SELECTABLE_METRICS,
    STUDY_RANGES,
    STUDY_WEIGHTS,
    CollapseSpec,
    EarlyStopSpec,
    SelectionSpec,
)
from contract.spec.sweep import SweepSpec
from contract.spec.train import (
    METHOD_OPTIONS,
    BaseModelSpec,
    CheckpointSpec,
    DeepSpeedSpec,
    DreamBoothSpec,
    ExportSpec,
    GridSpec,
    LearningRates,
    LoRASpec,
    Method,
    MethodOptions,
    MethodsSpec,
    PriorPreservationSpec,
    SubjectSpec,
    TextualInversionSpec,
    TrainSpec,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "FACE_CLASSES",
    "LAION_AESTHETIC_HEAD",
    "LAUNCHERS",
    "METHOD_OPTIONS",
    "MOVED_KEYS",
    "ORACLE_CURVES",
    "PROMPT_SLOTS",
    "SAFE_NAME",
    "SCHEDULERS",
    "SELECTABLE_METRICS",
    "SLURM_TYPED_SBATCH",
    "SPEC_KINDS",
    "STUDY_RANGES",
    "STUDY_WEIGHTS",
    "TINY",
    "AnySpec",
    "AshaSchedulerSpec",
    "BaseModelSpec",
    "CheckpointSpec",
    "CollapseSpec",
    "Curve",
    "DeepSpeedSpec",
    "Distribution",
    "DreamBoothSpec",
    "EarlyStopSpec",
    "EvalSpec",
    "ExportSpec",
    "FifoSchedulerSpec",
    "GridSpec",
    "InferenceSpec",
    "LearningRates",
    "LoRASpec",
    "LocalLauncherSpec",
    "MedianSchedulerSpec",
    "Method",
    "MethodOptions",
    "MethodsSpec",
    "Metric",
    "ModelSpec",
    "PriorPreservationSpec",
    "PromptTemplateSpec",
    "PrunerSpec",
    "RayLauncherSpec",
    "SchedulerSpec",
    "SearchSpec",
    "SelectionSpec",
    "SlurmLauncherSpec",
    "SpecError",
    "SubjectSpec",
    "SweepSpec",
    "TextualInversionSpec",
    "TrackingSpec",
    "TrainSpec",
    "check_eval_files",
    "check_subject_files",
    "inference_warnings",
    "load_any_spec",
    "load_spec",
    "logged_curves",
    "parse_spec",
    "subject_image_files",
]
