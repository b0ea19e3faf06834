"""Ranges, offsets, positions inside documents, cyclic head groups, causal random blocks and
block layouts with a batch axis; plain score functions run per element; bound tensors.

Each construct's dense form is checked against a reference written here from its stated
semantics (Python slices, explicit loops); counts, tile states, block masks, outputs and
gradients through ``sd.compile`` against the dense reference, on hypothesis patterns and
lengths that are not multiples of the block size."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import sparsedsl as sd
from reference import block_sets, random_row, reference_attention
from sparsedsl.analysis.formula import N as N_SYMBOL
from sparsedsl.compiler.planner import PlanNotSupported
from sparsedsl.lang import nodes as n
from sparsedsl.lang.queries import counts_from_the_end
from strategies import min_heads, primitives, within_rules

# ---------------------------------------------------------------------------------------
# References written from the stated semantics
# ---------------------------------------------------------------------------------------


def reference(pattern: n.Pattern, q_len: int, kv_len: int, heads: int, buffers: dict) -> torch.Tensor:
    """``[B, H, Q, K]`` bool for the constructs of this file (other nodes: ``sd.dense``)."""
    if isinstance(pattern, n.Queries):
        rows = torch.zeros(q_len, dtype=torch.bool)
        rows[pattern.start:pattern.stop] = True  # Python's slice reading
        return rows[None, None, :, None].expand(1, heads, q_len, kv_len)
    if isinstance(pattern, n.Keys):
        cols = torch.zeros(kv_len, dtype=torch.bool)
        cols[pattern.start:pattern.stop] = True
        return cols[None, None, None, :].expand(1, heads, q_len, kv_len)
    if isinstance(pattern, n.Shifted):
        o = pattern.offset
        out = torch.zeros(1, heads, q_len, kv_len, dtype=torch.bool)
        if q_len > o and kv_len > o:
            out[:, :, o:, o:] = reference(pattern.inner, q_len - o, kv_len - o, heads, buffers)
        return out
    if isinstance(pattern, n.DocumentWithin):
        ids = buffers[pattern.name]
        ids = ids if ids.dim() == 2 else ids[None]
        length = ids.shape[1]
        rule = reference(pattern.rule, length, length, heads, {})[0]
        out = torch.zeros(ids.shape[0], heads, q_len, kv_len, dtype=torch.bool)
        for b, row in enumerate(ids.tolist()):
            first = [row.index(x) for x in row]  # the first position with the same id
            for q in range(q_len):
                for k in range(kv_len):
                    if row[q] == row[k]:
                        out[b, :, q, k] = rule[:, q - first[q], k - first[k]]
        return out
    if isinstance(pattern, n.CycleHeads):
        parts = [reference(p, q_len, kv_len, heads, buffers) for p in pattern.parts]
        batch = max(p.shape[0] for p in parts)
        return torch.stack([parts[h % len(parts)].expand(batch, -1, -1, -1)[:, h]
                            for h in range(heads)], dim=1)
    if isinstance(pattern, n.Blocks) and any(isinstance(r, n.BlockRandomCausal) for r in pattern.rules):
        return _random_causal_reference(pattern, q_len, kv_len, heads)
    if isinstance(pattern, n.Blocks) and pattern.rules == (n.BlockLayout("lay"),):
        lay = buffers["lay"]  # [B, H or 1, nqb', nkb']: blocks outside it are not allowed
        q = torch.arange(q_len)[:, None] // pattern.size
        k = torch.arange(kv_len)[None, :] // pattern.size
        inside = (q < lay.shape[2]) & (k < lay.shape[3])
        allowed = lay[:, :, q.clamp(max=lay.shape[2] - 1), k.clamp(max=lay.shape[3] - 1)] & inside
        return allowed.expand(-1, heads, -1, -1)
    if isinstance(pattern, (n.Union, n.Intersection)):
        parts = [reference(p, q_len, kv_len, heads, buffers) for p in pattern.parts]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if isinstance(pattern, n.Union) else (out & p)
        return out
    if isinstance(pattern, n.Difference):
        return reference(pattern.left, q_len, kv_len, heads, buffers) & \
            ~reference(pattern.right, q_len, kv_len, heads, buffers)
    used = {name: buffers[name] for name in pattern.buffer_names()}
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **used)
    return allowed if allowed.dim() == 4 else allowed[None]


def _random_causal_reference(pattern: n.Blocks, q_len, kv_len, heads) -> torch.Tensor:
    """Blocks whose rules are ``.random_causal`` only (then maybe ``.causal()``): each row
    ``qb`` takes ``per_row`` blocks ``kb <= qb`` by the stated rule (``reference.random_row``)."""
    size = pattern.size
    nqb, nkb = -(-q_len // size), -(-kv_len // size)
    layout = torch.zeros(nqb, nkb, dtype=torch.bool)
    for rule in pattern.rules:
        assert isinstance(rule, n.BlockRandomCausal)
        for qb in range(nqb):
            for kb in random_row(rule.seed, qb, qb + 1, rule.per_row):
                if kb < nkb:
                    layout[qb, kb] = True
    q = torch.arange(q_len)[:, None] // size
    k = torch.arange(kv_len)[None, :] // size
    allowed = layout[q, k]
    if pattern.causal_:
        allowed = allowed & (k <= q)
    if pattern.within_ is not None:
        rule = sd.dense(pattern.within_, size, heads=heads)
        allowed = allowed & rule[:, torch.arange(q_len)[:, None] % size, torch.arange(kv_len)[None, :] % size]
    return allowed.expand(heads, q_len, kv_len)[None]


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

_bounds = st.integers(-60, 60)


@st.composite
def ranges(draw, from_end: bool = True):
    kind = draw(st.sampled_from((sd.queries, sd.keys)))
    bounds = _bounds if from_end else st.integers(0, 60)
    start = draw(bounds)
    stop = draw(st.one_of(st.none(), bounds))
    if stop is not None and (start < 0) == (stop < 0) and stop <= start:
        stop = None
    return kind(start, stop)


def _leaf(from_end: bool = True):
    return st.one_of(primitives(allow_buffers=False), ranges(from_end), within_rules(1))


@st.composite
def random_causal_blocks(draw):
    p = sd.blocks(draw(st.sampled_from((1, 3, 4, 5, 8, 12))))
    for _ in range(draw(st.integers(1, 2))):
        p = p.random_causal(draw(st.integers(1, 4)), draw(st.integers(0, 1000)))
    if draw(st.booleans()):
        p = p.causal()
    if draw(st.booleans()):
        p = p.within(draw(st.one_of(within_rules(1), ranges())))
    return p


@st.composite
def constructs(draw, depth: int = 2, from_end: bool = True, documents: bool = True):
    """One of the constructs of this file, its parts drawn from the whole vocabulary (inside
    ``starting_at`` and ``documents().within``, no call-time tensors)."""
    kinds = ("range", "starting_at", "cycle", "random_causal") + (("documents", "layout") if documents else ())
    kind = draw(st.sampled_from(kinds if depth > 0 else ("range", "random_causal")))
    if kind == "range":
        return draw(ranges(from_end))
    if kind == "layout":  # bound with a batch axis
        return sd.blocks(draw(st.sampled_from((1, 4, 5, 16)))).layout("lay")
    if kind == "random_causal":
        return draw(random_causal_blocks())
    inner = st.one_of(_leaf(from_end and kind != "documents"),
                      constructs(depth - 1, from_end and kind != "documents",
                                 documents and kind == "cycle"))
    if kind == "starting_at":
        return draw(inner).starting_at(draw(st.integers(0, 50)))
    if kind == "documents":
        return sd.documents("doc").within(draw(inner))
    return sd.cycle_heads(*(draw(inner) for _ in range(draw(st.integers(1, 3)))))


@st.composite
def cases(draw, max_len: int = 90, from_end: bool = True):
    """``(pattern, q_len, kv_len, heads, buffers)``: a construct, alone or combined with the
    vocabulary, at lengths that are rarely multiples of a tile."""
    pattern = draw(constructs(from_end=from_end))
    other = draw(_leaf(from_end))
    pattern = draw(st.sampled_from((pattern, pattern | other, pattern & other, pattern - other, other - pattern)))
    q_len = draw(st.integers(1, max_len))
    kv_len = q_len if draw(st.booleans()) else draw(st.integers(1, max_len))
    heads = max(draw(st.integers(1, 4)), min_heads(pattern))
    buffers = {}
    if "doc" in pattern.buffer_names():
        rng = random.Random(draw(st.integers(0, 2**32 - 1)))
        length = max(q_len, kv_len)

        def ids():  # documents of random lengths, ids not always sorted or contiguous
            row = sorted(rng.randrange(4) for _ in range(length))
            if rng.random() < 0.3:
                rng.shuffle(row)
            return torch.tensor(row)

        buffers["doc"] = torch.stack([ids(), ids()]) if rng.random() < 0.3 else ids()
    if "lay" in pattern.buffer_names():
        size = next(node.size for node in _nodes(pattern) if isinstance(node, n.Blocks) and node.rules)
        extent = (-(-q_len // size) + draw(st.integers(-1, 1)), -(-kv_len // size) + draw(st.integers(-1, 1)))
        shape = (draw(st.integers(1, 3)), draw(st.sampled_from((1, heads))), max(1, extent[0]), max(1, extent[1]))
        buffers["lay"] = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.4
    return pattern, q_len, kv_len, heads, buffers


def _nodes(pattern):
    yield pattern
    for child in pattern.children():
        yield from _nodes(child)


# ---------------------------------------------------------------------------------------
# Dense forms against the stated semantics; text forms
# ---------------------------------------------------------------------------------------


def _dense4(pattern, q_len, kv_len, heads, buffers):
    allowed = sd.dense(pattern, q_len, kv_len, heads=heads, **buffers)
    return allowed if allowed.dim() == 4 else allowed[None]


@settings(max_examples=150)
@given(cases())
def test_dense_equals_the_stated_semantics(case):
    pattern, q_len, kv_len, heads, buffers = case
    expected = reference(pattern, q_len, kv_len, heads, buffers)
    got = _dense4(pattern, q_len, kv_len, heads, buffers)
    batch = max(expected.shape[0], got.shape[0])
    assert torch.equal(got.expand(batch, -1, -1, -1), expected.expand(batch, -1, -1, -1)), str(pattern)


@settings(max_examples=150)
@given(constructs())
def test_text_form_round_trips(pattern):
    again = sd.parse(str(pattern))
    assert again == pattern and hash(again) == hash(pattern)


# ---------------------------------------------------------------------------------------
# Counting, tiles and block masks without N^2 evaluation, equal to the dense reference
# ---------------------------------------------------------------------------------------


def _tile_counts(allowed: torch.Tensor, tile: int) -> tuple[int, int, int]:
    """(full, partial, empty) tiles of ``[B, H, Q, K]`` as a tile kernel sees them."""
    batch, heads, q_len, kv_len = allowed.shape
    nq, nk = -(-q_len // tile), -(-kv_len // tile)
    padded = torch.zeros(batch, heads, nq * tile, nk * tile, dtype=torch.int64)
    padded[:, :, :q_len, :kv_len] = allowed
    per_tile = padded.view(batch, heads, nq, tile, nk, tile).sum((3, 5))
    full, empty = int((per_tile == tile * tile).sum()), int((per_tile == 0).sum())
    return full, per_tile.numel() - full - empty, empty



@settings(max_examples=80)
@given(cases(), st.sampled_from((3, 4, 7, 16)), st.sampled_from((16, 32)))
def test_counts_tiles_and_block_masks_equal_the_dense_reference(case, tile, block):
    pattern, q_len, kv_len, heads, buffers = case
    allowed = _dense4(pattern, q_len, kv_len, heads, buffers).expand(-1, heads, -1, -1)
    counts = sd.count(pattern, q_len, kv_len, heads=heads, tile=tile, **buffers)
    assert counts.per_head == tuple(int(allowed[:, h].sum()) for h in range(heads)), str(pattern)
    tiles = counts.tiles
    assert (tiles.full, tiles.partial, tiles.empty) == _tile_counts(allowed, tile), str(pattern)

    module = sd.compile(pattern, block_size=block)
    batch = allowed.shape[0]
    ours = module.block_mask(q_len, kv_len, heads=heads, **buffers)
    theirs = create_block_mask(module.mask_mod(q_len, kv_len, heads=heads, **buffers), batch, heads,
                               q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    for a, b in zip(block_sets(ours), block_sets(theirs)):
        assert torch.equal(a.expand(batch, heads, -1, -1), b.expand(batch, heads, -1, -1)), str(pattern)


@settings(max_examples=60)
@given(cases(max_len=2000, from_end=False).filter(lambda c: not c[0].buffer_names()))
def test_counts_at_larger_lengths_take_the_structural_path(case):
    pattern, q_len, kv_len, heads, _ = case
    counts = sd.count(pattern, q_len, kv_len, heads=heads, tile=64)
    if q_len * kv_len * heads <= 1 << 22:
        allowed = _dense4(pattern, q_len, kv_len, heads, {}).expand(-1, heads, -1, -1)
        assert counts.per_head == tuple(int(allowed[:, h].sum()) for h in range(heads)), str(pattern)


# ---------------------------------------------------------------------------------------
# Outputs and gradients through sd.compile
# ---------------------------------------------------------------------------------------


def _inputs(batch, heads, q_len, kv_len, seed, dtype=torch.float64, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads, kv_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads, kv_len, dim, generator=gen, dtype=dtype, requires_grad=True)
    return q, k, v


def _autograd_reference(allowed, q, k, v, scores=None):
    """Output of one softmax over the allowed keys (rows with none: 0), with autograd."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 if scores is None else scores
    s = s.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(s, -1).nan_to_num(0.0)
    return weights @ v


