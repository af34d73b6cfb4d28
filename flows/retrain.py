"""The retraining flow: prepare -> validate -> version -> bias -> fine-tune -> evaluate -> register.

Each task is one call into ``pipeline/``; the flow sequences them and stops at gates.
Models and frames pass between tasks in memory, so tasks neither cache nor persist.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.locks import promotion_lock
from pipeline import (
    bias,
    card,
    data,
    datasets,
    evaluate,
    fairness,
    finetune,
    forgetting,
    identity,
    lineage,
    mitigation,
    modelstore,
    plots,
    promotion,
    registration,
    registry,
    retention,
    serving,
    tracking,
    validation,
    versioning,
    worker,
)
from pipeline import tags as tag
from pipeline.config import RetuneConfig
from pipeline.cpu import set_cpu_threads
from pipeline.registration import Recompute, Registered
from pipeline.reports import render_bias_page, render_forgetting_page, render_validation_page

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
Predict = Callable[[list[str]], np.ndarray]  # texts -> (N, K) class probabilities


class ModelRefused(RuntimeError):
    """A gate refused the model: recorded in MLflow (tagged refused), never registered."""

    def __init__(
        self,
        run_id: str,
        forgetting_report: forgetting.ForgettingReport | None,
        bias_report: fairness.ModelBiasReport | None,
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


@task(**TASK_OPTIONS)
def prepare_data(config: RetuneConfig, project_dir: Path) -> data.PreparedData:
    return data.prepare_dataset(config.data, project_dir)


@task(**TASK_OPTIONS)
def validate_data(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], docs_dir: Path | None = None
) -> validation.ValidationReport:
    tokens = datasets.count_tokens(frames, config.train.base_model, config.train.max_length)
    return validation.validate_dataset(
        frames, config.validation, config.data.labels, docs_dir, tokens=tokens
    )


@task(**TASK_OPTIONS)
def version_data(
    config: RetuneConfig,
    frames: dict[str, pd.DataFrame],
    project_dir: Path,
    dropped: dict[str, int] | None = None,
) -> versioning.DataVersion:
    return datasets.import_dataset(frames, config.data, project_dir, dropped=dropped)


def load_lexicon(config: RetuneConfig, project_dir: Path) -> identity.Lexicon:
    folder = config.bias.lexicon_dir
    return identity.load_lexicons(config.bias.lexicons, project_dir / folder if folder else None)


def group_membership(frame: pd.DataFrame, lexicon: identity.Lexicon) -> pd.DataFrame:
    """Identity groups per row: the data's identity column if it has one, else the lexicons."""
    if "identity" in frame:
        return identity.groups_from_column(frame["identity"].tolist())
    return identity.assign_groups(frame["text"].tolist(), lexicon)


@task(**TASK_OPTIONS)
def check_data_bias(
    config: RetuneConfig, frames: dict[str, pd.DataFrame], lexicon: identity.Lexicon
) -> bias.DataBiasReport:
    frame = pd.concat([frames[s] for s in data.SPLITS], ignore_index=True)
    return bias.check_data_bias(
        frame["text"].tolist(),
        frame["label"].tolist(),
        lexicon,
        config.data.labels,
        config.bias.min_group_rows,
        min_group_share=config.bias.min_group_share,
        max_label_rate_gap=config.bias.max_label_rate_gap,
        membership=group_membership(frame, lexicon),
    )


@task(**TASK_OPTIONS)
def retention_suite(config: RetuneConfig, project_dir: Path) -> retention.Suite:
    """The versioned retention suite (built, and committed to DVC when it changed)."""
    return retention.ensure_suite(
        project_dir, config.forgetting, config.data.data_dir, push=config.data.dvc_push
    )


@dataclass(frozen=True)
class Retention:
    """One encoder's outputs on the retention suite, and its per-layer CKA features."""

    outputs: dict[str, forgetting.TaskOutputs]
    layers: Any  # np.ndarray (L + 1, N, H)
    cached: bool


