"""The retraining flow: prepare -> validate -> version -> bias -> fine-tune -> evaluate -> register.

Each task is one call into ``pipeline/``: what differs between kinds of task comes from the
kind ``task:`` names (:mod:`pipeline.tasks`), what a run records from
:mod:`pipeline.run_record`. The flow sequences them and stops at gates. Models and frames
pass between tasks in memory, so tasks neither cache nor persist.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.locks import promotion_lock
from pipeline import (
    bias,
    data,
    datasets,
    fairness,
    forgetting,
    plots,
    promotion,
    registration,
    registry,
    retention,
    run_record,
    tasks,
    tracking,
    validation,
    versioning,
)
from pipeline import tags as tag
from pipeline.config import RetuneConfig
from pipeline.cpu import set_cpu_threads
from pipeline.registration import Recompute, Registered
from pipeline.reports import render_bias_page, render_forgetting_page, render_validation_page
from pipeline.run_record import ModelRefused, RunContext, RunSummary
from pipeline.tasks.base import Baseline, Champion, Evaluation, Trained

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
__all__ = ["ModelRefused", "RunSummary", "retrain"]


def _kind(config: RetuneConfig) -> tasks.TaskKind:
    return tasks.get(config.task)


@task(**TASK_OPTIONS)
def prepare_data(config: RetuneConfig, project_dir: Path) -> data.PreparedData:
    prepared = _kind(config).prepare(config, project_dir)
    for line in prepared.dropped_lines():
        get_run_logger().warning("dropped %s", line)
    return prepared


@task(**TASK_OPTIONS)
def validate_data(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], run_dir: Path, project_dir: Path
) -> validation.ValidationReport:
    """The shared and the kind's checks; the validation page; refuse on an error."""
    logger = get_run_logger()
    report = _kind(config).validate(config, frames, run_dir / "data_docs", project_dir)
    page = render_validation_page(report, run_dir / "html" / "validation.html", config.data.source)
    logger.info("validation page (opens offline): %s", page)
    if not report.success:
        raise validation.DataValidationError(report, config.data.source)
    logger.info("validation: %s", report.summary())
    for warning in report.warnings:
        logger.warning("validation warning: %s", warning.line())
    if report.docs_index:
        logger.info("validation Data Docs: %s", report.docs_index)
    return report


@task(**TASK_OPTIONS)
def version_data(
    config: RetuneConfig, prepared: data.PreparedData, project_dir: Path
) -> versioning.DataVersion:
    version = datasets.import_dataset(
        prepared.frames,
        config.data,
        project_dir,
        dropped=prepared.dropped,
        source=prepared.source,
        files=prepared.files,
    )
    get_run_logger().info("data versioned: md5 %s", version.md5)
    return version


@task(**TASK_OPTIONS)
def check_data_bias(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], project_dir: Path
) -> bias.DataBiasReport:
    report = _kind(config).check_data_bias(config, frames, project_dir)
    for flag in report.flags():
        get_run_logger().warning("data bias: %s", flag)
    return report


@task(**TASK_OPTIONS)
def retention_suite(config: RetuneConfig, project_dir: Path) -> retention.Suite:
    """The versioned retention suite (built, and committed to DVC when it changed)."""
    suite = _kind(config).retention_suite(config, project_dir)
    for warning in suite.warnings:
        get_run_logger().warning("retention suite: %s", warning)
    return suite


@task(**TASK_OPTIONS)
def open_run(
    config: RetuneConfig,
    project_dir: Path,
    tracking_uri: str | None,
    version: versioning.DataVersion,
    suite: retention.Suite,
    report: validation.ValidationReport,
    frames: dict[str, pd.DataFrame],
) -> RunContext:
    """Mark orphaned runs, then start this run's MLflow run with its lineage tags."""
    tracking.configure(project_dir, tracking_uri)
    for orphan in mark_orphaned_runs(config.registry.experiment):
        get_run_logger().warning(
            "MLflow run %s: its process %s is gone; marked FAILED", orphan.run_id, orphan.pid
        )
    run_key = str(flow_run.id or "local")
    return run_record.open_run(
        _kind(config), config, project_dir, tracking_uri, run_key, version, suite, report, frames
    )


