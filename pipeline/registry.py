"""MLflow Model Registry: register a version, tag it, move aliases (never stages), audit.

Every alias change is recorded in an append-only audit trail kept in the same MLflow
backend as the registry: one run per entry in the ``retune-audit`` experiment, its fields
as ``retune.audit.*`` tags. Moving ``champion`` is all-or-nothing: the version must load
and predict first, and a failure after the move puts the previous champion back and says
so in the trail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import tags as tag

if TYPE_CHECKING:
    from pipeline.config import RetuneConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
AUDIT_EXPERIMENT = "retune-audit"
AUDIT_FIELDS = (
    "model",
    "alias",
    "from_version",
    "to_version",
    "actor",
    "reason",
    "verdict",
    "action",
    "status",
    "sequence",
)
ACTIONS = ("promote", "rollback", "register", "restore", "refuse")
STATUSES = ("done", "failed", "restored", "refused")  # refused: nothing moved, by design
MODEL_NAME_PREFIX = "retune-"
SEQUENCE_DIGITS = 8  # zero-padded so that the tag sorts as a string
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value
FLOW_RUN_ACTOR = "prefect-flow-run:"
# What a version must predict before it takes champion: short, long and empty-ish text.
SMOKE_TEXTS = [
    "A warm, funny and beautifully acted film.",
    "Dull, loud and far too long. " * 20,
    "ok",
]


def model_name(config: RetuneConfig) -> str:
    """The registered model name: ``registry.model_name``, else ``retune-<dataset name>``.

    The one resolver every caller uses (flows, deploy, ``retune models``, promotion), so a
    dataset's model never lands under another dataset's name by default.
    """
    if config.registry.model_name:
        return config.registry.model_name
    from pipeline.data import dataset_name

    return MODEL_NAME_PREFIX + dataset_name(config.data)


def champion_version(name: str) -> str:
    """The version that holds ``champion`` now, or "" if none (or no such model)."""
    from mlflow import MlflowClient

    return _alias_version(MlflowClient(), name, CHAMPION)


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
        f"{ref}: expected NAME@alias (e.g. retune-rotten-tomatoes@champion) or NAME/VERSION"
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


def list_versions(name: str) -> list[VersionInfo]:
    """Every version of model ``name``, newest first (empty if there is no such model)."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        held = client.get_registered_model(name).aliases  # alias -> version
    except MlflowException:
        return []
    escaped = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{escaped}'")
    # Search results carry no aliases; the registered model does.
    versions = [
        dataclasses.replace(
            _info(v), aliases=sorted(a for a, ver in held.items() if str(ver) == str(v.version))
        )
        for v in found
    ]
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def register_version(
    model_uri: str, name: str, run_id: str, tags: Mapping[str, str]
) -> VersionInfo:
    """Create a new version with its tags and no alias (creating the model if needed).

    The promotion policy then decides its alias: :func:`move_champion` or
    :func:`set_challenger`.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    _ensure_registered_model(client, name)
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=dict(tags), model_id=_model_id(model_uri)
    )
    return _info(client.get_model_version(name, version.version))


def default_actor(flow_run_id: str | None = None) -> str:
    """``prefect-flow-run:<id>`` for a flow, else the user name of this process."""
    if flow_run_id:
        return f"{FLOW_RUN_ACTOR}{flow_run_id}"
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER variable and no passwd entry (some containers)
        return f"uid:{os.getuid()}"


# --- audit trail -------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    model: str
    alias: str  # champion | challenger
    from_version: str  # "" if the alias was not set
    to_version: str  # "" if the alias was removed
    actor: str  # user name or prefect-flow-run:<id>
    reason: str
    verdict: str  # the policy's summary, "forced: ..." or the rule that decided
    action: str  # promote | rollback | register | restore | refuse
    status: str  # done | failed | restored | refused
    sequence: int  # 1, 2, ... per model, in the order the entries were written
    time_ms: int  # the entry run's start time, ms since the epoch
    run_id: str


class PromotionError(RuntimeError):
    """A version cannot take (or give back) an alias; nothing was moved, or it was restored."""


class StaleChampionError(PromotionError):
    """The champion changed between the policy's verdict and the move; decide again."""


