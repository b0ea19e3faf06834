"""Hostile and unusual inputs: each gives a clear error or a correct result, never NaN."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import sparsedsl as sd
from reference import reference_attention

PATTERNS = [
    sd.window(5) | sd.global_tokens(2),
    sd.segments([8, 16], [1, 2]),
    sd.blocks(16).local(1).random(1, 3),
    sd.causal().score(sd.softcap(5.0)),
]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("pattern", [*PATTERNS, sd.longnet([8, 16], [1, 2]), sd.window(5), sd.causal()], ids=str)
def test_non_contiguous_and_broadcast_inputs(pattern, grad):
    """Views of every kind, the head dim strided too (the fused kernels that plans call
    directly read it as one run), with gradients and without."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 40, 4, 8, generator=gen)  # [B, N, H, D] storage, used as bhnd views
    q = base.transpose(1, 2)                        # non-contiguous
    k = torch.randn(1, 4, 40, 8, generator=gen).expand(2, 4, 40, 8)  # broadcast over batch
    v = torch.randn(2, 4, 8, 40, generator=gen).transpose(-1, -2)    # strided last dims
    module = sd.compile(pattern, block_size=16)
    for q, k, v in ((q, k, v), (q[..., ::1], v, torch.randn(2, 4, 40, 16, generator=gen)[..., ::2])):
        q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))
        out = module(q, k, v)
        expected, _ = reference_attention(pattern, q, k, v)
        assert (out.double() - expected).abs().max() < 1e-5
        if grad:
            weights = torch.randn(out.shape, generator=gen)
            got = torch.autograd.grad((out * weights).sum(), (q, k, v))
            want = torch.autograd.grad((expected * weights.double()).sum(), (q, k, v))
            for g, w in zip(got, want):
                assert (g.double() - w).abs().max() < 1e-4


@pytest.mark.parametrize("value_dim", [8, 24])
@pytest.mark.parametrize("pattern", [*PATTERNS, sd.longnet([16, 32], [1, 2]), sd.dilated(16, 2) + sd.chunks(32),
                                     sd.blocks(32).local(1).within(sd.segments([16, 16], [1, 2]))], ids=str)
def test_values_of_another_head_dim_on_every_plan(pattern, value_dim):
    """Values whose head dim differs from the queries' (the output has theirs), on every
    plan that takes the call, forward and gradients (fused kernels that take one head dim
    get zero columns appended)."""
    gen = torch.Generator().manual_seed(value_dim)
    q, k = (torch.randn(2, h, 70, 16, generator=gen, dtype=torch.float64) for h in (2, 1))
    v = torch.randn(2, 1, 70, value_dim, generator=gen, dtype=torch.float64)
    expected, _ = reference_attention(pattern, q, k, v)
    weights = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((reference_attention(pattern, *inputs)[0] * weights).sum(), inputs)
    ran = []
    for kernel in ("gather", "tile_sdpa", "lattice", "branches", "band", "sdpa"):
        module = sd.compile(pattern, kernel=kernel, block_size=16)
        try:
            module.explain(70, heads=2, kv_heads=1, head_dim=16, device="cpu", requires_grad=True)
        except sd.PlanNotSupported:
            continue
        ran.append(kernel)
        with torch.no_grad():
            assert (module(q, k, v) - expected).abs().max() < 1e-9, kernel
        got = torch.autograd.grad((module(*inputs) * weights).sum(), inputs)
        for g, w in zip(got, want):
            assert (g - w).abs().max() < 1e-9, kernel
    assert "gather" in ran  # the plan every pattern has


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (37, 1), (17, 17)])
def test_tiny_lengths(pattern, q_len, kv_len):
    gen = torch.Generator().manual_seed(1)
    heads = 2
    q = torch.randn(1, heads, q_len, 8, generator=gen)
    k = torch.randn(1, heads, kv_len, 8, generator=gen)
    v = torch.randn(1, heads, kv_len, 8, generator=gen)
    out = sd.compile(pattern, block_size=16)(q, k, v)
    expected, _ = reference_attention(pattern, q, k, v)
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() < 1e-5


