"""The retraining flow: prepare -> validate -> version -> bias -> fine-tune -> evaluate -> register.

Each task is one call into ``pipeline/``; the flow sequences them and stops at gates.
Models and frames pass between tasks in memory, so tasks neither cache nor persist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipeline import (
    bias,
    data,
    datasets,
    evaluate,
    finetune,
    forgetting,
    lineage,
    plots,
    registry,
    serving,
    tracking,
    validation,
    versioning,
    worker,
)
from pipeline.config import RetuneConfig

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


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
    model_name: str
    version: str
    aliases: list[str]
    alias_reason: str
    champion_version: str
    mlflow_run_id: str
    tracking_uri: str
    train_seconds: float
    report_dir: str


@task(**TASK_OPTIONS)
def prepare_data(config: RetuneConfig, project_dir: Path) -> dict[str, pd.DataFrame]:
    return data.prepare_frames(config.data, project_dir)


@task(**TASK_OPTIONS)
def validate_data(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], docs_dir: Path | None = None
) -> validation.ValidationReport:
    return validation.validate_dataset(frames, config.validation, config.data.labels, docs_dir)


@task(**TASK_OPTIONS)
def version_data(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], project_dir: Path
) -> versioning.DataVersion:
    return datasets.import_dataset(frames, config.data, project_dir)


@task(**TASK_OPTIONS)
def check_data_bias(config: RetuneConfig, frames: dict[str, pd.DataFrame]) -> bias.DataBiasReport:
    frame = pd.concat([frames[s] for s in data.SPLITS], ignore_index=True)
    return bias.check_data_bias(
        frame["text"].tolist(),
        frame["label"].tolist(),
        bias.load_gender_lexicon(),
        config.data.labels,
        config.bias.min_group_rows,
    )


@task(**TASK_OPTIONS)
def measure_base(
    config: RetuneConfig, train: pd.DataFrame, test: pd.DataFrame, lee: forgetting.SimilarityTask
) -> tuple[evaluate.EvaluationReport, float]:
    """The frozen base encoder: logistic probe on the task, and its Lee similarity score."""
    from pipeline.embeddings import embed_texts

    encoder, tokenizer = finetune.load_encoder(config.train.base_model)
    device = finetune.pick_device()
    bf16 = finetune.use_bf16(config.train.bf16, device)
    encoder.to(device)

    def embed(texts: list[str], max_length: int) -> np.ndarray:
        return embed_texts(encoder, tokenizer, texts, config.evaluate.batch_size, max_length, bf16)

    probe = evaluate.probe_baseline(
        embed(train["text"].tolist(), config.train.max_length),
        _label_ids(train, config),
        embed(test["text"].tolist(), config.train.max_length),
        _label_ids(test, config),
        config.data.labels,
        config.evaluate.probe_c,
    )
    return probe, forgetting.similarity_spearman(embed(lee.texts, 256), lee)


@task(**TASK_OPTIONS)
def train_model(
    config: RetuneConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    run_id: str | None,
    out_dir: Path,
) -> tuple[Any, Any, finetune.FineTuneResult]:
    """Fine-tune in this process, or data-parallel under torchrun; save to ``out_dir``.

    Checkpoints go to ``out_dir``'s sibling ``checkpoints/``, so a retried task resumes.
    With LoRA and ``lora_merge: false`` the adapter is also saved, to ``adapter/``.
    """
    from tqdm.auto import tqdm

    cfg = config.train
    logger = tracking.MlflowLogger(run_id) if run_id else None
    if cfg.nproc_per_node > 1 or cfg.nnodes > 1:
        work = out_dir.parent / "distributed"
        work.mkdir(parents=True, exist_ok=True)
        train.to_csv(work / "train.csv", index=False)
        val.to_csv(work / "validation.csv", index=False)
        spec = worker.write_spec(
            work / "spec.json",
            cfg,
            config.data.labels,
            work / "train.csv",
            work / "validation.csv",
            out_dir,
            out_dir.parent / "checkpoints",
        )
        worker.launch(spec, cfg.nproc_per_node, cfg.nnodes)
        result = worker.read_result(out_dir)
        for record in result.history:
            if logger is not None:
                logger.log_metrics(
                    {"val_loss": record.val_loss, "val_accuracy": record.val_accuracy}, record.epoch
                )
        model, tokenizer = finetune.load_saved_classifier(out_dir)
        return model, tokenizer, result

    model, tokenizer = finetune.load_classifier(cfg.base_model, config.data.labels, cfg.seed)
    if cfg.strategy == "lora":
        model = finetune.apply_lora(model, cfg)
    result = finetune.fine_tune(
        model,
        tokenizer,
        train["text"].tolist(),
        _label_ids(train, config),
        val["text"].tolist(),
        _label_ids(val, config),
        cfg,
        logger=logger,
        progress=lambda total: tqdm(total=total, desc="fine-tune", unit="step"),
        checkpoint_dir=out_dir.parent / "checkpoints",
    )
    if cfg.strategy == "lora":
        if not cfg.lora_merge:
            model.save_pretrained(out_dir.parent / "adapter")
        model = finetune.finish_lora(model, merge=True)  # the served model is always merged
    finetune.save_model(model, tokenizer, out_dir)
    return model, tokenizer, result


@task(**TASK_OPTIONS)
def evaluate_model(
    config: RetuneConfig,
    model: Any,
    tokenizer: Any,
    test: pd.DataFrame,
    lee: forgetting.SimilarityTask,
) -> tuple[evaluate.EvaluationReport, float]:
    from pipeline.embeddings import embed_texts

    bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())
    probs = finetune.predict_proba(
        model,
        tokenizer,
        test["text"].tolist(),
        config.evaluate.batch_size,
        config.train.max_length,
        bf16,
    )
    report = evaluate.classification_metrics(
        _label_ids(test, config), probs.argmax(1), config.data.labels
    )
    lee_emb = embed_texts(
        model.base_model, tokenizer, lee.texts, config.evaluate.batch_size, 256, bf16
    )
    return report, forgetting.similarity_spearman(lee_emb, lee)


@task(**TASK_OPTIONS)
def register(
    config: RetuneConfig,
    run_id: str,
    model_dir: Path,
    example: list[str],
    tags: dict[str, str],
    metric: float,
) -> registry.RegisteredVersion:
    model_uri = serving.log_classifier(run_id, model_dir, example, config.train.max_length)
    return registry.register_model(
        model_uri,
        config.registry.model_name,
        run_id,
        tags,
        metric,
        f"test_{config.registry.primary_metric}",
    )


def validation_verdict(report: validation.ValidationReport) -> str:
    warnings = report.warnings
    return f"passed with {len(warnings)} warnings" if warnings else "passed"


def _label_ids(frame: pd.DataFrame, config: RetuneConfig) -> np.ndarray:
    index = {label: i for i, label in enumerate(config.data.labels)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


@flow(name="retrain", log_prints=True)
def retrain(
    config: RetuneConfig, project_dir: str = ".", tracking_uri: str | None = None
) -> RunSummary:
    """Prepare, validate, version, check, fine-tune, evaluate and register one model.

    Args:
        tracking_uri: MLflow server or database; None uses the project's embedded store.
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    frames = prepare_data(config, root)
    docs_dir = root / "runs" / str(flow_run.id or "local") / "data_docs"
    report = validate_data(config, frames, docs_dir)
    if not report.success:
        raise validation.DataValidationError(report, config.data.source)
    logger.info("validation: %s", report.summary())
    for warning in report.warnings:
        logger.warning("validation warning: %s", warning.line())
    if report.docs_index:
        logger.info("validation Data Docs: %s", report.docs_index)
    version = version_data(config, frames, root)
    logger.info("data versioned: md5 %s", version.md5)
    data_bias = check_data_bias(config, frames)

    train = data.subsample(frames["train"], config.train.max_train_samples, config.train.seed)
    test = data.subsample(frames["test"], config.evaluate.max_test_samples, config.train.seed)
    lee = forgetting.load_lee()

    uri = tracking.configure(root, tracking_uri)
    run_key = str(flow_run.id or "local")
    out_dir = root / "runs" / run_key
    tags = lineage.lineage_tags(root, config, version) | {"retune.prefect_flow_run_id": run_key}
    run_id = tracking.start_run(root, config.registry.experiment, f"retrain-{run_key[:8]}", tags)
    try:
        tracking.log_params_and_metrics(run_id, _flat_params(config), {})
        if report.docs_index:
            tracking.log_folder(run_id, docs_dir, "data_docs")
        tracking.log_dataset(
            run_id,
            frames["train"],
            "train",
            str(root / config.data.data_dir),
            version.md5,
            "training",
        )
        tracking.log_dataset(
            run_id, frames["test"], "test", str(root / config.data.data_dir), version.md5, "testing"
        )
        probe, base_lee = measure_base(config, train, test, lee)
        model, tokenizer, trained = train_model(
            config, train, frames["validation"], run_id, out_dir / "model"
        )
        test_report, tuned_lee = evaluate_model(config, model, tokenizer, test, lee)
        lee_report = forgetting.ForgettingReport("lee", base_lee, tuned_lee)

        reports = {
            "validation": report.to_dict(),
            "data_bias": data_bias.to_dict(),
            "test_metrics": test_report.to_dict(),
            "probe_baseline": probe.to_dict(),
            "forgetting": lee_report.to_dict(),
            "training": asdict(trained) | {"loss_curve": trained.loss_curve[-50:]},
            "config": config.model_dump(),
        }
        for name, body in reports.items():
            (out_dir / "reports").mkdir(parents=True, exist_ok=True)
            (out_dir / "reports" / f"{name}.json").write_text(
                json.dumps(body, indent=2, default=str)
            )
            tracking.log_report(run_id, body, f"reports/{name}.json")
        curve = plots.plot_learning_curve(trained, out_dir / "plots" / "learning_curve.png")
        tracking.log_folder(run_id, curve.parent, "plots")
        if (out_dir / "adapter").is_dir():
            tracking.log_folder(run_id, out_dir / "adapter", "adapter")
        tracking.log_params_and_metrics(
            run_id,
            {
                "trainable_parameters": trained.trainable_parameters,
                "device": trained.device,
                "bf16": trained.bf16,
            },
            {
                "test_accuracy": test_report.accuracy,
                "test_macro_f1": test_report.macro_f1,
                "probe_test_accuracy": probe.accuracy,
                "probe_test_macro_f1": probe.macro_f1,
                "lee_spearman_base": base_lee,
                "lee_spearman_tuned": tuned_lee,
                "lee_spearman_drop": lee_report.drop,
                "best_epoch": trained.best_epoch,
                "train_seconds": trained.train_seconds,
            },
        )
        metric = getattr(test_report, config.registry.primary_metric)
        run_record = tracking.get_run(run_id)
        tags |= {
            f"retune.test_{config.registry.primary_metric}": f"{metric:.6f}",
            lineage.VALIDATION: validation_verdict(report),
            lineage.VALIDATION_REPORT: f"{run_record.artifact_uri}/reports/validation.json",
        }
        tracking.set_tags(run_id, tags)
        registered = register(
            config, run_id, out_dir / "model", test["text"].head(2).tolist(), tags, metric
        )
        tracking.set_tags(run_id, {"retune.registered_version": registered.version})
        shutil.rmtree(out_dir / "model")  # the registered copy lives in MLflow's artifacts
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    return RunSummary(
        data_md5=version.md5,
        rows={s: len(frames[s]) for s in data.SPLITS}
        | {"train_used": len(train), "test_used": len(test)},
        validation=report.summary(),
        validation_table=report.table_rows(),
        groups=[asdict(g) for g in data_bias.groups],
        test=test_report.to_dict(),
        probe=probe.to_dict(),
        forgetting=lee_report.to_dict(),
        model_name=registered.name,
        version=registered.version,
        aliases=registered.aliases,
        alias_reason=registered.decision.reason,
        champion_version=registered.champion_version,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        train_seconds=trained.train_seconds,
        report_dir=str(out_dir / "reports"),
    )


def _flat_params(config: RetuneConfig) -> dict[str, Any]:
    flat = {}
    for section, values in config.model_dump().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
