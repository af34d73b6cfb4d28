"""Strategies, caching, layer-wise LR decay, class weights and the stopping metric (tiny BERT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_finetune import tiny_model, toy_data, train_config
from transformers import AutoTokenizer

from pipeline.finetune import (
    _Logits,
    _pad_ids,
    _param_groups,
    apply_lora,
    cache_frozen,
    classifier_logits,
    fine_tune,
    finish_lora,
    freeze_for_strategy,
    resolve_base_model,
    tokenize_all,
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_base_model("packaged:all-MiniLM-L6-v2"))


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cached_forward_computes_the_same_logits(tokenizer, k, pooling):
    model = tiny_model(tokenizer).eval()
    model.config.classifier_pooling = pooling
    texts = ["a short one", "a somewhat longer text with more tokens in it", "mid length text"]
    ids = tokenize_all(tokenizer, texts, 64)
    states = cache_frozen(model, ids, k, tokenizer.pad_token_id, bf16=False)
    if k == 3:
        assert states[0].shape == (32,)  # head: the pooled output is cached
    else:
        assert [s.shape[0] for s in states] == [len(x) for x in ids]  # no padding cached
    from pipeline.finetune import _Inputs, _make_batch

    inputs = _Inputs(None, states, tokenizer.pad_token_id)
    with torch.no_grad():
        cached = _Logits(model, k).eval()(_make_batch(inputs, [0, 1, 2], k, torch.device("cpu")))
        batch = _pad_ids(ids, tokenizer.pad_token_id, torch.device("cpu"))
        direct = classifier_logits(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)


def test_head_strategy_trains_only_the_head_from_the_cache(tokenizer):
    texts, labels = toy_data()
    model = tiny_model(tokenizer)
    encoder_before = {n: p.detach().clone() for n, p in model.bert.named_parameters()}
    result = fine_tune(
        model,
        tokenizer,
        texts,
        labels,
        texts,
        labels,
        train_config(strategy="head", epochs=10, patience=10, head_learning_rate=5e-2),
    )
    assert all(torch.equal(encoder_before[n], p) for n, p in model.bert.named_parameters())
    assert result.trainable_parameters == 32 * 2 + 2
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_cached_and_uncached_partial_training_agree_without_dropout(tokenizer):
    texts, labels = toy_data(2)
    runs = []
    for cache in (True, False):
        model = tiny_model(tokenizer)
        model.config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        cfg = train_config(
            strategy="partial", frozen_layers=2, epochs=2, patience=2, cache_frozen=cache
        )
        runs.append((fine_tune(model, tokenizer, texts, labels, texts, labels, cfg), model))
    (r1, m1), (r2, m2) = runs
    np.testing.assert_allclose(r1.loss_curve, r2.loss_curve, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m1.classifier.weight, m2.classifier.weight, rtol=1e-4, atol=1e-5)


def test_lora_trains_adapters_and_head_then_merges(tokenizer):
    texts, labels = toy_data(2)
    base = tiny_model(tokenizer)
    model = apply_lora(base, train_config(strategy="lora", lora_target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    result = fine_tune(
        model,
        tokenizer,
        texts,
        labels,
        texts,
        labels,
        train_config(strategy="lora", epochs=2, patience=2),
    )
    assert result.trainable_parameters == sum(model.get_parameter(n).numel() for n in trainable)
    assert result.trainable_parameters < sum(p.numel() for p in base.parameters()) / 10
    merged = finish_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    ids = _pad_ids(
        tokenize_all(tokenizer, texts[:4], 32), tokenizer.pad_token_id, torch.device("cpu")
    )
    with torch.no_grad():
        assert merged.eval()(**ids).logits.shape == (4, 2)


def test_lp_ft_runs_a_probe_then_full_training(tokenizer):
    texts, labels = toy_data(2)
    model = tiny_model(tokenizer)
    cfg = train_config(strategy="lp-ft", lpft_probe_epochs=3, epochs=2, patience=2)
    result = fine_tune(model, tokenizer, texts, labels, texts, labels, cfg)
    assert len(result.history) == 5
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())


def test_layer_wise_lr_decay_groups(tokenizer):
    model = tiny_model(tokenizer)
    freeze_for_strategy(model, "full", 0)
    cfg = train_config(learning_rate=1e-3, head_learning_rate=1e-2, layer_lr_decay=0.5)
    lr_of = {}
    for group in _param_groups(model, cfg):
        for p in group["params"]:
            lr_of[id(p)] = group["lr"]
    assert lr_of[id(model.bert.encoder.layer[2].output.dense.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.bert.encoder.layer[0].output.dense.weight)] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(model.bert.embeddings.word_embeddings.weight)] == pytest.approx(1e-3 * 0.125)
    assert lr_of[id(model.classifier.weight)] == pytest.approx(1e-2)
    no_decay = [g for g in _param_groups(model, cfg) if g["weight_decay"] == 0.0]
    assert any(
        any(p is model.bert.encoder.layer[0].output.LayerNorm.weight for p in g["params"])
        for g in no_decay
    )


def test_balanced_class_weights_change_the_loss(tokenizer):
    texts, labels = toy_data(2)
    imbalanced = np.where(np.arange(len(labels)) % 5 == 0, 1, 0)  # 20% class 1
    losses = []
    for weights in ("none", "balanced"):
        model = tiny_model(tokenizer)
        result = fine_tune(
            model,
            tokenizer,
            texts,
            imbalanced,
            texts,
            imbalanced,
            train_config(epochs=1, class_weights=weights),
        )
        losses.append(result.loss_curve[0])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_early_stopping_on_macro_f1_keeps_the_best_f1_epoch(tokenizer):
    texts, labels = toy_data(2)
    model = tiny_model(tokenizer)
    result = fine_tune(
        model,
        tokenizer,
        texts,
        labels,
        texts,
        labels,
        train_config(epochs=6, patience=6, early_stopping_metric="val_macro_f1"),
    )
    f1s = [h.val_macro_f1 for h in result.history]
    assert result.best_epoch == int(np.argmax(f1s)) + 1


def test_gradient_accumulation_gives_the_classifier_the_same_weights(tokenizer):
    """Micro-batches of the batch add up to its gradient: the same steps, the same model
    (dropout off, so both runs compute the same function)."""
    texts, labels = toy_data(repeat=2)
    runs = []
    for parts in (1, 3):
        model = tiny_model(tokenizer)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        start = {n: p.detach().clone() for n, p in model.state_dict().items()}
        config = train_config(epochs=2, patience=2, gradient_accumulation_steps=parts)
        result = fine_tune(model, tokenizer, texts, labels, texts, labels, config)
        runs.append((result.loss_curve, model.state_dict()))
    (curve1, w1), (curve3, w3) = runs
    assert len(curve1) == len(curve3) == 6  # one optimizer step per batch (20 rows, 8) either way
    assert curve1 == pytest.approx(curve3, rel=1e-5)
    # Sums in another order; Adam turns a tiny gradient difference into up to a step of
    # the learning rate. Both land on the same weights, well within how far training moved
    # them (a bias that gets no real gradient, such as attention's key bias, moves by noise).
    moved = max((w1[n] - start[n]).abs().max().item() for n in w1)
    assert moved > 1e-3
    for name in w1:
        gap = (w1[name] - w3[name]).abs().max().item()
        assert gap <= 0.01 * moved, (name, gap, moved)
