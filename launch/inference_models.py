"""An inference study's model entries resolved against the MLflow registry, before any
generation: each `models:/` name (and every `best_of` sweep's registered best) must exist, or
the study is refused with every missing one named, the registry, and what it holds. At `run`
the checkpoints are downloaded into `<output_dir>/models/` for the workers."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import mlflow
from contract.inference import ResolvedModel
from contract.layout import (
    BEST_ALIAS,
    PARAM_BASE_MODEL,
    PARAM_CLASS_TOKEN,
    PARAM_IDENTIFIER,
    PARAM_METHOD,
    PARAM_PLACEHOLDER_TOKEN,
    PARAM_SUBJECT,
    VERSION_TAG_STEP,
    VERSION_TAG_TRIAL_ID,
    registered_model_name,
)
from contract.spec import InferenceSpec, ModelSpec, SpecError, SweepSpec, load_any_spec
from contract.spec.inference import registry_reference

MODELS_DIR = "models"
COMPLETE_MARKER = ".complete"


def registry_uri(spec: InferenceSpec) -> str:
    """Where the study's `models:/` names live: `registry` (a URI, or a training spec's store),
    else the study's own tracking store."""
    if spec.registry is None:
        return spec.tracking_uri
    if spec.registry.endswith((".yaml", ".yml")):
        trained = load_any_spec(spec.registry)
        assert isinstance(trained, SweepSpec), "checked with the spec"
        return trained.tracking_uri
    return spec.registry


def _references(spec: InferenceSpec, index: int, entry: ModelSpec) -> list[tuple]:
    """(field, shown source, registry URI, name, alias, version) of a registry entry."""
    if entry.best_of is not None:
        trained = load_any_spec(entry.best_of)
        assert isinstance(trained, SweepSpec), "checked with the spec"
        # A sweep over several base models registers a best per subject × method × model.
        bases = [m.id for m in trained.base_model] if trained.compares_models else [None]
        names = [
            registered_model_name(trained.name, s.name, method, base)
            for s in trained.subjects
            for method, _ in trained.methods.enabled
            for base in bases
        ]
        return [
            (
                f"models[{index}].best_of",
                f"{entry.best_of}: {name}@{BEST_ALIAS}",
                trained.tracking_uri,
                name,
                BEST_ALIAS,
                None,
            )
            for name in names
        ]
    assert entry.source is not None
    name, alias, version = registry_reference(entry.source) or (None, None, None)
    return [(f"models[{index}].source", entry.source, registry_uri(spec), name, alias, version)]


def _registered_names(client: MlflowClient) -> list[str]:
    try:
        return sorted(m.name for m in client.search_registered_models(max_results=1000))
    except MlflowException:
        return []


def resolve_models(
    spec: InferenceSpec, *, download: bool, source: str = "spec"
) -> list[ResolvedModel]:
    """Every model entry as workers load it; raises `SpecError` naming every `models:/`
    reference that the registry lacks. With `download`, registered checkpoints are fetched."""
    problems: list[str] = []
    resolved: list[ResolvedModel] = []
    for index, entry in enumerate(spec.models):
        if entry.best_of is None and registry_reference(entry.source or "") is None:
            assert entry.source is not None
            resolved.append(
                ResolvedModel(
                    label=entry.shown,
                    base_model=entry.source,
                    identity=entry.source,
                    token=entry.token if entry.token is not None else spec.prompts.token,
                    class_token=entry.class_token or spec.prompts.class_token,
                )
            )
            continue
        for field, shown, uri, name, alias, version in _references(spec, index, entry):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            try:
                found = (
                    client.get_model_version_by_alias(name, alias)
                    if alias is not None
                    else client.get_model_version(name, version)
                )
            except MlflowException:
                what = f"alias {alias!r}" if alias is not None else f"version {version}"
                problems.append(
                    f"{field}: {shown!r}: the registry {uri} has no model {name!r} with {what}; "
                    f"registered models: {_registered_names(client) or 'none'} (run "
                    "`dreamsweep select` on the training spec to register its best checkpoints)"
                )
                continue
            resolved.append(
                _registered_model(spec, entry, client, uri, name, found, shown, download)
            )
    if problems:
        raise SpecError(source, problems)
    return resolved


def _registered_model(
    spec: InferenceSpec,
    entry: ModelSpec,
    client: MlflowClient,
    uri: str,
    name: str,
    version: object,
    shown: str,
    download: bool,
) -> ResolvedModel:
    run = client.get_run(version.run_id)
    params = run.data.params
    method = params[PARAM_METHOD]
    if method == "textual_inversion":
        token = params[PARAM_PLACEHOLDER_TOKEN].format(subject=params[PARAM_SUBJECT])
    else:
        token = params[PARAM_IDENTIFIER]
    checkpoint = Path(spec.resolved_output_dir / MODELS_DIR / f"{name}-v{version.version}")
    if download and not (checkpoint / COMPLETE_MARKER).exists():
        source = client.get_model_version_download_uri(name, version.version)
        checkpoint.mkdir(parents=True, exist_ok=True)
        fetched = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(checkpoint), tracking_uri=uri
            )
        )
        (checkpoint / COMPLETE_MARKER).write_text(str(fetched), encoding="utf-8")
    folder = (
        Path((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
        if (checkpoint / COMPLETE_MARKER).exists()
        else checkpoint
    )
    label = entry.label if entry.label and entry.best_of is None else shown.split(": ")[-1]
    tags = version.tags
    return ResolvedModel(
        label=label,
        base_model=params[PARAM_BASE_MODEL],
        method=method,
        checkpoint=folder,
        identity=f"{tags.get(VERSION_TAG_TRIAL_ID, run.info.run_id)}@{tags.get(VERSION_TAG_STEP)}",
        token=entry.token if entry.token is not None else token,
        class_token=entry.class_token or params[PARAM_CLASS_TOKEN],
    )
