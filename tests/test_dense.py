"""The dense reference (``sparsedsl.dense``) against a scalar definition of DESIGN.md §2, and
the ``mask_mod`` lowering against the dense reference.

Every expected value here comes from plain-Python ``allowed(...)`` functions written from the
semantics table (loops over positions, no torch). The seeded choice of random blocks comes
from its stated rule written plainly (``reference.random_row``: Floyd's sampling, one step
at a time), and the package's vectorised choice is checked against it and for its
documented properties.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsedsl import (
    BufferBindingError,
    PatternArgumentError,
    alibi,
    bias,
    blocks,
    causal,
    chunks,
    dense,
    dilated,
    dilated_window,
    documents,
    full,
    global_tokens,
    heads,
    prefix,
    segments,
    softcap,
    strided,
    window,
)
from sparsedsl.lang import nodes as n
from sparsedsl.lang.randomblocks import (
    block_picks_of_rows,
    random_block_layout,
    random_block_picks,
    random_causal_block_picks,
)
from sparsedsl.passes.context import Context
from sparsedsl.passes.maskmod import lower_mask

from reference import random_row
from strategies import pattern_cases

# ---------------------------------------------------------------------------------------
# Scalar definitions (DESIGN.md §2), no torch
# ---------------------------------------------------------------------------------------


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def group_of(h: int, num_heads: int, num_groups: int) -> int:
    """Head ``h``'s group: ``num_groups`` contiguous groups, the first ``H % G`` one larger."""
    start = 0
    for g in range(num_groups):
        size = num_heads // num_groups + (1 if g < num_heads % num_groups else 0)
        if h < start + size:
            return g
        start += size
    raise AssertionError(f"head {h} out of range for {num_heads} heads")


def table(allowed, q_len: int, kv_len: int, num_heads: int = 1, batch: int | None = None):
    """Nested lists ``[H][Q][K]`` (or ``[B][H][Q][K]`` when ``batch``) of ``allowed``.

    ``allowed`` takes ``(q, k)``, ``(h, q, k)`` or ``(b, h, q, k)`` (by arity)."""
    arity = allowed.__code__.co_argcount

    def call(b, h, q, k):
        if arity == 2:
            return bool(allowed(q, k))
        if arity == 3:
            return bool(allowed(h, q, k))
        return bool(allowed(b, h, q, k))

    def one(b):
        return [[[call(b, h, q, k) for k in range(kv_len)] for q in range(q_len)]
                for h in range(num_heads)]

    return one(0) if batch is None else [one(b) for b in range(batch)]


def first_mismatch(got, want, index=()):
    if isinstance(want, list):
        assert len(got) == len(want), f"length {len(got)} != {len(want)} at {index}"
        for i, (g, w) in enumerate(zip(got, want)):
            found = first_mismatch(g, w, index + (i,))
            if found is not None:
                return found
        return None
    return None if got == want else (index, got, want)


def assert_table(tensor: torch.Tensor, want, what=""):
    assert tensor.dtype == torch.bool
    mismatch = first_mismatch(tensor.tolist(), want)
    assert mismatch is None, f"{what}: first mismatch at index {mismatch[0]}: got {mismatch[1]}, want {mismatch[2]}"


def check(pattern, allowed, q_len, kv_len=None, num_heads=1, batch=None, **buffers):
    kv = q_len if kv_len is None else kv_len
    got = dense(pattern, q_len, kv_len, num_heads, **buffers)
    shape = [num_heads, q_len, kv] if batch is None else [batch, num_heads, q_len, kv]
    assert list(got.shape) == shape, f"{pattern}: shape {list(got.shape)} != {shape}"
    assert_table(got, table(allowed, q_len, kv, num_heads, batch), f"{pattern} Q={q_len} K={kv} H={num_heads}")


# A scalar interpreter of the whole language, for generated patterns.


class Env:
    def __init__(self, q_len, kv_len, num_heads, buffers):
        self.q_len, self.kv_len, self.heads = q_len, kv_len, num_heads
        self.buffers = {name: t.tolist() for name, t in buffers.items()}


def _depth(value) -> int:
    d = 0
    while isinstance(value, list):
        d, value = d + 1, (value[0] if value else None)
    return d


