"""The lattice plan (token dilation as dense attention on gathered lattices) is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from reference import reference_attention
from sparsedsl.passes.lattice import lattice_decomposition, merged, writes_every_row, zeroed_heads
from sparsedsl.plans.lattice_program import LatticeProgram
from sparsedsl.plans.lattice_views import chunk_runs, fold_positions, folded_view, take, view


@st.composite
def dilated_parts(draw):
    segment = draw(st.integers(1, 48))
    rate = draw(st.integers(1, segment))
    return sd.dilated(segment, rate, draw(st.integers(0, rate - 1)))


@st.composite
def lattice_cases(draw):
    """Patterns with a lattice decomposition, a length (block multiples where needed) and
    a head count."""
    kind = draw(st.sampled_from(("dilated", "segments", "heads", "blocks")))
    if kind == "dilated":
        pattern, heads = draw(dilated_parts()), draw(st.integers(1, 3))
        length = draw(st.integers(1, 260))
    elif kind == "segments":
        count = draw(st.integers(1, 4))
        lengths = draw(st.lists(st.integers(2, 64), min_size=count, max_size=count))
        rates = [draw(st.integers(1, length)) for length in lengths]
        pattern = sd.segments(lengths, rates)
        heads = draw(st.integers(count, count + 3))
        length = draw(st.integers(1, 260))
    elif kind == "heads":
        parts = draw(st.lists(st.one_of(dilated_parts(), st.just(sd.window(7)), st.just(sd.causal()),
                                        st.builds(sd.chunks, st.integers(1, 40))), min_size=2, max_size=3))
        if not any(isinstance(p, type(sd.dilated(2, 2))) for p in parts):
            parts[0] = draw(dilated_parts())
        pattern, heads = sd.heads(*parts), draw(st.integers(len(parts), len(parts) + 2))
        length = draw(st.integers(1, 200))
    else:
        segment = draw(st.sampled_from((4, 8, 16)))
        size = segment * draw(st.integers(1, 4))
        builder = sd.blocks(size)
        for rule in draw(st.lists(st.sampled_from(("local", "dilated", "global", "random")), max_size=3)):
            if rule == "local":
                builder = builder.local(draw(st.integers(0, 3)))
            elif rule == "dilated":
                builder = builder.dilated([draw(st.integers(1, 4))], window=draw(st.sampled_from((None, 5))))
            elif rule == "global":
                builder = builder.global_(1)
            else:
                builder = builder.random(draw(st.integers(1, 2)), draw(st.integers(0, 9)))
        if draw(st.booleans()):
            builder = builder.causal()
        rate = draw(st.integers(1, segment))
        within = sd.dilated(segment, rate, draw(st.integers(0, rate - 1)))
        heads = 1
        if draw(st.booleans()):
            within = sd.segments([segment, segment], [1, rate])
            heads = draw(st.integers(2, 4))
        pattern = builder.within(within)
        length = size * draw(st.integers(1, 6))
    return pattern, length, heads


@settings(max_examples=150)
@given(case=lattice_cases(), seed=st.integers(0, 2**16), gqa=st.booleans(), batch=st.integers(1, 2),
       grad=st.booleans(), with_lse=st.booleans())
def test_lattice_plan_is_exact(case, seed, gqa, batch, grad, with_lse):
    """Without gradients (strided views written in place), with gradients and only chunk
    parts (gradients written straight into the positions read), and otherwise (autograd
    through copies)."""
    pattern, length, heads = case
    module = sd.compile(pattern, block_size=16, kernel="lattice")
    assert module.explain(length, heads=heads, head_dim=8, device="cpu").kind == "lattice"
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 1 if gqa else heads
    q = torch.randn(batch, heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    k = torch.randn(batch, kv_heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    v = torch.randn(batch, kv_heads, length, 8, generator=gen, dtype=torch.float64, requires_grad=grad)
    out, lse = module(q, k, v, return_lse=True) if with_lse else (module(q, k, v), None)
    expected, expected_lse = reference_attention(pattern, q, k, v)
    assert (out - expected).abs().max().item() < 1e-9
    finite = torch.isfinite(expected_lse)
    if with_lse:
        assert torch.equal(torch.isfinite(lse), finite)
    if with_lse and finite.any():
        assert (lse[finite] - expected_lse[finite]).abs().max().item() < 1e-12
    if not grad:
        return
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() < 1e-9


@pytest.mark.parametrize("pattern,length,heads", [
    # LongNet's paper configuration, scaled down by 256: segments 2048..32768 with rates 1, 2, 4, 6, 12.
    (sd.segments([8, 16, 32, 64, 128], [1, 2, 4, 6, 12]), 256, 5),
    (sd.segments([12, 20], [5, 6]), 100, 2),  # segments not divisible by their rates
    (sd.blocks(32).local(1).within(sd.segments([16, 16], [1, 2])), 320, 4),  # the seed's rule
])
def test_lattice_configurations(pattern, length, heads):
    module = sd.compile(pattern, block_size=16, kernel="lattice")
    plan = module.explain(length, heads=heads, head_dim=16, device="cpu")
    assert plan.kind == "lattice"
    assert plan.computed_flops <= 1.3 * plan.useful_flops
    q, k, v = (torch.randn(1, heads, length, 16) for _ in range(3))
    expected, _ = reference_attention(pattern, q, k, v)
    assert (module(q, k, v).double() - expected).abs().max().item() < 1e-5


def test_auto_picks_the_lattice_by_its_parts_costs():
    longnet = sd.compile(sd.segments([512, 1024, 2048], [1, 2, 4]))
    plan = longnet.explain(4096, heads=3, device="cpu")
    assert plan.kind == "lattice" and plan.computed_flops <= 1.3 * plan.useful_flops
    # The seed's rule on the CPU: the lattice's block sub-problems (each costed by the plan
    # the planner gives it) cost less than one tile kernel on the dilated heads' whole tiles.
    seed_rule = sd.compile(sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2])))
    cpu_seed = seed_rule.explain(4096, heads=2, device="cpu")
    assert cpu_seed.kind == "lattice" and cpu_seed.computed_flops <= 1.1 * cpu_seed.useful_flops
    assert cpu_seed.candidates["lattice"].cost < cpu_seed.candidates["tile_sdpa"].cost
    # The CUDA plans, asked for on any machine (the work is done on the CPU without CUDA).
    assert longnet.explain(4096, heads=3, device="cuda").kind == "lattice"
    cuda_seed = seed_rule.explain(4096, heads=2, device="cuda")
    assert cuda_seed.kind == "flex" and cuda_seed.q_block == 128


def test_lattice_does_not_apply_where_it_cannot_be_exact():
    """``kernel="lattice"`` where the plan cannot run raises an error that lists why."""
    module = sd.compile(sd.segments([8, 8], [1, 2]), block_size=16, kernel="lattice")
    with pytest.raises(sd.PlanNotSupported, match="kernel='lattice' cannot run .*needs self-attention"):
        module.explain(64, 48, heads=2, device="cpu")  # Q != K
    with pytest.raises(sd.PlanNotSupported, match="needs self-attention"):
        module(*(torch.randn(1, 2, n, 8) for n in (64, 48, 48)))
    for pattern, length, reason in [
            (sd.segments([8, 8], [1, 2]).score(sd.alibi()), 64, "score modifications"),
            (sd.blocks(32).local(1).within(sd.dilated(16, 2)), 100, "no token dilation")]:  # ragged blocks
        with pytest.raises(sd.PlanNotSupported, match=reason):
            sd.compile(pattern, block_size=16, kernel="lattice").explain(length, heads=2, device="cpu")
    with pytest.raises(sd.PlanNotSupported, match="no token dilation"):
        sd.compile(sd.window(3), kernel="lattice").explain(64, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("pattern,length,heads,kv_heads", [
    (sd.segments([256, 512, 1024, 2048], [1, 2, 4, 8]), 4096, 8, 8),
    (sd.segments([512, 768, 1000], [4, 6, 12]), 3000, 6, 2),
    (sd.blocks(256).local(1).within(sd.segments([128, 128], [1, 2])), 4096, 8, 8),
])
def test_gpu_lattice(pattern, length, heads, kv_heads, dtype, tolerance):
    """Outputs and gradients against the float64 reference, GQA and lengths that are not
    multiples of the segments included: lattices of chunks run with gradients through
    one autograd pass over their runs' SDPA graphs, other lattices through copies."""
    module = sd.compile(pattern, kernel="lattice")
    assert module.explain(length, heads=heads, kv_heads=kv_heads, head_dim=64, device="cuda",
                          dtype=dtype).kind == "lattice"
    gen = torch.Generator(device="cuda").manual_seed(length)
    q, k, v = (torch.randn(1, count, length, 64, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for count in (heads, kv_heads, kv_heads))
    out = module(q, k, v)
    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    expected, _ = reference_attention(pattern, *cpu)
    assert (out.double().cpu() - expected).abs().max().item() < tolerance
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for got, wanted in zip(torch.autograd.grad(out, (q, k, v), grad.to("cuda", dtype)),
                           torch.autograd.grad(expected, cpu, grad)):
        assert got.dtype == dtype
        assert (got.double().cpu() - wanted).abs().max().item() < 4 * tolerance * max(1.0, wanted.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_lattice_program_runs_on_side_streams_exactly(dtype, tolerance):
    """Calls without gradients run the program's runs on side streams: exact, the caller's
    stream ordered after them, and repeated calls in a queue stay exact."""
    pattern, length, heads = sd.segments([256, 512, 1024, 2048], [1, 2, 6, 12]), 4096, 8
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, heads, length, 64, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    plan = lattice_decomposition(pattern, length, length, heads, "cuda")
    program = LatticeProgram.build(q, k, v, plan)
    assert program is not None and len(program.runs) > 1
    module = sd.compile(pattern, kernel="lattice")
    expected, _ = reference_attention(pattern, q.cpu(), k.cpu(), v.cpu())
    with torch.no_grad():
        outs = [module(q, k, v) for _ in range(4)]  # queued back to back
        outs.append(program(q, k, v, 64 ** -0.5))
    for out in outs:
        assert (out.double().cpu() - expected).abs().max().item() < tolerance
    # No lattice position at this length: a program without runs, all zeros.
    short = sd.compile(sd.dilated(64, 8, 7), kernel="lattice")
    with torch.no_grad():
        assert torch.equal(short(q[:, :, :5], k[:, :, :5], v[:, :, :5]), torch.zeros_like(q[:, :, :5]))


@pytest.mark.gpu
def test_gpu_lattice_calls_capture_into_a_cuda_graph():
    """A call without gradients, after a warm-up call of its layout, captures into a CUDA
    graph (side streams included, forked from and joined to the capturing stream): replays
    on new inputs copied into the captured ones are exact."""
    pattern, length, heads = sd.segments([256, 512, 1024, 2048], [1, 2, 6, 12]), 4096, 8
    module = sd.compile(pattern, kernel="lattice")
    gen = torch.Generator(device="cuda").manual_seed(5)
    static = [torch.randn(1, heads, length, 64, device="cuda", generator=gen) for _ in range(3)]
    caller, warm_up = torch.cuda.current_stream(), torch.cuda.Stream()
    warm_up.wait_stream(caller)
    with torch.no_grad(), torch.cuda.stream(warm_up):
        module(*static)
    caller.wait_stream(warm_up)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = module(*static)
    for _ in range(2):
        inputs = [torch.randn(1, heads, length, 64, device="cuda", generator=gen) for _ in range(3)]
        for target, source in zip(static, inputs):
            target.copy_(source)
        graph.replay()
        expected, _ = reference_attention(pattern, *(t.cpu() for t in inputs))
        assert (out.double().cpu() - expected).abs().max().item() < 1e-4


@settings(max_examples=200)
@given(segment=st.integers(1, 40), data=st.data(), periods=st.integers(1, 5), extra=st.integers(0, 39))
def test_dilated_lattices_are_views_and_their_group_zeroed_when_rows_are_off_them(segment, data, periods, extra):
    """A dilated segment keeps ``offset, offset + rate, ...`` of every period: folded as one
    strided view per run when the length is whole periods (rates that do not divide the
    segment included) or the positions are one arithmetic run (a rate that divides the
    segment, or a single period: to any length), and its head group counts as writing
    every output row exactly when the lattice holds every position."""
    rate = data.draw(st.integers(1, segment))
    offset = data.draw(st.integers(0, rate - 1))
    length = max(1, segment * periods + (extra % segment) - data.draw(st.sampled_from([0, segment])))
    (group,) = lattice_decomposition(sd.dilated(segment, rate, offset), length, length, 2, "cpu")
    (part,) = group.parts
    kept = [p for p in range(length) if (p % segment) % rate == offset]
    assert part.positions.tolist() == kept
    t = torch.randn(2, 3, length, 4)
    one_run = segment % rate == 0 or length <= segment  # also to a length of no whole periods
    if kept:
        assert (view(part, t) is not None) == one_run
    if kept and (one_run or length % segment == 0):
        assert part.runs is not None
        for start, count, chunk in chunk_runs(len(kept), part.pattern.size):
            folded = folded_view(part, t, start, count, chunk)
            assert folded is not None and folded._base is t
            assert torch.equal(folded, fold_positions(take(part, t), start, count, chunk))
    assert writes_every_row(group.parts, length) == (len(kept) == length)


@pytest.mark.parametrize("rates,zeroed", [
    ([1, 2, 1, 3], [range(2, 4), range(6, 8)]),
    ([1, 2, 4, 1], [range(2, 6)]),  # adjacent groups zeroed as one run of heads
    ([1, 1, 1, 1], []),
    ([3, 2, 2, 4], [range(0, 8)]),
])
def test_zeroed_heads_are_the_groups_with_rows_off_their_lattices(rates, zeroed):
    plan = lattice_decomposition(sd.segments([8, 16, 32, 64], rates), 128, 128, 8, "cpu")
    assert zeroed_heads(plan, 128) == zeroed
    assert merged([range(5, 7), range(0, 2), range(2, 3)]) == [range(0, 3), range(5, 7)]


#: Rates 3 and 6 do not divide the segments 16 and 32.
LAYOUT_PATTERN = sd.segments([8, 16, 32], [1, 3, 6])
LAYOUTS = ("contiguous", "bnhd, batch 1", "storage offset", "grouped kv heads", "bnhd, batch 2",
           "kv head shared across groups")


def _layout_inputs(layout: str, length: int, heads: int, seed: int = 5) -> list[torch.Tensor]:
    """``q``, ``k``, ``v`` (float64) laid out as ``layout`` names: ``[B, H, N, D]``
    contiguous, transposed from ``[B, N, H, D]``, at a storage offset, or with fewer
    key/value heads (3 for 6 query heads: each head group owns its key/value heads; 1:
    head groups share one)."""
    batch = 2 if layout == "bnhd, batch 2" else 1
    kv_heads = {"grouped kv heads": 3, "kv head shared across groups": 1}.get(layout, heads)
    gen = torch.Generator().manual_seed(seed)

    def make(h):
        if layout.startswith("bnhd"):
            return torch.randn(batch, length, h, 8, generator=gen, dtype=torch.float64).transpose(1, 2)
        if layout == "storage offset":
            return torch.randn(batch, h, length + 5, 8, generator=gen, dtype=torch.float64)[:, :, 5:]
        return torch.randn(batch, h, length, 8, generator=gen, dtype=torch.float64)

    return [make(heads), make(kv_heads), make(kv_heads)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("length", [96, 90])  # whole segments; a last segment cut short
def test_lattice_gradients_are_exact_for_every_input_layout(layout, length):
    """With gradients, chunk lattices write each run's gradients into the positions it
    read (grouped key/value heads written per group, heads shared across groups added):
    exact against the reference, and a second backward through the same graph
    (``retain_graph``, which rebuilds the runs' graphs) gives the same gradients."""
    q, k, v = (t.requires_grad_() for t in _layout_inputs(layout, length, 6, seed=length))
    module = sd.compile(LAYOUT_PATTERN, kernel="lattice")
    out = module(q, k, v)
    expected, _ = reference_attention(LAYOUT_PATTERN, q, k, v)
    assert (out - expected).abs().max().item() < 1e-12
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    loss = (out * weights).sum()
    for _ in range(2):
        got = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and (g - w).abs().max().item() < 1e-10


@pytest.mark.parametrize("layout,uses_program", [
    ("contiguous", True), ("bnhd, batch 1", True), ("storage offset", True), ("grouped kv heads", True),
    ("bnhd, batch 2", False),  # batch and heads do not merge into one strided dimension
    ("kv head shared across groups", False),  # head groups split a key/value head: gathered
])
def test_lattice_program_is_exact_for_every_input_layout(layout, uses_program):
    """Calls without gradients run a LatticeProgram (views from precomputed geometry) where
    every run is a view, and the general path otherwise; both are exact."""
    pattern, length, heads = LAYOUT_PATTERN, 96, 6
    q, k, v = _layout_inputs(layout, length, heads)
    plan = lattice_decomposition(pattern, length, length, heads, "cpu")
    program = LatticeProgram.build(q, k, v, plan)
    assert (program is not None) == uses_program
    expected, _ = reference_attention(pattern, q, k, v)
    if program is not None:
        assert (program(q, k, v, 8 ** -0.5) - expected).abs().max().item() < 1e-12
    module = sd.compile(pattern, kernel="lattice")
    with torch.no_grad():
        assert (module(q, k, v) - expected).abs().max().item() < 1e-12
