"""The training loop on a tiny BERT built from a config (milliseconds per step)."""

from __future__ import annotations

import math
import signal
from dataclasses import asdict

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from pipeline.config import TrainConfig
from pipeline.finetune import (
    EpochRecord,
    NullLogger,
    TrainingInterrupted,
    TrainState,
    bucketed_batches,
    fine_tune,
    freeze_for_strategy,
    predict_proba,
    resolve_base_model,
    save_model,
)

POSITIVE = ["great film", "wonderful acting", "a joy to watch", "brilliant and moving", "superb"]
NEGATIVE = ["dull film", "awful acting", "a chore to watch", "boring and flat", "terrible"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_base_model("packaged:all-MiniLM-L6-v2"))


def tiny_model(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def toy_data(repeat: int = 8) -> tuple[list[str], np.ndarray]:
    texts = (POSITIVE + NEGATIVE) * repeat
    labels = np.array(([0] * len(POSITIVE) + [1] * len(NEGATIVE)) * repeat)
    return texts, labels


def train_config(**overrides) -> TrainConfig:
    base = dict(
        strategy="full",
        learning_rate=3e-3,
        head_learning_rate=3e-3,
        epochs=8,
        patience=8,
        batch_size=8,
        bf16=False,
        seed=0,
        warmup_ratio=0.1,
    )
    return TrainConfig(**(base | overrides))


def test_freeze_strategies_count_trainable_parameters(tokenizer):
    model = tiny_model(tokenizer)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("bert."))
    layer = sum(p.numel() for p in model.bert.encoder.layer[0].parameters())
    pooler = sum(p.numel() for p in model.bert.pooler.parameters())

    assert freeze_for_strategy(model, "full", 0) == total
    assert freeze_for_strategy(model, "head", 0) == head
    # partial, K=2: layer 2 (of 0..2), the pooler and the head train.
    assert freeze_for_strategy(model, "partial", 2) == layer + pooler + head
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert not any(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[2].parameters())


def test_partial_with_too_many_frozen_layers_says_how_many_exist(tokenizer):
    with pytest.raises(ValueError, match="frozen_layers=7 but the model has only 3 layers"):
        freeze_for_strategy(tiny_model(tokenizer), "partial", 7)


def test_bucketed_batches_cover_every_row_once_and_repeat_with_the_seed():
    lengths = [5, 80, 12, 40, 3, 66, 21, 9, 14, 70, 33]
    first = bucketed_batches(lengths, 3, torch.Generator().manual_seed(1), bucket=2)
    again = bucketed_batches(lengths, 3, torch.Generator().manual_seed(1), bucket=2)
    other = bucketed_batches(lengths, 3, torch.Generator().manual_seed(2), bucket=2)
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in first)
    assert first == again
    assert first != other
    # Within a batch, rows come from one sorted chunk: lengths are non-decreasing.
    assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in first)


class RecordingLogger:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.records.append((step, dict(metrics)))


def test_fine_tune_learns_a_separable_task_and_logs_per_epoch(tokenizer):
    texts, labels = toy_data()
    model = tiny_model(tokenizer)
    logger = RecordingLogger()
    result = fine_tune(
        model, tokenizer, texts, labels, texts[:10], labels[:10], train_config(), logger=logger
    )

    assert len(result.history) == 8
    assert result.history[-1].train_loss < result.history[0].train_loss * 0.5
    assert result.history[-1].val_accuracy == 1.0
    assert np.mean(result.loss_curve[-3:]) < np.mean(result.loss_curve[:3])
    epoch_logs = [m for _, m in logger.records if "val_loss" in m]
    assert [round(m["val_loss"], 6) for m in epoch_logs] == [
        round(h.val_loss, 6) for h in result.history
    ]
    probs = predict_proba(model, tokenizer, texts[:10])
    assert probs.shape == (10, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == labels[:10]).all()


