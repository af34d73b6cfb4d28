"""The training sequence (train_classifier) and distillation's cached frozen layers (tiny BERT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import mitigation
from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.finetune import load_classifier, load_saved_classifier, predict_proba, tokenize_all
from pipeline.training import train_classifier

TEXTS = [f"a {w} film, truly {w}" for w in ("fine", "lovely", "great", "superb")] + [
    f"a {w} film, truly {w}" for w in ("dull", "tiresome", "awful", "bland")
]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
NAMES = ["pos", "neg"]


def without_dropout(folder: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(
        folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def test_lora_merge_false_saves_an_adapter_that_predicts_as_the_served_model(
    tiny_base_model: Path, tmp_path: Path
):
    from peft import PeftModel

    config = TrainConfig(
        base_model=str(tiny_base_model),
        strategy="lora",
        lora_merge=False,
        epochs=2,
        patience=2,
        batch_size=4,
        learning_rate=1e-2,
        bf16=False,
    )
    out = tmp_path / "run" / "model"
    model, _, result = train_classifier(
        config, None, NAMES, TEXTS, LABELS, TEXTS, LABELS, out, tmp_path / "ckpt"
    )
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert len(result.history) == 2

    served, tokenizer = load_saved_classifier(out)
    assert not any("lora_" in n for n, _ in served.named_parameters())  # merged
    base, _ = load_classifier(str(tiny_base_model), NAMES, config.seed)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(served.state_dict()[query], base.state_dict()[query])  # LoRA moved it
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    served_probs = predict_proba(served, tokenizer, TEXTS)
    np.testing.assert_allclose(
        predict_proba(adapted, tokenizer, TEXTS), served_probs, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(predict_proba(model, tokenizer, TEXTS), served_probs, atol=1e-6)


def test_lora_merge_true_saves_no_adapter(tiny_base_model: Path, tmp_path: Path):
    config = TrainConfig(base_model=str(tiny_base_model), strategy="lora", epochs=1, bf16=False)
    train_classifier(config, None, NAMES, TEXTS, LABELS, TEXTS, LABELS, tmp_path / "run" / "model")
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "adapter").exists()


def test_distillation_on_cached_frozen_layers_equals_recomputing_them(tiny_base_model: Path):
    model, tokenizer = load_classifier(str(tiny_base_model), NAMES, seed=0)  # 2 layers
    texts = mitigation.load_general_text()[:24]
    cached = mitigation.EmbeddingDistillation(model, tokenizer, texts, 2.0, 8, frozen=1)
    direct = mitigation.EmbeddingDistillation(model, tokenizer, texts, 2.0, 8)
    ids = tokenize_all(tokenizer, texts, 128)
    assert cached.states is not None and direct.states is None
    assert [s.shape for s in cached.states] == [(len(x), 32) for x in ids]  # no padding kept
    torch.manual_seed(1)
    top = model.base_model.encoder.layer[1]
    with torch.no_grad():  # training moves the top layer only
        for p in top.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()  # no dropout, so both compute the same function
    for step in range(3):
        losses, grads = [], []
        for reg in (cached, direct):
            model.zero_grad()
            loss = reg.loss(model, step)
            loss.backward()
            losses.append(loss.item())
            grads.append(top.output.dense.weight.grad.clone())
        assert losses[0] > 0.01
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    # Every layer frozen: the student is the teacher, nothing to add.
    assert (
        mitigation.EmbeddingDistillation(model, tokenizer, texts, 2.0, 8, frozen=2).loss(model, 0)
        is None
    )


def test_train_classifier_with_cached_distillation_matches_the_uncached_run(
    tiny_base_model: Path, tmp_path: Path
):
    base = without_dropout(tiny_base_model, tmp_path / "base")
    keep = ForgettingConfig(distill=5.0, distill_batch_size=8)
    runs = []
    for cache in (True, False):
        config = TrainConfig(
            base_model=str(base),
            strategy="partial",
            frozen_layers=1,
            cache_frozen=cache,
            epochs=2,
            patience=2,
            batch_size=4,
            learning_rate=1e-2,
            bf16=False,
        )
        out = tmp_path / f"cache-{cache}" / "model"
        model, tokenizer, result = train_classifier(
            config, keep, NAMES, TEXTS, LABELS, TEXTS, LABELS, out
        )
        runs.append((result, load_saved_classifier(out)[0].state_dict()))
    (r1, w1), (r2, w2) = runs
    np.testing.assert_allclose(r1.loss_curve, r2.loss_curve, rtol=1e-4, atol=1e-5)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-3, atol=1e-4)  # float sums differ
    layer1 = "bert.encoder.layer.1.output.dense.weight"
    start, _ = load_classifier(str(base), NAMES, 0)
    assert not torch.equal(w1[layer1], start.state_dict()[layer1])  # the top layer trained