@settings(max_examples=40)
@given(cases(max_len=70), st.integers(0, 2**31 - 1))
def test_outputs_and_gradients_equal_the_dense_reference(case, seed):
    pattern, q_len, kv_len, heads, buffers = case
    allowed = _dense4(pattern, q_len, kv_len, heads, buffers)
    batch = allowed.shape[0]
    q, k, v = _inputs(batch, heads, q_len, kv_len, seed)
    out = sd.compile(pattern, block_size=16)(q, k, v, **buffers)
    expected = _autograd_reference(allowed, q, k, v)
    assert (out - expected).abs().max() < 1e-9, str(pattern)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-9, str(pattern)


def test_float32_outputs_on_every_plan_that_runs():
    pattern = (sd.keys(-9) | sd.window(5, 0)).starting_at(3) | sd.queries(0, 2)
    q, k, v = (t.detach().float() for t in _inputs(1, 2, 150, 150, 1))
    expected, _ = reference_attention(pattern, q, k, v)
    ran = 0
    for kernel in ("auto", "gather", "flex", "sdpa", "band", "lattice"):
        try:
            out = sd.compile(pattern, block_size=32, kernel=kernel)(q, k, v)
        except PlanNotSupported:
            continue
        ran += 1
        assert (out.double() - expected).abs().max() < 1e-4, kernel
    assert ran >= 2