def test_same_seed_gives_identical_weights_and_metrics(tokenizer):
    texts, labels = toy_data(4)
    runs = []
    for _ in range(2):
        model = tiny_model(tokenizer, seed=3)
        result = fine_tune(model, tokenizer, texts, labels, texts, labels, train_config(epochs=2))
        runs.append((model.state_dict(), result))
    (w1, r1), (w2, r2) = runs
    assert [h.val_loss for h in r1.history] == [h.val_loss for h in r2.history]
    assert r1.loss_curve == r2.loss_curve
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_frozen_parameters_do_not_move(tokenizer):
    texts, labels = toy_data(2)
    model = tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fine_tune(
        model,
        tokenizer,
        texts,
        labels,
        texts,
        labels,
        train_config(strategy="partial", frozen_layers=2, epochs=1),
    )
    after = dict(model.named_parameters())
    assert torch.equal(
        before["bert.embeddings.word_embeddings.weight"],
        after["bert.embeddings.word_embeddings.weight"],
    )
    assert torch.equal(
        before["bert.encoder.layer.1.output.dense.weight"],
        after["bert.encoder.layer.1.output.dense.weight"],
    )
    assert not torch.equal(
        before["bert.encoder.layer.2.output.dense.weight"],
        after["bert.encoder.layer.2.output.dense.weight"],
    )
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])