def spec(node, env: Env):
    """``allowed(b, h, q, k)`` of ``node`` as a plain-Python function."""
    if isinstance(node, n.Full):
        return lambda b, h, q, k: True
    if isinstance(node, n.Causal):
        return lambda b, h, q, k: k <= q
    if isinstance(node, n.Window):
        return lambda b, h, q, k: q - node.before <= k <= q + node.after
    if isinstance(node, n.DilatedWindow):
        return lambda b, h, q, k: q - node.before <= k <= q + node.after and (q - k) % node.rate == 0
    if isinstance(node, n.Chunks):
        return lambda b, h, q, k: q // node.size == k // node.size
    if isinstance(node, n.Strided):
        return lambda b, h, q, k: (q - k) % node.stride == 0
    if isinstance(node, n.Dilated):
        s, r, o = node.segment, node.rate, node.offset
        return lambda b, h, q, k: q // s == k // s and (q % s) % r == o and (k % s) % r == o
    if isinstance(node, n.GlobalTokens):
        return lambda b, h, q, k: q < node.n or k < node.n
    if isinstance(node, n.Prefix):
        return lambda b, h, q, k: k < node.n
    if isinstance(node, n.Documents):
        ids = env.buffers[node.name]
        if _depth(ids) == 2:
            return lambda b, h, q, k: ids[b][q] == ids[b][k]
        return lambda b, h, q, k: ids[q] == ids[k]
    if isinstance(node, n.Blocks):
        return _spec_blocks(node, env)
    if isinstance(node, n.Heads):
        parts = [spec(p, env) for p in node.parts]
        return lambda b, h, q, k: parts[group_of(h, env.heads, len(parts))](b, h, q, k)
    if isinstance(node, n.Segments):
        groups = list(zip(node.lengths, node.dilations, node.offsets))

        def segments_allowed(b, h, q, k):
            s, r, o = groups[group_of(h, env.heads, len(groups))]
            return q // s == k // s and (q % s) % r == o and (k % s) % r == o

        return segments_allowed
    if isinstance(node, n.Union):
        parts = [spec(p, env) for p in node.parts]
        return lambda b, h, q, k: any(p(b, h, q, k) for p in parts)
    if isinstance(node, n.Intersection):
        parts = [spec(p, env) for p in node.parts]
        return lambda b, h, q, k: all(p(b, h, q, k) for p in parts)
    if isinstance(node, n.Difference):
        left, right = spec(node.left, env), spec(node.right, env)
        return lambda b, h, q, k: left(b, h, q, k) and not right(b, h, q, k)
    if isinstance(node, n.Complement):
        inner = spec(node.inner, env)
        return lambda b, h, q, k: not inner(b, h, q, k)
    if isinstance(node, n.Scored):
        return spec(node.pattern, env)
    raise TypeError(type(node).__name__)


def _spec_block_rule(rule, env: Env, nqb: int, nkb: int):
    if isinstance(rule, n.BlockLocal):
        return lambda h, qb, kb: abs(qb - kb) <= rule.window
    if isinstance(rule, n.BlockDilated):
        return lambda h, qb, kb: any((qb - kb) % r == 0 for r in rule.rates) and (
            rule.window is None or abs(qb - kb) <= rule.window)
    if isinstance(rule, n.BlockGlobal):
        return lambda h, qb, kb: qb < rule.n or kb < rule.n
    if isinstance(rule, n.BlockRandom):
        chosen = [random_row(rule.seed, qb, nkb, rule.per_row) for qb in range(nqb)]
        return lambda h, qb, kb: kb in chosen[qb]
    if isinstance(rule, n.BlockRandomCausal):
        chosen = [random_row(rule.seed, qb, qb + 1, rule.per_row) for qb in range(nqb)]
        return lambda h, qb, kb: kb in chosen[qb]
    if isinstance(rule, n.BlockLayout):
        lay = env.buffers[rule.name]
        if _depth(lay) == 2:
            lay = [lay]

        def layout_allowed(h, qb, kb):
            grid = lay[h if len(lay) > 1 else 0]
            # Blocks outside the tensor's extent are not allowed.
            return qb < len(grid) and kb < len(grid[qb]) and grid[qb][kb]

        return layout_allowed
    raise TypeError(type(rule).__name__)


def _spec_blocks(node: n.Blocks, env: Env):
    s = node.size
    nqb, nkb = ceil_div(env.q_len, s), ceil_div(env.kv_len, s)
    rules = [_spec_block_rule(r, env, nqb, nkb) for r in node.rules]
    within = None
    if node.within_ is not None:
        within = spec(node.within_, Env(s, s, env.heads, {}))

    def blocks_allowed(b, h, q, k):
        qb, kb = q // s, k // s
        if rules and not any(r(h, qb, kb) for r in rules):
            return False
        if node.causal_ and kb > qb:
            return False
        return within is None or within(b, h, q % s, k % s)

    return blocks_allowed


def spec_table(pattern, q_len, kv_len, num_heads, buffers):
    env = Env(q_len, kv_len, num_heads, buffers)
    allowed = spec(pattern, env)
    batch = None
    for t in buffers.values():
        if isinstance(t, torch.Tensor) and t.dim() == 2 and not t.dtype == torch.bool and \
                not t.is_floating_point():
            batch = t.shape[0]
    return table(lambda b, h, q, k: allowed(b, h, q, k), q_len, kv_len, num_heads, batch)


# ---------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 9), (9, 1), (7, 7), (13, 20), (20, 13), (25, 25)]

