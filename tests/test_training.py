"""The training sequence (train_classifier), distillation's cached frozen layers, head pooling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_ddp import base_without_dropout

from pipeline import mitigation
from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.finetune import load_classifier, load_saved_classifier, predict_proba, tokenize_all
from pipeline.training import train_classifier

TEXTS = [f"a {w} film, truly {w}" for w in ("fine", "lovely", "great", "superb")] + [
    f"a {w} film, truly {w}" for w in ("dull", "tiresome", "awful", "bland")
]
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
NAMES = ["pos", "neg"]


def test_lora_merge_false_saves_an_adapter_that_predicts_as_the_served_model(
    tiny_base_model: Path, tmp_path: Path
):
    from peft import PeftModel

    # A mean-pooled base: the head reads past PEFT's wrapper the way it was set up.
    st = with_pooling(tiny_base_model, tmp_path / "st", {"pooling_mode_mean_tokens": True}, False)
    config = TrainConfig(
        base_model=str(st),
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
    assert served.config.classifier_pooling == "mean"
    base, _ = load_classifier(str(st), NAMES, config.seed)
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
    base = base_without_dropout(tiny_base_model, tmp_path / "base")
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
    start = load_classifier(str(base), NAMES, 0)[0].state_dict()
    layer1 = "bert.encoder.layer.1.output.dense.weight"
    moved = (w1[layer1] - start[layer1]).abs().max().item()
    assert moved > 1e-3  # the top layer trained
    for name in w1:
        # Float sums run in another order, and Adam turns a tiny gradient difference into
        # up to a step of the learning rate; both runs still land on the same weights,
        # within a few percent of how far training moved them.
        gap = (w1[name] - w2[name]).abs().max().item()
        assert gap <= 0.05 * moved, (name, gap, moved)


def test_the_distillation_teacher_is_cached_by_base_weights_and_read_back(
    tiny_base_model: Path, tmp_path: Path
):
    from pipeline.lineage import weights_sha256

    keep = ForgettingConfig(distill=5.0, distill_batch_size=8)
    config = TrainConfig(
        base_model=str(tiny_base_model),
        strategy="full",
        epochs=1,
        batch_size=4,
        learning_rate=1e-2,
        bf16=False,
    )
    folder = tmp_path / "cache"
    teacher = mitigation.TeacherCache(folder, weights_sha256(str(tiny_base_model)))

    def run(name: str, cache: mitigation.TeacherCache | None) -> list[float]:
        out = tmp_path / name / "model"
        args = (config, keep, NAMES, TEXTS, LABELS, TEXTS, LABELS, out)
        return train_classifier(*args, teacher_cache=cache)[2].loss_curve

    uncached = run("plain", None)
    assert not folder.exists()
    first = run("first", teacher)
    files = list(folder.glob("*.npy"))
    assert len(files) == 1
    stored = np.load(files[0])
    assert stored.shape == (len(mitigation.load_general_text()), 32)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)  # normalised
    assert first == uncached  # the same teacher, computed or read back
    # The next run reads the file instead of embedding the corpus again: a teacher
    # written there (the base's, rotated) changes its loss.
    np.save(files[0], np.roll(stored, 1, axis=0))
    assert run("second", teacher) != first
    # Other base weights are another key: a file of their own, computed afresh.
    other = mitigation.TeacherCache(folder, "f" * 64)
    assert run("other", other) == uncached
    assert len(list(folder.glob("*.npy"))) == 2


def with_pooling(folder: Path, out: Path, flags: dict[str, bool], modules: bool) -> Path:
    """A copy of the tiny base model as a sentence-transformers folder with this pooling."""
    import json
    import shutil

    shutil.copytree(folder, out)
    pooling = out / ("2_Pool" if modules else "1_Pooling")
    pooling.mkdir()
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False} | flags
    (pooling / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if modules:  # the folder is named by modules.json, as sentence-transformers saves it
        entries = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "2_Pool",
                "type": "sentence_transformers.models.Pooling",
            },
        ]
        (out / "modules.json").write_text(json.dumps(entries), encoding="utf-8")
    return out


def test_pooling_follows_the_base_models_own_config_unless_set(
    tiny_base_model: Path, tmp_path: Path
):
    from pipeline.finetune import resolve_pooling

    mean = with_pooling(
        tiny_base_model, tmp_path / "mean", {"pooling_mode_mean_tokens": True}, False
    )
    maxed = with_pooling(tiny_base_model, tmp_path / "max", {"pooling_mode_max_tokens": True}, True)
    none = with_pooling(tiny_base_model, tmp_path / "none", {}, False)
    assert resolve_pooling(str(tiny_base_model)) == "cls"  # a plain BERT: its CLS pooler
    assert resolve_pooling(str(mean)) == "mean"
    assert resolve_pooling(str(maxed)) == "max"
    assert resolve_pooling(str(mean), "cls") == "cls"  # train.pooling overrides
    with pytest.raises(ValueError, match="1_Pooling/config.json sets none of .*train.pooling"):
        resolve_pooling(str(none))
    from pipeline.finetune import resolve_base_model

    packaged = resolve_base_model("packaged:all-MiniLM-L6-v2")
    assert resolve_pooling(packaged) == "mean"  # all-MiniLM-L6-v2 was trained mean-pooled


def test_a_mean_pooled_head_reads_the_mean_of_real_tokens_and_saves_that_way(
    tiny_base_model: Path, tmp_path: Path
):
    base = with_pooling(tiny_base_model, tmp_path / "st", {"pooling_mode_mean_tokens": True}, False)
    model, tokenizer = load_classifier(str(base), NAMES, seed=0)
    assert model.config.classifier_pooling == "mean"
    model.eval()
    texts = ["short", "a much longer text than the other one"]  # padding in the batch
    with torch.no_grad():
        expected = []
        for text in texts:  # one at a time: no padding at all
            hidden = model.bert(**tokenizer(text, return_tensors="pt")).last_hidden_state
            expected.append(torch.softmax(model.classifier(hidden.mean(1)), -1)[0])
    probs = predict_proba(model, tokenizer, texts)
    np.testing.assert_allclose(probs, torch.stack(expected).numpy(), rtol=1e-4, atol=1e-6)
    cls_probs = predict_proba(load_classifier(str(base), NAMES, 0, "cls")[0], tokenizer, texts)
    assert not np.allclose(cls_probs, probs, atol=1e-4)  # the pooling matters

    config = TrainConfig(
        base_model=str(base), strategy="head", epochs=3, patience=3, head_learning_rate=5e-2
    )
    out = tmp_path / "run" / "model"
    trained, _, result = train_classifier(config, None, NAMES, TEXTS, LABELS, TEXTS, LABELS, out)
    assert result.history[-1].train_loss < result.history[0].train_loss
    saved, _ = load_saved_classifier(out)
    assert saved.config.classifier_pooling == "mean"
    np.testing.assert_allclose(
        predict_proba(saved, tokenizer, TEXTS),
        predict_proba(trained, tokenizer, TEXTS),
        rtol=1e-5,
        atol=1e-6,
    )