def _assert_decoding_steps_exact(pattern, totals, seed: int) -> None:
    """One query after ``total - 1`` cached keys, for each total: equal to the reference."""
    module = sd.compile(pattern, block_size=16)
    gen = torch.Generator().manual_seed(seed)
    for total in totals:
        q = torch.randn(1, 2, 1, 8, generator=gen)
        k, v = torch.randn(1, 2, total, 8, generator=gen), torch.randn(1, 2, total, 8, generator=gen)
        with torch.no_grad():
            out = module(q, k, v, q_offset=total - 1)
        expected, _ = reference_attention(pattern, q, k, v, q_offset=total - 1)
        assert (out.double() - expected).abs().max() < 1e-5


def test_decoding_steps_with_ranges_from_the_start():
    _assert_decoding_steps_exact((sd.keys(0, 7) | sd.window(9, 0)).starting_at(5) & sd.causal(), (40, 41, 77), 5)


def test_decoding_steps_with_ranges_from_the_end():
    """Tile rows cached over the key capacity would place the end wrongly: such patterns
    do not decode by rows, and each step is exact."""
    pattern = sd.queries(-3) & sd.causal()
    assert counts_from_the_end(pattern)
    _assert_decoding_steps_exact(pattern, (41, 77), 6)


# ---------------------------------------------------------------------------------------
# Formula where a closed form exists
# ---------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(constructs(depth=1, from_end=False).filter(lambda p: not p.buffer_names()
                                                 and not isinstance(p, (n.CycleHeads, n.Blocks))))