class AuditTrailError(RuntimeError):
    """The audit experiment cannot be written (e.g. it was deleted)."""


def append_audit(
    model: str,
    alias: str,
    from_version: str,
    to_version: str,
    actor: str,
    reason: str,
    verdict: str,
    action: str,
    status: str,
) -> AuditEntry:
    """Write one audit entry (one run in ``retune-audit``) with the next sequence number.

    The sequence is the last entry's plus one: call this under the same lock as the alias
    move it records, or two writers may take the same number.

    Raises:
        ValueError: unknown action or status.
        AuditTrailError: the audit experiment was deleted.
    """
    if action not in ACTIONS:
        raise ValueError(f"audit action {action!r}: expected one of {', '.join(ACTIONS)}")
    if status not in STATUSES:
        raise ValueError(f"audit status {status!r}: expected one of {', '.join(STATUSES)}")
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _audit_experiment_id(client, create=True)
    assert experiment_id is not None  # created above
    sequence = _last_sequence(client, experiment_id, model) + 1
    fields = {
        "model": model,
        "alias": alias,
        "from_version": str(from_version or ""),
        "to_version": str(to_version or ""),
        "actor": actor,
        "reason": _fit(reason),
        "verdict": _fit(verdict),
        "action": action,
        "status": status,
        "sequence": str(sequence).zfill(SEQUENCE_DIGITS),
    }
    # Tags go in with the run in one call, so an entry is written whole or not at all.
    run = client.create_run(
        experiment_id,
        tags={tag.AUDIT_PREFIX + key: value for key, value in fields.items()},
        run_name=f"{model} #{sequence} {action} {alias}",
    )
    with contextlib.suppress(Exception):  # cosmetic: the entry is already written
        client.set_terminated(run.info.run_id, status="FINISHED")
    return _entry(run)


def record_refusal(
    name: str,
    champion_version: str,
    actor: str,
    reason: str,
    verdict: str,
    lock: contextlib.AbstractContextManager[Any] | None = None,
) -> AuditEntry:
    """Audit a candidate the policy kept away from ``name`` (action refuse, status refused):
    ``champion`` stays where it is, so the entry moves nothing."""
    with _held(lock):
        return append_audit(
            name,
            CHAMPION,
            champion_version,
            champion_version,
            actor,
            reason,
            verdict,
            "refuse",
            "refused",
        )


def version_identity(version: VersionInfo) -> Any:
    """The :class:`pipeline.promotion.ModelIdentity` of a registered version: its identity
    tags, else its run's, else the labels its run's config recorded (versions registered
    before identities were tagged). None if none of these exists."""
    import ast

    from pipeline import promotion

    found = promotion.identity_from_tags(version.tags)
    if found is not None or not version.run_id:
        return found
    from mlflow import MlflowClient

    run = MlflowClient().get_run(version.run_id)
    found = promotion.identity_from_tags(run.data.tags)
    if found is None and "data.labels" in run.data.params:
        labels = ast.literal_eval(run.data.params["data.labels"])
        found = promotion.text_classifier_identity([str(label) for label in labels])
    return found


def read_audit(name: str) -> list[AuditEntry]:
    """Every audit entry of model ``name``, oldest first (by sequence, then time)."""
    from mlflow.entities import ViewType

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _audit_experiment_id(client, create=False)
    if experiment_id is None:
        return []
    entries: list[AuditEntry] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=_model_filter(name),
            run_view_type=ViewType.ALL,  # an entry deleted in the UI is still history
            max_results=1000,
            order_by=[f"tags.`{tag.AUDIT_PREFIX}sequence` ASC", "attributes.start_time ASC"],
            page_token=token,
        )
        entries += [_entry(run) for run in page]
        token = page.token
        if not token:
            break
    return sorted(entries, key=lambda e: (e.sequence, e.time_ms, e.run_id))


