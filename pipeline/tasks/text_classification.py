"""Text classification: the first kind of task behind :mod:`pipeline.tasks`.

A sentence encoder (all-MiniLM-L6-v2 by default) gets a classification head and is
fine-tuned on labelled texts. Its forgetting benchmark scores the encoder on word and
document similarity and a topic probe; its bias probes are identity-group metrics,
identity-term swaps and CrowS-Pairs; it is served as an MLflow pyfunc that reads a
``text`` column and returns a label and one probability per class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import (
    bias,
    cache,
    data,
    datasets,
    evaluate,
    fairness,
    finetune,
    forgetting,
    identity,
    lineage,
    mitigation,
    promotion,
    retention,
    serving,
    validation,
    worker,
)
from pipeline.config import RetuneConfig
from pipeline.tasks.base import (
    Baseline,
    Champion,
    Evaluation,
    Frames,
    Retention,
    Trained,
    load_champion,
    sweep_blends,
)

Predict = Any  # Callable[[list[str]], np.ndarray]: texts -> (N, K) class probabilities


def label_ids(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """The frame's labels as indices into ``labels`` (the model's output order)."""
    index = {label: i for i, label in enumerate(labels)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


def load_lexicon(config: RetuneConfig, project_dir: Path) -> identity.Lexicon:
    folder = config.bias.lexicon_dir
    return identity.load_lexicons(config.bias.lexicons, project_dir / folder if folder else None)


def group_membership(frame: pd.DataFrame, lexicon: identity.Lexicon) -> pd.DataFrame:
    """Identity groups per row: the data's identity column if it has one, else the lexicons."""
    if "identity" in frame:
        return identity.groups_from_column(frame["identity"].tolist())
    return identity.assign_groups(frame["text"].tolist(), lexicon)


def score_retention(
    config: RetuneConfig,
    encoder: Any,
    suite: retention.Suite,
    project_dir: Path,
    weights_sha: str | None = None,
) -> Retention:
    """Score an encoder on the suite; with ``weights_sha``, read and fill the score cache.

    Args:
        encoder: returns the (encoder, tokenizer) pair; called only when the cache misses.
    """
    from pipeline.embeddings import embed_layers

    cfg = config.forgetting
    path = None
    if weights_sha is not None:
        path = forgetting.cache_file(project_dir / cfg.cache_dir, weights_sha, suite.md5)
        cached = forgetting.load_cached(path, suite.tasks)
        if cached is not None:
            return Retention(cached[0], cached[1], cached=True)
    encoder, tokenizer = encoder()
    outputs = forgetting.score_encoder(
        encoder, tokenizer, suite.tasks, config.evaluate.batch_size, cfg.max_length
    )
    layers = embed_layers(
        encoder, tokenizer, forgetting.cka_texts(suite.tasks, cfg.cka_texts), 64, cfg.max_length
    )
    if path is not None:
        forgetting.save_cached(path, outputs, layers)
    return Retention(outputs, layers, cached=False)


def classifier_predict(config: RetuneConfig, model: Any, tokenizer: Any) -> Predict:
    bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())

    def predict(texts: list[str]) -> np.ndarray:
        return finetune.predict_proba(
            model, tokenizer, texts, config.evaluate.batch_size, config.train.max_length, bf16
        )

    return predict


def _texts_key(config: RetuneConfig, texts: list[str], **parts: str) -> dict[str, str]:
    """A cache key for what a model computes from ``texts`` at this run's length and
    precision; ``parts`` name the model and the array."""
    bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())
    lengths = {"max_length": str(config.train.max_length), "bf16": str(bf16)}
    return parts | {"texts_md5": cache.texts_md5(texts)} | lengths


def base_embeddings(
    config: RetuneConfig, weights_sha: str, texts: list[str], project_dir: Path, embed: Any
) -> np.ndarray:
    """The frozen base's embeddings of ``texts`` (the training split for the probe, the
    test split, identity swaps and CrowS-Pairs for its bias figures), cached by the base
    weights' sha256 and the texts' md5: they change only when the base or the texts do."""
    max_length = config.train.max_length
    if weights_sha.startswith("unresolved:"):  # a hub id not on disk: nothing to key by
        return embed(texts, max_length)
    key = _texts_key(config, texts, what="base-embeddings", weights_sha256=weights_sha)
    folder = project_dir / config.forgetting.cache_dir / "probe"
    return cache.cached_array(folder, key, lambda: embed(texts, max_length))