def test_formula_equals_the_count(pattern):
    try:
        expr = sd.formula(pattern)
    except sd.formula.__globals__["NoClosedFormError"]:
        return
    for size in (1, 2, 7, 31, 64, 100):
        assert int(expr.subs(N_SYMBOL, size)) == int(sd.dense(pattern, size).sum()), (str(pattern), size)


def test_closed_forms_of_ranges_and_offsets():
    from sparsedsl.analysis.formula import NoClosedFormError
    assert sd.formula(sd.queries(3, 7)).subs(N_SYMBOL, 100) == 400
    assert sd.formula(sd.chunks(64).starting_at(100)).subs(N_SYMBOL, 356) == 4 * 64 * 64
    with pytest.raises(NoClosedFormError, match="counts from the end"):
        sd.formula(sd.keys(-4))
    with pytest.raises(NoClosedFormError, match="call-time tensor"):
        sd.formula(sd.documents("doc").within(sd.causal()))


# ---------------------------------------------------------------------------------------
# Cyclic heads, causal random blocks, block layouts with a batch axis
# ---------------------------------------------------------------------------------------


def test_cycle_heads_gives_head_h_part_h_mod_n():
    parts = (sd.causal(), sd.window(2), sd.global_tokens(3))
    allowed = sd.dense(sd.cycle_heads(*parts), 20, heads=7)
    for h in range(7):
        assert torch.equal(allowed[h], sd.dense(parts[h % 3], 20)[0])
    assert sd.count(sd.cycle_heads(*parts), 20).heads == 3
    assert sd.dense(sd.cycle_heads(*parts), 20, heads=2).shape[0] == 2  # fewer heads than parts


