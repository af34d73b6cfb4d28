"""Promotion by hand: re-run the policy for a registered version, promote, roll back.

The same policy (:func:`pipeline.promotion.decide_promotion`), the same all-or-nothing
alias move and the same lock as the retraining flow; every change lands in the audit trail.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flows.locks import promotion_lock
from pipeline import gates, lineage, modelstore, promotion, registration, registry, tracking
from pipeline import tags as tag
from pipeline.config import RetuneConfig


class PromotionRefused(RuntimeError):
    """The policy refuses the version; ``--force`` with a reason overrides it."""

    def __init__(self, verdict: promotion.PromotionVerdict):
        self.verdict = verdict
        super().__init__(f"the promotion policy refuses it: {verdict.summary()}")


class IncompatibleModel(registry.PromotionError):
    """The version is another kind of model than the champion; even --force refuses it."""


def check_same_kind(name: str, version: str) -> None:
    """Refuse ``name``/``version`` if its task, labels or input differ from the champion's.

    Raises:
        IncompatibleModel: they differ (nothing moved; the message names the fix).
    """
    from pipeline import data

    candidate = registry.resolve_version(f"{name}/{version}")
    try:
        champion = registry.resolve_version(f"{name}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return
    ours, theirs = registry.version_identity(candidate), registry.version_identity(champion)
    if ours is None or theirs is None or champion.version == candidate.version:
        return
    differences = promotion.compare_identity(ours, theirs)
    if not differences:
        return
    own_name = name
    try:  # the name its own dataset gives it, for the fix
        recorded = _recorded_config(candidate.run_id or "")
        own_name = registry.MODEL_NAME_PREFIX + data.dataset_name(recorded.data)
    except Exception:  # no recorded config: suggest NAME-2
        pass
    criterion = promotion.compatibility_criterion(differences, name, champion.version, own_name)
    raise IncompatibleModel(
        f"{name}/{version} cannot take champion, not even with --force: {criterion.detail}; "
        "nothing was moved"
    )


def _recorded_config(run_id: str) -> RetuneConfig:
    return RetuneConfig.model_validate(tracking.read_report(run_id, "reports/config.json"))


def candidate_figures(version: registry.VersionInfo, config: RetuneConfig):
    """What the policy reads about a registered version, from its run and tags."""
    assert version.run_id is not None
    run = tracking.get_run(version.run_id)
    tags = run.tags | version.tags
    key = config.registry.primary_metric
    return promotion.CandidateFigures(
        metric_name=key,
        metric=run.metrics[f"test_{key}"],
        probe_metric=run.metrics.get(f"probe_test_{key}"),
        gates=gates.outcomes_from_tags(tags),
        group_accuracy=registration.recorded_group_accuracy(version.run_id),
    )


def champion_figures(
    candidate: registry.VersionInfo,
    champion: registry.VersionInfo,
    config: RetuneConfig,
    project_dir: Path,
) -> promotion.ChampionFigures:
    """The champion's primary metric on the candidate's test split.

    The same data version: the champion's recorded test metric is on that split. Another
    one: the candidate's data is restored from DVC and the champion predicts its test split.
    """
    key = config.registry.primary_metric
    assert champion.run_id is not None and candidate.run_id is not None
    same_data = candidate.tags.get(tag.DATA_MD5) == champion.tags.get(tag.DATA_MD5)
    if same_data:
        metric = tracking.get_run(champion.run_id).metrics[f"test_{key}"]
    else:
        metric = _evaluate_on_split(candidate, champion, config, project_dir)
    groups = registration.recorded_group_accuracy(champion.run_id)
    return promotion.ChampionFigures(champion.version, metric, groups)


def _evaluate_on_split(
    candidate: registry.VersionInfo,
    champion: registry.VersionInfo,
    config: RetuneConfig,
    project_dir: Path,
) -> float:
    import numpy as np

    from pipeline import data, evaluate, versioning

    trace = lineage.trace(f"{candidate.name}/{candidate.version}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = versioning.restore_dataset(
            project_dir, trace.data_dvc_md5, trace.dataset, Path(tmp) / "data"
        )
        test = data.read_splits(folder)["test"]
        test = data.subsample(test, config.evaluate.max_test_samples, config.train.seed)
    model = modelstore.load_version(champion.name, champion.version)
    predicted = model.predict(test[["text"]])["label"].tolist()
    index = {label: i for i, label in enumerate(config.data.labels)}
    y_true = np.array([index[x] for x in test["label"]])
    y_pred = np.array([index.get(x, -1) for x in predicted])
    report = evaluate.classification_metrics(y_true, y_pred, config.data.labels)
    return float(getattr(report, config.registry.primary_metric))


def decide(name: str, version: str, project_dir: Path) -> promotion.PromotionVerdict:
    """The policy for ``name``/``version`` against the current champion, from the records."""
    candidate = registry.resolve_version(f"{name}/{version}")
    assert candidate.run_id is not None
    config = _recorded_config(candidate.run_id)
    try:
        champion = registry.resolve_version(f"{name}@{registry.CHAMPION}")
    except registry.ModelRefError:
        champion = None
    figures = None
    if champion is not None and champion.version != candidate.version:
        figures = champion_figures(candidate, champion, config, project_dir)
    return promotion.decide_promotion(
        candidate_figures(candidate, config), figures, config.promotion
    )


def promote(
    name: str, version: str, reason: str, force: bool, project_dir: Path
) -> tuple[promotion.PromotionVerdict, registry.AuditEntry]:
    """Move ``champion`` to ``name``/``version`` if the policy agrees (or ``force``).

    Raises:
        PromotionRefused: the policy refuses and ``force`` is off.
        registry.PromotionError: the version does not load or predict, or already is champion.
        IncompatibleModel: another kind of model than the champion (``force`` or not).
    """
    if not reason.strip():
        raise ValueError("a promotion needs a --reason")
    check_same_kind(name, version)
    verdict = decide(name, version, project_dir)
    if not verdict.promote and not force:
        raise PromotionRefused(verdict)
    current = registry.champion_version(name)
    recorded = verdict.summary() if verdict.promote else f"forced over: {verdict.summary()}"
    entry = registry.move_champion(
        name,
        version,
        registry.default_actor(),
        reason,
        recorded,
        action="promote",
        lock=_lock(project_dir, name),
        expected_champion=current,
    )
    return verdict, entry


def rollback(name: str, reason: str, project_dir: Path) -> registry.AuditEntry:
    """Move ``champion`` back to the version that held it before the current one."""
    if not reason.strip():
        raise ValueError("a rollback needs a --reason")
    previous = registry.previous_champion(name)
    if previous is None:
        raise registry.PromotionError(
            f"{name}: the audit trail holds no earlier champion to roll back to"
        )
    return registry.move_champion(
        name,
        previous,
        registry.default_actor(),
        reason,
        f"rollback to v{previous}",
        action="rollback",
        lock=_lock(project_dir, name),
        expected_champion=registry.champion_version(name),
    )


def _lock(project_dir: Path, name: str):
    return promotion_lock(project_dir, os.environ.get("MLFLOW_TRACKING_URI"), name)
