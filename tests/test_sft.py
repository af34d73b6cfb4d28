"""SFT tokenisation: loss on the assistant's tokens only; the masked causal-LM loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipeline import sft

TURNS = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "hello, how can I help?"},
    {"role": "assistant", "content": "please restart the router"},
    {"role": "user", "content": "thank you"},
    {"role": "assistant", "content": "goodbye"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm: Path):
    return AutoTokenizer.from_pretrained(tiny_causal_lm)


def labelled_text(tokenizer, item: sft.Tokenized) -> list[str]:
    """The labelled tokens, decoded run by run (consecutive labelled positions)."""
    runs, current = [], []
    for token, label in zip(item.input_ids, item.labels, strict=True):
        if label == sft.IGNORE:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_loss_falls_on_the_assistant_turns_and_their_end_markers_only(tokenizer):
    item = sft.tokenize_conversation(tokenizer, TURNS, max_length=512)
    assert labelled_text(tokenizer, item) == [
        "please restart the router<|im_end|>\n",
        "goodbye<|im_end|>\n",
    ]
    assert item.full_length == len(item.input_ids) and item.answer_tokens_cut == 0
    # Every other token is the prompt: system, user and the template's headers.
    prompt = [t for t, label in zip(item.input_ids, item.labels, strict=True) if label == -100]
    text = tokenizer.decode(prompt)
    assert "You are helpful." in text and "thank you" in text and "router" not in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_cut_conversation_counts_the_answer_tokens_it_lost(tokenizer):
    whole = sft.tokenize_conversation(tokenizer, TURNS, max_length=512)
    cut = sft.tokenize_conversation(tokenizer, TURNS, max_length=whole.full_length - 3)
    assert len(cut.input_ids) == whole.full_length - 3
    assert cut.answer_tokens_cut == whole.answer_tokens - cut.answer_tokens > 0
    assert cut.labels == whole.labels[: whole.full_length - 3]


def test_a_template_that_rewrites_the_past_is_refused(tokenizer):
    odd = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    # Renders the number of turns first: a prefix of the conversation is not a prefix.
    odd.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(sft.TemplateError, match="turn 3"):
        sft.tokenize_conversation(odd, TURNS, max_length=64)


def test_the_masked_loss_is_the_mean_cross_entropy_of_the_labelled_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 4, 2]])
    # by hand: position t predicts labels[t + 1]
    picks = [(0, 0, 3), (0, 1, 1), (1, 1, 4), (1, 2, 2)]
    logp = torch.log_softmax(logits, dim=-1)
    expected = -sum(logp[b, t, v].item() for b, t, v in picks)
    assert sft.causal_lm_loss(logits, labels, "sum").item() == pytest.approx(expected, rel=1e-6)
    assert sft.causal_lm_loss(logits, labels).item() == pytest.approx(expected / 4, rel=1e-6)
    per_token = sft.causal_lm_loss(logits, labels, "none")
    assert per_token.shape == (2, 3)
    assert per_token[0, 2].item() == 0.0 and math.isclose(
        per_token[1, 1].item(), -logp[1, 1, 4].item(), rel_tol=1e-6
    )


def test_padding_carries_no_loss_and_no_attention(tokenizer):
    short = sft.tokenize_conversation(tokenizer, TURNS[1:3], 512)
    long = sft.tokenize_conversation(tokenizer, TURNS, 512)
    batch = sft.pad_batch([short, long], tokenizer.pad_token_id, torch.device("cpu"))
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()
    assert (batch["labels"][0, n:] == sft.IGNORE).all()
    assert batch["labels"][1].tolist() == long.labels
