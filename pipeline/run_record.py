"""What one retraining run records: its MLflow run, reports, metrics, tags and summary.

The flow (``flows/retrain.py``) sequences the steps; this module turns their results into
the run's record, the same for every kind of task: the lineage tags it opens with, the JSON
reports, plots and pages it logs, the gate outcomes and figures the promotion policy reads,
and the summary the CLI prints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import data, lineage, plots, promotion, retention, tracking, validation, versioning
from pipeline import tags as tag
from pipeline.config import RetuneConfig
from pipeline.gates import GateOutcome
from pipeline.tasks.base import Baseline, Champion, Evaluation, TaskKind, Trained


class ModelRefused(RuntimeError):
    """A gate refused the model: recorded in MLflow (tagged refused), never registered."""

    def __init__(
        self,
        run_id: str,
        forgetting_report: Any | None,
        bias_report: Any | None,
        verdict: promotion.PromotionVerdict | None = None,
    ):
        self.run_id, self.forgetting, self.bias = run_id, forgetting_report, bias_report
        self.verdict = verdict
        reasons = []
        if verdict is not None and verdict.incompatible:
            reasons += [f"{c.name}: {c.detail}" for c in verdict.criteria if not c.passed]
        if forgetting_report is not None and forgetting_report.gate.refused:
            reasons.append("forgetting: " + "; ".join(forgetting_report.gate.failures))
        if bias_report is not None and bias_report.gate is not None and bias_report.gate.refused:
            reasons.append("bias: " + "; ".join(bias_report.gate.failures))
        super().__init__(
            f"model refused (recorded as MLflow run {run_id}, not registered): "
            + " | ".join(reasons)
        )


@dataclass
class RunContext:
    """One run's MLflow run and where its files go; ``tags`` grows as gates decide."""

    run_id: str
    tracking_uri: str
    project_dir: Path
    out_dir: Path  # runs/<flow run id>/
    model_name: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSummary:
    """What one run produced; printed at the end and returned to callers and tests."""

    data_md5: str
    rows: dict[str, int]
    validation: str
    validation_table: list[tuple[str, str, str, str]]
    groups: list[dict[str, Any]]
    test: dict[str, Any]
    probe: dict[str, Any]
    forgetting: dict[str, Any]
    forgetting_table: list[tuple[str, ...]]
    bias: dict[str, Any]
    bias_table: list[tuple[str, ...]]
    bias_groups: list[tuple[str, ...]]
    data_bias_flags: list[str]
    model_name: str
    version: str
    aliases: list[str]
    alias_reason: str
    champion_version: str
    mlflow_run_id: str
    tracking_uri: str
    train_seconds: float
    report_dir: str
    links: dict[str, str]  # MLflow UI: the run and the model version


@dataclass(frozen=True)
class Results:
    """Everything one run measured, from validation to the gates."""

    version: versioning.DataVersion
    frames: dict[str, pd.DataFrame]
    used: dict[str, int]  # rows of the train and test splits the run used (subsampled)
    validation: validation.ValidationReport
    data_bias: Any  # bias.DataBiasReport
    base: Baseline
    champion: Champion | None
    trained: Trained
    evaluation: Evaluation
    model_bias: Any  # fairness.ModelBiasReport
    kept: Any  # forgetting.ForgettingReport

    def outcomes(self) -> list[GateOutcome]:
        """The validation, forgetting and bias gates' outcomes, in that order."""
        return [
            self.validation.outcome(),
            self.kept.gate.outcome(),
            self.model_bias.gate.outcome(),
        ]

    def reports(self, config: RetuneConfig) -> dict[str, Any]:
        """The run's JSON reports by name (what the card and ``retune promote`` read)."""
        return {
            "validation": self.validation.to_dict(),
            "data_bias": self.data_bias.to_dict(),
            "test_metrics": self.evaluation.report.to_dict(),
            "probe_baseline": self.base.probe.to_dict(),
            "forgetting": self.kept.to_dict(),
            "bias": self.model_bias.to_dict(),
            "training": training_report(self.trained.result),
            "config": config.model_dump(),
        }

    def rows(self) -> dict[str, int]:
        return {s: len(self.frames[s]) for s in data.SPLITS}


def flat_params(config: RetuneConfig) -> dict[str, Any]:
    """The config as MLflow params: ``section.key`` (and top-level keys as they are)."""
    flat: dict[str, Any] = {}
    for section, values in config.model_dump().items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def open_run(
    kind: TaskKind,
    config: RetuneConfig,
    project_dir: Path,
    tracking_uri: str | None,
    run_key: str,
    version: versioning.DataVersion,
    suite: retention.Suite,
    report: validation.ValidationReport,
    frames: dict[str, pd.DataFrame],
) -> RunContext:
    """Start the MLflow run with its lineage and identity tags, the config as params, the
    Data Docs and the train and test datasets as inputs."""
    from pipeline import registry

    uri = tracking.configure(project_dir, tracking_uri)
    tags = lineage.lineage_tags(project_dir, config, version) | {
        tag.FLOW_RUN: run_key,
        tag.RETENTION_SUITE_MD5: suite.md5,
    }
    tags |= kind.identity(config).to_tags() | tracking.process_tags()
    name = tracking.run_name(data.dataset_name(config.data), config.train.strategy, run_key)
    run_id = tracking.start_run(project_dir, config.registry.experiment, name, tags)
    context = RunContext(
        run_id, uri, project_dir, project_dir / "runs" / run_key, registry.model_name(config), tags
    )
    with ended_on_error(context):
        tracking.log_params_and_metrics(run_id, flat_params(config), {})
        if report.docs_index:
            tracking.log_folder(run_id, Path(report.docs_index).parent, "data_docs")
        data_dir = str(project_dir / config.data.data_dir)
        for split, context_name in (("train", "training"), ("test", "testing")):
            tracking.log_dataset(run_id, frames[split], split, data_dir, version.md5, context_name)
    return context