def test_early_stopping_restores_the_best_epoch(tokenizer):
    # A learning rate this high makes validation loss rise after the first epochs.
    texts, labels = toy_data(2)
    flipped = 1 - labels  # validation labels disagree with training: loss grows as it learns
    model = tiny_model(tokenizer)
    result = fine_tune(
        model,
        tokenizer,
        texts,
        labels,
        texts,
        flipped,
        train_config(epochs=6, patience=2),
        logger=NullLogger(),
    )
    losses = [h.val_loss for h in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert len(result.history) == result.best_epoch + 2  # stopped after `patience` worse epochs
    probs = predict_proba(model, tokenizer, texts)
    restored = float(-np.log(np.clip(probs[np.arange(len(flipped)), flipped], 1e-12, 1)).mean())
    assert restored == pytest.approx(min(losses), rel=1e-4)


def test_saved_model_is_safetensors_with_tokenizer_and_label_map(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    model.config.id2label = {0: "fresh", 1: "rotten"}
    model.config.label2id = {"fresh": 0, "rotten": 1}
    out = save_model(model, tokenizer, tmp_path / "model")
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").is_file()
    reloaded = BertForSequenceClassification.from_pretrained(out)
    assert reloaded.config.id2label == {0: "fresh", 1: "rotten"}


def test_fine_tune_sizes_torch_threads_and_train_num_threads_overrides(tokenizer, monkeypatch):
    from pipeline.cpu import usable_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    texts, labels = toy_data(1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(7)  # as if something else had sized the pool from the host
        fine_tune(
            tiny_model(tokenizer), tokenizer, texts, labels, texts, labels, train_config(epochs=1)
        )
        assert torch.get_num_threads() == usable_cores()
        config = train_config(epochs=1, num_threads=1)
        fine_tune(tiny_model(tokenizer), tokenizer, texts, labels, texts, labels, config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


class SigtermAt:
    """A logger that sends this process SIGTERM when it sees ``metric`` (deterministic)."""

    def __init__(self, metric: str) -> None:
        self.metric, self.sent = metric, False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.metric in metrics and not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGTERM)


def test_a_sigterm_after_the_last_step_is_delivered_to_the_previous_handler(tokenizer, tmp_path):
    texts, labels = toy_data(2)
    received: list[int] = []

    def handler(signum, frame) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        # The epoch's validation metrics are logged after its (here the run's) last step.
        result = fine_tune(
            tiny_model(tokenizer),
            tokenizer,
            texts,
            labels,
            texts,
            labels,
            train_config(epochs=1),
            logger=SigtermAt("val_loss"),
            checkpoint_dir=tmp_path,
        )
        assert signal.getsignal(signal.SIGTERM) is handler  # restored before re-raising
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert received == [signal.SIGTERM]
    assert len(result.history) == 1
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["finished"] is True


def test_sigterm_mid_run_checkpoints_and_resuming_gives_the_same_weights(tokenizer, tmp_path):
    texts, labels = toy_data(4)  # 40 rows, 5 steps an epoch
    config = train_config(epochs=6, patience=6, checkpoint_every_steps=3)
    straight = tiny_model(tokenizer)
    expected = fine_tune(straight, tokenizer, texts, labels, texts, labels, config)

    with pytest.raises(TrainingInterrupted, match="stopped at step 20"):
        fine_tune(
            tiny_model(tokenizer),
            tokenizer,
            texts,
            labels,
            texts,
            labels,
            config,
            logger=SigtermAt("train_loss"),  # logged every 20 steps
            checkpoint_dir=tmp_path,
        )
    saved = TrainState.from_checkpoint(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert (saved.step, saved.epoch, saved.batch) == (20, 4, 5)
    assert [h.epoch for h in saved.history] == [1, 2, 3]
    resumed = tiny_model(tokenizer)
    result = fine_tune(
        resumed, tokenizer, texts, labels, texts, labels, config, checkpoint_dir=tmp_path
    )
    assert result.loss_curve == expected.loss_curve
    assert [h.val_loss for h in result.history] == [h.val_loss for h in expected.history]
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in straight.state_dict().items())


def test_train_state_round_trips_through_a_checkpoint_and_names_what_is_missing(tmp_path):
    state = TrainState.start("probe", "val_accuracy")
    assert state.best_value == -math.inf
    state.new_epoch([[0, 2], [1]])
    state.history.append(EpochRecord(1, 0.5, 0.4, 0.75, 2.0, 10.0, 0.7))
    state.loss_curve.extend([0.9, 0.5])
    state.step, state.batch, state.finished = 2, 2, True
    torch.save(asdict(state) | {"model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert TrainState.from_checkpoint(torch.load(tmp_path / "c.pt", weights_only=True)) == state
    old = asdict(state)
    del old["phase"]
    with pytest.raises(ValueError, match="lacks phase .*remove its folder"):
        TrainState.from_checkpoint(old)


def sentence_transformers_base(folder, out, normalize: bool):
    """A copy of a base model as sentence-transformers saves it: modules.json, 1_Pooling
    (mean) and, with ``normalize``, 2_Normalize (unit-length embeddings)."""
    import json
    import shutil

    shutil.copytree(folder, out)
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling), encoding="utf-8")
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    paths = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": paths[i], "type": f"sentence_transformers.models.{kind}"}
        for i, kind in enumerate(kinds)
    ]
    if normalize:
        (out / "2_Normalize").mkdir()
    (out / "modules.json").write_text(json.dumps(modules), encoding="utf-8")
    return out


def test_the_head_reads_unit_length_mean_pooling_where_the_base_has_a_normalize_module(
    tiny_base_model, tmp_path
):
    from pipeline.finetune import load_classifier, load_saved_classifier, normalizes

    normed = sentence_transformers_base(tiny_base_model, tmp_path / "normed", normalize=True)
    plain = sentence_transformers_base(tiny_base_model, tmp_path / "plain", normalize=False)
    assert normalizes(str(normed)) and not normalizes(str(plain))
    assert not normalizes(str(tiny_base_model))  # no modules.json at all
    assert normalizes(resolve_base_model("packaged:all-MiniLM-L6-v2"))
    model, tok = load_classifier(str(normed), ["pos", "neg"], seed=0)
    assert model.config.classifier_normalize and model.config.classifier_pooling == "mean"
    assert not load_classifier(str(plain), ["pos", "neg"], 0)[0].config.classifier_normalize
    explicit = load_classifier(str(normed), ["pos", "neg"], 0, pooling="mean")[0]
    assert not explicit.config.classifier_normalize  # train.pooling set: taken as it is

    model.eval()
    texts = ["short", "a much longer text than the other one"]  # padding in the batch
    with torch.no_grad():
        expected = []
        for text in texts:  # one at a time: no padding
            mean = model.bert(**tok(text, return_tensors="pt")).last_hidden_state.mean(1)
            expected.append(torch.softmax(model.classifier(mean / mean.norm()), -1)[0])
    probs = predict_proba(model, tok, texts)
    np.testing.assert_allclose(probs, torch.stack(expected).numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(predict_proba(explicit, tok, texts), probs, atol=1e-4)  # raw differs

    save_model(model, tok, tmp_path / "saved")
    saved, _ = load_saved_classifier(tmp_path / "saved")
    assert saved.config.classifier_normalize
    np.testing.assert_allclose(predict_proba(saved, tok, texts), probs, rtol=1e-5, atol=1e-7)


def test_the_cached_head_trains_on_unit_length_features_and_serves_the_same(
    tiny_base_model, tmp_path
):
    from pipeline.finetune import cache_frozen, load_classifier, tokenize_all

    normed = sentence_transformers_base(tiny_base_model, tmp_path / "normed", normalize=True)
    texts, labels = toy_data(2)
    model, tok = load_classifier(str(normed), ["pos", "neg"], seed=0)
    cached = cache_frozen(model, tokenize_all(tok, texts, 32), 2, tok.pad_token_id, bf16=False)
    norms = torch.stack(cached).norm(dim=-1)  # (N,): what the head reads
    torch.testing.assert_close(norms, torch.ones(len(texts)))
    config = train_config(
        strategy="head", head_learning_rate=5e-2, max_length=32, head_init="random"
    )
    result = fine_tune(model, tok, texts, labels, texts, labels, config)
    assert result.history[-1].train_loss < result.history[0].train_loss
    served = predict_proba(model, tok, texts, max_length=32)  # uncached: pools and normalises
    best = result.history[result.best_epoch - 1]
    assert best.val_accuracy == float((served.argmax(1) == labels).mean())
    expected_loss = -np.log(served[np.arange(len(labels)), labels]).mean()
    assert best.val_loss == pytest.approx(expected_loss, rel=1e-4)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("names", [["pos", "neg"], ["pos", "neg", "mixed"]])
def test_the_head_starts_at_the_probe_fitted_on_its_frozen_features(
    tiny_base_model, tmp_path, cache: bool, names: list[str]
):
    """head_init probe: the head is the logistic regression the frozen-feature probe fits
    on what the head reads; a learning rate of almost 0 keeps it there."""
    from pipeline.evaluate import fit_probe
    from pipeline.finetune import cache_frozen, load_classifier, tokenize_all

    normed = sentence_transformers_base(tiny_base_model, tmp_path / "normed", normalize=True)
    texts, labels = toy_data(2)
    if len(names) == 3:
        labels = np.arange(len(texts)) % 3  # every class present
    served = {}
    for init in ("probe", "random"):
        model, tok = load_classifier(str(normed), names, seed=0)
        layers = len(model.base_model.encoder.layer)
        features = cache_frozen(model, tokenize_all(tok, texts, 32), layers, 0, bf16=False)
        config = train_config(
            strategy="head",
            head_init=init,
            cache_frozen=cache,
            learning_rate=1e-12,
            head_learning_rate=1e-12,
            epochs=1,
            max_length=32,
        )
        fine_tune(model, tok, texts, labels, texts, labels, config)
        served[init] = predict_proba(model, tok, texts, max_length=32)
    probe = fit_probe(torch.stack(features).numpy(), labels)
    expected = probe.predict_proba(torch.stack(features).numpy())
    np.testing.assert_allclose(served["probe"], expected, atol=1e-4)
    assert np.abs(served["random"] - expected).max() > 0.01  # a random head is not the probe


def test_epochs_that_do_not_beat_the_fitted_head_leave_it_as_it_was(tiny_base_model, tmp_path):
    """The fitted head competes as epoch 0: a learning rate that wrecks it loses to it."""
    from pipeline.evaluate import fit_probe
    from pipeline.finetune import cache_frozen, load_classifier, tokenize_all

    normed = sentence_transformers_base(tiny_base_model, tmp_path / "normed", normalize=True)
    texts, labels = toy_data(2)
    model, tok = load_classifier(str(normed), ["pos", "neg"], seed=0)
    layers = len(model.base_model.encoder.layer)
    features = torch.stack(cache_frozen(model, tokenize_all(tok, texts, 32), layers, 0, False))
    config = train_config(
        strategy="head", head_learning_rate=50.0, epochs=3, patience=1, max_length=32
    )
    result = fine_tune(model, tok, texts, labels, texts, labels, config)
    assert result.best_epoch == 0  # no epoch beat it...
    assert len(result.history) == 1  # ...and with patience 1, the first one stopped it
    expected = fit_probe(features.numpy(), labels).predict_proba(features.numpy())
    np.testing.assert_allclose(predict_proba(model, tok, texts, max_length=32), expected, atol=1e-4)
