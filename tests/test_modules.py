"""DilatedAttention (LongNet) and MultiheadSparseAttention against hand computations,
the dense reference and nn.MultiheadAttention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.lang.groups import head_groups
from sparsedsl.modules import DilatedAttention, MultiheadSparseAttention


def _bnhd(batch, length, heads, dim, *, kv_heads=None, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = heads if kv_heads is None else kv_heads
    return (torch.randn(batch, length, heads, dim, generator=gen, dtype=dtype),
            torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=dtype),
            torch.randn(batch, length, kv_heads, dim, generator=gen, dtype=dtype))


def _longnet_by_hand(q, k, v, lengths, rates, *, causal=False, scale=None):
    """LongNet from its definition, on strided views: for each head group, each segment,
    the kept positions attend densely among themselves; every other row is zero."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    k, v = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros(batch, n, heads, dim, dtype=torch.float64)
    for i, (hs, length, rate) in enumerate(zip(head_groups(heads, len(lengths)), lengths, rates)):
        for start in range(0, n, length):
            pos = torch.arange(start, min(start + length, n))
            pos = pos[(pos - start) % rate == i % rate]
            if len(pos) == 0:
                continue
            qs = q[:, pos][:, :, hs].double().transpose(1, 2)
            ks = k[:, pos][:, :, hs].double().transpose(1, 2)
            vs = v[:, pos][:, :, hs].double().transpose(1, 2)
            scores = qs @ ks.transpose(-1, -2) * scale
            if causal:
                scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            res = torch.softmax(scores, -1) @ vs  # [B, h, len(pos), D]
            out[:, pos.unsqueeze(1), torch.tensor(list(hs)).unsqueeze(0)] = res.permute(0, 2, 1, 3)
    return out


# -- DilatedAttention --------------------------------------------------------------------------

@pytest.mark.parametrize("length,heads,kv_heads,lengths,rates,causal", [
    (64, 4, None, [16, 32], [1, 2], False),
    (100, 5, None, [16, 32], [1, 2], False),     # length not a multiple; uneven head groups
    (77, 6, 2, [8, 16, 64], [1, 2, 4], True),    # GQA, causal
    (50, 3, 1, [128, 7], [3, 7], False),         # a segment longer than the sequence
])
def test_dilated_attention_equals_hand_computation(length, heads, kv_heads, lengths, rates, causal):
    q, k, v = _bnhd(2, length, heads, 8, kv_heads=kv_heads)
    module = DilatedAttention(lengths, rates, block_size=32)
    out = module(q, k, v, is_causal=causal)
    assert out.shape == q.shape
    assert (out.double() - _longnet_by_hand(q, k, v, lengths, rates, causal=causal)).abs().max() < 1e-5
    pattern = module.pattern_for(causal)
    expected, _ = reference_attention(pattern, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert (out.double() - expected.transpose(1, 2)).abs().max() < 1e-5


def test_dilated_attention_pattern_scale_and_offsets():
    module = DilatedAttention([2048, 4096], [1, 2])
    assert module.pattern == sd.segments([2048, 4096], [1, 2])
    assert module.pattern_for(True) == sd.segments([2048, 4096], [1, 2]) & sd.causal()
    assert module.pattern == sd.patterns.longnet_head_grouped([2048, 4096], [1, 2])
    q, k, v = _bnhd(1, 40, 2, 8)
    scaled = DilatedAttention([8, 16], [1, 2], softmax_scale=0.3)(q, k, v)
    expected = _longnet_by_hand(q, k, v, [8, 16], [1, 2], scale=0.3)
    assert (scaled.double() - expected).abs().max() < 1e-5
    shifted = DilatedAttention([8, 16], [2, 2], offsets=[1, 1])
    assert shifted.pattern == sd.segments([8, 16], [2, 2], [1, 1])


def test_dilated_attention_errors_state_and_copies():
    with pytest.raises(ValueError, match="same length"):
        DilatedAttention([2048, 4096], [1])
    with pytest.raises(ValueError):
        DilatedAttention([4], [8])
    with pytest.raises(ValueError):
        DilatedAttention([16], [1], block_size=100)
    module = DilatedAttention([16, 32, 64], [1, 2, 4])
    q, k, v = _bnhd(1, 64, 2, 8)
    with pytest.raises(ValueError, match="at least 3 heads"):
        module(q, k, v)
    q, k, v = _bnhd(1, 64, 3, 8)
    assert module.state_dict() == {}
    clone = copy.deepcopy(module)
    assert torch.equal(clone(q, k, v), module(q, k, v))
    assert "dilation_rates=[1, 2, 4]" in repr(module)


def test_dilated_attention_backward():
    q, k, v = (t.double().requires_grad_() for t in _bnhd(1, 48, 2, 4))
    out = DilatedAttention([16, 24], [1, 3])(q, k, v, is_causal=True)
    want = _longnet_by_hand(q, k, v, [16, 24], [1, 3], causal=True)
    got_grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max() < 1e-9


# -- MultiheadSparseAttention ---------------------------------------------------------------------

def _pair(embed, heads, pattern, **kwargs):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(embed, heads, **kwargs)
    sparse = MultiheadSparseAttention(embed, heads, pattern, **kwargs)
    sparse.load_state_dict(reference.state_dict())
    return reference.eval(), sparse.eval()


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": True}, {"bias": False},
                                    {"kdim": 6, "vdim": 10, "batch_first": True}])