def score_retention(
    config: RetuneConfig,
    encoder: Any,
    tokenizer: Any,
    suite: retention.Suite,
    project_dir: Path,
    weights_sha: str | None = None,
) -> Retention:
    """Score an encoder on the suite; with ``weights_sha``, read and fill the score cache."""
    from pipeline.embeddings import embed_layers

    cfg = config.forgetting
    path = None
    if weights_sha is not None:
        path = forgetting.cache_file(project_dir / cfg.cache_dir, weights_sha, suite.md5)
        cached = forgetting.load_cached(path, suite.tasks)
        if cached is not None:
            return Retention(cached[0], cached[1], cached=True)
    outputs = forgetting.score_encoder(
        encoder, tokenizer, suite.tasks, config.evaluate.batch_size, cfg.max_length
    )
    layers = embed_layers(
        encoder, tokenizer, forgetting.cka_texts(suite.tasks, cfg.cka_texts), 64, cfg.max_length
    )
    if path is not None:
        forgetting.save_cached(path, outputs, layers)
    return Retention(outputs, layers, cached=False)


@task(**TASK_OPTIONS)
def measure_base(
    config: RetuneConfig,
    train: pd.DataFrame,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> tuple[evaluate.EvaluationReport, Retention, Predict]:
    """The frozen base encoder: logistic probe on the task, its retention scores (cached),
    and the probe's predict function (for the bias comparison)."""
    from pipeline.embeddings import embed_texts

    encoder, tokenizer = finetune.load_encoder(config.train.base_model)
    device = finetune.pick_device()
    bf16 = finetune.use_bf16(config.train.bf16, device)
    encoder.to(device)

    def embed(texts: list[str], max_length: int) -> np.ndarray:
        return embed_texts(encoder, tokenizer, texts, config.evaluate.batch_size, max_length, bf16)

    fitted = evaluate.fit_probe(
        embed(train["text"].tolist(), config.train.max_length),
        _label_ids(train, config),
        config.evaluate.probe_c,
    )

    def predict(texts: list[str]) -> np.ndarray:
        return fitted.predict_proba(embed(texts, config.train.max_length))

    test_probs = predict(test["text"].tolist())
    probe = evaluate.classification_metrics(
        _label_ids(test, config), test_probs.argmax(1), config.data.labels
    )
    sha = lineage.weights_sha256(config.train.base_model)
    cache_key = None if sha.startswith("unresolved:") else sha
    retained = score_retention(config, encoder, tokenizer, suite, project_dir, cache_key)
    return probe, retained, predict


@task(**TASK_OPTIONS)
def measure_champion(
    config: RetuneConfig, suite: retention.Suite, project_dir: Path, work_dir: Path
) -> tuple[str | None, Retention | None, Predict | None]:
    """The current champion's retention scores (cached by its weights) and its predict
    function, or Nones when there is no champion."""
    try:
        champion = registry.resolve_version(f"{registry.model_name(config)}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return None, None, None
    loaded = modelstore.load_version(
        champion.name, champion.version, work_dir, digest=lineage.folder_sha256
    )
    model, tokenizer = loaded.predictor.model, loaded.predictor.tokenizer
    sha = loaded.digest
    scores = score_retention(config, model.base_model, tokenizer, suite, project_dir, sha)
    return champion.version, scores, classifier_predict(config, model, tokenizer)


def classifier_predict(config: RetuneConfig, model: Any, tokenizer: Any) -> Predict:
    bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())

    def predict(texts: list[str]) -> np.ndarray:
        return finetune.predict_proba(
            model, tokenizer, texts, config.evaluate.batch_size, config.train.max_length, bf16
        )

    return predict


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
        model_dir = out_dir
        if cfg.nnodes > 1:  # every node must see the spec, the data and the output
            shared = os.environ.get("RETUNE_SHARED_DIR")
            if not shared:
                raise ValueError(
                    "train.nnodes > 1 needs RETUNE_SHARED_DIR: a folder every node mounts at "
                    "the same path, where the other nodes wait in `retune join`"
                )
            job_id = f"retune-{run_id or uuid.uuid4().hex}"  # a retried task resumes
            work = Path(shared) / job_id
            model_dir = work / "model"
        work.mkdir(parents=True, exist_ok=True)
        train.to_csv(work / "train.csv", index=False)
        val.to_csv(work / "validation.csv", index=False)
        spec = worker.write_spec(
            work / "spec.json",
            cfg,
            config.data.labels,
            work / "train.csv",
            work / "validation.csv",
            model_dir,
            work / "checkpoints" if cfg.nnodes > 1 else out_dir.parent / "checkpoints",
            config.forgetting,
        )
        if cfg.nnodes > 1:
            worker.train_on_nodes(Path(shared), job_id, spec, cfg.nproc_per_node, cfg.nnodes)
            shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        else:
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
    keep = config.forgetting
    regularizer = mitigation.build_regularizer(
        model, tokenizer, keep.l2sp, keep.distill, keep.distill_batch_size, cfg.seed
    )  # built from the pretrained weights, before any step
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
        regularizer=regularizer,
    )
    if cfg.strategy == "lora":
        if not cfg.lora_merge:
            model.save_pretrained(out_dir.parent / "adapter")
        model = finetune.finish_lora(model, merge=True)  # the served model is always merged
    finetune.save_model(model, tokenizer, out_dir)
    return model, tokenizer, result