@contextmanager
def ended_on_error(context: RunContext) -> Iterator[None]:
    """End the MLflow run KILLED (SIGTERM, Ctrl-C) or FAILED when the block raises;
    a refusal has ended it already, as recorded."""
    try:
        yield
    except ModelRefused:
        raise
    except BaseException as err:
        tracking.end_run(context.run_id, tracking.end_status(err))
        raise


def write_reports(context: RunContext, reports: dict[str, Any]) -> None:
    """Each report as ``reports/<name>.json`` in the run folder and in MLflow."""
    folder = context.out_dir / "reports"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in reports.items():
        (folder / f"{name}.json").write_text(json.dumps(body, indent=2, default=str))
        tracking.log_report(context.run_id, body, f"reports/{name}.json")


def log_artifacts(context: RunContext, trained: Any, kept: Any) -> None:
    """The learning-curve and forgetting plots, the HTML pages, and a LoRA adapter."""
    out = context.out_dir
    curve = plots.plot_learning_curve(trained, out / "plots" / "learning_curve.png")
    plots.plot_forgetting(kept, out / "plots" / "forgetting.png")
    tracking.log_folder(context.run_id, curve.parent, "plots")
    tracking.log_folder(context.run_id, out / "html", "reports")
    if (out / "adapter").is_dir():
        tracking.log_folder(context.run_id, out / "adapter", "adapter")


def log_results(
    context: RunContext,
    trained: Any,
    evaluation: Evaluation,
    probe: Any,
    kept: Any,
    model_bias: Any,
) -> None:
    """The run's final params and metrics: test and probe metrics, forgetting, bias."""
    tracking.log_params_and_metrics(
        context.run_id,
        {
            "trainable_parameters": trained.trainable_parameters,
            "device": trained.device,
            "bf16": trained.bf16,
        },
        {f"test_{k}": v for k, v in headline_metrics(evaluation.report).items()}
        | {f"probe_test_{k}": v for k, v in headline_metrics(probe).items()}
        | {
            **kept.metrics(),
            **model_bias.metrics(),
            "best_epoch": trained.best_epoch,
            "train_seconds": trained.train_seconds,
        },
    )


def headline_metrics(report: Any) -> dict[str, float]:
    """A task metrics report's scalar scores (e.g. accuracy, macro_f1; not counts)."""
    return {k: float(v) for k, v in report.to_dict().items() if isinstance(v, float)}


def gated_group_accuracy(report: Any | None) -> dict[str, float]:
    """Accuracy of the groups large enough to gate on (bias.min_gate_rows), for the policy."""
    if report is None or report.gate_groups is None:
        return {}
    return {g.group: g.accuracy for g in report.gate_groups.groups if not g.too_small}


def record_gates(
    context: RunContext,
    config: RetuneConfig,
    evaluation: Evaluation,
    probe: Any,
    outcomes: list[GateOutcome],
    model_bias: Any,
) -> promotion.CandidateFigures:
    """Tag the run with the gates' outcomes and its verdict; the candidate's figures."""
    metric_name = config.registry.primary_metric
    metric = float(getattr(evaluation.report, metric_name))
    refused = not all(o.passed for o in outcomes)
    artifact_uri = tracking.get_run(context.run_id).artifact_uri
    context.tags |= {
        tag.test_metric(metric_name): f"{metric:.6f}",
        tag.VALIDATION_REPORT: f"{artifact_uri}/reports/validation.json",
        tag.VERDICT: "refused" if refused else "accepted",
    }
    for outcome in outcomes:
        context.tags |= outcome.to_tags()
    return promotion.CandidateFigures(
        metric_name=metric_name,
        metric=metric,
        probe_metric=getattr(probe, metric_name),
        gates=outcomes,
        group_accuracy=gated_group_accuracy(model_bias),
    )


def champion_figures(
    config: RetuneConfig, champion: Champion | None, model_bias: Any
) -> promotion.ChampionFigures | None:
    """The champion's primary metric and gated group accuracy on this test split."""
    if champion is None:
        return None
    return promotion.ChampionFigures(
        str(champion.version),
        float(getattr(champion.test_report, config.registry.primary_metric)),
        gated_group_accuracy(model_bias.champion),
    )


def record_verdict(context: RunContext, verdict: promotion.PromotionVerdict) -> None:
    context.tags[tag.POLICY] = verdict.summary()[: tag.SUMMARY_CHARS]
    tracking.set_tags(context.run_id, context.tags)
    tracking.log_report(context.run_id, verdict.to_dict(), "reports/promotion.json")


def write_card(
    context: RunContext,
    reports: dict[str, Any],
    version: str | None,
    verdict: promotion.PromotionVerdict,
) -> Path:
    """The model card (Markdown and HTML), in the run folder and logged to the run."""
    from pipeline import card

    inputs = card.CardInputs(
        model_name=context.model_name,
        version=version,
        reports=reports,
        tags=context.tags,
        run_id=context.run_id,
        verdict=verdict.summary(),
    )
    folder = context.out_dir / "card"
    card.write_card(folder, inputs)
    tracking.log_folder(context.run_id, folder, "card")
    return folder


def training_report(trained: Any) -> dict[str, Any]:
    return asdict(trained) | {"loss_curve": trained.loss_curve[-50:]}
