"""The planner: explain() names the plan forward() runs, every candidate is listed with its
cost or reasons, a requested plan that cannot run says why, cached calls plan nothing, and
every plan that claims gradients has exact second-order gradients."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.compiler import planner as planner_module
from sparsedsl.plans.registry import KERNELS, PLANS
from strategies import pattern_cases

PLAN_NAMES = [plan.name for plan in PLANS]


def _plans_run(fn) -> list[str]:
    """Names of the plans whose runners ran inside ``fn()`` (their profiler labels)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [event.name.split("::", 1)[1] for event in prof.events()
            if event.name.startswith("sparsedsl::") and event.name.split("::", 1)[1] in PLAN_NAMES]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=pattern_cases(max_depth=2, allow_scores=True, max_len=96), dtype=st.sampled_from(
    (torch.float32, torch.float64)), grad=st.booleans(), lse=st.booleans(),
    offset=st.sampled_from(("zero", "end", "some")), head_dim=st.sampled_from((8, 16)),
    block=st.sampled_from((16, 32)))
def test_explain_names_the_plan_forward_runs(case, dtype, grad, lse, offset, head_dim, block):
    pattern, q_len, kv_len, heads, buffers = case
    if (offset == "end" and kv_len < q_len) or buffers:  # bound tensors are drawn for rows from 0
        offset = "zero"
    q_offset = {"zero": 0, "end": "end", "some": 3}[offset]
    module = sd.compile(pattern, block_size=block)
    plan = module.explain(q_len, kv_len, heads=heads, head_dim=head_dim, batch=2, device="cpu", dtype=dtype,
                          requires_grad=grad, return_lse=lse, q_offset=q_offset, **buffers)
    assert set(plan.candidates) == set(PLAN_NAMES)
    assert plan.candidates[plan.kind].reasons in ((), (planner_module.UNCOSTED,))
    for name, candidate in plan.candidates.items():
        assert (candidate.cost is None) == bool(candidate.reasons), name
    gen = torch.Generator().manual_seed(q_len * 7 + kv_len)
    # batch 2: bound document ids are drawn with a batch of 1 or 2
    q = torch.randn(2, heads, q_len, head_dim, generator=gen, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(2, heads, kv_len, head_dim, generator=gen, dtype=dtype, requires_grad=grad)
            for _ in range(2))
    ran = _plans_run(lambda: module(q, k, v, return_lse=lse, q_offset=q_offset, **buffers))
    assert ran and ran[0] == plan.kind, (str(plan), ran)


def test_explain_on_cuda_names_flex_or_a_dense_plan_without_a_gpu():
    """Calls on CUDA are explained on a machine without one (the plan depends on the
    device's kind), with FlexAttention costed there."""
    plan = sd.compile(sd.window(64) | sd.global_tokens(2)).explain(1024, heads=4, head_dim=64, device="cuda")
    assert plan.kind == "flex" and plan.candidates["flex"].cost is not None
    assert plan.candidates["gather"].cost is None  # not measured against flex on CUDA
    dilated = sd.compile(sd.segments([256, 512], [1, 2])).explain(1024, heads=4, head_dim=64, device="cuda")
    assert dilated.kind == "lattice" and dilated.candidates["lattice"].cost < dilated.candidates["flex"].cost


@pytest.mark.parametrize("kernel,pattern,call,reason", [
    ("sdpa", sd.window(3), {}, "not full() or causal()"),
    ("sdpa", sd.causal(), {"return_lse": True}, "log-sum-exp"),
    ("lattice", sd.window(3), {}, "no token dilation"),
    ("band", sd.window(3), {}, "not a band of whole blocks"),
    ("decode", sd.window(3), {}, "not a decoding step"),
    ("flex", sd.window(3), {"requires_grad": True}, "no backward pass on the CPU"),
    ("flex", sd.window(3), {"dtype": torch.float64}, "float64"),
    ("flex", sd.window(3), {"head_dim": 8}, "head_dim=8"),
])
def test_a_requested_plan_that_cannot_run_raises_its_reasons(kernel, pattern, call, reason):
    module = sd.compile(pattern, block_size=16, kernel=kernel)
    sizes = {"head_dim": 16, "device": "cpu", **call}
    with pytest.raises(sd.PlanNotSupported, match=f"kernel='{kernel}' cannot run .*{re.escape(reason)}"):
        module.explain(64, **sizes)
    plan = sd.compile(pattern, block_size=16).explain(64, **sizes)
    assert any(reason in r for r in plan.candidates[kernel].reasons)


def test_kernel_names_are_the_plans():
    assert set(KERNELS) == {"auto", *PLAN_NAMES}
    with pytest.raises(sd.PatternArgumentError, match="argument 'kernel'"):
        sd.compile(sd.causal(), kernel="fast")


def test_str_lists_every_candidate_and_marks_the_chosen_one():
    text = str(sd.compile(sd.window(8), block_size=16).explain(100, heads=2, head_dim=16, device="cpu"))
    lines = text.splitlines()[-len(PLAN_NAMES):]
    assert [line[3:].split()[0] for line in lines] == PLAN_NAMES
    assert sum(line.startswith(" * ") for line in lines) == 1


def test_a_cached_call_plans_and_builds_nothing(monkeypatch):
    module = sd.compile(sd.window(4) | sd.global_tokens(1), block_size=16)
    q = torch.randn(1, 2, 40, 16)
    module(q, q, q)
    built = []
    monkeypatch.setattr(planner_module.Planner, "_build", lambda *a: built.append(a))
    monkeypatch.setattr(planner_module.Planner, "candidates", lambda *a: built.append(a))
    for _ in range(3):
        module(q, q, q)
    assert built == []


