"""The best checkpoint of each subject × method, registered in the MLflow model registry.

One registered model per subject and method (`<sweep>.<subject>.<method>`; in a sweep that
compares base models, per base model too: `<sweep>.<subject>.<method>.<model name>`); each
trial offers its best step that has a checkpoint on disk (`select` passes over the base model
and removed checkpoints), scored as that step. The highest-scoring offer becomes a version
(tagged with the trial, step, score and weights), and the alias `best` points at it, so
`models:/<name>@best` downloads its checkpoint folder.
Re-running selection with other weights adds versions where the choice changed and moves the
alias; a (trial, step) already registered is reused, not registered twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from contract.layout import (
    BEST_ALIAS,
    TAG_SELECTION_WEIGHTS,
    VERSION_TAG_SCORE,
    VERSION_TAG_STEP,
    VERSION_TAG_TRIAL,
    VERSION_TAG_TRIAL_ID,
    registered_model_name,
)


@dataclass(frozen=True)
class Candidate:
    """A trial's checkpoint as offered to the registry: its step and that step's score."""

    run_id: str
    trial_id: str
    label: str
    subject: str
    method: str
    step: int
    score: float
    checkpoint: str
    base_model: str | None = None
    """The trial's base model when the sweep compares several (one registered model each)."""


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    candidate: Candidate

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{BEST_ALIAS}"


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Best checkpoints chosen by dreamsweep select"
        )


def _version_for(client: MlflowClient, name: str, candidate: Candidate) -> str:
    """The version holding this (trial, step), created if there is none yet."""
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags
        same_trial = tags.get(VERSION_TAG_TRIAL_ID) == candidate.trial_id
        if same_trial and tags.get(VERSION_TAG_STEP) == str(candidate.step):
            return version.version
    tags = {
        VERSION_TAG_TRIAL_ID: candidate.trial_id,
        VERSION_TAG_TRIAL: candidate.label,
        VERSION_TAG_STEP: str(candidate.step),
        VERSION_TAG_SCORE: f"{candidate.score:.6f}",
    }
    folder = Path(candidate.checkpoint)
    try:
        # A store on this filesystem registers the checkpoint folder where it lies.
        version = client.create_model_version(
            name, source=folder.resolve().as_uri(), run_id=candidate.run_id, tags=tags
        )
    except MlflowException:
        # A tracking server accepts only sources inside its artifact store: upload the
        # checkpoint into the trial's run and register it from there.
        artifact_path = f"checkpoints/{folder.name}"
        client.log_artifacts(candidate.run_id, str(folder), artifact_path)
        source = f"runs:/{candidate.run_id}/{artifact_path}"
        version = client.create_model_version(
            name, source=source, run_id=candidate.run_id, tags=tags
        )
    return version.version


def register_best(
    client: MlflowClient, sweep: str, candidates: list[Candidate], *, weights: dict[str, float]
) -> list[Registered]:
    """Register each subject × method's (× base model's, when candidates name one) best
    candidate and point its `best` alias at it."""
    groups: dict[tuple[str, str, str], list[Candidate]] = {}
    for candidate in candidates:
        key = (candidate.subject, candidate.method, candidate.base_model or "")
        groups.setdefault(key, []).append(candidate)
    registered = []
    for (subject, method, base_model), group in sorted(groups.items()):
        winner = min(group, key=lambda c: (-c.score, c.label))
        name = registered_model_name(sweep, subject, method, base_model or None)
        _ensure_model(client, name)
        version = _version_for(client, name, winner)
        client.set_model_version_tag(
            name, version, TAG_SELECTION_WEIGHTS, json.dumps(weights, sort_keys=True)
        )
        client.set_registered_model_alias(name, BEST_ALIAS, version)
        client.set_registered_model_tag(
            name, TAG_SELECTION_WEIGHTS, json.dumps(weights, sort_keys=True)
        )
        registered.append(Registered(name=name, version=version, candidate=winner))
    return registered


def download_best(name: str, *, tracking_uri: str, destination: Path) -> Path:
    """The checkpoint folder behind `models:/<name>@best`, downloaded to `destination`."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, BEST_ALIAS)
    # Resolved through this client: `models:/` URIs given to download_artifacts are looked up
    # in the process-wide registry, not in `tracking_uri`.
    source = client.get_model_version_download_uri(name, version.version)
    destination.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri
    )
    return Path(path)