@task(**TASK_OPTIONS)
def blend_with_base(
    config: RetuneConfig,
    model: Any,
    tokenizer: Any,
    val: pd.DataFrame,
    suite: retention.Suite,
    base: Retention,
    out_dir: Path,
) -> mitigation.AlphaChoice:
    """WiSE-FT: sweep alpha, keep the best-validating blend within the forgetting budget.

    The chosen blend replaces the model in place and in ``out_dir``.
    """
    cfg = config.forgetting
    base_encoder, _ = finetune.load_encoder(config.train.base_model)
    base_state = mitigation.encoder_state(base_encoder)
    del base_encoder
    labels = _label_ids(val, config)
    bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())
    budget = cfg.model_copy(update={"gate": "error"})

    def validate(blend: Any) -> float:
        probs = finetune.predict_proba(
            blend,
            tokenizer,
            val["text"].tolist(),
            config.evaluate.batch_size,
            config.train.max_length,
            bf16,
        )
        report = evaluate.classification_metrics(labels, probs.argmax(1), config.data.labels)
        return float(getattr(report, config.registry.primary_metric))

    def retain(blend: Any) -> forgetting.Comparison:
        outputs = forgetting.score_encoder(
            blend.base_model, tokenizer, suite.tasks, config.evaluate.batch_size, cfg.max_length
        )
        return forgetting.compare(
            base.outputs, outputs, suite.tasks, "base", cfg.bootstrap, cfg.seed
        )

    choice = mitigation.wise_ft(
        model,
        base_state,
        cfg.wise_ft_alphas,
        validate,
        retain,
        lambda kept: forgetting.forgetting_gate(kept, budget).passed,
    )
    finetune.save_model(model, tokenizer, out_dir)
    return choice


