"""Mitigations: L2-SP, embedding distillation, WiSE-FT's choice of alpha, in fine_tune."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import mitigation
from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.finetune import fine_tune, load_classifier
from pipeline.mitigation import AlphaPoint, pick_alpha

TEXTS = [f"a {w} film, truly {w}" for w in ("fine", "lovely", "great", "superb")] + [
    f"a {w} film, truly {w}" for w in ("dull", "tiresome", "awful", "bland")
]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])


@pytest.fixture
def tiny_classifier(tiny_base_model: Path):
    return load_classifier(str(tiny_base_model), ["pos", "neg"], seed=0)


def test_general_text_is_lee_background_and_never_a_lee_test_document():
    from pipeline.retention_tasks import load_lee

    sentences = mitigation.load_general_text()
    assert len(sentences) > 1000
    assert all(len(s.split()) >= 6 for s in sentences)
    lee_docs = set(load_lee().texts)
    assert not any(s in lee_docs for s in sentences)


def test_l2sp_pulls_each_encoder_weight_back_by_lr_times_weight(tiny_classifier):
    model, _ = tiny_classifier
    reg = mitigation.L2SP(model, weight=4.0)
    assert reg.loss(model, 0) is None and reg.distance(model) == 0.0
    bias = model.base_model.encoder.layer[0].output.dense.bias  # 32 values
    start = bias.detach().clone()
    with torch.no_grad():
        bias.add_(0.5)
        model.classifier.bias.add_(0.5)
    assert reg.distance(model) == pytest.approx(32 * 0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reg.after_step(optimizer)
    # theta - theta_0 shrinks by lr * weight = 0.4: 0.5 -> 0.3; the head is not anchored.
    assert (bias - start).detach() == pytest.approx(torch.full((32,), 0.3), abs=1e-6)
    assert model.classifier.bias.detach().tolist() != [0.0, 0.0]


def test_distillation_is_zero_for_the_teacher_and_positive_after_a_change(tiny_classifier):
    model, tokenizer = tiny_classifier
    texts = mitigation.load_general_text()[:40]
    reg = mitigation.EmbeddingDistillation(model, tokenizer, texts, weight=2.0, batch_size=8)
    model.eval()  # no dropout: the student is exactly the teacher
    assert reg.loss(model, 0).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.base_model.encoder.layer[1].parameters():
            p.copy_(torch.randn_like(p))
    assert reg.loss(model, 0).item() > 0.05
    # Batches follow the step: a resumed run sees the same ones.
    assert reg.batch_indices(3).tolist() == reg.batch_indices(3).tolist()
    seen = np.concatenate([reg.batch_indices(s) for s in range(5)])
    assert sorted(seen) == list(range(40))  # 5 steps of 8 cover the 40 texts once


def test_a_strong_l2sp_keeps_the_encoder_near_its_pretrained_weights(tiny_base_model: Path):
    config = TrainConfig(
        strategy="full", epochs=3, batch_size=4, learning_rate=1e-2, bf16=False, patience=3
    )

    def distance(weight: float) -> float:
        model, tokenizer = load_classifier(str(tiny_base_model), ["pos", "neg"], seed=0)
        start = mitigation.encoder_state(model)
        reg = mitigation.L2SP(model, weight) if weight else None
        fine_tune(model, tokenizer, TEXTS, LABELS, TEXTS, LABELS, config, regularizer=reg)
        end = mitigation.encoder_state(model)
        return sum(float((end[n] - start[n]).pow(2).sum()) for n in start if "weight" in n)

    # lr * weight = 0.5: each step halves the distance the task gradient just added.
    free, pulled = distance(0.0), distance(50.0)
    assert pulled < 0.2 * free


def test_fine_tune_with_a_regulariser_is_deterministic(tiny_base_model: Path):
    config = TrainConfig(strategy="full", epochs=1, batch_size=4, bf16=False)
    finals = []
    for _ in range(2):
        model, tokenizer = load_classifier(str(tiny_base_model), ["pos", "neg"], seed=0)
        reg = mitigation.EmbeddingDistillation(
            model, tokenizer, mitigation.load_general_text()[:20], 1.0, 4
        )
        result = fine_tune(model, tokenizer, TEXTS, LABELS, TEXTS, LABELS, config, regularizer=reg)
        finals.append((result.loss_curve, mitigation.encoder_state(model)))
    assert finals[0][0] == finals[1][0]
    assert all(torch.equal(finals[0][1][n], finals[1][1][n]) for n in finals[0][1])


def test_pick_alpha_takes_the_best_metric_within_the_budget():
    curve = [
        AlphaPoint(0.2, 0.70, 0.00, 0.01, 0.01, True),
        AlphaPoint(0.4, 0.78, 0.01, 0.02, 0.03, True),
        AlphaPoint(0.6, 0.80, 0.03, 0.04, 0.06, False),
        AlphaPoint(1.0, 0.82, 0.10, 0.12, 0.30, False),
    ]
    choice = pick_alpha(curve)
    assert choice.alpha == 0.4 and "within the forgetting budget" in choice.reason
    # None within budget: the least forgetting one, and the reason says so.
    over = [AlphaPoint(p.alpha, p.val_metric, 0.1, 0.2 + p.alpha, 0.3, False) for p in curve]
    choice = pick_alpha(over)
    assert choice.alpha == 0.2 and choice.reason.startswith("no alpha within the forgetting")
    with pytest.raises(ValueError):
        pick_alpha([])


def test_wise_ft_sweeps_every_alpha_and_leaves_the_choice_in_the_model(tiny_classifier):
    model, _ = tiny_classifier
    base = mitigation.encoder_state(model)
    with torch.no_grad():
        for p in model.base_model.parameters():
            p.add_(1.0)
    tuned = mitigation.encoder_state(model)
    name = "embeddings.word_embeddings.weight"

    def shift(m) -> float:  # how far the blend sits from the base: alpha exactly
        return float((m.base_model.state_dict()[name] - base[name]).mean())

    class Kept:  # the fields wise_ft reads from a Comparison
        def __init__(self, drop: float):
            self.mean_drop = self.mean_ci_high = self.worst_drop = drop

    choice = mitigation.wise_ft(
        model,
        base,
        [1.0, 0.0, 0.5, 0.25],
        validate=lambda m: shift(m),  # more tuning, better metric
        retain=lambda m: Kept(shift(m) / 10),  # ...and more forgetting
        within_budget=lambda kept: kept.mean_drop <= 0.03,
    )
    assert [p.alpha for p in choice.curve] == [0.0, 0.25, 0.5, 1.0]
    assert [p.passed for p in choice.curve] == [True, True, False, False]
    assert choice.alpha == 0.25
    assert shift(model) == pytest.approx(0.25)
    assert not torch.equal(model.base_model.state_dict()[name], tuned[name])


def test_config_rejects_mitigations_that_cannot_apply():
    with pytest.raises(ConfigError, match="l2sp does not apply to train.strategy=lora"):
        load_config(None, ["train.strategy=lora", "forgetting.l2sp=0.1"])
    # distillation and L2-SP run under DDP too (tests/test_resume_ddp.py)
    assert (
        load_config(None, ["train.nproc_per_node=2", "forgetting.distill=1"]).train.nproc_per_node
        == 2
    )
    with pytest.raises(ConfigError, match="wise_ft_alphas"):
        load_config(None, ["forgetting.wise_ft_alphas=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="names must be unique"):
        load_config(None, ["forgetting.tasks=[lee, lee]"])


def test_distillation_reaches_the_encoder_under_lora(tiny_base_model: Path):
    from pipeline.finetune import apply_lora

    config = TrainConfig(strategy="lora", epochs=1, batch_size=4, bf16=False)
    model, tokenizer = load_classifier(str(tiny_base_model), ["pos", "neg"], seed=0)
    reg = mitigation.EmbeddingDistillation(
        model, tokenizer, mitigation.load_general_text()[:8], 1.0, 4
    )
    model = apply_lora(model, config)
    model.eval()  # adapters start at zero: the student is the teacher
    assert reg.loss(model, 0).item() == pytest.approx(0.0, abs=1e-6)
    result = fine_tune(model, tokenizer, TEXTS, LABELS, TEXTS, LABELS, config, regularizer=reg)
    assert len(result.loss_curve) == 2