def audit_problems(entries: list[AuditEntry], alias: str = CHAMPION) -> list[str]:
    """Inconsistencies in one model's trail: repeated or missing sequence numbers, and
    ``alias`` moves whose from_version is not where the previous move left the alias.
    """
    problems = []
    sequences = [e.sequence for e in entries]
    duplicates = sorted({s for s in sequences if sequences.count(s) > 1})
    if duplicates:
        problems.append(f"sequence numbers used twice: {duplicates}")
    missing = sorted(set(range(1, max(sequences, default=0) + 1)) - set(sequences))
    if missing:
        problems.append(f"entries missing: sequence {missing}")
    current: str | None = None  # unknown until the first move
    for e in entries:
        if e.alias != alias or e.status in ("failed", "refused"):
            continue
        if e.status == "done" and current is not None and e.from_version != current:
            problems.append(
                f"#{e.sequence} {e.action} moved {alias} from v{e.from_version or '-'} but the "
                f"trail left it at v{current or '-'}"
            )
        current = e.to_version
    return problems


def previous_champion(name: str) -> str | None:
    """The version that held champion before the current one, from the audit trail.

    The trail is read as a stack: a promotion or registration pushes its version, a
    rollback pops one, and a restore undoes the move it names. So rolling back twice goes
    two promotions back, not back and forth. None if the trail holds no earlier champion.
    """
    stack: list[str] = []
    for e in read_audit(name):
        if e.alias != CHAMPION or e.status in ("failed", "refused"):
            continue
        if e.action in ("rollback", "restore") and stack and stack[-1] == e.from_version:
            stack.pop()  # (a restore pops only a move that was recorded before it failed)
        if e.to_version and (not stack or stack[-1] != e.to_version):
            stack.append(e.to_version)
    return stack[-2] if len(stack) >= 2 else None


# --- moving aliases ----------------------------------------------------------------------


def smoke_test(name: str, version: str, inputs: Any | None = None) -> None:
    """Load ``models:/NAME/VERSION`` as pyfunc and check it predicts ``inputs``.

    ``inputs`` is a frame of the model's input columns; None uses the example logged with
    the model (every kind of task logs one), else :data:`SMOKE_TEXTS`. The prediction must
    have one row per input, every output column of the model's signature without a missing
    value, and any ``prob_*`` column within [0, 1].

    Raises:
        PromotionError: the version does not load or predicts nothing usable.
    """
    import math

    import pandas as pd

    from pipeline import modelstore

    uri = f"models:/{name}/{version}"
    try:
        loaded = modelstore.load_version(name, version)
        frame = inputs if inputs is not None else loaded.input_example
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame({"text": SMOKE_TEXTS})
        out = loaded.predict(frame)
    except Exception as err:
        raise PromotionError(
            f"{uri} failed to load or predict, so champion was not moved: "
            f"{type(err).__name__}: {err}"
        ) from err
    wanted = loaded.output_columns or ["label"]
    if (
        not isinstance(out, pd.DataFrame)
        or len(out) != len(frame)
        or not set(wanted) <= set(out.columns)
        or out[wanted].isna().any().any()
    ):
        shape = f"{type(out).__name__} {getattr(out, 'shape', '')}"
        raise PromotionError(
            f"{uri} predicted {shape} for {len(frame)} inputs; expected a frame with the "
            f"columns {', '.join(wanted)} filled and one row per input, so champion was not moved"
        )
    probs = [c for c in out.columns if str(c).startswith("prob_")]
    values = out[probs].to_numpy(dtype=float).ravel() if probs else []
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values):
        raise PromotionError(
            f"{uri} predicted probabilities outside [0, 1], so champion was not moved"
        )