def test_full_pattern_equals_nn_multihead_attention(kwargs):
    reference, sparse = _pair(16, 4, "full()", **kwargs)
    assert set(sparse.state_dict()) == set(reference.state_dict())
    gen = torch.Generator().manual_seed(1)
    first = kwargs.get("batch_first", False)
    query = torch.randn(*((2, 9) if first else (9, 2)), 16, generator=gen)
    key = torch.randn(*((2, 11) if first else (11, 2)), kwargs.get("kdim", 16), generator=gen)
    value = torch.randn(*key.shape[:2], kwargs.get("vdim", 16), generator=gen)
    want, want_w = reference(query, key, value, need_weights=True)
    got, got_w = sparse(query, key, value, need_weights=True)
    assert (got - want).abs().max() < 1e-5
    assert (got_w - want_w).abs().max() < 1e-6
    got, none = sparse(query, key, value)
    assert none is None and (got - want).abs().max() < 1e-5
    per_head = sparse(query, key, value, need_weights=True, average_attn_weights=False)[1]
    assert per_head.shape == (2, 4, 9, 11)


def test_causal_full_pattern_equals_nn_multihead_attention_with_causal_mask():
    reference, sparse = _pair(12, 3, sd.full(), batch_first=True)
    x = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(2))
    mask = nn.Transformer.generate_square_subsequent_mask(10)
    want, _ = reference(x, x, x, attn_mask=mask, need_weights=False)
    got, _ = sparse(x, x, x, is_causal=True)
    assert (got - want).abs().max() < 1e-5


def _by_hand(module, pattern, x, **buffers):
    """Projections, the dense reference attention, the output projection (batch_first)."""
    e, h = module.embed_dim, module.num_heads
    wq, wk, wv = module.in_proj_weight.detach().double().split(e)
    bq, bk, bv = module.in_proj_bias.detach().double().split(e)
    def heads(t):
        return t.view(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)
    q, k, v = heads(x @ wq.T + bq), heads(x @ wk.T + bk), heads(x @ wv.T + bv)
    out, _ = reference_attention(pattern, q, k, v, **buffers)
    out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], e)
    return out @ module.out_proj.weight.detach().double().T + module.out_proj.bias.detach().double()


@pytest.mark.parametrize("pattern,expected", [
    ("sliding_window(window=8)", sd.window(7, 0)),
    ("window(3) | global_tokens(2)", sd.window(3) | sd.global_tokens(2)),
    ("longnet_head_grouped(segment_lengths=[8, 16], dilation_rates=[1, 2])", sd.segments([8, 16], [1, 2])),
    (sd.blocks(8).local(1).global_(1), sd.blocks(8).local(1).global_(1)),
])
def test_sparse_patterns_equal_hand_computation(pattern, expected):
    torch.manual_seed(3)
    module = MultiheadSparseAttention(16, 4, pattern, batch_first=True, block_size=16)
    assert module.pattern == expected
    x = torch.randn(2, 37, 16)
    out, _ = module(x, x, x)
    assert (out.double() - _by_hand(module, expected, x.double())).abs().max() < 1e-5
    causal, _ = module(x, x, x, is_causal=True)
    want = _by_hand(module, expected & sd.causal(), x.double())
    assert (causal.double() - want).abs().max() < 1e-5


def test_buffers_pass_through_and_unbatched_inputs():
    torch.manual_seed(4)
    module = MultiheadSparseAttention(8, 2, "document_mask")
    ids = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    x = torch.randn(15, 8)  # unbatched [L, E]
    out, _ = module(x, x, x, doc_ids=ids)
    assert out.shape == (15, 8)
    want = _by_hand(module, sd.documents("doc_ids") & sd.causal(), x.double()[None], doc_ids=ids)
    assert (out.double() - want[0]).abs().max() < 1e-5
    weights = module(x, x, x, need_weights=True, doc_ids=ids)[1]
    assert weights.shape == (15, 15) and weights[5, :5].abs().max() == 0


def test_dropout_applies_to_the_output_in_training_only():
    torch.manual_seed(5)
    module = MultiheadSparseAttention(16, 2, "window(2)", dropout=0.5, batch_first=True)
    x = torch.randn(1, 20, 16)
    module.eval()
    first, _ = module(x, x, x)
    assert torch.equal(first, module(x, x, x)[0])
    module.train()
    torch.manual_seed(0)
    dropped, _ = module(x, x, x)
    assert not torch.allclose(dropped, first)
    # Dropout on the context before out_proj: undo out_proj and count the zeros.
    context = (dropped - module.out_proj.bias) @ torch.linalg.pinv(module.out_proj.weight).T
    zero_fraction = (context.abs() < 1e-4).float().mean().item()
    assert 0.3 < zero_fraction < 0.7


@pytest.mark.parametrize("call,message", [
    (lambda m, y: m(y, y, y, is_causal="False"), "'is_causal' must be True or False, got 'False'"),
    (lambda m, y: m(y, y, y, need_weights="yes"), "'need_weights' must be True or False"),
    (lambda m, y: m(y, y, y, average_attn_weights=None), "'average_attn_weights' must be True or False"),
    (lambda m, y: m(y, torch.randn(3, 10, 32), torch.randn(3, 10, 32)), r"one batch size \(dim 0\)"),
    (lambda m, y: m(y, y, torch.randn(2, 11, 32)), r"key and value must have one length \(dim 1\)"),
    (lambda m, y: m(torch.randn(10, 32), y, y), "same number of dims"),
    (lambda m, y: m(torch.randn(2, 10, 31), y, y), "query's last dim must be 32, got shape \\[2, 10, 31\\]"),
    (lambda m, y: m(y, y, y.tolist()), "'value' must be a tensor"),
])
def test_multihead_inputs_are_checked_by_name(call, message):
    module = MultiheadSparseAttention(32, 4, "window(5)", batch_first=True)
    with pytest.raises((TypeError, ValueError), match=message):
        call(module, torch.randn(2, 10, 32))


@pytest.mark.parametrize("pattern", ["longnet([8, 16], [1, 2])", "window(4) + chunks(16)", "window(4).score(alibi())"])
def test_need_weights_names_why_scored_and_multiset_patterns_have_none(pattern):
    module = MultiheadSparseAttention(32, 4, pattern)
    x = torch.randn(21, 2, 32)
    with pytest.raises(ValueError, match="score modifications or pairs counted more than once"):
        module(x, x, x, need_weights=True)


def test_backward_state_dict_deepcopy_and_errors():
    torch.manual_seed(6)
    module = MultiheadSparseAttention(16, 4, "bigbird(block_size=16, random_blocks=1)")
    x = torch.randn(50, 3, 16, requires_grad=True)
    out, _ = module(x, x, x)
    out.square().sum().backward()
    assert x.grad is not None and module.in_proj_weight.grad.abs().sum() > 0
    fresh = MultiheadSparseAttention(16, 4, "bigbird(block_size=16, random_blocks=1)")
    fresh.load_state_dict(module.state_dict())
    clone = copy.deepcopy(module)
    with torch.no_grad():
        assert torch.equal(fresh(x, x, x)[0], out) and torch.equal(clone(x, x, x)[0], out)
    assert "bigbird" not in repr(module) and "blocks(16)" in repr(module)
    with pytest.raises(NotImplementedError):
        module(x, x, x, key_padding_mask=torch.zeros(3, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="head groups"):
        MultiheadSparseAttention(16, 2, sd.segments([8, 8, 8], [1, 2, 4]))
    with pytest.raises(ValueError, match="divisible"):
        MultiheadSparseAttention(10, 4, "full()")
    with pytest.raises(ValueError):
        MultiheadSparseAttention(16, 4, "no_such_pattern")
    with pytest.raises(TypeError):
        MultiheadSparseAttention(16, 4, 3)
    limit = MultiheadSparseAttention(8, 1, "full()")
    with pytest.raises(ValueError, match="need_weights"):
        big = torch.zeros(4100, 1, 8)
        limit(big, big, big, need_weights=True)


def test_factory_kwargs_and_dtype():
    module = MultiheadSparseAttention(8, 2, "window(1)", dtype=torch.float64, batch_first=True)
    assert module.in_proj_weight.dtype == torch.float64
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    assert module(x, x, x)[0].dtype == torch.float64
    assert math.isclose(module.in_proj_bias.abs().sum().item(), 0.0)
