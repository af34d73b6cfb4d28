"""Registering a candidate: a new version, the alias its verdict earns, all or nothing.

Library code, orchestrator-free: the caller passes the lock every alias move holds (a file
lock or a Prefect concurrency limit, see ``flows/locks.py``) as a factory, one fresh lock
per move. The registry adapter does the moves and writes the audit trail.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import modelstore, promotion, registry, tracking
from pipeline import tags as tag

Lock = Callable[[], contextlib.AbstractContextManager[Any]]  # a fresh lock per alias move
Recompute = Callable[[], tuple[str, promotion.PromotionVerdict]]  # -> (champion, verdict)
Refusal = tuple[str, promotion.PromotionVerdict]  # (champion version, refusing verdict)
STALE_RETRIES = 3  # champion changes tolerated while one run takes its alias
_LOG = logging.getLogger(__name__)


class IncompatibleModel(registry.PromotionError):
    """The champion that took the alias while this run trained is another kind of model:
    the candidate's version was deleted again and the refusal audited."""

    def __init__(self, verdict: promotion.PromotionVerdict):
        self.verdict = verdict
        super().__init__(verdict.summary())


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    aliases: list[str]
    verdict: promotion.PromotionVerdict
    champion_version: str  # after the move; "none" if no version holds champion


def register_candidate(
    name: str,
    run_id: str,
    model_uri: str,
    tags: Mapping[str, str],
    verdict: promotion.PromotionVerdict,
    champion_version: str,
    actor: str,
    lock: Lock,
    smoke_input: Any | None = None,
    recompute: Recompute | None = None,
    logger: Any = _LOG,
) -> Registered:
    """Register ``model_uri`` as a new version of ``name`` with its tags, then give it the
    alias ``verdict`` earns (champion: all or nothing, audited).

    If the alias move fails, the new version is deleted again and the error re-raised: the
    champion alias and the audit trail stay as the registry's move left them (as they were,
    or restored with a ``restore`` entry when the failure came after the move). So is a
    version that ``recompute`` finds to be of another kind than the champion of now.

    Args:
        champion_version: the champion the verdict was computed against ("" for none).
        smoke_input: what the version must predict before it takes champion (a frame of
            its input columns; None: its logged input example).
        recompute: decides again against the champion that now holds the alias, when it
            changed meanwhile (see :func:`apply_verdict`).

    Raises:
        IncompatibleModel: decided again, the version is of another kind than the champion.
    """
    version = registry.register_version(model_uri, name, run_id, tags)
    try:
        verdict = apply_verdict(
            name,
            version.version,
            verdict,
            champion_version,
            actor,
            lock,
            smoke_input,
            recompute,
            logger,
        )
    except BaseException:
        registry.delete_version(name, version.version)
        raise
    if verdict.incompatible:
        registry.delete_version(name, version.version)
        _audit_refusal(name, registry.champion_version(name) or "", run_id, actor, verdict, lock)
        raise IncompatibleModel(verdict)
    summary = verdict.summary()[: tag.SUMMARY_CHARS]
    registry.tag_version(name, version.version, tag.POLICY, summary)
    current = registry.resolve_version(f"{name}/{version.version}")
    champion = registry.champion_version(name) or "none"
    return Registered(name, version.version, current.aliases, verdict, champion)


def apply_verdict(
    name: str,
    version: str,
    verdict: promotion.PromotionVerdict,
    champion_version: str,
    actor: str,
    lock: Lock,
    smoke_input: Any | None,
    recompute: Recompute | None,
    logger: Any = _LOG,
) -> promotion.PromotionVerdict:
    """Give ``version`` the alias ``verdict`` earns; returns the verdict that was applied.

    If the champion changed since the verdict (another run promoted meanwhile), the
    verdict is recomputed against the champion that now holds the alias and applied
    instead, up to STALE_RETRIES times; every move is audited by the registry. A verdict
    decided again that finds another kind of model (``verdict.incompatible``) moves nothing.

    Raises:
        registry.StaleChampionError: the champion kept changing, or no ``recompute``.
    """
    reason = "promotion policy after retraining"
    for _ in range(STALE_RETRIES):
        try:
            if verdict.promote:
                registry.move_champion(
                    name,
                    version,
                    actor,
                    reason,
                    verdict.summary(),
                    lock=lock(),
                    smoke_input=smoke_input,
                    expected_champion=champion_version,
                )
            elif verdict.alias == registry.CHALLENGER:
                registry.set_challenger(
                    name,
                    version,
                    actor,
                    reason,
                    verdict.summary(),
                    lock(),
                    expected_champion=champion_version,
                )
            return verdict
        except registry.StaleChampionError as err:
            if recompute is None:
                raise
            logger.warning("%s: deciding again against the current champion", err)
            champion_version, verdict = recompute()
            if verdict.incompatible:  # another kind of model: nothing to move, not retried
                return verdict
            against = f"v{champion_version}" if champion_version else "no champion"
            reason = f"promotion policy after retraining, decided again against {against}"
            logger.info("promotion (decided again): %s", verdict.summary())
    raise registry.StaleChampionError(
        f"{name}: the champion changed {STALE_RETRIES} times while v{version} took its alias; "
        f"v{version} is not registered. Run again, or promote it by hand: "
        f"retune promote {name} <version> --reason ..."
    )