PRIMITIVES = [
    ("full", full(), lambda q, k: True),
    ("causal", causal(), lambda q, k: k <= q),
    ("window(2)", window(2), lambda q, k: q - 2 <= k <= q + 2),
    ("window(0)", window(0), lambda q, k: k == q),
    ("window(3, 1)", window(3, 1), lambda q, k: q - 3 <= k <= q + 1),
    ("window(0, 4)", window(0, 4), lambda q, k: q <= k <= q + 4),
    ("window(40)", window(40), lambda q, k: abs(q - k) <= 40),
    ("dilated_window(6, 3, 2)", dilated_window(6, 3, 2), lambda q, k: q - 6 <= k <= q + 3 and (q - k) % 2 == 0),
    ("dilated_window(7, 7, 3)", dilated_window(7, 7, 3), lambda q, k: abs(q - k) <= 7 and (q - k) % 3 == 0),
    ("dilated_window(0, 5, 1)", dilated_window(0, 5, 1), lambda q, k: q <= k <= q + 5),
    ("chunks(4)", chunks(4), lambda q, k: q // 4 == k // 4),
    ("chunks(5)", chunks(5), lambda q, k: q // 5 == k // 5),
    ("chunks(1)", chunks(1), lambda q, k: q == k),
    ("strided(3)", strided(3), lambda q, k: (q - k) % 3 == 0),
    ("strided(1)", strided(1), lambda q, k: True),
    ("dilated(6, 2)", dilated(6, 2), lambda q, k: q // 6 == k // 6 and q % 6 % 2 == 0 and k % 6 % 2 == 0),
    ("dilated(8, 3, 2)", dilated(8, 3, 2), lambda q, k: q // 8 == k // 8 and q % 8 % 3 == 2 and k % 8 % 3 == 2),
    ("dilated(4, 4, 3)", dilated(4, 4, 3), lambda q, k: q // 4 == k // 4 and q % 4 == 3 and k % 4 == 3),
    ("dilated(5, 1)", dilated(5, 1), lambda q, k: q // 5 == k // 5),
    ("global_tokens(3)", global_tokens(3), lambda q, k: q < 3 or k < 3),
    ("prefix(4)", prefix(4), lambda q, k: k < 4),
    ("prefix-LM", causal() | prefix(4), lambda q, k: k <= q or k < 4),
]


@pytest.mark.parametrize("name,pattern,allowed", PRIMITIVES, ids=[p[0] for p in PRIMITIVES])
@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_primitive(name, pattern, allowed, q_len, kv_len):
    check(pattern, allowed, q_len, kv_len)


@pytest.mark.parametrize("name,pattern,allowed", PRIMITIVES[:6], ids=[p[0] for p in PRIMITIVES[:6]])
def test_primitive_is_the_same_on_every_head(name, pattern, allowed):
    check(pattern, allowed, 6, 9, num_heads=3)


def test_causal_alignment_rule_with_q_not_k():
    # Start-aligned: query i and key i are the same position, whatever Q and K are.
    short_q = dense(causal(), 3, 8)[0]
    assert short_q.sum(dim=1).tolist() == [1, 2, 3]
    long_q = dense(causal(), 8, 3)[0]
    assert long_q.sum(dim=1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]


def test_kv_len_defaults_to_q_len():
    assert dense(window(1), 5).shape == (1, 5, 5)
    assert torch.equal(dense(window(1), 5), dense(window(1), 5, 5))


# ---------------------------------------------------------------------------------------
# Block rules
# ---------------------------------------------------------------------------------------

BLOCK_SIZES_CASES = [(3, 10, 10), (4, 16, 16), (5, 12, 23), (4, 23, 9), (7, 1, 20), (2, 9, 1)]


def block_case(pattern, size, allowed_blocks):
    """(pattern, allowed(q, k)) for a block-only rule ``allowed_blocks(qb, kb)``."""
    return pattern, lambda q, k: allowed_blocks(q // size, k // size)


BLOCK_RULES = {
    "no rules": lambda s: block_case(blocks(s), s, lambda qb, kb: True),
    "local(0)": lambda s: block_case(blocks(s).local(0), s, lambda qb, kb: qb == kb),
    "local(1)": lambda s: block_case(blocks(s).local(1), s, lambda qb, kb: abs(qb - kb) <= 1),
    "local(2)": lambda s: block_case(blocks(s).local(2), s, lambda qb, kb: abs(qb - kb) <= 2),
    "dilated([2])": lambda s: block_case(blocks(s).dilated([2]), s, lambda qb, kb: (qb - kb) % 2 == 0),
    "dilated(3)": lambda s: block_case(blocks(s).dilated(3), s, lambda qb, kb: (qb - kb) % 3 == 0),
    "dilated([2, 3])": lambda s: block_case(
        blocks(s).dilated([2, 3]), s, lambda qb, kb: (qb - kb) % 2 == 0 or (qb - kb) % 3 == 0),
    "dilated([2], window=2)": lambda s: block_case(
        blocks(s).dilated([2], window=2), s, lambda qb, kb: (qb - kb) % 2 == 0 and abs(qb - kb) <= 2),
    "dilated([3, 4], window=4)": lambda s: block_case(
        blocks(s).dilated([3, 4], window=4), s,
        lambda qb, kb: ((qb - kb) % 3 == 0 or (qb - kb) % 4 == 0) and abs(qb - kb) <= 4),
    "global_(1)": lambda s: block_case(blocks(s).global_(1), s, lambda qb, kb: qb < 1 or kb < 1),
    "global_(2)": lambda s: block_case(blocks(s).global_(2), s, lambda qb, kb: qb < 2 or kb < 2),
    "causal()": lambda s: block_case(blocks(s).causal(), s, lambda qb, kb: kb <= qb),
    "within(causal())": lambda s: (blocks(s).within(causal()), lambda q, k: k % s <= q % s),
    "within(window(1))": lambda s: (blocks(s).within(window(1)), lambda q, k: abs(q % s - k % s) <= 1),
    # rules union, then causal, then within
    "local(0).global_(1).causal().within(window(1))": lambda s: (
        blocks(s).local(0).global_(1).causal().within(window(1)),
        lambda q, k: (q // s == k // s or q // s < 1 or k // s < 1)
        and k // s <= q // s and abs(q % s - k % s) <= 1),
    "local(1).dilated([3]).causal()": lambda s: block_case(
        blocks(s).local(1).dilated([3]).causal(), s,
        lambda qb, kb: (abs(qb - kb) <= 1 or (qb - kb) % 3 == 0) and kb <= qb),
    "dilated([2], window=4).global_(1).within(strided(2))": lambda s: (
        blocks(s).dilated([2], window=4).global_(1).within(strided(2)),
        lambda q, k: ((((q // s) - (k // s)) % 2 == 0 and abs(q // s - k // s) <= 4)
                      or q // s < 1 or k // s < 1) and (q % s - k % s) % 2 == 0),
    "local(0).within(~causal())": lambda s: (
        blocks(s).local(0).within(~causal()), lambda q, k: q // s == k // s and k % s > q % s),
}


@pytest.mark.parametrize("rule", list(BLOCK_RULES))
@pytest.mark.parametrize("size,q_len,kv_len", BLOCK_SIZES_CASES)
def test_block_rule(rule, size, q_len, kv_len):
    pattern, allowed = BLOCK_RULES[rule](size)
    check(pattern, allowed, q_len, kv_len)


def test_blocks_of_size_one_are_tokens():
    check(blocks(1).local(2), lambda q, k: abs(q - k) <= 2, 9, 11)
    check(blocks(1).causal(), lambda q, k: k <= q, 9, 11)


def test_within_rule_sees_block_relative_positions():
    # global_tokens(1) inside 4-blocks: the first token of every block row/column.
    check(blocks(4).within(global_tokens(1)), lambda q, k: q % 4 == 0 or k % 4 == 0, 10, 13)
    # prefix(2) inside blocks of 3
    check(blocks(3).local(0).within(prefix(2)), lambda q, k: q // 3 == k // 3 and k % 3 < 2, 11, 11)


def test_within_heads_rule():
    pattern = blocks(4).local(1).within(heads(causal(), full()))
    check(pattern, lambda h, q, k: abs(q // 4 - k // 4) <= 1 and (h >= 2 or k % 4 <= q % 4),
          10, 13, num_heads=3)


# ---------------------------------------------------------------------------------------
# Random blocks
# ---------------------------------------------------------------------------------------


def block_grid(allowed: torch.Tensor, size: int) -> torch.Tensor:
    """``[Q, K]`` token relation -> ``[nqb, nkb]``, checking every tile is uniform."""
    q_len, kv_len = allowed.shape
    nqb, nkb = ceil_div(q_len, size), ceil_div(kv_len, size)
    grid = torch.zeros(nqb, nkb, dtype=torch.bool)
    for qb, kb in itertools.product(range(nqb), range(nkb)):
        tile = allowed[qb * size:(qb + 1) * size, kb * size:(kb + 1) * size]
        assert tile.all() or not tile.any(), f"tile ({qb}, {kb}) is not uniform"
        grid[qb, kb] = tile[0, 0]
    return grid


@pytest.mark.parametrize("size,q_len,kv_len", [(1, 12, 12), (3, 20, 31), (4, 13, 7), (5, 5, 40), (2, 1, 9)])
@pytest.mark.parametrize("per_row", [1, 2, 3, 5, 50])
def test_random_picks_exactly_min_per_row_blocks(size, q_len, kv_len, per_row):
    got = dense(blocks(size).random(per_row, 7), q_len, kv_len)[0]
    grid = block_grid(got, size)
    nkb = ceil_div(kv_len, size)
    assert grid.sum(dim=1).tolist() == [min(per_row, nkb)] * ceil_div(q_len, size)


def test_random_is_deterministic_and_seeded():
    p = blocks(2).random(3, 11)
    first = dense(p, 32, 32)
    assert torch.equal(first, dense(p, 32, 32))
    assert torch.equal(first, dense(blocks(2).random(3, 11), 32, 32))
    others = [dense(blocks(2).random(3, seed), 32, 32) for seed in (0, 1, 12, 1000)]
    assert all(not torch.equal(first, other) for other in others)
    assert not torch.equal(others[0], others[1])


def test_random_row_depends_only_on_seed_row_and_key_blocks():
    # Growing Q adds rows without changing the existing ones.
    small = dense(blocks(3).random(2, 5), 10, 30)
    large = dense(blocks(3).random(2, 5), 29, 30)
    assert torch.equal(small, large[:, :10])


def test_random_matches_its_layout_function():
    got = block_grid(dense(blocks(4).random(2, 3), 30, 27)[0], 4)
    assert torch.equal(got, random_block_layout(8, 7, 2, 3))
    picks = random_block_picks(8, 7, 2, 3)
    assert picks.shape == (8, 2)
    assert [set(row) for row in picks.tolist()] == [random_row(3, qb, 7, 2) for qb in range(8)]


@settings(max_examples=150, deadline=None)
@given(num_qb=st.integers(0, 40), num_kb=st.integers(1, 70), per_row=st.integers(1, 80),
       seed=st.one_of(st.integers(0, 2**20), st.just(2**40 + 7)), row_chunk=st.sampled_from([None, 1, 7]))
def test_random_picks_are_the_stated_rule(num_qb, num_kb, per_row, seed, row_chunk):
    """Each row's picks: ``min(per_row, n)`` distinct blocks in ``[0, n)``, the set Floyd's
    steps give (written plainly); per_row above ``2 sqrt(n)`` runs the bitmap path."""
    width = min(per_row, num_kb)
    picks = random_block_picks(num_qb, num_kb, per_row, seed, row_chunk=row_chunk)
    assert picks.shape == (num_qb, width) and picks.dtype == torch.int64
    for qb, row in enumerate(picks.tolist()):
        assert len(set(row)) == width and all(0 <= kb < num_kb for kb in row)
        assert set(row) == random_row(seed, qb, num_kb, per_row), qb
    rows = torch.arange(num_qb).flip(0)[::2]  # any rows, in any order
    assert torch.equal(block_picks_of_rows(rows, num_kb, per_row, seed), picks[rows])
    causal = random_causal_block_picks(num_qb, per_row, seed)
    assert causal.shape == (num_qb, min(per_row, num_qb))
    for qb, row in enumerate(causal.tolist()):
        taken = random_row(seed, qb, qb + 1, per_row)
        assert len(taken) == min(per_row, qb + 1) and all(0 <= kb <= qb for kb in taken)
        assert sorted(row) == sorted(list(taken) + [qb] * (len(row) - len(taken)))  # unused slots: qb


def test_random_picks_are_spread_evenly():
    """Over many rows, each of 16 key blocks is taken about ``3 / 16`` of the time (the
    picks of a rule that favoured the last steps' ``j`` would not be)."""
    picks = random_block_picks(8192, 16, 3, 0)
    counts = torch.bincount(picks.flatten(), minlength=16)
    expected = 8192 * 3 / 16  # 1536, standard deviation about 35
    assert (counts - expected).abs().max() < 200, counts.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 7, 2, 3), (300, 257, 5, 11), (1024, 1024, 3, 0), (1500, 900, 4, 2**40 + 7),
                                   (400, 300, 120, 5)])
def test_random_layout_on_cuda_is_the_cpu_layout(shape):
    num_qb, num_kb, per_row, seed = shape
    on_cpu = random_block_layout(num_qb, num_kb, per_row, seed)
    on_cuda = random_block_layout(num_qb, num_kb, per_row, seed, device="cuda")
    assert on_cuda.is_cuda and torch.equal(on_cuda.cpu(), on_cpu)
    # Several row chunks on the device give the same choice as one.
    chunked = random_block_picks(num_qb, num_kb, per_row, seed, row_chunk=97, device="cuda")
    assert torch.equal(chunked.sort(1).values.cpu(), random_block_picks(num_qb, num_kb, per_row, seed).sort(1).values)
    causal = random_causal_block_picks(num_qb, per_row, seed, device="cuda")
    assert torch.equal(causal.cpu(), random_causal_block_picks(num_qb, per_row, seed))


def test_random_combined_with_other_rules():
    size, q_len, kv_len = 3, 20, 25
    picks = [random_row(9, qb, ceil_div(kv_len, size), 2) for qb in range(ceil_div(q_len, size))]
    check(blocks(size).local(0).random(2, 9).causal(),
          lambda q, k: (q // size == k // size or k // size in picks[q // size]) and k // size <= q // size,
          q_len, kv_len)


# ---------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------

LAY_2D = [[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 0, 1, 0], [0, 0, 0, 1, 1]]


def lay_tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


@pytest.mark.parametrize("q_len,kv_len", [(12, 15), (10, 13), (11, 14)])  # 3-blocks: 4 x 5 grid
def test_layout_2d(q_len, kv_len):
    check(blocks(3).layout("lay"), lambda q, k: bool(LAY_2D[q // 3][k // 3]), q_len, kv_len,
          num_heads=2, lay=lay_tensor(LAY_2D))


def test_layout_per_head():
    lay = [LAY_2D, [[1 - v for v in row] for row in LAY_2D], [[1] * 5 for _ in range(4)]]
    check(blocks(3).layout("lay"), lambda h, q, k: bool(lay[h][q // 3][k // 3]), 11, 14,
          num_heads=3, lay=lay_tensor(lay))
    check(blocks(3).layout("lay"), lambda q, k: bool(LAY_2D[q // 3][k // 3]), 11, 14,
          num_heads=3, lay=lay_tensor([LAY_2D]))


def test_layout_cropped_and_padded():
    # Larger than the grid: cropped. Smaller: blocks outside the tensor are not allowed.
    check(blocks(3).layout("lay"), lambda q, k: bool(LAY_2D[q // 3][k // 3]), 7, 8, lay=lay_tensor(LAY_2D))
    check(blocks(2).layout("lay"),
          lambda q, k: q // 2 < 4 and k // 2 < 5 and bool(LAY_2D[q // 2][k // 2]), 13, 15,
          lay=lay_tensor(LAY_2D))


def test_layout_union_with_rules_and_causal():
    check(blocks(3).layout("lay").local(0).causal(),
          lambda q, k: (bool(LAY_2D[q // 3][k // 3]) or q // 3 == k // 3) and k // 3 <= q // 3,
          12, 15, lay=lay_tensor(LAY_2D))


def test_layout_shape_errors():
    with pytest.raises(BufferBindingError):
        dense(blocks(3).layout("lay"), 12, 15, 2, lay=lay_tensor([LAY_2D] * 3))  # 3 heads != 2
    with pytest.raises(BufferBindingError):
        dense(blocks(3).layout("lay"), 12, 15, lay=torch.ones(4, 5))  # not bool
    with pytest.raises(BufferBindingError):
        dense(blocks(3).layout("lay"), 12, 15)  # missing


def test_layout_with_zero_extent_allows_nothing():
    for shape in [(0, 5), (4, 0), (2, 0, 5)]:
        got = dense(blocks(3).layout("lay"), 12, 15, 2, lay=torch.zeros(shape, dtype=torch.bool))
        assert not got.any()


# ---------------------------------------------------------------------------------------
# Head groups, segments, documents
# ---------------------------------------------------------------------------------------

# head -> group for H heads and G groups (first H % G groups get one extra head), by hand
GROUPS = {
    (1, 1): [0],
    (3, 3): [0, 1, 2],
    (4, 3): [0, 0, 1, 2],
    (5, 3): [0, 0, 1, 1, 2],
    (7, 2): [0, 0, 0, 0, 1, 1, 1],
    (6, 4): [0, 0, 1, 1, 2, 3],
    (5, 2): [0, 0, 0, 1, 1],
}


def test_group_of_matches_hand_written_groups():
    for (num_heads, num_groups), groups in GROUPS.items():
        assert [group_of(h, num_heads, num_groups) for h in range(num_heads)] == groups


@pytest.mark.parametrize("num_heads,num_groups", list(GROUPS))
def test_heads_grouping(num_heads, num_groups):
    parts = [causal(), window(1), ~causal(), global_tokens(2)][:num_groups]
    rules = [lambda q, k: k <= q, lambda q, k: abs(q - k) <= 1, lambda q, k: k > q,
             lambda q, k: q < 2 or k < 2]
    groups = GROUPS[(num_heads, num_groups)]
    check(heads(*parts), lambda h, q, k: rules[groups[h]](q, k), 6, 8, num_heads=num_heads)


def test_heads_needs_one_head_per_group():
    with pytest.raises(PatternArgumentError, match="num_heads=2"):
        dense(heads(causal(), full(), window(1)), 4, heads=2)
    with pytest.raises(PatternArgumentError):
        dense(segments([4, 4, 4], [1, 2, 3]), 4, heads=1)


def test_segments_default_offsets():
    assert segments([4, 6, 8], [1, 2, 3]).offsets == (0, 1, 2)
    assert segments([4, 4], [2, 2]).offsets == (0, 1)
    assert segments([8, 8, 8, 8], [2, 2, 2, 2]).offsets == (0, 1, 0, 1)
    assert segments([4, 6], [3, 3], [2, 0]).offsets == (2, 0)


@pytest.mark.parametrize("num_heads", [3, 4, 5])
@pytest.mark.parametrize("q_len,kv_len", [(17, 17), (13, 22)])
def test_segments(num_heads, q_len, kv_len):
    lengths, rates, offsets = [4, 6, 8], [1, 2, 3], [0, 1, 2]  # default offsets i % rate

    def allowed(h, q, k):
        g = GROUPS.get((num_heads, 3)) or [group_of(x, num_heads, 3) for x in range(num_heads)]
        s, r, o = lengths[g[h]], rates[g[h]], offsets[g[h]]
        return q // s == k // s and q % s % r == o and k % s % r == o

    check(segments(lengths, rates), allowed, q_len, kv_len, num_heads=num_heads)
    assert torch.equal(dense(segments(lengths, rates), q_len, kv_len, num_heads),
                       dense(heads(dilated(4, 1), dilated(6, 2, 1), dilated(8, 3, 2)), q_len, kv_len, num_heads))


def test_segments_explicit_offsets():
    check(segments([6, 6], [3, 2], [2, 0]),
          lambda h, q, k: q // 6 == k // 6 and (q % 6 % 3 == 2 and k % 6 % 3 == 2 if h == 0
                                                else q % 6 % 2 == 0 and k % 6 % 2 == 0),
          14, 14, num_heads=2)


@pytest.mark.parametrize("q_len,kv_len", [(24, 24), (20, 13), (13, 30), (1, 9)])
@pytest.mark.parametrize("num_heads", [2, 3])
def test_seed_example_small(q_len, kv_len, num_heads):
    # blocks(256).local(w).within(segments([128, 128], [1, 2])) at 1/32 scale.
    pattern = blocks(8).local(1).within(segments([4, 4], [1, 2]))
    groups = [group_of(h, num_heads, 2) for h in range(num_heads)]

    def allowed(h, q, k):
        if abs(q // 8 - k // 8) > 1:
            return False
        rq, rk = q % 8, k % 8
        if rq // 4 != rk // 4:  # same 4-segment inside the block
            return False
        if groups[h] == 0:
            return True  # rate 1, offset 0
        return rq % 4 % 2 == 1 and rk % 4 % 2 == 1  # rate 2, default offset 1 % 2 == 1

    check(pattern, allowed, q_len, kv_len, num_heads=num_heads)


def test_documents_1d():
    ids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    check(documents("doc"), lambda q, k: ids[q] == ids[k], 10, 10, doc=torch.tensor(ids))
    check(documents("doc") & causal(), lambda q, k: ids[q] == ids[k] and k <= q, 10, 10,
          num_heads=2, doc=torch.tensor(ids))


def test_documents_q_not_k():
    ids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]  # length max(Q, K)
    check(documents("doc"), lambda q, k: ids[q] == ids[k], 4, 10, doc=torch.tensor(ids))
    check(documents("doc"), lambda q, k: ids[q] == ids[k], 10, 6, doc=torch.tensor(ids))


def test_documents_batched():
    ids = [[0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]]
    check(documents("doc"), lambda b, h, q, k: ids[b][q] == ids[b][k], 8, 8, num_heads=2, batch=2,
          doc=torch.tensor(ids))
    check(documents("doc") | heads(window(0), global_tokens(1)),
          lambda b, h, q, k: ids[b][q] == ids[b][k] or (q == k if h == 0 else q < 1 or k < 1),
          8, 5, num_heads=2, batch=2, doc=torch.tensor(ids))


def test_documents_bad_ids():
    with pytest.raises(BufferBindingError):
        dense(documents("doc"), 8, 8, doc=torch.zeros(7, dtype=torch.int64))  # wrong length
    with pytest.raises(BufferBindingError):
        dense(documents("doc"), 8, 8, doc=torch.zeros(8))  # float ids
    with pytest.raises(BufferBindingError):
        dense(documents("doc"), 8, 8, doc=torch.zeros(8, dtype=torch.int64), other=torch.zeros(1))


# ---------------------------------------------------------------------------------------
# Combinators and scores
# ---------------------------------------------------------------------------------------

COMBINATORS = [
    ("|", window(1) | global_tokens(2), lambda q, k: abs(q - k) <= 1 or q < 2 or k < 2),
    ("| of 3", causal() | prefix(3) | strided(4), lambda q, k: k <= q or k < 3 or (q - k) % 4 == 0),
    ("&", causal() & window(3), lambda q, k: q - 3 <= k <= q),
    ("& of 3", causal() & window(3) & strided(2), lambda q, k: q - 3 <= k <= q and (q - k) % 2 == 0),
    ("-", causal() - window(1), lambda q, k: k < q - 1),
    ("- left assoc", full() - causal() - window(2), lambda q, k: k > q + 2),
    ("- right nested", full() - (causal() - window(2)), lambda q, k: not (k <= q and abs(q - k) > 2)),
    ("~", ~causal(), lambda q, k: k > q),
    ("~~", ~~window(1), lambda q, k: abs(q - k) <= 1),
    ("mixed", (chunks(4) | global_tokens(1)) & ~(strided(3) - window(0)),
     lambda q, k: (q // 4 == k // 4 or q < 1 or k < 1) and not ((q - k) % 3 == 0 and q != k)),
    ("blocks | token", blocks(4).local(0) | window(2), lambda q, k: q // 4 == k // 4 or abs(q - k) <= 2),
    ("~blocks", ~blocks(3).causal(), lambda q, k: k // 3 > q // 3),
]


@pytest.mark.parametrize("name,pattern,allowed", COMBINATORS, ids=[c[0] for c in COMBINATORS])
@pytest.mark.parametrize("q_len,kv_len", [(9, 9), (7, 15), (15, 7)])
def test_combinator(name, pattern, allowed, q_len, kv_len):
    check(pattern, allowed, q_len, kv_len, num_heads=2)


def test_heads_inside_combinators():
    pattern = heads(causal(), full()) & window(2) | global_tokens(1)
    check(pattern, lambda h, q, k: ((k <= q if h < 2 else True) and abs(q - k) <= 2) or q < 1 or k < 1,
          7, 9, num_heads=3)


@pytest.mark.parametrize("base", [causal(), window(3) | prefix(2), heads(causal(), blocks(2).local(1)),
                                  segments([4, 4], [1, 2])])
@pytest.mark.parametrize("mods", [(alibi(),), (softcap(5.0),), (bias("bias"),),
                                  (alibi(), softcap(30.0), bias("bias"))])
def test_score_does_not_change_dense(base, mods):
    scored = base.score(*mods)
    buffers = {"bias": torch.randn(2, 9, 11)} if any(isinstance(m, n.Bias) for m in mods) else {}
    assert torch.equal(dense(scored, 9, 11, 2, **buffers), dense(base, 9, 11, 2))
    assert torch.equal(dense(base.score(lambda score, b, h, q, k: score * 2), 9, 11, 2),
                       dense(base, 9, 11, 2))


# ---------------------------------------------------------------------------------------
# Heads parts with their own head dimension (nested groups, per-head layouts)
# ---------------------------------------------------------------------------------------

PER_HEAD_PARTS = [
    ("nested heads", heads(heads(causal(), full()), window(1)), 3, {}),
    ("segments in heads", heads(segments([4, 4], [1, 2]), full()), 4, {}),
    ("within(segments) in heads", heads(blocks(4).local(0).within(segments([2, 2], [1, 2])), causal()), 3, {}),
    ("per-head layout in heads", heads(blocks(2).layout("lay"), full()), 2,
     {"lay": lay_tensor([[[1, 0, 1], [0, 1, 0], [1, 1, 0]], [[0, 1, 1], [1, 0, 0], [0, 0, 1]]])}),
]


@pytest.mark.parametrize("name,pattern,num_heads,buffers", PER_HEAD_PARTS, ids=[c[0] for c in PER_HEAD_PARTS])
def test_mask_mod_heads_part_with_head_dimension(name, pattern, num_heads, buffers):
    """The lowering reads each part at the global head index (allowed(b, h, q, k) of the
    part), which is what the scalar definition says."""
    want = spec_table(pattern, 6, 5, num_heads, buffers)
    ctx = Context.make(pattern, 6, 5, num_heads, buffers=buffers)
    got = evaluate_mask_mod(lower_mask(pattern, ctx), 1, num_heads, 6, 5)[0]
    assert_table(got, want, str(pattern))


@pytest.mark.parametrize("name,pattern,num_heads,buffers", PER_HEAD_PARTS, ids=[c[0] for c in PER_HEAD_PARTS])
def test_dense_heads_part_with_head_dimension(name, pattern, num_heads, buffers):
    # Regression: dense() used to expand each part to its group size, which crashed when the
    # part already had a head dimension.
    want = spec_table(pattern, 6, 5, num_heads, buffers)
    assert_table(dense(pattern, 6, 5, num_heads, **buffers), want, str(pattern))


# ---------------------------------------------------------------------------------------
# Generated patterns: dense == scalar definition, mask_mod == dense
# ---------------------------------------------------------------------------------------


def evaluate_mask_mod(mask_mod, batch, num_heads, q_len, kv_len, dtype=torch.int64):
    """``mask_mod`` on a full broadcast index grid, as ``[B, H, Q, K]`` bool."""
    def ar(size):
        return torch.arange(size, dtype=dtype)

    if batch == 1:
        out = mask_mod(torch.tensor(0, dtype=dtype), ar(num_heads)[:, None, None],
                       ar(q_len)[None, :, None], ar(kv_len)[None, None, :])
        out = out.expand(num_heads, q_len, kv_len)[None]
    else:
        out = mask_mod(ar(batch)[:, None, None, None], ar(num_heads)[None, :, None, None],
                       ar(q_len)[None, None, :, None], ar(kv_len)[None, None, None, :])
        out = out.expand(batch, num_heads, q_len, kv_len)
    assert out.dtype == torch.bool
    return out


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pattern_cases(allow_scores=True, vary_layout_shape=True))
def test_mask_mod_matches_dense(case):
    pattern, q_len, kv_len, num_heads, buffers = case
    want = dense(pattern, q_len, kv_len, num_heads, **buffers)
    if want.dim() == 3:
        want = want[None]
    batch = want.shape[0]
    ctx = Context.make(pattern, q_len, kv_len, num_heads, buffers=buffers)
    mask_mod = lower_mask(pattern, ctx)
    got = evaluate_mask_mod(mask_mod, batch, num_heads, q_len, kv_len)
    assert torch.equal(got, want), f"{pattern}: {int((got != want).sum())} pairs differ"
    # FlexAttention's vmap calls it with 0-d int32 b and h: check one (b, h) that way.
    b, h = batch - 1, num_heads - 1
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    one = mask_mod(i32(b), i32(h), torch.arange(q_len, dtype=torch.int32)[:, None],
                   torch.arange(kv_len, dtype=torch.int32)[None, :])
    assert torch.equal(one.expand(q_len, kv_len), want[b, h])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pattern_cases(max_depth=2, allow_scores=True, max_len=20, vary_layout_shape=True))
def test_dense_matches_scalar_definition(case):
    pattern, q_len, kv_len, num_heads, buffers = case
    got = dense(pattern, q_len, kv_len, num_heads, **buffers)
    assert_table(got, spec_table(pattern, q_len, kv_len, num_heads, buffers), str(pattern))