def test_large_logits_stay_finite():
    q = torch.randn(1, 2, 50, 8) * 1e4
    k = torch.randn(1, 2, 50, 8) * 1e4
    v = torch.randn(1, 2, 50, 8)
    for pattern in (sd.window(3), sd.segments([8, 8], [1, 2])):
        out, lse = sd.compile(pattern, block_size=16, kernel="gather")(q, k, v, return_lse=True)
        assert torch.isfinite(out).all()
        expected, _ = reference_attention(pattern, q, k, v)
        assert (out.double() - expected).abs().max() < 1e-4


def test_score_mod_returning_minus_infinity_masks_like_the_pattern():
    def hide_future(score, b, h, q, k):
        return torch.where(k > q, torch.full_like(score, float("-inf")), score)

    def hide_all(score, b, h, q, k):
        return torch.full_like(score, float("-inf"))

    q, k, v = (torch.randn(1, 2, 30, 8, requires_grad=True) for _ in range(3))
    out = sd.compile(sd.full().score(hide_future), block_size=16)(q, k, v)
    causal = sd.compile(sd.causal(), block_size=16)(q, k, v)
    torch.testing.assert_close(out, causal)
    empty = sd.compile(sd.window(4).score(hide_all), block_size=16)(q, k, v)
    assert torch.equal(empty, torch.zeros_like(empty))
    empty.sum().backward()  # q and k do not reach the output: hide_all ignores the scores
    assert v.grad is not None and torch.equal(v.grad, torch.zeros_like(v.grad))


def test_outputs_are_deterministic_on_the_cpu():
    """Every CPU plan is deterministic: the same inputs give bit-identical outputs."""
    q, k, v = (torch.randn(2, 4, 200, 16) for _ in range(3))
    for pattern in PATTERNS:
        module = sd.compile(pattern, block_size=32)
        assert torch.equal(module(q, k, v), module(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [sd.window(300) | sd.global_tokens(64),
                                     sd.segments([256, 512, 1024], [1, 2, 4]),
                                     sd.causal() & sd.window(500, 0)])
def test_gpu_forward_and_backward_are_bitwise_deterministic(pattern):
    """On CUDA (flex, lattice and decoding plans), the same inputs give bit-identical
    outputs and gradients from run to run (see docs/compiler.md, "Determinism")."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2048, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    module = sd.compile(pattern)
    runs = []
    for _ in range(3):
        out = module(q, k, v)
        grads = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))
        runs.append((out, *grads))
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    step = [module(q[:, :, -1:], k, v, q_offset="end") for _ in range(3)]
    assert all(torch.equal(step[0], s) for s in step[1:])


def test_per_head_masks_at_256k_tokens():
    script = textwrap.dedent("""
        import resource, sparsedsl as sd
        m = sd.compile(sd.segments([2048, 4096, 8192, 16384], [1, 2, 4, 8]) | sd.global_tokens(64))
        bm = m.block_mask(1 << 18, heads=8)
        assert tuple(bm.kv_num_blocks.shape) == (1, 8, 2048)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 4 * 1024 * 1024  # KiB: under 4 GB


def test_concurrent_forward_calls_equal_serial_results():
    patterns = [sd.window(6 + i) | sd.global_tokens(1 + i % 3) for i in range(4)]
    patterns += [sd.segments([16, 32], [1, 2 + i]) for i in range(2)]
    inputs = [tuple(torch.randn(1, 2, 64 + 7 * i, 8) for _ in range(3)) for i in range(3)]
    serial = {(p, i): sd.compile(p, block_size=16)(*inputs[i]) for p in patterns for i in range(3)}
    sd.clear_caches()
    results, errors = [], []

    def work(p, i):
        try:
            results.append(((p, i), sd.compile(p, block_size=16)(*inputs[i])))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(p, i)) for p in patterns for i in range(3) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == len(threads)
    for key, out in results:
        assert torch.equal(out, serial[key])


@pytest.mark.parametrize("bad,message", [
    (lambda: sd.window(2**31), "2\\*\\*31 - 1"),
    (lambda: sd.blocks(10**40), "an integer of"),
    (lambda: sd.compile(sd.window(2)).block_mask(0), "q_len"),
    (lambda: sd.compile(sd.window(2)).block_mask(10, heads=0), "heads"),
    (lambda: sd.count(sd.window(2), 10, tile=0), "tile"),
    (lambda: sd.compile(sd.window(2)).explain(10, head_dim=0), "head_dim"),
])
def test_sizes_are_checked_with_named_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