@task(**TASK_OPTIONS)
def evaluate_model(
    config: RetuneConfig,
    model: Any,
    tokenizer: Any,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> tuple[evaluate.EvaluationReport, Retention, np.ndarray]:
    """Test metrics of the tuned classifier, its encoder's retention scores, test probs."""
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
    retained = score_retention(config, model.base_model, tokenizer, suite, project_dir)
    return report, retained, probs


@task(**TASK_OPTIONS)
def check_model_bias(
    config: RetuneConfig,
    test: pd.DataFrame,
    lexicon: identity.Lexicon,
    candidate: Predict,
    candidate_probs: np.ndarray,
    base_probe: Predict,
    champion: Predict | None,
    champion_version: str | None,
    champion_probs: np.ndarray | None = None,
) -> fairness.ModelBiasReport:
    """Per-group metrics, identity swaps and CrowS-Pairs for the candidate, the base probe
    and the champion on the test split; the bias gate on the candidate."""
    texts, y_true = test["text"].tolist(), _label_ids(test, config)
    membership = group_membership(test, lexicon)
    crows = identity.load_crows_pairs()
    labels = config.data.labels

    def measure(predict: Predict, name: str, probs: np.ndarray | None = None):
        return fairness.measure_model_bias(
            predict, texts, y_true, membership, lexicon, crows, config.bias, labels, name, probs
        )

    return fairness.evaluate_model_bias(
        measure(candidate, "candidate", candidate_probs),
        config.bias,
        base_probe=measure(base_probe, "base probe"),
        champion=(
            measure(champion, f"champion v{champion_version}", champion_probs) if champion else None
        ),
    )


@task(**TASK_OPTIONS)
def register(
    config: RetuneConfig,
    run_id: str,
    model_dir: Path,
    example: list[str],
    tags: dict[str, str],
    verdict: promotion.PromotionVerdict,
    champion_version: str | None,
    actor: str,
    lock: Callable[[], Any],
    recompute: Recompute | None = None,
) -> Registered:
    """Log the model, then register it with the alias the policy chose (see
    :func:`pipeline.registration.register_candidate`; a failed move deletes the version).

    Args:
        lock: makes the lock each alias move holds (a fresh one per move).
        recompute: decides again when the champion changed while this run trained.
    """
    model_uri = serving.log_classifier(run_id, model_dir, example, config.train.max_length)
    return registration.register_candidate(
        registry.model_name(config),
        run_id,
        model_uri,
        tags,
        verdict,
        champion_version or "",
        actor,
        lock,
        smoke_texts=example,
        recompute=recompute,
        logger=get_run_logger(),
    )


def current_champion_figures(
    config: RetuneConfig, name: str, data_md5: str, test: pd.DataFrame, work_dir: Path
) -> promotion.ChampionFigures | None:
    """The figures of the champion that holds the alias now, for a verdict decided again
    (see :func:`pipeline.registration.current_champion_figures`)."""

    def evaluate_on_test(champion: modelstore.LoadedModel) -> float:
        predictor = champion.predictor
        probs = classifier_predict(config, predictor.model, predictor.tokenizer)(
            test["text"].tolist()
        )
        report = evaluate.classification_metrics(
            _label_ids(test, config), probs.argmax(1), config.data.labels
        )
        return getattr(report, config.registry.primary_metric)

    return registration.current_champion_figures(
        name, data_md5, config.registry.primary_metric, evaluate_on_test, work_dir
    )


def decide_again(
    config: RetuneConfig,
    name: str,
    candidate: promotion.CandidateFigures,
    data_md5: str,
    test: pd.DataFrame,
    work_dir: Path,
) -> Recompute:
    """The ``recompute`` for :func:`register`: the policy against the champion of now."""
    figures = partial(current_champion_figures, config, name, data_md5, test, work_dir)
    return registration.decide_again(candidate, config.promotion, figures)


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
    own_name = registry.MODEL_NAME_PREFIX + data.dataset_name(config.data)
    return registration.check_compatibility(name, model_identity, run_id, actor, lock, own_name)


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


def gated_group_accuracy(report: fairness.ModelBiasReport | None) -> dict[str, float]:
    """Accuracy of the groups large enough to gate on (bias.min_gate_rows), for the policy."""
    if report is None or report.gate_groups is None:
        return {}
    return {g.group: g.accuracy for g in report.gate_groups.groups if not g.too_small}


def _label_ids(frame: pd.DataFrame, config: RetuneConfig) -> np.ndarray:
    index = {label: i for i, label in enumerate(config.data.labels)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


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
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    threads = set_cpu_threads(config.train.num_threads)  # every task's torch work
    logger.info("torch CPU threads: %d (train.num_threads overrides)", threads)
    prepared = prepare_data(config, root)
    frames = prepared.frames
    for line in prepared.dropped_lines():
        logger.warning("dropped %s", line)
    docs_dir = root / "runs" / str(flow_run.id or "local") / "data_docs"
    report = validate_data(config, frames, docs_dir)
    page = render_validation_page(
        report, docs_dir.parent / "html" / "validation.html", config.data.source
    )
    logger.info("validation page (opens offline): %s", page)
    if not report.success:
        raise validation.DataValidationError(report, config.data.source)
    logger.info("validation: %s", report.summary())
    for warning in report.warnings:
        logger.warning("validation warning: %s", warning.line())
    if report.docs_index:
        logger.info("validation Data Docs: %s", report.docs_index)
    version = version_data(config, frames, root, prepared.dropped)
    logger.info("data versioned: md5 %s", version.md5)
    lexicon = load_lexicon(config, root)
    data_bias = check_data_bias(config, frames, lexicon)
    for flag in data_bias.flags():
        logger.warning("data bias: %s", flag)

    train = data.subsample(frames["train"], config.train.max_train_samples, config.train.seed)
    test = data.subsample(frames["test"], config.evaluate.max_test_samples, config.train.seed)
    suite = retention_suite(config, root)
    for warning in suite.warnings:
        logger.warning("retention suite: %s", warning)

    uri = tracking.configure(root, tracking_uri)
    for orphan in mark_orphaned_runs(config.registry.experiment):
        logger.warning(
            "MLflow run %s: its process %s is gone; marked FAILED", orphan.run_id, orphan.pid
        )
    model_name = registry.model_name(config)
    model_identity = promotion.text_classifier_identity(config.data.labels)
    run_key = str(flow_run.id or "local")
    out_dir = root / "runs" / run_key
    tags = lineage.lineage_tags(root, config, version) | {
        tag.FLOW_RUN: run_key,
        tag.RETENTION_SUITE_MD5: suite.md5,
    }
    tags |= model_identity.to_tags() | tracking.process_tags()
    name = tracking.run_name(data.dataset_name(config.data), config.train.strategy, run_key)
    run_id = tracking.start_run(root, config.registry.experiment, name, tags)
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
        actor, lock = (
            registry.default_actor(run_key),
            partial(promotion_lock, root, uri, model_name),
        )
        incompatible = check_compatibility(config, model_name, model_identity, run_id, actor, lock)
        if incompatible is not None:
            logger.error("promotion: %s", incompatible.summary())
            tracking.end_run(run_id)
            raise ModelRefused(run_id, None, None, incompatible)
        probe, base, probe_predict = measure_base(config, train, test, suite, root)
        champion_version, champion, champion_predict = measure_champion(
            config, suite, root, out_dir
        )
        model, tokenizer, trained = train_model(
            config, train, frames["validation"], run_id, out_dir / "model"
        )
        keep = config.forgetting
        mitigations: dict[str, Any] = {"l2sp": keep.l2sp, "distill": keep.distill}
        if keep.wise_ft:
            choice = blend_with_base(
                config, model, tokenizer, frames["validation"], suite, base, out_dir / "model"
            )
            mitigations["wise_ft"] = asdict(choice)
            plots.plot_alpha_curve(choice, out_dir / "plots" / "wise_ft.png")
        test_report, tuned, test_probs = evaluate_model(config, model, tokenizer, test, suite, root)
        champion_probs = champion_predict(test["text"].tolist()) if champion_predict else None
        model_bias = check_model_bias(
            config,
            test,
            lexicon,
            classifier_predict(config, model, tokenizer),
            test_probs,
            probe_predict,
            champion_predict,
            champion_version,
            champion_probs,
        )
        assert model_bias.gate is not None
        logger.info("%s", model_bias.summary())
        render_bias_page(model_bias, out_dir / "html" / "bias.html")
        kept = forgetting.evaluate_forgetting(
            base.outputs,
            tuned.outputs,
            suite.tasks,
            keep,
            suite.md5,
            base.layers,
            tuned.layers,
            champion.outputs if champion else None,
            champion_version,
            suite.warnings,
            mitigations,
        )
        logger.info("forgetting gate: %s", kept.gate.summary())
        render_forgetting_page(
            kept, out_dir / "html" / "forgetting.html", config.registry.model_name
        )

        reports = {
            "validation": report.to_dict(),
            "data_bias": data_bias.to_dict(),
            "test_metrics": test_report.to_dict(),
            "probe_baseline": probe.to_dict(),
            "forgetting": kept.to_dict(),
            "bias": model_bias.to_dict(),
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
        plots.plot_forgetting(kept, out_dir / "plots" / "forgetting.png")
        tracking.log_folder(run_id, curve.parent, "plots")
        tracking.log_folder(run_id, out_dir / "html", "reports")
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
                **kept.metrics(),
                **model_bias.metrics(),
                "best_epoch": trained.best_epoch,
                "train_seconds": trained.train_seconds,
            },
        )
        metric = getattr(test_report, config.registry.primary_metric)
        outcomes = [report.outcome(), kept.gate.outcome(), model_bias.gate.outcome()]
        refused = not all(o.passed for o in outcomes)
        run_record = tracking.get_run(run_id)
        tags |= {
            tag.test_metric(config.registry.primary_metric): f"{metric:.6f}",
            tag.VALIDATION_REPORT: f"{run_record.artifact_uri}/reports/validation.json",
            tag.VERDICT: "refused" if refused else "accepted",
        }
        for outcome in outcomes:
            tags |= outcome.to_tags()
        candidate = promotion.CandidateFigures(
            metric_name=config.registry.primary_metric,
            metric=metric,
            probe_metric=getattr(probe, config.registry.primary_metric),
            gates=outcomes,
            group_accuracy=gated_group_accuracy(model_bias),
        )
        champion_figures = None
        if champion_probs is not None:
            champion_report = evaluate.classification_metrics(
                _label_ids(test, config), champion_probs.argmax(1), config.data.labels
            )
            champion_figures = promotion.ChampionFigures(
                str(champion_version),
                getattr(champion_report, config.registry.primary_metric),
                gated_group_accuracy(model_bias.champion),
            )
        verdict = promotion.decide_promotion(candidate, champion_figures, config.promotion)
        logger.info("promotion: %s", verdict.summary())
        tags[tag.POLICY] = verdict.summary()[:4000]
        tracking.set_tags(run_id, tags)
        tracking.log_report(run_id, verdict.to_dict(), "reports/promotion.json")
        registered = None
        if not refused or config.promotion.register_refused:
            registered = register(
                config,
                run_id,
                out_dir / "model",
                test["text"].head(2).tolist(),
                tags,
                verdict,
                champion_version,
                actor,
                lock,
                decide_again(config, model_name, candidate, version.md5, test, out_dir),
            )
            verdict = registered.verdict  # decided again if the champion changed meanwhile
            tracking.set_tags(
                run_id,
                {tag.REGISTERED_VERSION: registered.version, tag.POLICY: verdict.summary()[:4000]},
            )
        shutil.rmtree(out_dir / "model")  # a registered copy lives in MLflow's artifacts
        card_inputs = card.CardInputs(
            model_name=model_name,
            version=registered.version if registered else None,
            reports=reports | {"rows": {s: len(frames[s]) for s in data.SPLITS}},
            tags=tags,
            run_id=run_id,
            verdict=verdict.summary(),
        )
        markdown = card.render_card(card_inputs)
        (out_dir / "card").mkdir(parents=True, exist_ok=True)
        (out_dir / "card" / "model_card.md").write_text(markdown, encoding="utf-8")
        (out_dir / "card" / "model_card.html").write_text(
            card.card_html(markdown, f"{model_name} model card"), encoding="utf-8"
        )
        tracking.log_folder(run_id, out_dir / "card", "card")
    except ModelRefused:
        raise  # the run was ended as recorded
    except BaseException as err:
        tracking.end_run(run_id, tracking.end_status(err))  # KILLED on SIGTERM or Ctrl-C
        raise
    tracking.end_run(run_id)
    if refused:
        raise ModelRefused(run_id, kept, model_bias)
    assert registered is not None
    return RunSummary(
        data_md5=version.md5,
        rows={s: len(frames[s]) for s in data.SPLITS}
        | {"train_used": len(train), "test_used": len(test)},
        validation=report.summary(),
        validation_table=report.table_rows(),
        groups=[asdict(g) for g in data_bias.groups],
        test=test_report.to_dict(),
        probe=probe.to_dict(),
        forgetting=kept.to_dict(),
        forgetting_table=kept.table_rows(),
        bias=model_bias.to_dict(),
        bias_table=model_bias.table_rows(),
        bias_groups=model_bias.group_rows(),
        data_bias_flags=data_bias.flags(),
        model_name=registered.name,
        version=registered.version,
        aliases=registered.aliases,
        alias_reason=registered.verdict.summary(),
        champion_version=registered.champion_version,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        train_seconds=trained.train_seconds,
        report_dir=str(out_dir / "reports"),
        links=tracking.ui_links(uri, run_id, registered.name, registered.version),
    )


def _flat_params(config: RetuneConfig) -> dict[str, Any]:
    flat = {}
    for section, values in config.model_dump().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat
