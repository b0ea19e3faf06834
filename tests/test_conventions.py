"""Everyday PyTorch conventions: dtypes, layouts, copying, saving, pickling patterns."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings

import sparsedsl as sd
from reference import reference_attention
from strategies import patterns


@settings(max_examples=100)
@given(pattern=patterns(allow_buffers=True, allow_scores=False))
def test_patterns_pickle_and_round_trip_through_text(pattern):
    assert pickle.loads(pickle.dumps(pattern)) == pattern
    assert copy.deepcopy(pattern) == pattern
    assert sd.parse(str(pattern)) == pattern


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 3e-3),
                                              (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_dtypes_on_the_cpu(dtype, tolerance):
    pattern = sd.window(9) | sd.global_tokens(2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen).to(dtype) for _ in range(3))
    out = sd.compile(pattern, block_size=32)(q, k, v)
    assert out.dtype == dtype
    expected, _ = reference_attention(pattern, q, k, v)
    assert (out.double() - expected).abs().max().item() < tolerance


def test_compiled_module_copies_saves_and_loads():
    module = sd.compile(sd.segments([16, 32], [1, 2]).score(sd.softcap(20.0)), block_size=16)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    out = module(q, k, v)
    assert torch.equal(copy.deepcopy(module)(q, k, v), out)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.pattern == module.pattern
    assert torch.equal(loaded(q, k, v), out)


def test_multihead_module_state_dict_and_deepcopy():
    torch.manual_seed(0)
    module = sd.MultiheadSparseAttention(32, 4, "window(6) | global_tokens(1)", batch_first=True)
    x = torch.randn(2, 40, 32)
    out, _ = module(x, x, x)
    clone = copy.deepcopy(module)
    assert torch.equal(clone(x, x, x)[0], out)
    fresh = sd.MultiheadSparseAttention(32, 4, "window(6) | global_tokens(1)", batch_first=True)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh(x, x, x)[0], out)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