def recorded_group_accuracy(run_id: str) -> dict[str, float]:
    """The gated groups' accuracy a run's bias report recorded ({} for an older run)."""
    try:
        report = tracking.read_report(run_id, "reports/bias.json")
    except Exception:  # an older run without the report: no group criterion
        return {}
    groups = (report.get("gate_groups") or {}).get("groups") or []
    return {
        g["group"]: g["accuracy"]
        for g in groups
        if not g.get("too_small") and g.get("accuracy") is not None
    }


def current_champion_figures(
    name: str,
    data_md5: str,
    primary_metric: str,
    evaluate: Callable[[modelstore.LoadedModel], float],
    work_dir: Path | None = None,
) -> promotion.ChampionFigures | None:
    """The figures of the champion that holds the alias now, for a verdict decided again.

    Its recorded ``test_<primary_metric>`` (and gated groups) when it was evaluated on the
    same data version (same data md5); otherwise the loaded champion is passed to
    ``evaluate``, which returns its metric on the candidate's test split (groups not
    compared). None when there is no champion.
    """
    try:
        champion = registry.resolve_version(f"{name}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return None
    assert champion.run_id is not None
    record = tracking.get_run(champion.run_id)
    key = f"test_{primary_metric}"
    if champion.tags.get(tag.DATA_MD5) == data_md5 and key in record.metrics:
        groups = recorded_group_accuracy(champion.run_id)
        return promotion.ChampionFigures(champion.version, record.metrics[key], groups)
    loaded = modelstore.load_version(champion.name, champion.version, work_dir)
    return promotion.ChampionFigures(champion.version, evaluate(loaded), {})


def decide_again(
    candidate: promotion.CandidateFigures,
    policy: Any,
    champion_figures: Callable[[], promotion.ChampionFigures | None],
    incompatible: Callable[[], Refusal | None] = lambda: None,
) -> Recompute:
    """The ``recompute`` for :func:`register_candidate`: ``policy`` (the promotion config)
    against the champion of now, whose figures ``champion_figures`` reads; first, the
    refusal ``incompatible`` returns when that champion is another kind of model (see
    :func:`incompatibility`)."""

    def recompute() -> tuple[str, promotion.PromotionVerdict]:
        refusal = incompatible()
        if refusal is not None:
            return refusal
        figures = champion_figures()
        verdict = promotion.decide_promotion(candidate, figures, policy)
        return (figures.version if figures else ""), verdict

    return recompute


def incompatibility(
    name: str, model_identity: promotion.ModelIdentity, own_name: str
) -> Refusal | None:
    """The refusing verdict when ``name``'s champion of now is another kind of model
    (task, labels, input) than ``model_identity``, with that champion's version; None when
    there is no champion or it is the same kind.

    Args:
        own_name: the name the candidate's own dataset gives its model (for the fix).
    """
    try:
        champion = registry.resolve_version(f"{name}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return None
    recorded = registry.version_identity(champion)
    if recorded is None:
        return None
    differences = promotion.compare_identity(model_identity, recorded)
    if not differences:
        return None
    criterion = promotion.compatibility_criterion(differences, name, champion.version, own_name)
    return champion.version, promotion.refuse_incompatible(criterion)


def check_compatibility(
    name: str,
    model_identity: promotion.ModelIdentity,
    run_id: str,
    actor: str,
    lock: Lock,
    own_name: str,
) -> promotion.PromotionVerdict | None:
    """Refuse a candidate of another kind (task, labels, input) than ``name``'s champion
    (see :func:`incompatibility`).

    Returns:
        None when there is no champion or it is the same kind of model; otherwise the
        refusing verdict, recorded on the run (tagged refused) and in the audit trail.
    """
    refusal = incompatibility(name, model_identity, own_name)
    if refusal is None:
        return None
    champion_version, verdict = refusal
    record_refused_run(run_id, verdict)
    _audit_refusal(name, champion_version, run_id, actor, verdict, lock)
    return verdict


def record_refused_run(run_id: str, verdict: promotion.PromotionVerdict) -> None:
    """Tag run ``run_id`` refused, with ``verdict``'s summary and report."""
    summary = verdict.summary()[: tag.SUMMARY_CHARS]
    tracking.set_tags(run_id, {tag.VERDICT: "refused", tag.POLICY: summary})
    tracking.log_report(run_id, verdict.to_dict(), "reports/promotion.json")


def _audit_refusal(
    name: str,
    champion_version: str,
    run_id: str,
    actor: str,
    verdict: promotion.PromotionVerdict,
    lock: Lock,
) -> None:
    """The audit entry of a candidate of another kind than champion ``champion_version``."""
    registry.record_refusal(
        name,
        champion_version,
        actor,
        f"refused run {run_id}: not the same kind of model as champion v{champion_version}",
        verdict.summary(),
        lock(),
    )