@task(**TASK_OPTIONS)
def measure_base(
    config: RetuneConfig,
    train: pd.DataFrame,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> Baseline:
    """The frozen base model: a probe on the task and its retention scores (cached)."""
    return _kind(config).measure_base(config, train, test, suite, project_dir)


@task(**TASK_OPTIONS)
def measure_champion(
    config: RetuneConfig,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
    work_dir: Path,
) -> Champion | None:
    """The champion's retention scores and test metrics, or None without a champion."""
    return _kind(config).measure_champion(config, test, suite, project_dir, work_dir)


@task(**TASK_OPTIONS)
def train_model(
    config: RetuneConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    run_id: str | None,
    out_dir: Path,
    project_dir: Path,
) -> Trained:
    """Fine-tune in this process, or data-parallel under torchrun; save to ``out_dir``.

    Checkpoints go to ``out_dir``'s sibling ``checkpoints/``, so a retried task resumes.
    """
    return _kind(config).train(config, train, val, run_id, out_dir, project_dir)


@task(**TASK_OPTIONS)
def blend_with_base(
    config: RetuneConfig,
    trained: Trained,
    val: pd.DataFrame,
    suite: retention.Suite,
    base: Baseline,
    out_dir: Path,
    project_dir: Path,
) -> dict[str, Any]:
    """The mitigations applied; with WiSE-FT, the chosen blend replaces the model."""
    keep = config.forgetting
    mitigations: dict[str, Any] = {"l2sp": keep.l2sp, "distill": keep.distill}
    if keep.wise_ft:
        choice = _kind(config).blend_with_base(config, trained, val, suite, base, project_dir)
        mitigations["wise_ft"] = asdict(choice)
        plots.plot_alpha_curve(choice, out_dir / "plots" / "wise_ft.png")
    return mitigations


@task(**TASK_OPTIONS)
def evaluate_model(
    config: RetuneConfig,
    trained: Trained,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> Evaluation:
    """Test metrics of the tuned model and its retention scores."""
    return _kind(config).evaluate(config, trained, test, suite, project_dir)


@task(**TASK_OPTIONS)
def check_model_bias(
    config: RetuneConfig,
    test: pd.DataFrame,
    trained: Trained,
    evaluation: Evaluation,
    base: Baseline,
    champion: Champion | None,
    project_dir: Path,
    out_dir: Path,
) -> fairness.ModelBiasReport:
    """The bias probes on candidate, base and champion; the bias gate; the bias page."""
    kind = _kind(config)
    report = kind.check_model_bias(config, test, trained, evaluation, base, champion, project_dir)
    get_run_logger().info("%s", report.summary())
    render_bias_page(report, out_dir / "html" / "bias.html")
    return report


@task(**TASK_OPTIONS)
def check_forgetting(
    config: RetuneConfig,
    base: Baseline,
    evaluation: Evaluation,
    champion: Champion | None,
    suite: retention.Suite,
    mitigations: dict[str, Any],
    out_dir: Path,
) -> forgetting.ForgettingReport:
    """The forgetting gate: the tuned model's retention vs the base (and the champion's)."""
    report = forgetting.evaluate_forgetting(
        base.retention.outputs,
        evaluation.retention.outputs,
        suite.tasks,
        config.forgetting,
        suite.md5,
        base.retention.layers,
        evaluation.retention.layers,
        champion.retention.outputs if champion else None,
        champion.version if champion else None,
        suite.warnings,
        mitigations,
    )
    get_run_logger().info("forgetting gate: %s", report.gate.summary())
    render_forgetting_page(report, out_dir / "html" / "forgetting.html", config.registry.model_name)
    return report


@task(**TASK_OPTIONS)
def register(
    config: RetuneConfig,
    run_id: str,
    model_dir: Path,
    test: pd.DataFrame,
    tags: dict[str, str],
    verdict: promotion.PromotionVerdict,
    champion_version: str | None,
    actor: str,
    lock: Callable[[], Any],
    project_dir: Path,
    recompute: Recompute | None = None,
) -> Registered:
    """Log the model for serving, then register it with the alias the policy chose (see
    :func:`pipeline.registration.register_candidate`; a failed move deletes the version).

    Args:
        lock: makes the lock each alias move holds (a fresh one per move).
        recompute: decides again when the champion changed while this run trained.
    """
    kind = _kind(config)
    model_uri = kind.log_model(config, run_id, model_dir, test, project_dir)
    return registration.register_candidate(
        registry.model_name(config),
        run_id,
        model_uri,
        tags,
        verdict,
        champion_version or "",
        actor,
        lock,
        smoke_input=kind.examples(config, test, project_dir),
        recompute=recompute,
        logger=get_run_logger(),
    )


def current_champion_figures(
    config: RetuneConfig,
    name: str,
    data_md5: str,
    test: pd.DataFrame,
    work_dir: Path,
    project_dir: Path,
) -> promotion.ChampionFigures | None:
    """The figures of the champion that holds the alias now, for a verdict decided again
    (see :func:`pipeline.registration.current_champion_figures`)."""
    kind = _kind(config)
    return registration.current_champion_figures(
        name,
        data_md5,
        config.registry.primary_metric,
        partial(kind.loaded_metric, config, test=test, project_dir=project_dir),
        work_dir,
    )


def decide_again(
    config: RetuneConfig,
    name: str,
    candidate: promotion.CandidateFigures,
    data_md5: str,
    test: pd.DataFrame,
    work_dir: Path,
    project_dir: Path,
) -> Recompute:
    """The ``recompute`` for :func:`register`: the policy against the champion of now."""
    figures = partial(current_champion_figures, config, name, data_md5, test, work_dir, project_dir)
    identity = _kind(config).identity(config)
    incompatible = partial(registration.incompatibility, name, identity, _own_name(config))
    return registration.decide_again(candidate, config.promotion, figures, incompatible)


@task(**TASK_OPTIONS)
def check_compatibility(
    config: RetuneConfig,
    name: str,
    model_identity: promotion.ModelIdentity,
    run_id: str,
    actor: str,
    lock: Callable[[], Any],
) -> promotion.PromotionVerdict | None:
    """Refuse a candidate of another kind than ``name``'s champion (recorded on the run and
    in the audit trail); None when it is the same kind or there is no champion."""
    return registration.check_compatibility(
        name, model_identity, run_id, actor, lock, _own_name(config)
    )


def _own_name(config: RetuneConfig) -> str:
    """The model name the run's own dataset gives it (the fix a refusal suggests)."""
    return registry.MODEL_NAME_PREFIX + data.dataset_name(config.data)


def mark_orphaned_runs(experiment: str) -> list[tracking.Orphan]:
    """Runs of ``experiment`` left RUNNING by a killed process on this host: marked FAILED
    in MLflow (tagged orphaned), and their Prefect flow run Crashed where it is reachable."""
    orphans = tracking.mark_orphans(experiment)
    for orphan in orphans:
        flow_run_id = orphan.tags.get(tag.FLOW_RUN, "local")
        if flow_run_id != "local":
            crash_flow_run(flow_run_id, f"process {orphan.pid} was gone (killed)")
    return orphans


def crash_flow_run(flow_run_id: str, message: str) -> None:
    """Set a Prefect flow run Crashed, if it is still running; never raises."""
    import contextlib

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        found = client.read_flow_run(flow_run_id)
        if found.state is None or not found.state.is_final():
            client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)


@task(**TASK_OPTIONS)
def record_results(
    context: RunContext, config: RetuneConfig, results: run_record.Results
) -> tuple[promotion.PromotionVerdict, promotion.CandidateFigures]:
    """Log the reports, plots, metrics and gate tags; the promotion policy's verdict."""
    trained, probe = results.trained.result, results.base.probe
    run_record.write_reports(context, results.reports(config))
    run_record.log_artifacts(context, trained, results.kept)
    run_record.log_results(
        context, trained, results.evaluation, probe, results.kept, results.model_bias
    )
    candidate = run_record.record_gates(
        context, config, results.evaluation, probe, results.outcomes(), results.model_bias
    )
    figures = run_record.champion_figures(config, results.champion, results.model_bias)
    verdict = promotion.decide_promotion(candidate, figures, config.promotion)
    get_run_logger().info("promotion: %s", verdict.summary())
    run_record.record_verdict(context, verdict)
    return verdict, candidate


def flow_run_name() -> str:
    """``retrain news partial``: the Prefect UI says which data and strategy a run trains."""
    config = flow_run.parameters["config"]
    return f"retrain {data.dataset_name(config.data)} {config.train.strategy}"


@flow(name="retrain", log_prints=True, flow_run_name=flow_run_name)
def retrain(
    config: RetuneConfig, project_dir: str = ".", tracking_uri: str | None = None
) -> RunSummary:
    """Prepare, validate, version, check, fine-tune, evaluate and register one model.

    Args:
        tracking_uri: MLflow server or database; None uses the project's embedded store.
    """
    root = Path(project_dir).resolve()
    out_dir = root / "runs" / str(flow_run.id or "local")
    threads = set_cpu_threads(config.train.num_threads)  # every task's torch work
    get_run_logger().info("torch CPU threads: %d (train.num_threads overrides)", threads)
    prepared = prepare_data(config, root)
    frames = prepared.frames
    report = validate_data(config, frames, out_dir, root)
    version = version_data(config, prepared, root)
    data_bias = check_data_bias(config, frames, root)
    suite = retention_suite(config, root)
    train = data.subsample(frames["train"], config.train.max_train_samples, config.train.seed)
    test = data.subsample(frames["test"], config.evaluate.max_test_samples, config.train.seed)
    context = open_run(config, root, tracking_uri, version, suite, report, frames)
    with run_record.ended_on_error(context):
        refuse_other_kinds(config, context)
        base = measure_base(config, train, test, suite, root)
        champion = measure_champion(config, test, suite, root, out_dir)
        trained = train_model(
            config, train, frames["validation"], context.run_id, out_dir / "model", root
        )
        mitigations = blend_with_base(
            config, trained, frames["validation"], suite, base, out_dir, root
        )
        evaluation = evaluate_model(config, trained, test, suite, root)
        model_bias = check_model_bias(
            config, test, trained, evaluation, base, champion, root, out_dir
        )
        kept = check_forgetting(config, base, evaluation, champion, suite, mitigations, out_dir)
        used = {"train_used": len(train), "test_used": len(test)}
        results = run_record.Results(
            version,
            frames,
            used,
            report,
            data_bias,
            base,
            champion,
            trained,
            evaluation,
            model_bias,
            kept,
        )
        verdict, candidate = record_results(context, config, results)
        registered, final = register_model(config, context, results, test, verdict, candidate)
        reports = results.reports(config) | {"rows": results.rows()}
        run_record.write_card(context, reports, registered and registered.version, final)
    tracking.end_run(context.run_id)
    if final.refused or registered is None:
        raise ModelRefused(context.run_id, kept, model_bias, final)
    return summarize(context, results, registered)


def refuse_other_kinds(config: RetuneConfig, context: RunContext) -> None:
    """A candidate of another kind than the champion is refused before any training."""
    incompatible = check_compatibility(
        config,
        context.model_name,
        _kind(config).identity(config),
        context.run_id,
        registry.default_actor(context.out_dir.name),
        partial(promotion_lock, context.project_dir, context.tracking_uri, context.model_name),
    )
    if incompatible is not None:
        get_run_logger().error("promotion: %s", incompatible.summary())
        tracking.end_run(context.run_id)
        raise ModelRefused(context.run_id, None, None, incompatible)


def register_model(
    config: RetuneConfig,
    context: RunContext,
    results: run_record.Results,
    test: pd.DataFrame,
    verdict: promotion.PromotionVerdict,
    candidate: promotion.CandidateFigures,
) -> tuple[Registered | None, promotion.PromotionVerdict]:
    """Register the candidate unless a gate refused it (``promotion.register_refused``
    registers it anyway, without an alias); the saved model folder is removed after.

    Returns:
        The registered version (None if none) and the verdict applied: decided again, it
        refuses a candidate of another kind than the champion that took the alias
        meanwhile (no version is left registered then).
    """
    registered, final = None, verdict
    if not verdict.refused or config.promotion.register_refused:
        name, out_dir = context.model_name, context.out_dir
        recompute = decide_again(
            config, name, candidate, results.version.md5, test, out_dir, context.project_dir
        )
        try:
            registered = register(
                config,
                context.run_id,
                results.trained.model_dir,
                test,
                context.tags,
                verdict,
                results.champion.version if results.champion else None,
                registry.default_actor(out_dir.name),
                partial(promotion_lock, context.project_dir, context.tracking_uri, name),
                context.project_dir,
                recompute,
            )
            final = registered.verdict
            tracking.set_tags(
                context.run_id,
                {
                    tag.REGISTERED_VERSION: registered.version,
                    tag.POLICY: final.summary()[: tag.SUMMARY_CHARS],
                },
            )
        except registration.IncompatibleModel as refused:
            get_run_logger().error("promotion (decided again): %s", refused.verdict.summary())
            final = refused.verdict
            registration.record_refused_run(context.run_id, final)
    shutil.rmtree(results.trained.model_dir)  # a registered copy lives in MLflow's artifacts
    return registered, final


def summarize(
    context: RunContext, results: run_record.Results, registered: Registered
) -> RunSummary:
    """What the CLI prints and tests read."""
    report, kept, model_bias = results.validation, results.kept, results.model_bias
    return RunSummary(
        data_md5=results.version.md5,
        rows=results.rows() | results.used,
        validation=report.summary(),
        validation_table=report.table_rows(),
        groups=[asdict(g) for g in results.data_bias.groups],
        test=results.evaluation.report.to_dict(),
        probe=results.base.probe.to_dict(),
        forgetting=kept.to_dict(),
        forgetting_table=kept.table_rows(),
        bias=model_bias.to_dict(),
        bias_table=model_bias.table_rows(),
        bias_groups=model_bias.group_rows(),
        data_bias_flags=results.data_bias.flags(),
        model_name=registered.name,
        version=registered.version,
        aliases=registered.aliases,
        alias_reason=registered.verdict.summary(),
        champion_version=registered.champion_version,
        mlflow_run_id=context.run_id,
        tracking_uri=context.tracking_uri,
        train_seconds=results.trained.result.train_seconds,
        report_dir=str(context.out_dir / "reports"),
        links=tracking.ui_links(
            context.tracking_uri, context.run_id, registered.name, registered.version
        ),
    )
