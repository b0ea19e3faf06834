"""The branches plan (multisets of dense lattice terms merged by log-sum-exp) is exact:
outputs, log-sum-exps and gradients against the dense multiset reference, on
hypothesis-generated LongNet configurations and sums of lattice patterns."""

from __future__ import annotations

import functools
from functools import partial
import operator
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import sparsedsl as sd
from reference import reference_attention
from test_planner import _plans_run

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def longnet_cases(draw):
    """``(pattern, length, heads, kv_heads, batch)``: segments and rates at random (rates
    that do not divide the segments or the heads), any length."""
    count = draw(st.integers(1, 3))
    segments = draw(st.lists(st.integers(1, 40), min_size=count, max_size=count))
    rates = [draw(st.integers(1, min(segment, 6))) for segment in segments]
    heads = draw(st.integers(1, 7))
    return (sd.longnet(segments, rates), draw(st.integers(1, 130)), heads,
            draw(st.sampled_from(_divisors(heads))), draw(st.integers(1, 2)))


@st.composite
def lattice_terms(draw):
    kind = draw(st.sampled_from(("dilated", "chunks", "segments", "dilated_heads", "longnet")))
    segment = draw(st.integers(1, 32))
    rate = draw(st.integers(1, min(segment, 5)))
    if kind == "dilated":
        return sd.dilated(segment, rate, draw(st.integers(0, rate - 1)))
    if kind == "chunks":
        return sd.chunks(segment)
    if kind == "dilated_heads":
        return sd.dilated_heads(segment, rate)
    if kind == "longnet":
        return sd.longnet([segment, 2 * segment], [1, rate])
    return sd.segments([segment, segment + 3], [1, rate])


@st.composite
def sum_cases(draw):
    """Sums of two or three lattice patterns (some leaving rows without keys), sometimes a
    head group of a sum beside a set pattern."""
    pattern = functools.reduce(operator.add, draw(st.lists(lattice_terms(), min_size=2, max_size=3)))
    if draw(st.booleans()):
        pattern = sd.heads(pattern, sd.chunks(draw(st.integers(1, 16))))
    heads = draw(st.integers(2, 6))
    return (pattern, draw(st.integers(1, 100)), heads, draw(st.sampled_from(_divisors(heads))),
            draw(st.integers(1, 2)))


def _inputs(length, heads, kv_heads, batch, dtype, seed, device="cpu", dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return tuple(t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    assert torch.isfinite(actual).all()
    error = (actual.double().cpu() - expected).abs().max().item() if actual.numel() else 0.0
    assert error < tolerance, error


def _check_exact(pattern, length, heads, kv_heads, batch, dtype, seed=0):
    """The module runs the branches plan, and its output, log-sum-exp and gradients equal
    the dense reference's; it computes each pair once per term that allows it."""
    module = sd.compile(pattern, block_size=16)
    plan = module.explain(length, heads=heads, kv_heads=kv_heads, head_dim=8, batch=batch, device="cpu",
                          dtype=dtype, requires_grad=True, return_lse=True)
    assert plan.kind == "branches", str(plan)
    assert plan.computed_pairs == sd.count(pattern, length, heads=heads).pairs_with_multiplicity
    q, k, v = _inputs(length, heads, kv_heads, batch, dtype, seed=length * 31 + heads)
    out, lse = module(q, k, v, return_lse=True)
    expected, expected_lse = reference_attention(pattern, q, k, v)
    tolerance = TOLERANCE[dtype]
    _close(out, expected.detach(), tolerance)
    assert lse.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.equal(lse.isneginf(), expected_lse.isneginf())
    covered = torch.isfinite(expected_lse)
    _close(lse[covered], expected_lse[covered], tolerance)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad.double())
    for actual, wanted in zip(grads, expected_grads):
        _close(actual, wanted.double(), 5 * tolerance)


@settings(max_examples=40, deadline=None)
@given(case=longnet_cases(), dtype=st.sampled_from((torch.float32, torch.float64)))
def test_longnet_is_exact(case, dtype):
    _check_exact(*case, dtype)


@settings(max_examples=40, deadline=None)
@given(case=sum_cases(), dtype=st.sampled_from((torch.float32, torch.float64)))
def test_sums_of_lattice_patterns_are_exact(case, dtype):
    _check_exact(*case, dtype)


@pytest.mark.parametrize("pattern,length,heads,kv_heads,batch", [
    (sd.longnet([8, 16, 32], [1, 2, 4]), 45, 6, 2, 2),    # GQA whose groups the branches split
    (sd.longnet([12, 20], [1, 3]), 50, 4, 1, 3),          # multi-query, batch 3
    (sd.chunks(8) + sd.dilated(16, 2, 1), 37, 3, 3, 2),
])
def test_grouped_query_attention_and_batches(pattern, length, heads, kv_heads, batch):
    for dtype in (torch.float32, torch.float64):
        _check_exact(pattern, length, heads, kv_heads, batch, dtype)


def test_rows_no_term_covers_output_zero():
    """Odd positions are in no term: output 0, log-sum-exp -inf, gradients 0 there, never
    NaN; the even ones see every key twice or once as the reference does."""
    pattern = sd.dilated(8, 2, 0) + sd.dilated(8, 4, 0)
    q, k, v = _inputs(30, 2, 2, 1, torch.float64, seed=1)
    out, lse = sd.compile(pattern)(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, 1::2], torch.zeros_like(out[:, :, 1::2]))
    assert lse[:, :, 1::2].isneginf().all() and torch.isfinite(lse[:, :, ::2]).all()
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1::2], torch.zeros_like(q.grad[:, :, 1::2]))
    _check_exact(pattern, 30, 2, 2, 1, torch.float64)


