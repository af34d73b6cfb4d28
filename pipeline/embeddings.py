"""Sentence embeddings from an encoder: mean-pooled over real tokens, L2-normalised.

The same pooling serves the frozen-feature probe and the forgetting measures, for the
base model and the tuned one alike, so their scores are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def embed_texts(
    encoder: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 128,
    max_length: int = 128,
    bf16: bool = False,
) -> np.ndarray:
    """Embeddings of shape (len(texts), hidden), in input order.

    Args:
        encoder: a transformers base model (e.g. ``BertModel``) returning last_hidden_state.
    """
    device = next(encoder.parameters()).device
    encoder.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch
    out: np.ndarray | None = None
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = encoder(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        pooled = nn.functional.normalize(pooled, dim=-1)
        if out is None:
            out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
        out[idx] = pooled.cpu().numpy()
    if out is None:
        raise ValueError("embed_texts needs at least one text")
    return out


@torch.no_grad()
def embed_layers(
    encoder: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """Mean-pooled (not normalised) hidden states of every layer, shape (L + 1, N, H).

    Index 0 is the embedding layer's output, index i the i-th encoder layer's. fp32 only:
    it feeds CKA, which compares small differences.
    """
    device = next(encoder.parameters()).device
    encoder.eval()
    per_batch = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        states = encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states  # L + 1 tensors of (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = [(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0) for h in states]
        per_batch.append(torch.stack(pooled).cpu().numpy())  # (L + 1, B, H)
    if not per_batch:
        raise ValueError("embed_layers needs at least one text")
    return np.concatenate(per_batch, axis=1)