def test_random_causal_blocks_are_drawn_at_or_before_the_diagonal():
    pattern = sd.blocks(4).random_causal(3, seed=11)
    layout = sd.dense(pattern, 200)[0, ::4, ::4]
    per_row = layout.sum(-1)
    assert not layout.triu(1).any()
    assert torch.equal(per_row, torch.clamp(torch.arange(50) + 1, max=3))  # exactly per_row, all drawn
    # .random(...).causal() draws among every block and then drops: fewer per row
    dropped = sd.dense(sd.blocks(4).random(3, seed=11).causal(), 200)[0, ::4, ::4].sum(-1)
    assert int(dropped.sum()) < int(per_row.sum())
    # a row's choice depends only on (seed, qb): the same rows at another length
    longer = sd.dense(pattern, 320)[0, ::4, ::4]
    assert torch.equal(longer[:50, :50], layout)


def test_layout_with_a_batch_axis():
    gen = torch.Generator().manual_seed(2)
    lay = torch.rand(3, 2, 5, 5, generator=gen) < 0.4
    pattern = sd.blocks(8).layout("lay")
    allowed = sd.dense(pattern, 37, heads=2, lay=lay)
    q = torch.arange(37)[:, None] // 8
    k = torch.arange(37)[None, :] // 8
    assert torch.equal(allowed, lay[:, :, q, k])
    counts = sd.count(pattern, 37, heads=2, tile=16, lay=lay)
    assert counts.batch == 3 and counts.pairs == int(allowed.sum())
    q_, k_, v_ = _inputs(3, 2, 37, 37, 3)
    out = sd.compile(pattern, block_size=16)(q_, k_, v_, lay=lay)
    assert (out - _autograd_reference(allowed, q_, k_, v_)).abs().max() < 1e-9
    one_head = torch.rand(3, 1, 5, 5, generator=gen) < 0.4
    assert torch.equal(sd.dense(pattern, 37, heads=2, lay=one_head), one_head.expand(3, 2, 5, 5)[:, :, q, k])
    with pytest.raises(sd.BufferBindingError, match=r"\[batch, 2 or 1, nqb, nkb\]"):
        sd.dense(pattern, 37, heads=2, lay=torch.ones(3, 3, 5, 5, dtype=torch.bool))