def test_forward_runs_the_branches_plan():
    pattern = sd.longnet([16, 32], [1, 2])
    module = sd.compile(pattern)
    assert module.explain(64, heads=3, head_dim=8, device="cpu").kind == "branches"
    q, k, v = (t.detach() for t in _inputs(64, 3, 3, 1, torch.float32, seed=2))
    assert _plans_run(lambda: module(q, k, v)) == ["branches"]
    expected, _ = reference_attention(pattern, q, k, v)
    _close(module(q, k, v), expected, 2e-4)


def test_second_order_gradients_through_the_planner():
    module = sd.compile(sd.longnet([4, 8], [1, 2]), kernel="branches")
    q, k, v = _inputs(13, 3, 3, 1, torch.float64, seed=3, dim=2)
    assert gradcheck(lambda q, k, v: module(q, k, v), (q, k, v), fast_mode=True)
    assert gradgradcheck(lambda q, k, v: module(q, k, v), (q, k, v), fast_mode=True)


def test_computed_pairs_are_the_pairs_with_multiplicity():
    """The plan computes each pair once per branch that holds it (1.0x the count with
    multiplicity), LongNet's paper configuration (scaled down 16 times, fewer heads than a
    rate) included."""
    for pattern, length, heads in [(sd.longnet([128, 256, 512, 1024, 2048], [1, 2, 4, 6, 12]), 2048, 6),
                                   (sd.longnet([100, 300], [3, 7]), 1000, 5)]:
        plan = sd.compile(pattern).explain(length, heads=heads, head_dim=64, device="cpu")
        counted = sd.count(pattern, length, heads=heads)
        assert plan.kind == "branches"
        assert plan.computed_pairs == counted.pairs_with_multiplicity < 1.3 * counted.pairs_with_multiplicity


@pytest.mark.parametrize("pattern,call,reason", [
    (sd.dilated(8, 2), {}, "not a multiset pattern"),
    (sd.longnet([8, 16], [1, 2]) & sd.causal(), {}, "term 1 (dilated_heads(8, 1) & causal())"),
    (sd.chunks(8) + sd.window(2), {}, "term 2 (window(2)): window(2) is not dilated(...) or chunks(...)"),
    (sd.longnet([8], [2]).score(sd.alibi()), {}, "score modifications"),
    (sd.longnet([8], [2]), {"kv_len": 80}, "needs self-attention"),
    (sd.longnet([8], [2]), {"device": "cuda", "dtype": torch.float64}, "float64 on CUDA"),
])
def test_a_call_the_plan_cannot_run_raises_its_reason(pattern, call, reason):
    sizes = {"heads": 2, "head_dim": 8, "device": "cpu", **call}
    with pytest.raises(sd.PlanNotSupported, match=f"kernel='branches' cannot run .*{re.escape(reason)}"):
        sd.compile(pattern, kernel="branches").explain(64, **sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("length,heads,kv_heads,batch", [(1500, 6, 2, 2), (2048, 4, 4, 1)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3), (torch.float32, 1e-4)])
