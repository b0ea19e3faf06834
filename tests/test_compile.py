"""The compiled attention against the dense reference, on random inputs and patterns."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from reference import reference_attention
from strategies import pattern_cases


def _inputs(batch, heads, kv_heads, q_len, kv_len, dim, *, dtype=torch.float32, device="cpu",
            seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    def make(h, n):
        t = (torch.randn(batch, h, n, dim, generator=gen) * 1.5).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)
    return make(heads, q_len), make(kv_heads, kv_len), make(kv_heads, kv_len)


def _batch_for(buffers, rng):
    for t in buffers.values():
        if t.dim() == 2 and t.dtype == torch.int64:  # batched document ids
            return t.shape[0]
    return rng.choice((1, 2))


@settings(max_examples=120)
@given(case=pattern_cases(allow_scores=True), block=st.sampled_from((16, 32, 64, 128)),
       seed=st.integers(0, 2**16), gqa=st.booleans())
def test_output_equals_dense_softmax(case, block, seed, gqa):
    pattern, q_len, kv_len, heads, buffers = case
    rng = random.Random(seed)
    batch = _batch_for(buffers, rng)
    kv_heads = 1 if gqa else heads
    q, k, v = _inputs(batch, heads, kv_heads, q_len, kv_len, 16, seed=seed)
    module = sd.compile(pattern, block_size=block)
    out, lse = module(q, k, v, return_lse=True, **buffers)
    expected, expected_lse = reference_attention(pattern, q, k, v, **buffers)
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max().item() < 1e-4
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse.double()[finite] - expected_lse[finite]).abs().max().item() < 1e-4


@settings(max_examples=40)
@given(case=pattern_cases(max_len=96, max_depth=2), seed=st.integers(0, 2**16))
def test_gradients_equal_dense_reference(case, seed):
    pattern, q_len, kv_len, heads, buffers = case
    batch = _batch_for(buffers, random.Random(seed))
    q, k, v = _inputs(batch, heads, heads, q_len, kv_len, 8, dtype=torch.float64, seed=seed,
                      requires_grad=True)
    out = sd.compile(pattern, block_size=16)(q, k, v, **buffers)
    expected, _ = reference_attention(pattern, q, k, v, **buffers)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g - w).abs().max().item() < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_rows_without_keys_output_zero_with_finite_gradients(dtype):
    # Rows 0..9 see nothing: window(3) intersected with keys >= 10 on the first rows.
    pattern = (sd.window(3) & ~sd.prefix(10)) | (sd.causal() - sd.window(50))
    q, k, v = _inputs(2, 2, 2, 130, 130, 16, dtype=dtype, requires_grad=True)
    out, lse = sd.compile(pattern, block_size=32)(q, k, v, return_lse=True)
    empty = ~sd.dense(pattern, 130).any(-1)[0]
    assert empty[:7].all() and not empty.all()
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad.float()).all()
    assert torch.equal(q.grad[:, :, empty], torch.zeros_like(q.grad[:, :, empty]))


@pytest.mark.parametrize("pattern,kernel,q_len,kv_len,q_offset,plan", [
    (sd.blocks(4).local(1).within(sd.segments([2, 4], [1, 2])) | sd.global_tokens(2), "auto", 11, 13, 0, "tile_sdpa"),
    ((sd.window(3) | sd.global_tokens(2)).score(sd.alibi()), "auto", 11, 13, 0, "gather"),
    (sd.segments([4, 8], [1, 2]), "auto", 16, 16, 0, "lattice"),
    (sd.dilated(6, 2, 1), "lattice", 13, 13, 0, "lattice"),
    (sd.causal(), "auto", 5, 12, "end", "sdpa"),
    (sd.full(), "auto", 7, 9, 0, "sdpa"),
    (sd.causal() & sd.window(5, 0), "auto", 3, 20, "end", "tile_sdpa"),  # queries at the end
])
def test_gradcheck_float64_through_every_plan(pattern, kernel, q_len, kv_len, q_offset, plan):
    module = sd.compile(pattern, block_size=16, kernel=kernel)
    heads = 2
    assert module.explain(q_len, kv_len, heads=heads, q_offset=q_offset, device="cpu",
                          dtype=torch.float64, requires_grad=True).kind == plan
    q, k, v = _inputs(1, heads, 1, q_len, kv_len, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: module(a, b, c, q_offset=q_offset), (q, k, v))


def test_bnhd_layout_matches_bhnd():
    module = sd.compile(sd.window(10) | sd.global_tokens(3), block_size=16)
    q, k, v = _inputs(2, 4, 2, 70, 50, 8)
    out = module(q, k, v)
    out_bnhd = module(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bnhd")
    torch.testing.assert_close(out_bnhd, out.transpose(1, 2))


def test_plain_function_score_mod():
    def tilt(score, b, h, q, k):
        return score + 0.01 * (q - k) * (h + 1)

    pattern = sd.causal().score(tilt)
    q, k, v = _inputs(1, 2, 2, 40, 40, 8)
    out = sd.compile(pattern, block_size=16)(q, k, v)
    expected, _ = reference_attention(pattern, q, k, v)
    assert (out.double() - expected).abs().max() < 1e-5


@pytest.mark.parametrize("pattern,kind", [
    (sd.full(), "sdpa"), (sd.causal(), "sdpa"), (sd.window(8), "tile_sdpa"),
    (sd.causal().score(sd.alibi()), "gather"),
])
def test_explain_names_the_plan_and_counts(pattern, kind):
    plan = sd.compile(pattern, block_size=16).explain(100, heads=2, head_dim=8, device="cpu")
    assert plan.kind == kind
    pairs = int(sd.dense(pattern, 100, heads=2).sum())
    assert plan.pairs == pairs
    assert plan.useful_flops == 4 * 8 * pairs
    assert plan.computed_flops >= plan.useful_flops
    assert kind in str(plan) and f"{pairs:,}" in str(plan)


def test_inductor_compiled_flex_on_cpu():
    """The Inductor-compiled FlexAttention kernel (C++ backend on the CPU), forward only."""
    pattern = sd.blocks(32).local(1).within(sd.segments([16, 32], [1, 2])) | sd.global_tokens(5)
    module = sd.compile(pattern, block_size=32, kernel="flex")
    q, k, v = _inputs(2, 4, 2, 150, 150, 16, seed=3)
    with torch.no_grad():
        out = module(q, k, v)
    expected, _ = reference_attention(pattern, q, k, v)
    assert (out.double() - expected).abs().max().item() < 1e-4
    q2, k2, v2 = _inputs(1, 4, 2, 100, 117, 16, seed=4)  # other lengths, Q != K
    with torch.no_grad():
        out2 = module(q2, k2, v2)
    assert (out2.double() - reference_attention(pattern, q2, k2, v2)[0]).abs().max().item() < 1e-4


def test_flex_on_cpu_refuses_backward_with_a_clear_error():
    module = sd.compile(sd.window(4), block_size=16, kernel="flex")
    q, k, v = _inputs(1, 1, 1, 20, 20, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward pass on the CPU"):
        module(q, k, v)


@pytest.mark.parametrize("call,message", [
    (lambda m, q: m(q[0], q, q), "must be 4-D"),
    (lambda m, q: m(q, q.double(), q), "share one dtype"),
    (lambda m, q: m(q.int(), q.int(), q.int()), "floating tensor"),
    (lambda m, q: m(q, q[:1], q[:1]), "same batch size"),
    (lambda m, q: m(q, q[:, :3], q[:, :3]), "multiple of k/v's heads"),
    (lambda m, q: m(q, q[..., :4], q), "same head_dim"),
    (lambda m, q: m(q, q, q[:, :, :5]), "same heads and length"),
    (lambda m, q: m(q, q, q, layout="nhbd"), "layout"),
    (lambda m, q: m(q, q, q, scale=float("nan")), "scale"),
    (lambda m, q: m(q, q, q, ids=torch.zeros(3)), "unexpected keyword"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    module = sd.compile(sd.window(2), block_size=16)
    q = torch.randn(2, 4, 10, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        call(module, q)


_INPUT_CHANGES = [None] + [
    ("size", name, axis, value) for name in "qkv" for axis in range(4) for value in ("zero", "plus one")
] + [("size", "kv", axis, value) for axis in range(4) for value in ("zero", "plus one")] + [
    ("dtype", names, dtype) for names in ("q", "k", "v", "qkv") for dtype in (torch.float64, torch.int32)
] + [("rank", name) for name in "qkv"] + [("scale", bad) for bad in (2, float("inf"), float("nan"), True, "x")]


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("change", _INPUT_CHANGES)
def test_input_fast_path_accepts_exactly_what_the_checks_accept(change, layout):
    """check_attention_inputs' few-comparison path accepts a call only when the checks made
    one by one accept it too, with the same scale: a well-formed call (grouped-query heads,
    a value head_dim of its own) with one thing changed, or none."""
    from sparsedsl.compiler.inputs import check_attention_inputs, checked_one_by_one

    shapes = {"q": [2, 4, 5, 8], "k": [2, 2, 6, 8], "v": [2, 2, 6, 3]}
    dtypes = dict.fromkeys("qkv", torch.float32)
    scale = None
    if change is not None and change[0] == "size":
        for name in change[1]:
            shapes[name][change[2]] = 0 if change[3] == "zero" else shapes[name][change[2]] + 1
    elif change is not None and change[0] == "dtype":
        dtypes.update(dict.fromkeys(change[1], change[2]))
    elif change is not None and change[0] == "rank":
        shapes[change[1]].append(1)
    elif change is not None:
        scale = change[1]
    q, k, v = (torch.randn(shapes[name]).to(dtypes[name]) for name in "qkv")
    try:
        expected = checked_one_by_one(q, k, v, scale, layout, "forward()")
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError)):
            check_attention_inputs(q, k, v, scale, layout)
        return
    got = check_attention_inputs(q, k, v, scale, layout)
    assert got[3] == expected[3] and type(got[3]) is float
    assert all(a.shape == b.shape for a, b in zip(got[:3], expected[:3]))


def test_missing_buffer_and_batch_mismatch():
    module = sd.compile(sd.documents("doc"), block_size=16)
    q = torch.randn(3, 1, 10, 8)
    with pytest.raises(ValueError, match="doc"):
        module(q, q, q)
    with pytest.raises(ValueError, match="batch"):
        module(q, q, q, doc=torch.zeros(2, 10, dtype=torch.int64))


@pytest.mark.parametrize("block_size", [0, 48, 100, (16,), "128", 2048])
def test_block_size_checked(block_size):
    with pytest.raises(sd.PatternArgumentError, match="block_size"):
        sd.compile(sd.window(2), block_size=block_size)


def test_compile_rejects_non_patterns():
    with pytest.raises(sd.PatternArgumentError, match="pattern"):
        sd.compile("window(3)")
    with pytest.raises(sd.PatternArgumentError, match="kernel"):
        sd.compile(sd.window(3), kernel="triton")


def test_too_few_heads_for_head_groups():
    module = sd.compile(sd.segments([8, 8, 8], [1, 2, 4]), block_size=16)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="head groups"):
        module(q, q, q)


# ---------------------------------------------------------------------------------------
# GPU: the same checks in bf16 through compiled FlexAttention
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@settings(max_examples=20, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(case=pattern_cases(allow_scores=True, max_len=400), block=st.sampled_from((32, 64, 128)),
       seed=st.integers(0, 2**16), gqa=st.booleans())
def test_gpu_flex_bf16_equals_dense_softmax(case, block, seed, gqa):
    pattern, q_len, kv_len, heads, buffers = case
    batch = _batch_for(buffers, random.Random(seed))
    buffers = {name: t.cuda() for name, t in buffers.items()}
    q, k, v = _inputs(batch, heads, 1 if gqa else heads, q_len, kv_len, 64,
                      dtype=torch.bfloat16, device="cuda", seed=seed)
    module = sd.compile(pattern, block_size=block)
    assert module.explain(q_len, kv_len, heads=heads, device="cuda", **buffers).kind in ("flex", "sdpa")
    out = module(q, k, v, **buffers)
    expected, _ = reference_attention(pattern, q.cpu(), k.cpu(), v.cpu(),
                                      **{n: t.cpu() for n, t in buffers.items()})
    assert (out.double().cpu() - expected).abs().max().item() < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [
    sd.window(70) | sd.global_tokens(9),
    sd.blocks(64).local(1).within(sd.segments([32, 64], [1, 2])),
    sd.blocks(64).local(1).random(2, 1) - sd.chunks(50),
])
def test_gpu_flex_gradients_bf16(pattern):
    heads = 2
    q, k, v = _inputs(2, heads, heads, 333, 333, 64, dtype=torch.bfloat16, device="cuda",
                      requires_grad=True)
    module = sd.compile(pattern, block_size=64)
    out = module(q, k, v)
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expected, _ = reference_attention(pattern, q64, k64, v64)
    want = torch.autograd.grad((expected * weights.cpu().double()).sum(), (q64, k64, v64))
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert (g.double().cpu() - w).abs().max().item() < 5e-2 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("pattern,band", [
    (sd.window(100), True), (sd.window(30, 0), True), (sd.causal() & sd.window(200, 0), True),
    (sd.blocks(128).local(2), True), (sd.blocks(128).local(3).causal(), True),
    (sd.causal(), False), (sd.window(100) | sd.global_tokens(4), False),
    (sd.blocks(64).local(1).global_(2).random(3, 0), False), (sd.window(100).score(sd.alibi()), False),
    (sd.window(100) & sd.prefix(50), False),
])
def test_band_kernel_options_only_for_diagonal_bands_at_head_dim_128_on_h100(pattern, band, monkeypatch):
    """Diagonal bands take the band forward options; windows of whole blocks also the
    promises of whole, consecutive tiles, but only on unpadded self-attention whose tiles
    lie inside blocks."""
    from sparsedsl.lang.queries import block_band, is_diagonal_band
    from sparsedsl.plans.flex import ALIGNED_BAND_OPTIONS, BAND_FORWARD_OPTIONS, flex_kernel_options
    assert is_diagonal_band(pattern) == band
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tuned = flex_kernel_options(pattern, 128, torch.device("cuda", 0), torch.bfloat16)
    assert (tuned is BAND_FORWARD_OPTIONS) == band
    aligned = flex_kernel_options(pattern, 128, torch.device("cuda", 0), torch.bfloat16, whole_tiles=True)
    assert (aligned is ALIGNED_BAND_OPTIONS) == (band and block_band(pattern) is not None)
    assert flex_kernel_options(sd.blocks(64).local(2), 128, torch.device("cuda", 0), torch.bfloat16,
                               whole_tiles=True) is BAND_FORWARD_OPTIONS  # 64-token blocks cut tiles
    assert flex_kernel_options(pattern, 64, torch.device("cuda", 0), torch.bfloat16) is None
    assert flex_kernel_options(pattern, 128, torch.device("cuda", 0), torch.float32) is None
    assert flex_kernel_options(pattern, 128, torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert flex_kernel_options(pattern, 128, torch.device("cuda", 0), torch.bfloat16) is None
    assert flex_kernel_options(sd.window(9).score(sd.bias("b")), 128, torch.device("cuda", 0),
                               torch.bfloat16) == {"num_stages": 2}


@pytest.mark.parametrize("pattern,length,small", [
    (sd.blocks(64).local(1).global_(2).random(3, 0), 16384, True),  # BigBird: 2.1x the pairs on 128 tiles
    (sd.blocks(64).local(1), 4096, True),
    (sd.blocks(64).local(25), 16384, False),  # 1.06x on 128 tiles: not worth smaller ones
    (sd.blocks(128).local(6), 16384, False),
    (sd.window(64) | sd.global_tokens(64), 4096, False),  # not whole blocks
])
def test_flex_takes_64_token_tiles_on_cuda_for_64_token_blocks(pattern, length, small):
    """On CUDA without gradients the flex plan takes 64-token tiles (forward kernel tiles
    of 64) for a pattern of whole 64-token blocks when they save enough pairs: BigBird then
    computes its useful pairs exactly, where 128-token tiles computed 2.1x. With gradients
    it keeps 128-token tiles (Inductor's flex backward takes no smaller ones)."""
    from sparsedsl.plans.flex import SMALL_TILE_OPTIONS, flex_kernel_options
    for grad in (False, True):
        plan = sd.compile(pattern).explain(length, heads=4, head_dim=128, device="cuda", dtype=torch.bfloat16,
                                           requires_grad=grad)
        assert plan.kind == "flex"
        assert (plan.q_block, plan.kv_block) == ((64, 64) if small and not grad else (128, 128))
        if small and not grad:
            assert plan.computed_flops <= 1.3 * plan.useful_flops
    assert flex_kernel_options(pattern, 128, torch.device("cuda", 0), torch.bfloat16, 64) is SMALL_TILE_OPTIONS
    biased = flex_kernel_options(sd.blocks(64).local(1).score(sd.bias("b")), 64, torch.device("cuda", 0),
                                 torch.float16, 64)
    assert biased == {**SMALL_TILE_OPTIONS, "fwd_num_stages": 2}


def _check_bf16_against_reference(pattern, out, q, k, v) -> None:
    """``out`` of bf16 ``q``, ``k``, ``v`` and its gradients against the float64 reference."""
    weights = torch.randn_like(out)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expected, _ = reference_attention(pattern, q64, k64, v64)
    assert (out.double().cpu() - expected).abs().max().item() < 3e-2
    want = torch.autograd.grad((expected * weights.cpu().double()).sum(), (q64, k64, v64))
    for g, w in zip(got, want):
        assert (g.double().cpu() - w).abs().max().item() < 5e-2 * max(1.0, w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_flex_64_token_tiles_forward_and_gradients_bf16(head_dim):
    """BigBird on 64-token blocks runs the flex kernel on 64-token tiles without gradients
    and on 128-token ones with: exact both ways, at a length that is not a multiple of the
    tile."""
    pattern, heads, length = sd.blocks(64).local(1).global_(2).random(3, 0), 2, 1000
    module = sd.compile(pattern)
    plan = module.explain(length, heads=heads, head_dim=head_dim, device="cuda", dtype=torch.bfloat16)
    assert (plan.kind, plan.q_block) == ("flex", 64)
    q, k, v = _inputs(1, heads, heads, length, length, head_dim, dtype=torch.bfloat16, device="cuda",
                      requires_grad=True)
    with torch.no_grad():
        forward_only = module(q, k, v)
    out = module(q, k, v)
    assert (forward_only - out).abs().max().item() < 3e-2
    _check_bf16_against_reference(pattern, out, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [sd.window(100), sd.causal() & sd.window(200, 0), sd.blocks(128).local(2),
                                     sd.blocks(256).local(1).causal()])
@pytest.mark.parametrize("length", [1000, 1024])
def test_gpu_band_kernel_options_forward_and_gradients_bf16(pattern, length, monkeypatch):
    """Diagonal bands at head dim 128 run the flex kernel with the band options (on an
    H100), windows of whole blocks on whole tiles with the aligned options: exact, with
    gradients, at a length that is a multiple of the tile and one that is not."""
    from sparsedsl.lang.queries import block_band
    from sparsedsl.plans import flex
    options, chosen = flex.flex_kernel_options, []
    monkeypatch.setattr(flex, "flex_kernel_options", lambda *args: chosen.append(options(*args)) or chosen[-1])
    heads = 2
    q, k, v = _inputs(1, heads, heads, length, length, 128, dtype=torch.bfloat16, device="cuda",
                      requires_grad=True)
    module = sd.compile(pattern)
    assert module.explain(length, heads=heads, head_dim=128, device="cuda").kind == "flex"
    out = module(q, k, v)
    if torch.cuda.get_device_capability() == (9, 0):
        aligned = length % 128 == 0 and block_band(pattern) is not None
        assert chosen == [flex.ALIGNED_BAND_OPTIONS if aligned else flex.BAND_FORWARD_OPTIONS]
    _check_bf16_against_reference(pattern, out, q, k, v)


@pytest.mark.gpu
def test_gpu_rows_without_keys_bf16():
    pattern = (sd.window(3) & ~sd.prefix(10)) | (sd.causal() - sd.window(50))
    q, k, v = _inputs(1, 2, 2, 300, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = sd.compile(pattern, block_size=128)(q, k, v)
    empty = ~sd.dense(pattern, 300).any(-1)[0].cuda()
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    out.float().square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [
    sd.full().score(sd.softcap(0.5)), sd.full().score(sd.softcap(2.0)),
    sd.window(30).score(sd.softcap(1.5), sd.alibi()), sd.full().score(sd.bias("bias")),
    (sd.window(50) | sd.global_tokens(3)).score(sd.bias("bias")),
])
@pytest.mark.parametrize("length", [1, 2, 130, 300])
def test_gpu_score_mods_across_lengths(pattern, length):
    """Several caps and lengths in one process: recompiles must stay correct."""
    heads = 2
    buffers = {"bias": torch.randn(heads, length, length, device="cuda")} if pattern.buffer_names() else {}
    q, k, v = _inputs(1, heads, heads, length, length, 64, dtype=torch.bfloat16, device="cuda")
    out = sd.compile(pattern)(q, k, v, **buffers)
    expected, _ = reference_attention(pattern, q.cpu(), k.cpu(), v.cpu(),
                                      **{n: t.cpu() for n, t in buffers.items()})
    assert (out.double().cpu() - expected).abs().max().item() < 3e-2


def test_lowerings_of_bound_tensors_are_shared_while_the_tensor_is_unchanged():
    """One ids tensor used by several calls (the layers of a model) is lowered once; an
    in-place change of it, or another tensor, gets its own lowering and exact results."""
    module = sd.compile(sd.documents("ids") & sd.causal(), block_size=16)
    ids = torch.tensor([0] * 30 + [1] * 34)
    first = module.lowering(64, ids=ids)
    assert module.lowering(64, ids=ids) is first
    assert module.lowering(64, ids=ids[None][0]) is first  # another view of the same memory
    assert module.lowering(64, ids=ids.clone()) is not first
    q, k, v = _inputs(1, 2, 2, 64, 64, 8, dtype=torch.float64)
    before = module(q, k, v, ids=ids)
    ids[40:] = 2  # in place: a third document
    assert module.lowering(64, ids=ids) is not first
    expected, _ = reference_attention(sd.documents("ids") & sd.causal(), q, k, v, ids=ids)
    after = module(q, k, v, ids=ids)
    assert torch.allclose(after, expected, atol=1e-12) and not torch.allclose(after, before)
    scored = sd.compile((sd.documents("ids") & sd.causal()).score(sd.bias("b")), block_size=16)
    bias = torch.randn(64, 64)
    assert scored.lowering(64, ids=ids, b=bias) is not scored.lowering(64, ids=ids, b=bias)