def test_documents_within_a_packed_batch():
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([10, 25, 14]))
    prefix_lm = sd.documents("doc").within(sd.causal() | sd.prefix(4))
    allowed = sd.dense(prefix_lm, 49, doc=ids)[0]
    for start, length in ((0, 10), (10, 25), (35, 14)):
        block = allowed[start:start + length, start:start + length]
        assert torch.equal(block, sd.dense(sd.causal() | sd.prefix(4), length)[0])
    assert int(allowed.sum()) == sum(int(sd.dense(sd.causal() | sd.prefix(4), m).sum()) for m in (10, 25, 14))


# ---------------------------------------------------------------------------------------
# Plain score functions: FlexAttention's per-element semantics on every plan
# ---------------------------------------------------------------------------------------

_TABLE = torch.randn(80, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def rope_dot(score, b, h, q, k):
    return score + torch.dot(_TABLE[q], _TABLE[k]).to(score.dtype) * 0.3


def rope_sum(score, b, h, q, k):
    return score - (_TABLE[q] * _TABLE[k]).sum().to(score.dtype) * 0.2 + 0.1 * h


def constant(score, b, h, q, k):
    return torch.tensor(0.5, dtype=score.dtype)


def _per_element_scores(fn, q, k):
    """Scores of ``fn`` applied to one element at a time, in a Python loop."""
    raw = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    rows = []
    for b in range(raw.shape[0]):
        for h in range(raw.shape[1]):
            for i in range(raw.shape[2]):
                for j in range(raw.shape[3]):
                    rows.append(fn(raw[b, h, i, j], torch.tensor(b), torch.tensor(h), torch.tensor(i), torch.tensor(j)))
    return torch.stack(rows).view(raw.shape)


def rope_pointwise(score, b, h, q, k):
    return score + _TABLE[q, 0].to(score.dtype) * _TABLE[k, 1].to(score.dtype)


_SCORE_CASES = [(fn, kernel) for fn in (rope_dot, rope_sum, rope_pointwise, constant) for kernel in ("auto", "gather")]
_SCORE_CASES += [(rope_pointwise, "flex"), (constant, "flex")]


@pytest.mark.parametrize("fn,kernel", _SCORE_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_score_functions_run_per_element_with_gradients(fn, kernel):
    pattern = (sd.window(6) | sd.keys(0, 3)).score(fn)
    # FlexAttention on the CPU: float32, a head dim of at least 16, no backward pass.
    on_cpu_flex = kernel == "flex" and not torch.cuda.is_available()
    dtype, tolerance = (torch.float32, 1e-4) if kernel == "flex" else (torch.float64, 1e-9)
    q, k, v = _inputs(1, 2, 37, 37, 8, dtype, dim=16)
    try:
        module = sd.compile(pattern, block_size=16, kernel=kernel)
        with torch.set_grad_enabled(not on_cpu_flex):
            out = module(q, k, v)
    except PlanNotSupported:
        pytest.skip(f"{kernel} does not run this call here")
    allowed = sd.dense(pattern, 37, heads=2)[None]
    expected = _autograd_reference(allowed, q, k, v, _per_element_scores(fn, q, k))
    assert (out - expected).abs().max() < tolerance
    if on_cpu_flex:
        return
    grad = torch.randn_like(out)
    for a, b in zip(_grads(out, (q, k, v), grad), _grads(expected, (q, k, v), grad)):
        assert (a - b).abs().max() < tolerance


def _grads(out, inputs, grad):
    """Gradients of ``out`` against ``inputs`` (zeros for inputs it does not use)."""
    grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def test_a_score_function_that_cannot_run_per_element_is_named():
    def reads_back(score, b, h, q, k):
        return score + float(q)

    q, k, v = (t.detach() for t in _inputs(1, 2, 20, 20, 1))
    with pytest.raises(sd.ScoreFunctionError, match="reads_back.*element at a time"):
        sd.compile(sd.window(3).score(reads_back), block_size=16, kernel="gather")(q, k, v)


def test_a_score_function_with_the_wrong_signature_is_refused_at_score():
    def four(score, b, h, q):
        return score

    with pytest.raises(sd.PatternArgumentError, match=r"four\(score, b, h, q\).*\(score, b, h, q, k\)"):
        sd.causal().score(four)
    sd.causal().score(lambda score, *indices: score)  # takes five arguments


def test_a_function_whose_name_is_not_an_identifier_prints_text_parse_refuses_by_name():
    pattern = sd.causal().score(lambda score, b, h, q, k: score)
    assert str(pattern) == "causal().score('<lambda>')"
    with pytest.raises(sd.PatternSyntaxError, match="'<lambda>' names a plain Python function"):
        sd.parse(str(pattern))


# ---------------------------------------------------------------------------------------
# Bound tensors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("write", ["data", "numpy"])
def test_writes_that_bypass_the_version_counter_are_seen(write):
    pattern = sd.documents("doc") & sd.causal()
    module = sd.compile(pattern, block_size=16)
    ids = torch.repeat_interleave(torch.arange(2), torch.tensor([20, 30]))
    q, k, v = (t.detach() for t in _inputs(1, 2, 50, 50, 4))
    module(q, k, v, doc=ids)
    new = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 40, 5]))
    version = ids._version
    if write == "data":
        ids.data[:] = new
    else:
        ids.numpy()[:] = new.numpy()
    assert ids._version == version  # the counter did not move
    expected, _ = reference_attention(pattern, q, k, v, doc=new)
    assert (module(q, k, v, doc=ids).double() - expected).abs().max() < 1e-5
    lay = torch.eye(4, dtype=torch.bool)
    layout_pattern = sd.blocks(16).layout("lay")
    layout_module = sd.compile(layout_pattern, block_size=16)
    layout_module(q, k, v, lay=lay)
    lay.numpy()[0, 3] = True
    expected, _ = reference_attention(layout_pattern, q, k, v, lay=lay.clone())
    assert (layout_module(q, k, v, lay=lay).double() - expected).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,message", [
    (lambda: sd.documents("doc").within(sd.keys(-2)), "keys\\(-2\\) counts from the end"),
    (lambda: sd.documents("doc").within(sd.documents("other")), "call-time tensors"),
    (lambda: sd.causal().starting_at(-1), "'offset' must be >= 0"),
    (lambda: sd.documents("doc").starting_at(3), "call-time tensors"),
    (lambda: sd.causal().score(sd.alibi()).starting_at(3), "call .score\\(...\\) last"),
    (lambda: sd.queries(5, 2), "'stop' must be greater than start"),
    (lambda: sd.keys(-2, -4), "'stop' must be greater than start"),
    (lambda: sd.keys(1.5), "'start' must be an integer"),
    (lambda: sd.cycle_heads(), "at least one pattern"),
    (lambda: sd.cycle_heads(sd.causal(), 3), "argument 1 must be a pattern"),
    (lambda: sd.blocks(4).random_causal(0), "'per_row' must be positive"),
])
def test_bad_arguments_are_named(build, message):
    with pytest.raises(sd.PatternArgumentError, match=message):
        build()


def test_ranges_inside_blocks_count_from_the_block_end():
    pattern = sd.blocks(8).within(sd.keys(-2) & sd.queries(0, 1))
    allowed = sd.dense(pattern, 21)[0]
    expected = torch.zeros(21, 21, dtype=torch.bool)
    for q in range(21):
        for k in range(21):
            expected[q, k] = q % 8 == 0 and k % 8 >= 6
    assert torch.equal(allowed, expected)
    assert not counts_from_the_end(pattern) and counts_from_the_end(sd.keys(0, -1) | sd.causal())


@pytest.mark.parametrize("fn", [rope_dot, rope_sum], ids=lambda f: f.__name__)
def test_flex_refuses_a_score_function_it_cannot_lower_by_name(fn):
    """Compiled FlexAttention cannot lower a reduction over gathered values inside a
    score_mod: the error names the function and the plans that run it."""
    pattern = sd.causal().score(fn)
    q, k, v = _inputs(1, 2, 37, 37, 8, torch.float32, dim=16)
    with torch.no_grad(), pytest.raises(sd.ScoreFunctionError, match=f"score function {fn.__name__}.*kernel='gather'"):
        sd.compile(pattern, block_size=16, kernel="flex")(q, k, v)