def test_gpu_longnet(dtype, tolerance, length, heads, kv_heads, batch):
    """On CUDA (cuDNN's kernels in half precision from compute capability 9.0, the flash
    kernel's before, the memory-efficient one in float32, each with its backward given the
    merged statistics): outputs, log-sum-exps and gradients against the reference. GQA and
    batch 2 at a length no segment divides run without a program; 4 heads at batch 1 run
    the program, the rate-1 term's kernel output as its term's (cuDNN) and the rate-4
    term's one-head groups joined."""
    pattern = sd.longnet([256, 512, 1024], [1, 2, 4])
    module = sd.compile(pattern, kernel="branches")  # not costed on CUDA: requested
    assert module.explain(length, heads=heads, kv_heads=kv_heads, head_dim=64, device="cuda", dtype=dtype,
                          requires_grad=True).kind == "branches"
    q, k, v = _inputs(length, heads, kv_heads, batch, dtype, seed=4, device="cuda", dim=64)
    out = module(q, k, v)
    with torch.no_grad():
        _, lse = module(q, k, v, return_lse=True)
    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected, expected_lse = reference_attention(pattern, *cpu)
    _close(out, expected.detach(), tolerance)
    assert lse.dtype == torch.float32
    _close(lse, expected_lse, tolerance)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(device="cuda", dtype=dtype))
    for actual, wanted in zip(grads, torch.autograd.grad(expected, cpu, grad)):
        _close(actual, wanted, 4 * tolerance * max(1.0, wanted.abs().max().item()))


