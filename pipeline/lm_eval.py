"""What a causal LM is measured by: log-likelihoods, greedy generations, chrF/BLEU, and
CrowS-Pairs by likelihood.

- :func:`mean_logliks` scores each item by the mean log-probability of its labelled tokens
  (every token after the first for plain text, :func:`text_items`; the answer's tokens
  for a conversation, :func:`pipeline.sft.tokenize_all`). Per item, so a paired bootstrap
  over documents can resample them; ``exp(-mean)`` is the item's perplexity.
- :func:`generate` answers conversations greedily (batched, left-padded).
- :func:`translation_scores` is sacrebleu's chrF and BLEU of generations against references.
- :func:`crows_preferences` says, per CrowS-Pairs pair, whether the model finds the more
  stereotyping sentence the more likely (summed log-probability); 0.5 of the pairs is
  unbiased. :func:`preference_shift` compares two models' preferences with a paired
  bootstrap.

The vocabulary projection runs only on the positions that are scored, in chunks, so a
49k-token vocabulary never needs a (batch, length, vocabulary) tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import sft

CHUNK = 1024  # scored positions per vocabulary projection (CHUNK x V floats at a time)


def text_items(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[sft.Tokenized]:
    """Plain texts as items whose every token is scored (the first has no predecessor)."""
    items = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        items.append(sft.Tokenized(ids[:max_length], ids[:max_length], len(ids), 0))
    return items


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def token_logprob_sums(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled next tokens and their count,
    each (B,)."""
    inner = _inner(model)
    hidden = inner.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    keep = targets != sft.IGNORE  # (B, T - 1)
    rows = keep.nonzero()[:, 0]  # the row of each scored position
    states, wanted = hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)
    picked = torch.empty(len(wanted), device=hidden.device)
    for start in range(0, len(wanted), CHUNK):
        logits = inner.lm_head(states[start : start + CHUNK]).float()  # (n, V)
        logp = torch.log_softmax(logits, dim=-1)
        picked[start : start + CHUNK] = logp.gather(1, wanted[start : start + CHUNK, None])[:, 0]
    sums = torch.zeros(len(keep), device=hidden.device).index_add_(0, rows, picked)
    return sums, keep.sum(1)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each position's next-token distribution, in nats: (N,).

    ``sum_v p_t(v) * (log p_t(v) - log p_s(v))`` from logits of shape (N, V), in fp32;
    the gradient flows into ``student_logits`` only when it requires one.
    """
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return nn.functional.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)


def scored_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the positions whose next token is labelled (the scored ones of
    :func:`token_logprob_sums`), in row-major order: (N, V)."""
    inner = _inner(model)
    hidden = inner.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # (B, T, H)
    keep = batch["labels"][:, 1:] != sft.IGNORE  # (B, T - 1)
    return inner.lm_head(hidden[:, :-1][keep])


@torch.no_grad()
def mean_logliks(
    model: nn.Module,
    items: Sequence[sft.Tokenized],
    pad_id: int,
    batch_size: int = 16,
    summed: bool = False,
) -> np.ndarray:
    """Each item's mean (or, with ``summed``, total) log-probability per scored token:
    (N,) float64, in input order; NaN for an item with nothing to score."""
    device = next(model.parameters()).device
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    out = np.full(len(items), np.nan)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        sums, counts = token_logprob_sums(
            model, sft.pad_batch([items[i] for i in idx], pad_id, device)
        )
        values = sums if summed else sums / counts.clamp(min=1)
        values = torch.where(counts > 0, values, torch.nan)
        out[idx] = values.double().cpu().numpy()
    return out


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[str]:
    """Greedy answers to ``prompts`` (conversations up to the turn to answer), in order."""
    device = next(model.parameters()).device
    model.eval()
    texts = [sft.render(tokenizer, p, generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens follow every prompt's last token
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
                add_special_tokens=False,
            ).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            for i, tokens in zip(idx, new, strict=True):
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus chrF (character 6-grams, beta 2) and BLEU (sacrebleu's defaults), 0-100."""
    from sacrebleu.metrics import BLEU, CHRF

    refs = [list(references)]
    return {
        "chrf": float(CHRF().corpus_score(list(hypotheses), refs).score),
        "bleu": float(BLEU().corpus_score(list(hypotheses), refs).score),
    }


def crows_preferences(
    model: nn.Module, tokenizer: Any, pairs: pd.DataFrame, max_length: int = 128
) -> np.ndarray:
    """1.0 where the model gives ``sent_a`` (the more stereotyping sentence) the higher
    summed log-probability, else 0.0: (P,), in the order of ``pairs``."""
    items = text_items(tokenizer, [*pairs["sent_a"], *pairs["sent_b"]], max_length)
    scores = mean_logliks(model, items, tokenizer.pad_token_id, summed=True)
    n = len(pairs)
    return (scores[:n] > scores[n:]).astype(np.float64)


@dataclass(frozen=True)
class PreferenceShift:
    """One CrowS-Pairs bias type (or "all"): how often each model prefers the stereotype,
    and the tuned minus the base share with its paired bootstrap 95% interval."""

    bias_type: str
    pairs: int
    base: float
    tuned: float
    shift: float
    ci_low: float
    ci_high: float


def preference_shift(
    types: Sequence[str],
    base: np.ndarray,
    tuned: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> list[PreferenceShift]:
    """Per bias type (sorted) and pooled ("all", first): base and tuned stereotype
    preference and their paired difference, resampling pairs."""
    from pipeline.evaluate import percentile_interval

    labels = np.asarray(types)
    rows = []
    for i, name in enumerate(["all", *sorted(set(labels))]):
        mask = np.ones(len(labels), bool) if name == "all" else labels == name
        diff = tuned[mask] - base[mask]
        rng = np.random.default_rng([seed, i])
        draws = rng.integers(0, len(diff), size=(resamples, len(diff)))
        low, high = percentile_interval(diff[draws].mean(1))
        rows.append(
            PreferenceShift(
                name,
                int(mask.sum()),
                float(base[mask].mean()),
                float(tuned[mask].mean()),
                float(diff.mean()),
                low,
                high,
            )
        )
    return rows
