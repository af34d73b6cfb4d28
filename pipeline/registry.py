"""MLflow Model Registry: register a version, tag it, and move aliases (never stages)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class AliasDecision:
    alias: str  # the alias the candidate gets
    reason: str


def decide_aliases(
    candidate_metric: float, champion_metric: float | None, metric: str
) -> AliasDecision:
    """The first version becomes champion; a later one only if strictly better.

    The full promotion policy (gates, margins, per-group checks) replaces this later.
    """
    if champion_metric is None:
        return AliasDecision(CHAMPION, "no champion yet")
    if candidate_metric > champion_metric:
        return AliasDecision(
            CHAMPION, f"test {metric} {candidate_metric:.4f} > champion's {champion_metric:.4f}"
        )
    return AliasDecision(
        CHALLENGER, f"test {metric} {candidate_metric:.4f} <= champion's {champion_metric:.4f}"
    )


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    aliases: list[str]
    decision: AliasDecision
    champion_version: str


def champion_metric(name: str, metric_key: str) -> tuple[str | None, float | None]:
    """The current champion's version and the value of ``metric_key`` in its run."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    if not version.run_id:
        return version.version, None
    value = client.get_run(version.run_id).data.metrics.get(metric_key)
    return version.version, value


def register_model(
    model_uri: str,
    name: str,
    run_id: str,
    tags: Mapping[str, str],
    candidate_metric: float,
    metric_key: str,
) -> RegisteredVersion:
    """Create a new version, tag it and set its alias.

    If anything fails after the version exists, the version is deleted again so that
    the registry holds no half-registered model, and the error is re-raised.
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Fine-tuned by retune.")
    previous_champion, previous_value = champion_metric(name, metric_key)
    decision = decide_aliases(candidate_metric, previous_value, metric_key)
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=dict(tags))
    try:
        client.set_model_version_tag(
            name, version.version, "retune.alias_decision", decision.reason
        )
        if decision.alias == CHAMPION:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            # The challenger lost to the old champion; the new champion beat both.
            _delete_alias_if_set(client, name, CHALLENGER)
        else:
            client.set_registered_model_alias(name, CHALLENGER, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        if previous_champion is not None:
            client.set_registered_model_alias(name, CHAMPION, previous_champion)
        raise
    current = client.get_model_version(name, version.version)
    return RegisteredVersion(
        name=name,
        version=str(version.version),
        aliases=sorted(current.aliases),
        decision=decision,
        champion_version=str(version.version)
        if decision.alias == CHAMPION
        else str(previous_champion),
    )


def _delete_alias_if_set(client: object, name: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_alias(name, alias)  # type: ignore[attr-defined]
    except MlflowException:
        pass


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    aliases: list[str]
    run_id: str | None
    tags: dict[str, str]
    created_ms: int
    source: str


def _info(v: object) -> VersionInfo:
    return VersionInfo(
        name=v.name,  # type: ignore[attr-defined]
        version=str(v.version),  # type: ignore[attr-defined]
        aliases=sorted(v.aliases or []),  # type: ignore[attr-defined]
        run_id=v.run_id,  # type: ignore[attr-defined]
        tags=dict(v.tags or {}),  # type: ignore[attr-defined]
        created_ms=int(v.creation_timestamp or 0),  # type: ignore[attr-defined]
        source=str(v.source),  # type: ignore[attr-defined]
    )


class ModelRefError(LookupError):
    """A NAME@alias or NAME/VERSION reference that the registry does not hold."""


def resolve_version(ref: str) -> VersionInfo:
    """``NAME@alias`` or ``NAME/VERSION`` -> that registered version.

    Raises:
        ModelRefError: malformed reference, or no such model, alias or version.
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.rsplit("@", 1)
            return _info(client.get_model_version_by_alias(name, alias))
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return _info(client.get_model_version(name, version))
    except MlflowException as err:
        raise ModelRefError(f"{ref}: not in the registry ({err.message})") from None
    raise ModelRefError(
        f"{ref}: expected NAME@alias (e.g. retune-sentiment@champion) or NAME/VERSION"
    )


def versions_with_tag(key: str, value: str) -> list[VersionInfo]:
    """Every registered version, of any model, whose tag ``key`` equals ``value``."""
    from mlflow import MlflowClient

    escaped = value.replace("'", "\\'")
    found = MlflowClient().search_model_versions(f"tags.`{key}` = '{escaped}'")
    return sorted((_info(v) for v in found), key=lambda v: (v.name, int(v.version)))


def tag_version(name: str, version: str, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(name, version, key, value)
