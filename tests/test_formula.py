"""``sparsedsl.formula`` equals ``count(...).pairs`` at every N tried, small N and
non-multiples of every size included."""

from __future__ import annotations

import pytest
import sympy as sp
import torch
from hypothesis import given, settings

import sparsedsl as sd
from sparsedsl.analysis.count import count
from sparsedsl.analysis.formula import N, NoClosedFormError, formula, tidy
from sparsedsl.lang.queries import head_group_count

from strategies import patterns

#: Small N (every one up to 40), then around the sizes used below.
LENGTHS = list(range(1, 70)) + [47, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257, 300, 383, 511, 513, 700]

SUPPORTED = [
    # every primitive
    sd.full(), sd.causal(), sd.window(0), sd.window(3), sd.window(5, 2), sd.window(0, 7),
    sd.dilated_window(4, 7, 3), sd.dilated_window(9, 0, 2), sd.chunks(1), sd.chunks(5), sd.chunks(64),
    sd.strided(1), sd.strided(3), sd.strided(16), sd.dilated(6, 2, 1), sd.dilated(16, 4), sd.dilated(7, 7, 3),
    sd.global_tokens(1), sd.global_tokens(9), sd.prefix(1), sd.prefix(13),
    # unions, intersections, differences, complements that close
    sd.causal() | sd.prefix(10), sd.window(6) | sd.global_tokens(4), sd.window(8) | sd.strided(5),
    sd.window(3) | sd.window(1, 9), sd.causal() & sd.chunks(8), sd.chunks(8) & sd.window(2),
    sd.window(12) - sd.strided(3), ~sd.window(4), ~sd.causal() | sd.prefix(3),
    sd.dilated(12, 2) | sd.dilated(12, 3, 1), sd.chunks(4) | sd.chunks(12), sd.causal() | sd.global_tokens(3),
    sd.window(5) & sd.prefix(7), sd.dilated_window(10, 10, 2) | sd.dilated_window(10, 10, 3),
    # block patterns
    sd.blocks(4), sd.blocks(4).local(1), sd.blocks(8).local(2).causal(), sd.blocks(3).causal(),
    sd.blocks(4).global_(2), sd.blocks(4).global_(1) | sd.blocks(4).local(0),
    sd.blocks(4).local(1).global_(1).causal(), sd.blocks(5).dilated([2, 3]),
    sd.blocks(4).dilated([2], window=6), sd.blocks(8).local(0).within(sd.causal()),
    sd.blocks(16).local(1).within(sd.dilated(8, 2, 1)), sd.blocks(12).local(1).within(sd.dilated(5, 2)),
    sd.blocks(8).within(sd.window(2) | sd.global_tokens(1)),
    # head groups: the sum over one head per group
    sd.segments([8, 16], [1, 2]), sd.heads(sd.causal(), sd.window(2), sd.chunks(6)),
    sd.blocks(32).local(1).within(sd.segments([16, 16], [1, 2])),
    sd.heads(sd.causal(), sd.heads(sd.window(1), sd.prefix(2))),
]


def at(expr, n: int) -> int:
    value = expr.xreplace({N: sp.Integer(n)})
    assert value.is_Integer, (expr, n, value)
    return int(value)


def pairs_by_length(pattern, heads: int, longest: int) -> torch.Tensor:
    """``[longest + 1]``: allowed pairs of the top-left ``n x n`` corner, all heads (the
    supported patterns do not depend on the length, so every ``n`` reads one dense mask)."""
    allowed = sd.dense(pattern, longest, heads=heads).to(torch.int64).sum(0)
    corner = allowed.cumsum(0).cumsum(1).diagonal()
    return torch.cat([torch.zeros(1, dtype=torch.int64), corner])


@pytest.mark.parametrize("pattern", SUPPORTED, ids=str)
def test_formula_equals_count(pattern):
    expr = formula(pattern)
    assert expr.free_symbols <= {N}
    heads = head_group_count(pattern)
    by_length = pairs_by_length(pattern, heads, max(LENGTHS))
    for n in LENGTHS:
        assert at(expr, n) == by_length[n], (pattern, n, expr)
    for n in (1, 7, 129, 257, 700):
        assert at(expr, n) == count(pattern, n, heads=heads).pairs, (pattern, n, expr)


def test_readable_closed_forms():
    w = 5
    assert formula(sd.window(w)) == sp.Piecewise((N * (2 * w + 1) - w * (w + 1), N >= w + 1), (N ** 2, True))
    assert formula(sd.window(256)) == sp.Piecewise((513 * N - 65792, N >= 257), (N ** 2, True))
    assert formula(sd.causal()) == N ** 2 / 2 + N / 2
    assert formula(sd.full()) == N ** 2
    assert formula(sd.global_tokens(4)) == sp.Piecewise((8 * N - 16, N >= 4), (N ** 2, True))
    assert formula(sd.prefix(5)) == sp.Piecewise((5 * N, N >= 5), (N ** 2, True))
    assert formula(sd.chunks(5)) == 25 * sp.floor(N / 5) + sp.Mod(N, 5) ** 2
    assert formula(sd.causal() | sd.prefix(4)) == sp.Piecewise((N ** 2 / 2 + N / 2 + 6, N >= 4), (N ** 2, True))


def test_seed_block_formula():
    # Two head groups, one block of local window: 40,960 pairs per 256 tokens for N = 256.
    p = sd.blocks(256).local(0).within(sd.segments([128, 128], [1, 2]))
    expr = formula(p)
    assert expr.subs(N, 256) == 32768 + 8192
    assert expr.subs(N, 256 * 64) == 64 * (32768 + 8192)


@pytest.mark.parametrize("pattern, name", [
    (sd.documents("doc"), "documents('doc')"),
    (sd.blocks(4).random(1, 7), ".random(1, 7)"),
    (sd.blocks(4).layout("lay"), ".layout('lay')"),
    (sd.window(3) & sd.dilated(16, 2), "window(3) & dilated(16, 2)"),
    (sd.causal() | sd.blocks(8).random(2, 0), "random(2, 0)"),
])
def test_no_closed_form_is_a_clear_error(pattern, name):
    with pytest.raises(NoClosedFormError, match="no closed form") as info:
        formula(pattern)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_tidy_keeps_what_it_cannot_split():
    expr = sp.Min(sp.Mod(N, 3), 1) * N
    assert tidy(expr) == expr


@settings(max_examples=25)
@given(patterns(max_depth=2, allow_buffers=False))
def test_formula_of_generated_patterns(pattern):
    try:
        expr = formula(pattern)
    except NoClosedFormError:
        return
    heads = head_group_count(pattern)
    for n in (1, 2, 3, 5, 8, 13, 31, 64, 100, 129):
        assert at(expr, n) == count(pattern, n, heads=heads).pairs, (pattern, n)