def _check_merge(device: str, dtype: torch.dtype) -> None:
    """``merge`` (a Triton kernel on CUDA) against the merge in float64, on rows no term
    covers (output 0, log-sum-exp -inf), rows one term covers, and two lengths and head
    dims, neither a multiple of the kernel's tile; a term's rows it does not cover hold
    NaN, never read."""
    from sparsedsl.plans.terms_merge import merge
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for length, dim in ((300, 64), (1027, 40)):
        gen = torch.Generator().manual_seed(length)
        outs = [torch.randn(2, 3, length, dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        lses = (4 * torch.randn(3, 2, 3, length, generator=gen)).to(device=device, dtype=lse_dtype)
        lses[:, :, :, :7] = float("-inf")  # no term
        lses[1:, :, :, 7:20] = float("-inf")  # the first term alone
        for term_out, lse in zip(outs, lses):  # rows a term does not cover are never read
            term_out.masked_fill_((lse == float("-inf"))[..., None], float("nan"))
        out, total = merge(outs, lses)
        expected_total = torch.logsumexp(lses.double(), 0)
        weights = torch.exp(lses.double() - expected_total.nan_to_num(neginf=0.0))[..., None]
        expected = sum(torch.where(w > 0, w * o.double(), 0.0) for w, o in zip(weights, outs))
        assert out.dtype == dtype and total.dtype == lse_dtype
        torch.testing.assert_close(total.double(), expected_total, rtol=1e-5, atol=1e-5)
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
        torch.testing.assert_close(out.double(), expected.to(dtype).double(), rtol=tolerance, atol=tolerance)
        assert not out[:, :, :7].any() and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_merge_reads_no_row_a_term_does_not_cover(dtype):
    _check_merge("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_gpu_merge_kernel(dtype):
    _check_merge("cuda", dtype)


def test_program_joins_the_one_head_groups_of_a_rate():
    """LongNet's rate classes of one head each (rate = heads) run as one kernel call per
    chunk length (dimension 1 stepping over head and offset), and stay exact, forward and
    backward, at a length that is not a multiple of the segments."""
    from sparsedsl.plans.branches import BranchesPlan
    from sparsedsl.plans.branches_program import BranchesProgram
    pattern, length, heads = sd.longnet([64, 96, 200], [1, 2, 4]), 500, 4
    call = sd.compile(pattern).explain(length, heads=heads, head_dim=8, device="cpu")
    assert call.kind == "branches"
    q, k, v = _inputs(length, heads, heads, 1, torch.float64, seed=3)
    terms = BranchesPlan().prepare(pattern, _call(length, heads))
    program = BranchesProgram.build(q, k, v, terms)
    rate_four = [run for run in program.runs if run[0] == 2]
    # 200 positions per segment in 4 offset classes of 50, two whole segments and one of
    # 100 (25 a class): one call per chunk length, each over the 4 one-head groups.
    assert sorted(run[1][0][1:3] for run in rate_four) == [(4, 25), (4, 50)]
    module = sd.compile(pattern, kernel="branches")
    out = module(q, k, v)
    expected, _ = reference_attention(pattern, q, k, v)
    _close(out, expected.detach(), 1e-10)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for actual, wanted in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        _close(actual, wanted, 1e-10)


def test_a_run_laid_out_as_its_term_becomes_the_terms_output():
    """A term of one run writing every element (rate 1), whose kernel output has the
    stride order of its queries (as cuDNN allocates it), is the term's output uncopied;
    an output laid out otherwise (the CPU kernel's) is copied. Both exact."""
    from sparsedsl.plans.branches import BranchesPlan
    from sparsedsl.plans.branches_program import BranchesProgram
    from sparsedsl.plans.fused_attention import attend
    pattern, length, heads = sd.longnet([64, 128], [1, 2]), 256, 2
    q, k, v = (t.detach() for t in _inputs(length, heads, heads, 1, torch.float64, seed=5))
    program = BranchesProgram.build(q, k, v, BranchesPlan().prepare(pattern, _call(length, heads)))
    assert program.whole == (True, False)
    returned = []

    def attend_in_query_order(q_run, k_run, v_run, scale):
        out, lse = attend(q_run, k_run, v_run, scale)
        laid = torch.empty_strided(out.shape, q_run.stride(), dtype=out.dtype)
        returned.append(laid.copy_(out))
        return laid, lse

    expected, _ = reference_attention(pattern, q, k, v)
    for kernel, reused in ((attend_in_query_order, True), (attend, False)):
        returned.clear()
        outs, lses = program(q, k, v, 8 ** -0.5, kernel, torch.float64)
        shared = any(outs[0].untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in returned)
        assert shared == reused
        from sparsedsl.plans.terms_merge import merge
        _close(merge(outs, lses)[0], expected, 1e-10)


def _call(length: int, heads: int):
    from sparsedsl.plans.base import Call
    return Call(length, length, 0, heads, heads, 8, 1, torch.float64, torch.device("cpu"), 8 ** -0.5, 16, 16)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_jobs_in_turns_write_after_the_previous_turn(device):
    """``in_turns``: every job runs once, and what a job does after ``before_writing`` sees
    every write of the previous turn, though the turns' jobs overlap on CUDA side streams
    (their kernels before that point run unordered): job ``slot`` of turn ``t`` writes row
    ``t + 1`` from all of row ``t``, which turn ``t - 1`` wrote."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from sparsedsl.plans.cuda_streams import in_turns
    turns, slots, width = 3, 4, 1 << 16
    rows = torch.zeros(turns + 1, slots, width, device=device)
    rows[0] = 1.0
    big = torch.randn(1024, 1024, device=device)

    def job(turn: int, slot: int, before_writing) -> None:
        busy = (big @ big).sum() * 0  # kernel work before the write, free to overlap
        before_writing()
        rows[turn + 1, slot] = (turn + 1) * rows[turn].sum(0) + slot + busy

    in_turns(torch.device(device), [[partial(job, turn, slot) for slot in range(slots)] for turn in range(turns)])
    expected = torch.zeros(turns + 1, slots, width, dtype=torch.float64)
    expected[0] = 1.0
    for turn in range(turns):
        for slot in range(slots):
            expected[turn + 1, slot] = (turn + 1) * expected[turn].sum(0) + slot
    assert torch.allclose(rows.double().cpu(), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_longnet_runs_the_branches_plan_on_cuda_by_default(dtype):
    """On CUDA the planner picks the branches plan for LongNet (FlexAttention would compute
    several times its pairs on whole tiles), computing at most 1.3x the pairs its branches
    hold; float64, which the fused kernels do not take, goes elsewhere."""
    pattern, length, heads = sd.longnet([2048, 4096, 8192], [1, 2, 4]), 16384, 12
    plan = sd.compile(pattern).explain(length, heads=heads, head_dim=128, device="cuda", dtype=dtype,
                                       requires_grad=True)
    assert plan.kind == "branches", str(plan)
    assert plan.computed_pairs <= 1.3 * sd.count(pattern, length, heads=heads).pairs_with_multiplicity
    assert sd.compile(pattern).explain(length, heads=heads, head_dim=128, device="cuda",
                                       dtype=torch.float64).kind != "branches"
