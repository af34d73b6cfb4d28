"""Supervised fine-tuning data: conversations as token ids with loss on the answers only.

:func:`tokenize_conversation` renders a conversation through the tokenizer's chat template
and labels each token: its id where it belongs to an assistant turn (the answer and the
template's end-of-turn marker, so the model learns to stop), ``IGNORE`` (-100) elsewhere
(system, user and the template's headers). The assistant spans are found by rendering the
conversation up to each assistant turn with the generation prompt and comparing it with the
rendering that includes the turn: that works for any template that renders a prefix of the
conversation as a prefix of the text, which :func:`tokenize_conversation` checks.

:func:`causal_lm_loss` is the mean cross-entropy over labelled tokens of a batch; with
``reduction="sum"`` its sum, so data-parallel ranks can divide by the global count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE = -100


class TemplateError(ValueError):
    """The chat template does not render a conversation's prefix as a prefix of its text."""


@dataclass(frozen=True)
class Tokenized:
    """One conversation as model input: ids and labels of equal length (at most
    ``max_length``), the untruncated length and how many answer tokens the cut lost."""

    input_ids: list[int]
    labels: list[int]
    full_length: int
    answer_tokens_cut: int

    @property
    def answer_tokens(self) -> int:
        """Labelled tokens that carry a loss: all but a label at position 0, which no
        earlier position predicts."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


def render(tokenizer: Any, turns: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(turns), tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return text


def answer_spans(
    tokenizer: Any, turns: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Raises:
        TemplateError: the template renders an earlier part of the conversation as
            something other than a prefix of the whole.
    """
    full = render(tokenizer, turns, generation_prompt=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start_text = render(tokenizer, turns[:i], generation_prompt=True)
        end_text = render(tokenizer, turns[: i + 1], generation_prompt=False)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise TemplateError(
                "the chat template does not render the conversation up to turn "
                f"{i + 1} as the start of the whole conversation; retune cannot tell the "
                "answer's tokens from the prompt's with this template"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def tokenize_conversation(
    tokenizer: Any, turns: Sequence[dict[str, str]], max_length: int
) -> Tokenized:
    """Token ids and labels of ``turns`` (see the module docstring), cut to ``max_length``.

    A token is labelled when its first character lies in an assistant span. Needs a fast
    tokenizer (character offsets).
    """
    text, spans = answer_spans(tokenizer, turns)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) and end > start else IGNORE
        for token, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    cut = sum(1 for x in labels[max_length:] if x != IGNORE)
    return Tokenized(ids[:max_length], labels[:max_length], len(ids), cut)


def tokenize_all(
    tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], max_length: int
) -> list[Tokenized]:
    return [tokenize_conversation(tokenizer, c, max_length) for c in conversations]


def pad_batch(
    items: Sequence[Tokenized], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding):
    each (B, T) with T the longest item. Padding never attends or is attended to."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy on labelled tokens: position t predicts label t + 1.

    Args:
        logits: (B, T, V); labels: (B, T) with IGNORE where no loss applies.
        reduction: "mean" over labelled tokens, "sum", or "none" for (B, T - 1).
    """
    shifted = labels[:, 1:]
    loss = nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        shifted.flatten(),
        ignore_index=IGNORE,
        reduction="none" if reduction == "none" else "sum",
    )
    if reduction == "none":
        return loss.view(shifted.shape)
    if reduction == "sum":
        return loss
    return loss / (shifted != IGNORE).sum().clamp(min=1)
