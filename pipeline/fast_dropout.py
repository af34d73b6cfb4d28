"""Dropout for CPU training whose masks cost a fraction of torch's.

On CPU, ``torch.nn.functional.dropout`` draws one Mersenne-Twister double per element
(``bernoulli_``). Fine-tuning MiniLM in fp32 calls it 20 times a step (embeddings, and per
layer the attention probabilities, the attention output and the feed-forward output), which
is about 12% of the step. Here one 64-bit draw from the same default generator gives four
16-bit uniforms, and an element is dropped when its uniform is below ``round(p * 65536)``:
the drop probability is ``p`` to within 2**-17 and the kept values are scaled by the inverse
of the exact keep probability, so the expectation is unchanged. Forward and backward
together cost about a third of torch's.

Seeded runs stay deterministic, and a resumed run restores the generator with the rest of
its state. CUDA draws dropout masks with Philox in the kernel, so this is for CPU only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Encoder models whose self-attention calls the shared attention interface with only
# (query, key, value, mask, scaling, dropout): their attention dropout can go through here.
ATTENTION_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
_IMPLEMENTATION = "retune_cpu_train"


def _threshold(p: float) -> tuple[int, float]:
    """The int16 threshold below which an element is dropped, and the scale for kept ones."""
    drop = min(round(p * 65536), 65535)  # p just below 1 still keeps some elements
    return drop - 32768, 65536 / (65536 - drop)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with masks from 16-bit uniforms (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    threshold, scale = _threshold(p)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), 2**63 - 1)  # full-width words: all 16-bit quarters are uniform
    uniforms = words.view(torch.int16)[:n].view(x.shape)
    keep = torch.empty_like(x, memory_format=torch.contiguous_format)
    torch.ge(uniforms, threshold, out=keep)  # straight into x's dtype: cheaper than where()
    return x * keep.mul_(scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with :func:`fast_dropout` masks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention with fast dropout on the probabilities.

    Without dropout it is PyTorch's SDPA; with dropout, the math path SDPA itself takes on
    CPU, with the mask drawn by :func:`fast_dropout`. The mask is SDPA's: boolean (True
    attends) or None.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or not module.training:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=0.0, **kwargs
        )
    scores = torch.matmul(query, key.transpose(-1, -2))  # (B, heads, T, T)
    scores = scores * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    out = torch.matmul(probs.to(value.dtype), value)  # (B, heads, T, D)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(_IMPLEMENTATION, sdpa_mask)


@contextmanager
def fast_cpu_dropout(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Train ``model`` with :class:`FastDropout` in place of every ``nn.Dropout``.

    For the encoders in ``ATTENTION_MODEL_TYPES`` the attention-probability dropout is
    replaced too. Everything is put back on exit, so the model saves and loads as it was.
    """
    if not enabled:
        yield
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                replacement = FastDropout(child.p)
                replacement.train(child.training)
                setattr(parent, name, replacement)
                swapped.append((parent, name, child))
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            config is not None
            and getattr(config, "model_type", None) in ATTENTION_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa"
            and all(config is not seen for seen, _ in configs)
        ):
            configs.append((config, config._attn_implementation))
    if configs:
        _register()
    try:
        for config, _ in configs:
            config._attn_implementation = _IMPLEMENTATION
        yield
    finally:
        for config, previous in configs:
            config._attn_implementation = previous
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)
