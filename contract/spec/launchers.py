"""Where trials run and are recorded: the local, SLURM and Ray launcher specs (with Ray's
scheduler specs), the tracking spec, and the maps from each `kind` tag to its spec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator

from contract.spec.base import _Strict

if TYPE_CHECKING:
    from contract.spec.search import SearchSpec
    from contract.spec.train import BaseModelSpec, TrainSpec


class LocalLauncherSpec(_Strict):
    """Run trials as worker processes on this machine."""

    kind: Literal["local"] = "local"
    max_parallel: int = Field(default=1, ge=1)
    """Trials run at once."""
    processes_per_trial: int = Field(default=1, ge=1)
    """Processes per trial (`accelerate launch --num_processes`), e.g. one per GPU."""
    pack: int = Field(default=1, ge=1)
    """Trials trained together in one worker on one frozen base model (LoRA and textual
    inversion trials of the same method, base model and training settings; others train alone).
    Placement only: a trial's id, folder, MLflow run and curves are the same packed or alone."""


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
    pack: int = Field(default=1, ge=1)
    """Trials trained together in one worker on one frozen base model (LoRA and textual
    inversion trials of the same method, base model and training settings; others train alone).
    One array task per pack.
    Placement only: a trial's id, folder, MLflow run and curves are the same packed or alone."""

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
    pack: int = Field(default=1, ge=1)
    """Trials trained together in one worker: 1 only on Ray (see the refusal below)."""

    @field_validator("pack")
    @classmethod
    def _no_packs(cls, pack: int) -> int:
        if pack > 1:
            # A Tune trial is one trainable; ASHA and the median rule decide per Tune trial, so
            # a pack would need one trainable reporting K trials' scores, each stopped alone.
            raise ValueError(
                "packed trials are not supported on the Ray launcher yet: Tune runs and its "
                "scheduler (ASHA, median) stops each trial as a trainable of its own; set "
                "launcher.pack: 1, or pack with the local or SLURM launcher"
            )
        return pack

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


def trial_processes(
    launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec,
) -> tuple[int, str]:
    """How many processes each trial trains on, and the launcher fields that say so."""
    if isinstance(launcher, SlurmLauncherSpec):
        spread = (
            f"launcher.nodes {launcher.nodes} × processes_per_node {launcher.processes_per_node}"
        )
        return launcher.nodes * launcher.processes_per_node, spread
    processes = launcher.processes_per_trial
    return processes, f"launcher.processes_per_trial {processes}"


def compile_problems(
    launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, train: TrainSpec
) -> list[str]:
    """`train.compile` against a trial spread over processes (not tested here: compiled DDP
    wrappers must be released before the process group ends, as `trainers.loop.release` does)."""
    processes, spread = trial_processes(launcher)
    if train.compile == "no" or processes == 1:
        return []
    return [
        f"train.compile: {train.compile!r} with {spread}: compiled trials train in one process "
        "each here; set compile: 'no', or train each trial in one process"
    ]


def pack_problems(
    launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec,
    train: TrainSpec,
    models: list[BaseModelSpec],
) -> list[str]:
    """`launcher.pack` > 1 against what a pack cannot share (launcher, train, base_model)."""
    # A pack is K trials in one process on one frozen base (contract/packs.py): what spreads a
    # trial over processes, or needs one loss scaler per trial, cannot be shared so.
    size = launcher.pack
    if size == 1:
        return []
    where = f"launcher.pack: {size}"
    problems = []
    processes, spread = trial_processes(launcher)
    if processes > 1:
        problems.append(
            f"{where} with {spread}: a pack trains in one process, and these trials train on "
            f"{processes}; set launcher.pack: 1, or train each trial in one process"
        )
    if train.deepspeed is not None:
        problems.append(
            f"{where} with train.deepspeed: DeepSpeed partitions one model's optimizer state "
            "across a trial's processes, and a pack trains in one process; set launcher.pack: 1 "
            "or drop train.deepspeed"
        )
    fp16 = [
        "train.mixed_precision"
        if model.mixed_precision is None
        else f"base_model[{i}].mixed_precision"
        for i, model in enumerate(models)
        if (model.mixed_precision or train.mixed_precision) == "fp16"
    ]
    for field in dict.fromkeys(fp16):
        problems.append(
            f"{where} with {field} fp16: fp16 trains with a loss scaler per trial, and one "
            "scaler for a pack would skip every member's step when one member overflows; use "
            "bf16 or no mixed precision, or set launcher.pack: 1"
        )
    return problems


def pack_search_problems(
    launcher: LocalLauncherSpec | SlurmLauncherSpec | RayLauncherSpec, search: SearchSpec
) -> list[str]:
    """`launcher.pack` > 1 with an Optuna search."""
    if launcher.pack == 1 or search.kind == "grid":
        return []
    return [
        f"launcher.pack: {launcher.pack} with search.kind {search.kind!r}: packs group a grid's "
        "trials, and a search asks its trials one at a time; set launcher.pack: 1"
    ]