def measure_base(
    config: RetuneConfig,
    train: pd.DataFrame,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> Baseline:
    """The frozen base encoder: a logistic probe on the task, its retention scores (cached),
    and the probe's predict function (for the bias comparison), all from cached embeddings
    on a second run with the same base and data."""
    from pipeline.embeddings import embed_texts

    sha = lineage.weights_sha256(config.train.base_model)
    loaded: list[Any] = []  # the encoder, loaded only when a cache misses

    def encoder() -> tuple[Any, Any]:
        if not loaded:
            model, tokenizer = finetune.load_encoder(config.train.base_model)
            loaded.extend([model.to(finetune.pick_device()), tokenizer])
        return loaded[0], loaded[1]

    def embed(texts: list[str], max_length: int) -> np.ndarray:
        bf16 = finetune.use_bf16(config.train.bf16, finetune.pick_device())
        model, tokenizer = encoder()
        return embed_texts(model, tokenizer, texts, config.evaluate.batch_size, max_length, bf16)

    labels = config.data.labels
    features = base_embeddings(config, sha, train["text"].tolist(), project_dir, embed)
    fitted = evaluate.fit_probe(features, label_ids(train, labels), config.evaluate.probe_c)

    def predict(texts: list[str]) -> np.ndarray:
        return fitted.predict_proba(base_embeddings(config, sha, texts, project_dir, embed))

    test_probs = predict(test["text"].tolist())
    probe = evaluate.classification_metrics(label_ids(test, labels), test_probs.argmax(1), labels)
    cache_key = None if sha.startswith("unresolved:") else sha
    retained = score_retention(config, encoder, suite, project_dir, cache_key)
    return Baseline(probe, retained, predict)


def cached_predict(
    config: RetuneConfig, predict: Predict, digest: str, project_dir: Path
) -> Predict:
    """``predict`` of a registered version, its outputs cached by the version's digest and
    the texts' md5 (the champion is measured on the same swaps and pairs every run)."""
    folder = project_dir / config.forgetting.cache_dir / "versions"

    def cached(texts: list[str]) -> np.ndarray:
        key = _texts_key(config, texts, what="version-probabilities", digest=digest)
        return cache.cached_array(folder, key, lambda: predict(texts))

    return cached


def measure_champion(
    config: RetuneConfig,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
    work_dir: Path,
) -> Champion | None:
    """The current champion's retention scores (cached by its weights), its predict
    function and its metrics on this test split; None when there is no champion."""
    found = load_champion(config, work_dir)
    if found is None:
        return None
    version, loaded = found
    model, tokenizer = loaded.predictor.model, loaded.predictor.tokenizer
    scores = score_retention(
        config, lambda: (model.base_model, tokenizer), suite, project_dir, loaded.digest
    )
    predict = classifier_predict(config, model, tokenizer)
    if loaded.digest is not None:
        predict = cached_predict(config, predict, loaded.digest, project_dir)
    probs = predict(test["text"].tolist())
    labels = config.data.labels
    report = evaluate.classification_metrics(label_ids(test, labels), probs.argmax(1), labels)
    return Champion(version, scores, predict, report, probs)


def teacher_cache(config: RetuneConfig, project_dir: Path) -> mitigation.TeacherCache:
    """Where distillation's teacher embeddings of the base are kept between runs."""
    folder = project_dir / config.forgetting.cache_dir / "distill"
    return mitigation.TeacherCache(folder, lineage.weights_sha256(config.train.base_model))


def train_distributed(
    config: RetuneConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    run_id: str | None,
    out_dir: Path,
    teacher: mitigation.TeacherCache | None = None,
) -> Trained:
    """Data-parallel fine-tuning under torchrun (this node's processes, or several nodes
    sharing RETUNE_SHARED_DIR); the model is saved to ``out_dir`` and loaded back."""

    def write(work: Path, model_dir: Path, checkpoints: Path) -> Path:
        train.to_csv(work / "train.csv", index=False)
        val.to_csv(work / "validation.csv", index=False)
        return worker.write_spec(
            work / "spec.json",
            config.train,
            config.data.labels,
            work / "train.csv",
            work / "validation.csv",
            model_dir,
            checkpoints,
            config.forgetting,
            teacher,
        )

    result = worker.train_with_torchrun(config.train, run_id, out_dir, write)
    model, tokenizer = finetune.load_saved_classifier(out_dir)
    return Trained(model, tokenizer, result, out_dir)


def train_here(
    config: RetuneConfig,
    train: pd.DataFrame,
    val: pd.DataFrame,
    logger: Any,
    out_dir: Path,
    teacher: mitigation.TeacherCache | None = None,
) -> Trained:
    """Fine-tune in this process; checkpoints beside ``out_dir`` so a retried task resumes.
    With LoRA and ``lora_merge: false`` the adapter is also saved, to ``adapter/``."""
    from tqdm.auto import tqdm

    from pipeline.training import train_classifier

    labels = config.data.labels
    model, tokenizer, result = train_classifier(
        config.train,
        config.forgetting,
        labels,
        train["text"].tolist(),
        label_ids(train, labels),
        val["text"].tolist(),
        label_ids(val, labels),
        out_dir,
        checkpoint_dir=out_dir.parent / "checkpoints",
        logger=logger,
        progress=lambda total: tqdm(total=total, desc="fine-tune", unit="step"),
        teacher_cache=teacher,
    )
    return Trained(model, tokenizer, result, out_dir)


def blend_with_base(
    config: RetuneConfig,
    trained: Trained,
    validation: pd.DataFrame,
    suite: retention.Suite,
    base: Baseline,
    project_dir: Path,
) -> mitigation.AlphaChoice:
    """WiSE-FT: sweep alpha, keep the best-validating blend within the forgetting budget.
    The chosen blend replaces the model in place and in its saved folder."""
    cfg, model, tokenizer = config.forgetting, trained.model, trained.processor
    base_encoder, _ = finetune.load_encoder(config.train.base_model)
    base_state = mitigation.encoder_state(base_encoder)
    del base_encoder
    labels = label_ids(validation, config.data.labels)

    def validate(blend: Any) -> float:
        probs = classifier_predict(config, blend, tokenizer)(validation["text"].tolist())
        report = evaluate.classification_metrics(labels, probs.argmax(1), config.data.labels)
        return float(getattr(report, config.registry.primary_metric))

    def score(blend: Any) -> dict[str, forgetting.TaskOutputs]:
        return forgetting.score_encoder(
            blend.base_model, tokenizer, suite.tasks, config.evaluate.batch_size, cfg.max_length
        )

    choice = sweep_blends(
        config, model, base_state, validate, score, base, suite, mitigation.encoder
    )
    finetune.save_model(model, tokenizer, trained.model_dir)
    return choice


def check_model_bias(
    config: RetuneConfig,
    test: pd.DataFrame,
    trained: Trained,
    evaluation: Evaluation,
    base: Baseline,
    champion: Champion | None,
    project_dir: Path,
) -> fairness.ModelBiasReport:
    """Per-group metrics, identity swaps and CrowS-Pairs for the candidate, the base probe
    and the champion on the test split; the bias gate on the candidate."""
    texts, labels = test["text"].tolist(), config.data.labels
    y_true = label_ids(test, labels)
    lexicon = load_lexicon(config, project_dir)
    membership = group_membership(test, lexicon)
    crows = identity.load_crows_pairs()

    def measure(predict: Predict, name: str, probs: np.ndarray | None = None):
        return fairness.measure_model_bias(
            predict, texts, y_true, membership, lexicon, crows, config.bias, labels, name, probs
        )

    candidate = classifier_predict(config, trained.model, trained.processor)
    champion_report = None
    if champion is not None:
        name = f"champion v{champion.version}"
        champion_report = measure(champion.predict, name, champion.test_outputs)
    return fairness.evaluate_model_bias(
        measure(candidate, "candidate", evaluation.outputs),
        config.bias,
        base_probe=measure(base.predict, "base probe") if base.predict else None,
        champion=champion_report,
    )


class TextClassification:
    """Labelled texts -> a fine-tuned sentence-encoder classifier."""

    name = promotion.TEXT_CLASSIFICATION

    def identity(self, config: RetuneConfig) -> promotion.ModelIdentity:
        return promotion.text_classifier_identity(config.data.labels)

    def prepare(self, config: RetuneConfig, project_dir: Path) -> data.PreparedData:
        return data.prepare_dataset(config.data, project_dir)

    def validate(
        self, config: RetuneConfig, frames: Frames, docs_dir: Path | None, project_dir: Path
    ) -> validation.ValidationReport:
        tokens = datasets.count_tokens(frames, config.train.base_model, config.train.max_length)
        return validation.validate_dataset(
            frames, config.validation, config.data.labels, docs_dir, tokens=tokens
        )

    def check_data_bias(
        self, config: RetuneConfig, frames: Frames, project_dir: Path
    ) -> bias.DataBiasReport:
        lexicon = load_lexicon(config, project_dir)
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

    def retention_suite(
        self, config: RetuneConfig, project_dir: Path, versioned: retention.Suite | None = None
    ) -> retention.Suite:
        """The versioned retention suite (built, and committed to DVC when it changed)."""
        if versioned is not None:
            return versioned
        return datasets.ensure_suite(
            project_dir, config.forgetting, config.data.data_dir, push=config.data.dvc_push
        )

    measure_base = staticmethod(measure_base)
    measure_champion = staticmethod(measure_champion)

    def train(
        self,
        config: RetuneConfig,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        run_id: str | None,
        model_dir: Path,
        project_dir: Path,
    ) -> Trained:
        from pipeline import tracking

        logger = tracking.MlflowLogger(run_id) if run_id else None
        teacher = teacher_cache(config, project_dir) if config.forgetting.distill > 0 else None
        if config.train.nproc_per_node == 1 and config.train.nnodes == 1:
            return train_here(config, train, validation, logger, model_dir, teacher)
        trained = train_distributed(config, train, validation, run_id, model_dir, teacher)
        for record in trained.result.history if logger is not None else []:
            logger.log_metrics(
                {"val_loss": record.val_loss, "val_accuracy": record.val_accuracy}, record.epoch
            )
        return trained

    blend_with_base = staticmethod(blend_with_base)

    def evaluate(
        self,
        config: RetuneConfig,
        trained: Trained,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
    ) -> Evaluation:
        """Test metrics of the tuned classifier, its encoder's retention scores, test probs."""
        labels = config.data.labels
        probs = classifier_predict(config, trained.model, trained.processor)(test["text"].tolist())
        report = evaluate.classification_metrics(label_ids(test, labels), probs.argmax(1), labels)
        retained = score_retention(
            config, lambda: (trained.model.base_model, trained.processor), suite, project_dir
        )
        return Evaluation(report, retained, probs)

    check_model_bias = staticmethod(check_model_bias)

    def loaded_metric(
        self, config: RetuneConfig, model: Any, test: pd.DataFrame, project_dir: Path | None = None
    ) -> float:
        predictor = model.predictor
        probs = classifier_predict(config, predictor.model, predictor.tokenizer)(
            test["text"].tolist()
        )
        labels = config.data.labels
        report = evaluate.classification_metrics(label_ids(test, labels), probs.argmax(1), labels)
        return float(getattr(report, config.registry.primary_metric))

    def examples(
        self, config: RetuneConfig, test: pd.DataFrame, project_dir: Path | None = None
    ) -> pd.DataFrame:
        return pd.DataFrame({"text": test["text"].head(2).tolist()})

    def log_model(
        self,
        config: RetuneConfig,
        run_id: str,
        model_dir: Path,
        test: pd.DataFrame,
        project_dir: Path | None = None,
    ) -> str:
        example = self.examples(config, test)["text"].tolist()
        return serving.log_classifier(run_id, model_dir, example, config.train.max_length)
