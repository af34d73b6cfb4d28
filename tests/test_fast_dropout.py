"""CPU dropout from 16-bit uniforms: its statistics, its gradient, and the module swap."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline.fast_dropout import FastDropout, _attention, fast_cpu_dropout, fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_drop_rate_and_scale_match_p(p):
    torch.manual_seed(0)
    n = 2_000_000
    out = fast_dropout(torch.ones(n), p)
    dropped = (out == 0).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma + 2**-16  # quantised to 1/65536
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, kept[0].item()))
    assert out.mean().item() == pytest.approx(1.0, abs=6 * sigma / (1 - p))


def test_masks_are_independent_across_positions():
    torch.manual_seed(1)
    out = fast_dropout(torch.ones(400_000), 0.5) == 0
    a, b = out[0::4].float(), out[1::4].float()  # quarters of the same 64-bit word
    both = (a * b).mean().item()
    assert both == pytest.approx(0.25, abs=0.005)


def test_seeded_masks_repeat_and_gradient_is_the_mask():
    torch.manual_seed(3)
    first = fast_dropout(torch.ones(1000), 0.2)
    torch.manual_seed(3)
    x = torch.ones(1000, requires_grad=True)
    second = fast_dropout(x, 0.2)
    assert torch.equal(first, second)
    second.sum().backward()
    assert torch.equal(x.grad, second.detach())  # d(x * mask * scale)/dx = mask * scale


def test_eval_and_zero_p_are_identity_and_bad_p_is_refused():
    x = torch.randn(10)
    assert fast_dropout(x, 0.3, training=False) is x
    assert fast_dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="dropout probability"):
        fast_dropout(x, 1.0)
    torch.manual_seed(0)
    nearly_all = fast_dropout(torch.ones(1_000_000), 1 - 1e-7)  # rounds to 65535 / 65536
    assert torch.isfinite(nearly_all).all() and nearly_all.max().item() == 65536.0


def test_bf16_input_keeps_its_dtype():
    out = fast_dropout(torch.ones(64, dtype=torch.bfloat16), 0.1)
    assert out.dtype == torch.bfloat16


def test_attention_math_path_matches_sdpa_with_padding():
    torch.manual_seed(0)
    module = nn.Module().train()
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    mask = torch.ones(3, 1, 5, 5, dtype=torch.bool)
    mask[1, :, :, 3:] = False  # row 1 is padded after 3 tokens
    module.training = False
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5, dropout=0.0)
    module.training = True
    # p below 2**-17 rounds to no drops: the math path alone, against SDPA
    got, _ = _attention(module, q, k, v, mask, scaling=0.5, dropout=1e-9)
    assert torch.allclose(got, expected, atol=1e-6)
    # with dropout, each row of probabilities loses some entries: outputs differ
    dropped, _ = _attention(module, q, k, v, mask, scaling=0.5, dropout=0.5)
    assert not torch.allclose(dropped, expected, atol=1e-3)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_swap_covers_every_dropout_and_is_undone():
    model = tiny_bert().train()
    ids = torch.randint(0, 50, (4, 8))
    assert model.config._attn_implementation == "sdpa"
    stock = [m for m in model.modules() if type(m) is nn.Dropout]
    with fast_cpu_dropout(model):
        assert not any(type(m) is nn.Dropout for m in model.modules())
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == len(stock)
        assert model.config._attn_implementation == "retune_cpu_train"
        torch.manual_seed(0)
        a = model(input_ids=ids).logits
        torch.manual_seed(0)
        b = model(input_ids=ids).logits
        torch.manual_seed(1)
        c = model(input_ids=ids).logits
        model.eval()
        inside_eval = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert [m for m in model.modules() if type(m) is nn.Dropout] == stock
    assert all(not m.training for m in stock)  # the mode set inside is carried back
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(inside_eval, model(input_ids=ids).logits, atol=1e-6)


def test_disabled_swap_changes_nothing():
    model = tiny_bert()
    with fast_cpu_dropout(model, enabled=False):
        assert any(type(m) is nn.Dropout for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