def move_champion(
    name: str,
    version: str,
    actor: str,
    reason: str,
    verdict: str,
    action: str = "promote",
    lock: contextlib.AbstractContextManager[Any] | None = None,
    smoke_input: Any | None = None,
    after_move: Callable[[], None] | None = None,
    expected_champion: str | None = None,
) -> AuditEntry:
    """Give ``champion`` to ``name``/``version``, all or nothing, and record it.

    First the version must load through ``models:/NAME/VERSION`` and predict
    ``smoke_input`` (see :func:`smoke_test`; outside the lock: a version's artifacts never
    change). Then, under ``lock``: read the current champion, move the alias, drop
    ``challenger`` if this version held it, call ``after_move`` (a hook; tests inject
    failures there) and append the audit entry. If anything after the move fails, the
    previous champion (and challenger) are put back, a ``restore`` entry naming the error
    is appended, and the error is re-raised.

    Args:
        action: "promote" or "rollback".
        lock: held across read-move-record so that concurrent promotions form one chain
            (e.g. ``prefect.concurrency.sync.concurrency(...)`` or :func:`file_lock`).
        expected_champion: the champion the verdict was computed against ("" for none);
            if the champion has changed since, nothing moves (StaleChampionError).

    Returns:
        The "done" audit entry.

    Raises:
        PromotionError: the version failed the smoke test or already is champion.
        StaleChampionError: the champion is not ``expected_champion``.
    """
    from mlflow import MlflowClient

    if action not in ("promote", "rollback"):
        raise ValueError(f"move_champion action {action!r}: expected promote or rollback")
    version = str(version)
    smoke_test(name, version, smoke_input)
    client = MlflowClient()
    with _held(lock):
        previous = _check_champion(client, name, version, expected_champion)
        if previous == version:
            raise PromotionError(f"{name}/{version} already holds {CHAMPION}; nothing to move")
        cleared_challenger = False
        try:
            client.set_registered_model_alias(name, CHAMPION, version)
            if _alias_version(client, name, CHALLENGER) == version:
                client.delete_registered_model_alias(name, CHALLENGER)
                cleared_challenger = True
            if after_move is not None:
                after_move()
            return append_audit(
                name, CHAMPION, previous, version, actor, reason, verdict, action, "done"
            )
        except BaseException as err:  # Ctrl-C too: never leave an unrecorded champion
            _restore_champion(
                client, name, version, previous, cleared_challenger, actor, verdict, action, err
            )
            raise


def _check_champion(client: Any, name: str, version: str, expected: str | None) -> str:
    """The champion of now ("" for none); StaleChampionError if it is not ``expected``."""
    current = _alias_version(client, name, CHAMPION)
    if expected is not None and current != expected:
        raise StaleChampionError(
            f"{name}: champion is v{current or ' (none)'}, but the verdict for v{version} "
            f"was computed against v{expected or ' (none)'}; run the policy again"
        )
    return current


