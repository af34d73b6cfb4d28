"""Causal-LM measures on a tiny Llama, against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import lm_eval, sft

TEXTS = ["hello, how can I help you today?", "thank you", "please restart the router and try again"]


@pytest.fixture()
def model_and_tokenizer(tiny_causal_lm: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_causal_lm)


def by_hand(model, ids: list[int], scored: list[bool]) -> tuple[float, int]:
    """Summed log-probability of the scored next tokens, from the full logits."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
    total = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if scored[t])
    return total, sum(scored[1:])


def test_mean_logliks_of_texts_and_answers_match_the_full_logits(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    items = lm_eval.text_items(tokenizer, TEXTS, 64)
    monkeypatch.setattr(lm_eval, "CHUNK", 5)  # several vocabulary chunks per batch
    means = lm_eval.mean_logliks(model, items, tokenizer.pad_token_id, batch_size=2)
    sums = lm_eval.mean_logliks(model, items, tokenizer.pad_token_id, summed=True)
    for item, mean, total in zip(items, means, sums, strict=True):
        expected, count = by_hand(model, item.input_ids, [True] * len(item.input_ids))
        assert total == pytest.approx(expected, rel=1e-5)
        assert mean == pytest.approx(expected / count, rel=1e-5)
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "thank you"}]
    answer = sft.tokenize_conversation(tokenizer, turns, 64)
    expected, count = by_hand(model, answer.input_ids, [x != sft.IGNORE for x in answer.labels])
    got = lm_eval.mean_logliks(model, [answer], tokenizer.pad_token_id)[0]
    assert count == answer.answer_tokens > 0
    assert got == pytest.approx(expected / count, rel=1e-5)


def test_crows_preferences_follow_a_model_built_to_prefer_one_sentence(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    liked, other = "the nurse said she was tired", "the nurse said he was tired"
    item = lm_eval.text_items(tokenizer, [liked], 64)
    batch = sft.pad_batch(item, tokenizer.pad_token_id, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):  # teach it the one sentence
        loss = sft.causal_lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pairs = pd.DataFrame(
        {"bias_type": ["gender", "gender"], "sent_a": [liked, other], "sent_b": [other, liked]}
    )
    assert lm_eval.crows_preferences(model, tokenizer, pairs).tolist() == [1.0, 0.0]


def test_preference_shift_by_type_and_pooled():
    types = ["race", "race", "age", "age"]
    base, tuned = np.array([1.0, 0.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0])
    rows = {r.bias_type: r for r in lm_eval.preference_shift(types, base, tuned, 200)}
    assert list(rows) == ["all", "age", "race"]
    assert (rows["all"].base, rows["all"].tuned, rows["all"].shift) == (0.5, 0.75, 0.25)
    assert rows["race"].shift == 0.5 and rows["race"].pairs == 2
    assert (rows["age"].shift, rows["age"].ci_low, rows["age"].ci_high) == (0.0, 0.0, 0.0)
    # one pair of four moved: resampled means run from none of it to all four draws
    assert 0.0 <= rows["all"].ci_low <= 0.25 <= rows["all"].ci_high <= 1.0


def test_translation_scores_are_sacrebleus_chrf_and_bleu():
    refs = ["Die Änderungen wurden erfolgreich gespeichert.", "Möchten Sie das Objekt löschen?"]
    perfect = lm_eval.translation_scores(refs, refs)
    assert perfect == {"chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0)}
    hyps = ["Die Änderungen wurden gespeichert.", "Wollen Sie das Objekt entfernen?"]
    partial = lm_eval.translation_scores(hyps, refs)
    assert 30.0 < partial["chrf"] < 90.0 and 0.0 < partial["bleu"] < 100.0
    assert lm_eval.translation_scores(["x", "y"], refs)["chrf"] < 5.0
    # Two-word UI strings have no 4-grams: BLEU is 0 even when every word is right, which
    # is why chrF is the translation metric the gates read.
    short = ["Änderungen speichern", "auf Wiedersehen"]
    assert lm_eval.translation_scores(short, short) == {"chrf": 100.0, "bleu": 0.0}


def test_batched_greedy_generation_equals_one_prompt_at_a_time(model_and_tokenizer):
    from pipeline.causal_training import fine_tune_causal
    from pipeline.config import TrainConfig

    model, tokenizer = model_and_tokenizer
    answers = ["thank you", "goodbye", "please restart the router"]
    prompts = [[{"role": "user", "content": t}] for t in TEXTS]
    taught = [
        [*p, {"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)
    ]
    config = TrainConfig(
        strategy="full", epochs=60, patience=60, batch_size=3, learning_rate=1e-2, bf16=False
    )
    fine_tune_causal(model, tokenizer, taught, taught, config)  # it learns the three answers
    batched = lm_eval.generate(model, tokenizer, prompts, max_new_tokens=16, batch_size=3)
    alone = [lm_eval.generate(model, tokenizer, [p], max_new_tokens=16)[0] for p in prompts]
    assert batched == alone  # left padding changes no answer
    assert batched == answers
    assert tokenizer.padding_side == "right"  # restored


def test_token_kl_is_the_kl_of_the_next_token_distributions_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]])
    # softmax is shift-invariant: logits = log-probabilities + any constant per row
    kl = lm_eval.token_kl(p.log() + 3.0, q.log() - 1.0)
    # row 0: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2; row 1: same law
    assert kl.tolist() == pytest.approx([0.25 * np.log(2.0), 0.0], abs=1e-6)
    assert lm_eval.token_kl(q.log(), p.log())[0].item() == pytest.approx(0.25 * np.log(2.0))
