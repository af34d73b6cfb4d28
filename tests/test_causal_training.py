"""SFT on a tiny Llama: strategies, gradient accumulation, resume, the answer-only loss."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import causal_training as ct
from pipeline import mitigation, sft
from pipeline.config import ForgettingConfig, TrainConfig
from pipeline.finetune import TrainingInterrupted, apply_lora

PAIRS = [
    ("Save changes", "Änderungen speichern"),
    ("Delete", "Löschen"),
    ("thank you", "danke"),
    ("goodbye", "auf Wiedersehen"),
    ("hello", "hallo"),
    ("Close", "Schliessen"),
    ("Yes", "Ja"),
    ("No", "Nein"),
]


def conversation(source: str, target: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"Translate from English to German:\n{source}"},
        {"role": "assistant", "content": target},
    ]


CONVERSATIONS = [conversation(s, t) for s, t in PAIRS]


def load(folder: Path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def config(**overrides) -> TrainConfig:
    values = {
        "strategy": "full",
        "epochs": 2,
        "patience": 2,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "warmup_ratio": 0.0,
        "max_length": 64,
        "bf16": False,
        "num_threads": 1,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    return TrainConfig(**(values | overrides))


def test_the_validation_loss_is_the_mean_cross_entropy_of_the_answer_tokens(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    items = sft.tokenize_all(tokenizer, CONVERSATIONS, 64)
    metrics = ct.answer_loss(ct._AnswerLoss(model), items, tokenizer.pad_token_id, bf16=False)
    # by hand: the full logits of each conversation, one at a time, unpadded
    total = tokens = 0.0
    with torch.no_grad():
        for item in items:
            logits = model(input_ids=torch.tensor([item.input_ids])).logits
            total += sft.causal_lm_loss(logits, torch.tensor([item.labels]), "sum").item()
            tokens += sum(1 for x in item.labels[1:] if x != sft.IGNORE)
    assert metrics["val_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["val_perplexity"] == pytest.approx(torch.tensor(total / tokens).exp().item())
    assert 0.0 <= metrics["val_accuracy"] <= 1.0


def test_full_fine_tuning_lowers_the_answer_loss(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    before = ct.answer_loss(
        ct._AnswerLoss(model), sft.tokenize_all(tokenizer, CONVERSATIONS, 64), 0, False
    )["val_loss"]
    result = ct.fine_tune_causal(
        model, tokenizer, CONVERSATIONS, CONVERSATIONS, config(epochs=15, patience=15)
    )
    assert result.history[-1].val_loss < 0.5 * before
    assert result.loss_curve[-1] < result.loss_curve[0]
    assert result.trainable_parameters == result.total_parameters


def test_partial_freezes_the_embeddings_and_the_bottom_blocks(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ct.fine_tune_causal(
        model, tokenizer, CONVERSATIONS, CONVERSATIONS, config(strategy="partial", frozen_layers=1)
    )
    after = dict(model.named_parameters())
    frozen = [n for n in start if n.startswith(("model.embed_tokens", "model.layers.0."))]
    trained = [n for n in start if n.startswith("model.layers.1.")]
    assert frozen and trained
    assert all(torch.equal(start[n], after[n]) for n in frozen)
    assert all(not torch.equal(start[n], after[n]) for n in trained if "weight" in n)


def test_lora_trains_adapters_only_and_refuses_unknown_targets(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    with pytest.raises(ValueError, match=r"\['query'\] are not modules of this model"):
        apply_lora(model, config(lora_target_modules=["query"]), "CAUSAL_LM")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = apply_lora(model, config(strategy="lora"), "CAUSAL_LM")
    settings = config(strategy="lora", epochs=4, patience=4)
    result = ct.fine_tune_causal(wrapped, tokenizer, CONVERSATIONS, CONVERSATIONS, settings)
    assert 0 < result.trainable_parameters < result.total_parameters / 10
    assert result.history[-1].val_loss < result.history[0].val_loss
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in wrapped.named_parameters()
        if "lora_" not in n
    }
    assert base.keys() == start.keys()
    assert all(torch.equal(base[n], start[n]) for n in start)  # the base stays as it was


def test_gradient_accumulation_gives_the_same_weights_as_one_batch(tiny_causal_lm):
    runs = []
    for parts in (1, 2):
        model, tokenizer = load(tiny_causal_lm)
        start = {n: p.detach().clone() for n, p in model.state_dict().items()}
        settings = config(gradient_accumulation_steps=parts)
        result = ct.fine_tune_causal(model, tokenizer, CONVERSATIONS, CONVERSATIONS, settings)
        runs.append((result.loss_curve, model.state_dict()))
    (curve1, w1), (curve2, w2) = runs
    assert curve1 == pytest.approx(curve2, rel=1e-5)
    # Sums in another order; Adam turns a tiny gradient difference into up to a step of
    # the learning rate. Both land on the same weights, well within how far training moved
    # them (a bias that gets no real gradient, such as attention's key bias, moves by noise).
    moved = max((w1[n] - start[n]).abs().max().item() for n in w1)
    assert moved > 1e-3
    for name in w1:
        gap = (w1[name] - w2[name]).abs().max().item()
        assert gap <= 0.01 * moved, (name, gap, moved)


def test_a_run_stopped_by_sigterm_resumes_to_the_same_weights(tiny_causal_lm, tmp_path: Path):
    settings = config(epochs=2, patience=2, batch_size=2, checkpoint_every_steps=1000)
    model, tokenizer = load(tiny_causal_lm)
    straight = ct.fine_tune_causal(model, tokenizer, CONVERSATIONS, CONVERSATIONS, settings)
    expected = {n: p.detach().clone() for n, p in model.state_dict().items()}

    class StopAfter:
        """A progress bar that sends SIGTERM to this process after ``n`` steps."""

        def __init__(self, n: int):
            self.n, self.seen = n, 0

        def update(self, k: int) -> None:
            self.seen += k
            if self.seen == self.n and threading.current_thread() is threading.main_thread():
                signal.raise_signal(signal.SIGTERM)

        def set_postfix(self, **_: object) -> None: ...

        def close(self) -> None: ...

    model, tokenizer = load(tiny_causal_lm)
    with pytest.raises(TrainingInterrupted):
        ct.fine_tune_causal(
            model,
            tokenizer,
            CONVERSATIONS,
            CONVERSATIONS,
            settings,
            progress=lambda total: StopAfter(5),
            checkpoint_dir=tmp_path,
        )
    model, tokenizer = load(tiny_causal_lm)
    resumed = ct.fine_tune_causal(
        model, tokenizer, CONVERSATIONS, CONVERSATIONS, settings, checkpoint_dir=tmp_path
    )
    assert resumed.loss_curve == straight.loss_curve
    assert all(torch.equal(model.state_dict()[n], expected[n]) for n in expected)


GENERAL = [
    "the router was restarted and the service came back an hour later",
    "hello, the weather today is cold and the trains are late again",
    "a new bridge was opened across the river this morning",
    "thank you for the letter, we will answer it next week",
]


def mean_kl_by_hand(model, base, tokenizer, texts: list[str]) -> float:
    """Mean over every next-token position of KL(base || model), one text at a time."""
    total = positions = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            p = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
            q = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            total += (p.exp() * (p - q)).sum().item()
            positions += ids.shape[1] - 1
    return total / positions


def test_kl_distillation_is_zero_at_the_base_and_the_mean_token_kl_once_moved(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    distill = mitigation.LogitDistillation(
        model, tokenizer, GENERAL, weight=2.0, batch_size=len(GENERAL)
    )
    assert distill.loss(model, 0).item() == pytest.approx(0.0, abs=1e-6)
    base, _ = load(tiny_causal_lm)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = mean_kl_by_hand(model, base, tokenizer, GENERAL)
    assert expected > 1e-3
    assert distill.loss(model, 0).item() == pytest.approx(2.0 * expected, rel=1e-4)


def test_kl_distillation_with_lora_uses_the_base_under_the_adapters(tiny_causal_lm):
    model, tokenizer = load(tiny_causal_lm)
    distill = mitigation.LogitDistillation(
        model, tokenizer, GENERAL, 1.0, len(GENERAL), shared_base=True
    )
    assert distill.teacher is None  # no second copy of the weights
    wrapped = apply_lora(model, config(strategy="lora"), "CAUSAL_LM")
    assert distill.loss(wrapped, 0).item() == pytest.approx(0.0, abs=1e-6)  # B starts at 0
    ct.fine_tune_causal(
        wrapped, tokenizer, CONVERSATIONS, CONVERSATIONS, config(strategy="lora", epochs=3)
    )
    base, _ = load(tiny_causal_lm)
    expected = mean_kl_by_hand(wrapped, base, tokenizer, GENERAL)
    assert expected > 1e-4
    assert distill.loss(wrapped, 0).item() == pytest.approx(expected, rel=1e-4)


def test_kl_distillation_keeps_general_text_closer_to_the_base(tiny_causal_lm, tmp_path: Path):
    drift = {}
    for weight in (0.0, 5.0):
        settings = config(epochs=6, patience=6)
        keep = ForgettingConfig(distill=weight, distill_batch_size=4)
        model, tokenizer, result = ct.train_causal(
            settings,
            keep,
            str(tiny_causal_lm),
            CONVERSATIONS,
            CONVERSATIONS,
            tmp_path / str(weight),
        )
        base, _ = load(tiny_causal_lm)
        drift[weight] = mean_kl_by_hand(model, base, tokenizer, mitigation.load_general_text()[:40])
        assert result.history[-1].val_loss < result.history[0].val_loss  # it still learns
        assert (tmp_path / str(weight) / "model.safetensors").is_file()
    assert drift[5.0] < 0.5 * drift[0.0], drift


def test_the_best_weights_copy_holds_the_adapters_alone_and_restores_them(tiny_causal_lm):
    from pipeline.finetune import Optimization

    model, tokenizer = load(tiny_causal_lm)
    wrapped = apply_lora(model, config(strategy="lora"), "CAUSAL_LM")
    trainables = [p for p in wrapped.parameters() if p.requires_grad]
    opt = Optimization.build(wrapped, [{"params": trainables}], config(), 10, torch.device("cpu"))
    best = opt.weights(wrapped)
    assert best and all("lora_" in name for name in best)  # not the frozen base
    lora_size = sum(t.numel() for t in best.values())
    assert (
        lora_size
        == sum(p.numel() for p in trainables)
        < 0.2 * sum(p.numel() for p in wrapped.parameters())
    )
    before = {n: t.clone() for n, t in wrapped.state_dict().items()}
    with torch.no_grad():
        for p in trainables:
            p.add_(1.0)
    opt.load_weights(wrapped, best)
    assert all(torch.equal(before[n], t) for n, t in wrapped.state_dict().items())
    with pytest.raises(ValueError, match="saved weights the model does not have"):
        opt.load_weights(wrapped, {"nowhere.weight": torch.zeros(1)})