def set_challenger(
    name: str,
    version: str,
    actor: str,
    reason: str,
    verdict: str,
    lock: contextlib.AbstractContextManager[Any] | None = None,
    expected_champion: str | None = None,
) -> AuditEntry:
    """Give ``challenger`` to ``name``/``version`` and record it (no smoke test: not served).

    Args:
        expected_champion: the champion the verdict was computed against ("" for none);
            if the champion has changed since, nothing moves (StaleChampionError).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    with _held(lock):
        _check_champion(client, name, version, expected_champion)
        previous = _alias_version(client, name, CHALLENGER)
        client.set_registered_model_alias(name, CHALLENGER, str(version))
        try:
            return append_audit(
                name, CHALLENGER, previous, str(version), actor, reason, verdict, "promote", "done"
            )
        except BaseException:
            if previous:
                client.set_registered_model_alias(name, CHALLENGER, previous)
            else:
                _delete_alias_if_set(client, name, CHALLENGER)
            raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) across processes on one machine.

    Enough for the embedded SQLite store, where every writer runs on this machine; with a
    shared tracking server, use a lock every machine sees (a Prefect concurrency limit).
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _restore_champion(
    client: Any,
    name: str,
    version: str,
    previous: str,
    cleared_challenger: bool,
    actor: str,
    verdict: str,
    action: str,
    err: BaseException,
) -> None:
    """Put the previous champion (and challenger) back and record that; never raises."""
    status = "restored"
    note = ""
    try:
        if previous:
            client.set_registered_model_alias(name, CHAMPION, previous)
        else:
            _delete_alias_if_set(client, name, CHAMPION)
        if cleared_challenger:
            client.set_registered_model_alias(name, CHALLENGER, version)
    except Exception as restore_err:
        status = "failed"
        note = f"; restoring failed too ({type(restore_err).__name__}: {restore_err})"
    back = f"v{previous}" if previous else "no champion"
    reason = (
        f"{action} of v{version} failed after the alias moved "
        f"({type(err).__name__}: {err}); champion restored to {back}{note}"
    )
    try:
        append_audit(name, CHAMPION, version, previous, actor, reason, verdict, "restore", status)
    except Exception as audit_err:
        err.add_note(f"the audit entry for the restore was not written either: {audit_err}")
    if status == "failed":
        err.add_note(reason)


def _held(
    lock: contextlib.AbstractContextManager[Any] | None,
) -> contextlib.AbstractContextManager[Any]:
    return lock if lock is not None else contextlib.nullcontext()


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Fine-tuned by retune.")


def _alias_version(client: Any, name: str, alias: str) -> str:
    """The version that holds ``alias``, or "" if none (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return ""


def _audit_experiment_id(client: Any, create: bool) -> str | None:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if found is None and create:
        try:
            return client.create_experiment(AUDIT_EXPERIMENT)
        except MlflowException:  # another writer created it just now
            found = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if found is None:
        return None
    if found.lifecycle_stage != "active" and create:
        raise AuditTrailError(
            f"the audit experiment '{AUDIT_EXPERIMENT}' (id {found.experiment_id}) was "
            f"deleted; restore it with `mlflow experiments restore --experiment-id "
            f"{found.experiment_id}` before moving aliases"
        )
    return found.experiment_id


def _model_filter(name: str) -> str:
    escaped = name.replace("'", "\\'")
    return f"tags.`{tag.AUDIT_PREFIX}model` = '{escaped}'"


def _last_sequence(client: Any, experiment_id: str, model: str) -> int:
    from mlflow.entities import ViewType

    last = client.search_runs(
        [experiment_id],
        filter_string=_model_filter(model),
        run_view_type=ViewType.ALL,
        max_results=1,
        order_by=[f"tags.`{tag.AUDIT_PREFIX}sequence` DESC"],
    )
    return int(last[0].data.tags[tag.AUDIT_PREFIX + "sequence"]) if last else 0


def _fit(text: str) -> str:
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def _entry(run: Any) -> AuditEntry:
    tags = run.data.tags
    values = {key: tags.get(tag.AUDIT_PREFIX + key, "") for key in AUDIT_FIELDS}
    return AuditEntry(
        **{k: v for k, v in values.items() if k != "sequence"},
        sequence=int(values["sequence"] or 0),
        time_ms=int(run.info.start_time or 0),
        run_id=run.info.run_id,
    )


def delete_version(name: str, version: str) -> None:
    """Remove a version that failed to register completely (never one that held an alias)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if client.get_model_version(name, version).aliases:
        raise PromotionError(f"{name}/{version} holds an alias; it is not deleted")
    client.delete_model_version(name, version)


def _model_id(model_uri: str) -> str | None:
    """``models:/m-...`` (a logged model) -> its id: a tracking server needs it explicitly."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and rest.startswith("m-") and "/" not in rest else None