_Q = torch.randn(1, 2, 32, 8)


@pytest.mark.parametrize("bad,error,message", [
    (lambda: sd.compile(sd.documents("d"))(_Q, _Q, _Q, d=[0] * 32), sd.BufferBindingError, "'d' must be a torch.Tensor"),
    (lambda: sd.compile(sd.window(4))(_Q, _Q, _Q, foo=3), sd.BufferBindingError, "'foo' must be a torch.Tensor"),
    (lambda: sd.compile(sd.window(4)).explain(32, foo=1), sd.BufferBindingError, "'foo' must be a torch.Tensor"),
    (lambda: sd.compile(sd.window(4))(*[torch.empty(1, 2, 16, 8, device="meta")] * 3), ValueError, "meta device"),
    (lambda: sd.compile(sd.window(4))(_Q, _Q, _Q, return_lse="yes"), TypeError, "'return_lse' must be True or False"),
    (lambda: sd.compile(sd.window(4)).explain(32, scale=float("nan")), ValueError, "'scale' must be a finite"),
    (lambda: sd.compile(sd.window(4)).explain(32, scale="x"), ValueError, "'scale' must be a finite"),
    (lambda: sd.compile(sd.window(4)).explain(32, dtype=torch.int32), TypeError, "'dtype' must be one of"),
    (lambda: sd.compile(sd.window(4)).explain(32, heads=4, kv_heads=3), ValueError, "'kv_heads' \\(3\\) must divide"),
    (lambda: sd.compile(sd.window(4)).explain(32, device="bogus"), ValueError, "'device' must be a torch.device"),
    (lambda: sd.dense("window(3)", 4), ValueError, "'pattern' must be a pattern"),
    (lambda: sd.MultiheadSparseAttention(64.0, 2, sd.causal()), ValueError, "'embed_dim' must be an integer"),
    (lambda: sd.MultiheadSparseAttention(64, True, sd.causal()), ValueError, "'num_heads' must be an integer"),
    (lambda: sd.DilatedAttention([16], [1], softmax_scale="a"), ValueError, "'softmax_scale' must be a finite"),
    (lambda: sd.DilatedAttention([16], [1])(*[_Q.transpose(1, 2)] * 3, is_causal="no"), TypeError,
     "'is_causal' must be True or False"),
])
def test_arguments_of_the_wrong_kind_are_named(bad, error, message):
    with pytest.raises(error, match=message):
        bad()


def test_a_tile_longer_than_the_sequence_is_counted_over_the_sequence_only():
    """A tile longer than both lengths is one tile: counting it evaluates the sequence's
    positions, not the tile's."""
    counts = sd.count(sd.blocks(16).random(2) | sd.window(3), 100, tile=2**20)
    assert counts.pairs == sd.count(sd.blocks(16).random(2) | sd.window(3), 100, tile=16).pairs
    assert (counts.tiles.full, counts.tiles.partial, counts.tiles.empty) == (0, 1, 0)


def test_softcap_is_exact_in_float64():
    """A cap float32 cannot hold (0.1) is applied in the score's dtype."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (3 * torch.randn(1, 1, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    pattern = sd.causal().score(sd.softcap(0.1))
    expected, _ = reference_attention(pattern, q, k, v)
    for kernel in ("gather", "auto"):
        assert (sd.compile(pattern, kernel=kernel)(q, k, v) - expected).abs().max() < 1e-12


def test_numpy_scalars_are_numbers():
    q = torch.randn(1, 2, 32, 8, dtype=torch.float64)
    module = sd.compile(sd.window(4))
    assert torch.equal(module(q, q, q, scale=np.float32(0.5)), module(q, q, q, scale=0.5))
    assert module(q, q, q, return_lse=np.bool_(True))[1].shape == (1, 2, 32)


def test_head_dims_flex_cannot_take_run_on_another_plan():
    module = sd.compile(sd.window(8) | sd.global_tokens(2))
    small = module.explain(512, head_dim=8, device="cuda")
    assert small.kind == "tile_sdpa" and any("head_dim=8" in r for r in small.candidates["flex"].reasons)
    assert module.explain(512, head_dim=64, device="cuda").kind == "flex"
