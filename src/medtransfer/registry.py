"""Registered-model names, aliases and tag keys, defined once; resolving `models:/` URIs with one-line errors.

Names: `source.<name>` for pretraining sources, `<dataset>.<source>.<regime>` for fine-tuned models.
Aliases: `default` (a source's current version), `champion` (the best fine-tuned fold), `fold<k>`.
Registry stages are deprecated in MLflow; aliases and tags carry the same meaning.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from medtransfer.errors import ModelError
from medtransfer.layout import Tag

SOURCE_PREFIX = "source."
ALIAS_DEFAULT = "default"
ALIAS_CHAMPION = "champion"


def source_model_name(source: str) -> str:
    return f"{SOURCE_PREFIX}{source}"


def finetuned_model_name(dataset: str, source: str, regime: str) -> str:
    return f"{dataset}.{source}.{regime}"


def fold_alias(fold: int) -> str:
    return f"fold{fold}"


def model_uri(name: str, *, alias: str | None = None, version: int | str | None = None) -> str:
    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias and version")
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelReference:
    """A parsed `models:/name@alias` or `models:/name/version` URI."""

    name: str
    alias: str | None
    version: str | None


def parse_model_uri(uri: str) -> ModelReference:
    match = _URI.match(uri)
    if match is None:
        raise ModelError(
            f"'{uri}' is not a registered-model URI",
            fix="write models:/<name>@<alias> or models:/<name>/<version>, e.g. models:/source.random@default",
        )
    return ModelReference(match["name"], match["alias"], match["version"])


def resolve_model_version(client, uri: str):
    """The registry's ModelVersion behind `uri`, or a ModelError saying what is missing and how to get it."""
    from mlflow.exceptions import MlflowException

    reference = parse_model_uri(uri)
    try:
        client.get_registered_model(reference.name)
    except MlflowException:
        raise ModelError(
            f"no registered model named '{reference.name}'",
            where=uri,
            fix=_how_to_create(reference.name),
        ) from None
    try:
        if reference.alias is not None:
            return client.get_model_version_by_alias(reference.name, reference.alias)
        return client.get_model_version(reference.name, reference.version)
    except MlflowException:
        what = f"alias '{reference.alias}'" if reference.alias else f"version {reference.version}"
        raise ModelError(
            f"registered model '{reference.name}' has no {what}",
            where=uri,
            fix=f"list its versions in the MLflow UI, or {_how_to_create(reference.name)}",
        ) from None


@dataclass(frozen=True)
class RegisteredSource:
    name: str  # registered model name
    version: str
    weights_sha256: str
    reused: bool

    def describe(self) -> str:
        verb = "reused" if self.reused else "registered"
        return f"{verb} {self.name} version {self.version} (alias {ALIAS_DEFAULT}), weights sha256 {self.weights_sha256}"


def registered_versions(client, model_name: str) -> list:
    """Every version of `model_name`, oldest first (empty when the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version))
    except MlflowException:
        return []


def version_with_weights(client, model_name: str, digest: str):
    """The oldest version of `model_name` whose weights hash is `digest`, or None."""
    matching = [v for v in registered_versions(client, model_name) if v.tags.get(Tag.WEIGHTS_SHA256) == digest]
    return matching[0] if matching else None


def ensure_default_alias(client, model_name: str, version: str) -> None:
    """Point alias `default` of `model_name` at `version` (a no-op when it already does)."""
    try:
        current = client.get_model_version_by_alias(model_name, ALIAS_DEFAULT).version
    except Exception:  # noqa: BLE001 - no alias yet
        current = None
    if str(current) != str(version):
        client.set_registered_model_alias(model_name, ALIAS_DEFAULT, str(version))


def _how_to_create(name: str) -> str:
    if name.startswith(SOURCE_PREFIX):
        return f"register it with 'medtransfer source --name {name[len(SOURCE_PREFIX):]}'"
    return "run the search that registers it ('medtransfer search ...')"


# -- descriptions shown in the registry UI (Markdown) ---------------------------------------------------------------


def model_version_link(name: str, version: int | str) -> str:
    """A Markdown link to a version's page in the MLflow UI, relative so it works on any host."""
    return f"[{name} v{version}](#/models/{name}/versions/{version})"


def source_model_description(source: str) -> str:
    return (f"Pretraining source `{source}`: the starting point of every model fine-tuned from it. "
            f"Alias `{ALIAS_DEFAULT}` names the version the study uses.")


def source_version_description(source: str, arch: str, origin: str) -> str:
    return f"Source `{source}`: `{arch}` with weights from `{origin}`."


def finetuned_model_description(dataset: str, source: str, regime: str) -> str:
    name = source_model_name(source)
    return (f"`{dataset}` fine-tuned from source `{source}` ([{name}](#/models/{name})), regime `{regime}`. "
            f"Aliases `fold<k>`: the fit of each fold; `{ALIAS_CHAMPION}`: the fit with the lowest validation loss.")


def finetuned_version_description(source: str, regime: str, fold: int, seed: int, trial: str, source_version: str,
                                  test_auc: float) -> str:
    # A preset's fits name the preset where a search's name its best trial.
    configuration = f"the best configuration (trial {trial})" if trial.isdigit() else f"the `{trial}` protocol"
    return (f"Source `{source}`, regime `{regime}`: fold {fold} (seed {seed}) of {configuration}, "
            f"fine-tuned from {model_version_link(source_model_name(source), source_version)}; "
            + (f"test AUC {test_auc:.3f}." if math.isfinite(test_auc) else "test AUC not measured."))