def test_lattice_parts_go_through_the_planner():
    """The parts of a block lattice that are not chunks are sub-problems the planner plans
    (a tile plan on the CPU), and the module computes them exactly."""
    pattern = sd.blocks(32).local(1).within(sd.dilated(16, 2))
    module = sd.compile(pattern, block_size=16, kernel="lattice")
    q, k, v = (torch.randn(1, 2, 128, 8, dtype=torch.float64) for _ in range(3))
    ran = _plans_run(lambda: module(q, k, v))
    assert ran[0] == "lattice" and ran[1:] and set(ran[1:]) <= {"tile_sdpa", "gather"}
    expected, _ = reference_attention(pattern, q, k, v)
    assert (module(q, k, v) - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("pattern,kernel,length", [
    (sd.causal(), "auto", 13),                             # sdpa
    (sd.segments([4, 8], [1, 2]), "auto", 16),             # lattice, chunk parts
    (sd.blocks(8).local(1).within(sd.dilated(4, 2)), "lattice", 24),  # lattice with sub-problems
    (sd.window(3) | sd.global_tokens(1), "auto", 13),      # gather
    (sd.blocks(16).local(1), "band", 32),                  # band
])
def test_second_order_gradients_are_exact_on_every_plan_with_gradients(pattern, kernel, length):
    module = sd.compile(pattern, block_size=16, kernel=kernel)
    heads = 2
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, heads, length, 2, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    assert gradcheck(lambda q, k, v: module(q, k, v), (q, k, v), fast_mode=True)
    assert gradgradcheck(lambda q, k, v: module(q, k, v), (q, k, v), fast_mode=True)


def test_a_gradient_penalty_equals_the_gather_plans():
    """A loss on the gradient itself (create_graph) through the lattice plan equals the
    same loss through the gather plan, whose operations are all differentiable."""
    pattern = sd.segments([4, 8], [1, 2])
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 2, 32, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    grads = {}
    for kernel in ("lattice", "gather"):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = sd.compile(pattern, block_size=16, kernel=kernel)(q, k, v)
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        dq.square().sum().backward()
        grads[kernel] = k.grad
    assert (grads["lattice"] - grads["gather"]).abs().max().item() < 1e-10


def test_an_offset_past_32_bit_indices_is_named_q_offset():
    """The last query position must fit 32-bit kernel indices: the error names q_offset
    (not the derived length), and a step just inside the limit still runs a plan."""
    module = sd.compile(sd.causal() & sd.window(4))
    assert module.explain(16, q_offset=2**31 - 20, head_dim=16, device="cpu").kind != "decode"
    with pytest.raises(sd.PatternArgumentError, match="argument 'q_offset' is 2147483638"):
        module.explain(16, q_offset=2**31 - 10, head_dim=16, device="cpu")


def test_flex_on_the_cpu_gives_zero_rows_and_refuses_float64():
    """kernel="flex" on the CPU (Inductor's C++ kernel): a row whose score function masks
    every key outputs 0, as on every plan; float64 is refused with the plan's reason."""
    def hide_first_rows(score, b, h, q, k):
        return torch.where(q < 5, torch.full_like(score, float("-inf")), score)

    pattern = (sd.window(40) | sd.global_tokens(2)).score(hide_first_rows)
    module = sd.compile(pattern, block_size=16, kernel="flex")
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = module(q, k, v)
    expected, _ = reference_attention(pattern, q, k, v)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (out.double() - expected).abs().max().item() < 1e-5
    with pytest.raises(sd.PlanNotSupported, match="float64"):
        module(*(t.double() for t in (q, k, v)))


@pytest.mark.parametrize("pattern,kernel", [(sd.segments([4, 8], [1, 2]), "lattice"),
                                            (sd.longnet([4, 8], [1, 2]), "branches"),
                                            (sd.blocks(16).local(1), "band"),
                                            (sd.blocks(16).local(1), "gather")])
def test_a_loss_through_the_log_sum_exp_gets_its_gradient_on_every_plan(pattern, kernel):
    """Plans whose log-sum-exp is computed outside autograd give it its gradient by
    recomputing the call through the gather plan: a loss through the output and the
    log-sum-exp gets the reference's gradients, second order included."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    out, lse = sd.compile(pattern, block_size=16, kernel=kernel)(q, k, v, return_lse=True)
    expected, _ = reference_attention(pattern, q, k, v)
    multiplicity = sd.dense(pattern, 32, heads=2).double()
    # masked pairs at weight 1e-200: no -inf, so rows that see no key give no NaN gradient
    direct = torch.logsumexp((q @ k.transpose(-1, -2)) * 8 ** -0.5 + multiplicity.clamp(min=1e-200).log(), -1)
    finite = multiplicity.sum(-1).expand_as(direct) > 0
    assert (lse[finite] - direct[finite]).abs().max().item() < 1e-9
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)

    def loss(o, lse_):
        return (o * weights).sum() + (lse_[finite] ** 2).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v), create_graph=True)
    want = torch.autograd.grad(loss(expected, direct), (q, k, v), create_graph=True)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 1e-9
    second = torch.autograd.grad(sum((g * g).sum() for g in got), (q, k, v))
    assert all(torch.isfinite(g).all() for g in second)
    if bool(finite.all()):  # the reference's second order is NaN on rows without keys
        second_want = torch.autograd.grad(sum((w * w).sum() for w in want), (q, k, v))
        for g, w in zip(second, second_want):
            assert (g - w).abs().max().item() < 1e-8
