"""Multiset patterns (``a + b``) and ``longnet(segment_lengths, dilation_rates)``.

LongNet's multiplicities are checked against a reference written here from the statement of
its semantics (every head runs every branch; in a branch of rate ``r`` the heads form groups
of ``ceil(H / r)``, group ``j`` keeping the positions with ``(p mod w) mod r == j`` of each
segment, a segment longer than the sequence cut to the sequence; the branches' outputs
merged by softmax over their log-sum-exps), on hypothesis-generated configurations with
head counts the rates do not divide and lengths that are not multiples of the segments.
Attention is checked against a softmax per branch merged by log-sum-exp, and against the
shared float64 reference (``log m`` added to the scores), gradients included.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl as sd
from sparsedsl.analysis.formula import N
from sparsedsl.lang import nodes as n
from sparsedsl.lang.multiset import is_multiset, multiset_terms
from sparsedsl.passes.context import Context
from sparsedsl.passes.maskmod import lower_mask, lower_multiplicity
from sparsedsl.passes.tiles import EMPTY, FULL, PARTIAL

from reference import reference_attention
from strategies import min_heads, patterns

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- an independent statement of LongNet --------------------------------------------------------


def longnet_branch_sets(lengths, rates, heads: int, length: int) -> list[torch.Tensor]:
    """One ``[heads, length, length]`` bool tensor per branch: the pairs the branch attends."""
    branches = []
    p = torch.arange(length)
    for w, r in zip(lengths, rates):
        w = min(w, length)  # a segment longer than the sequence is cut to it
        per_group = math.ceil(heads / r)
        allowed = torch.zeros(heads, length, length, dtype=torch.bool)
        for h in range(heads):
            kept = (p % w) % r == h // per_group
            same_segment = (p[:, None] // w) == (p[None, :] // w)
            allowed[h] = same_segment & kept[:, None] & kept[None, :]
        branches.append(allowed)
    return branches


def longnet_reference_multiplicity(lengths, rates, heads, length, causal) -> torch.Tensor:
    total = torch.zeros(heads, length, length, dtype=torch.int64)
    lower = torch.ones(length, length, dtype=torch.bool).tril()
    for allowed in longnet_branch_sets(lengths, rates, heads, length):
        total += (allowed & lower if causal else allowed).long()
    return total


def merged_branches(lengths, rates, causal, q, k, v) -> torch.Tensor:
    """Attention per branch (its own softmax), outputs merged with weights softmax over the
    branches' log-sum-exps (a row a branch does not cover has lse -inf: weight 0)."""
    heads, length = q.shape[1], q.shape[2]
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lower = torch.ones(length, length, dtype=torch.bool).tril()
    outs, lses = [], []
    for allowed in longnet_branch_sets(lengths, rates, heads, length):
        allowed = allowed & lower if causal else allowed
        masked = scores.masked_fill(~allowed, float("-inf"))
        lses.append(torch.logsumexp(masked, -1))
        outs.append(torch.softmax(masked, -1).nan_to_num(0.0) @ v.double())
    lse = torch.stack(lses)  # [branches, B, H, N]
    weights = torch.softmax(lse, 0).nan_to_num(0.0)
    return (weights[..., None] * torch.stack(outs)).sum(0)


@st.composite
def longnet_configs(draw):
    branches = draw(st.integers(1, 4))
    lengths = [draw(st.integers(1, 40)) for _ in range(branches)]
    rates = [draw(st.integers(1, min(w, 6))) for w in lengths]
    heads = draw(st.integers(1, 7))
    length = draw(st.integers(1, 60))
    return lengths, rates, heads, length, draw(st.booleans())


def longnet_pattern(lengths, rates, causal):
    pattern = sd.longnet(lengths, rates)
    return pattern & sd.causal() if causal else pattern


# -- LongNet ------------------------------------------------------------------------------------


@SETTINGS
@given(longnet_configs(), st.sampled_from([4, 8, 16]))
def test_longnet_multiplicities_and_counts_equal_the_statement(config, tile):
    lengths, rates, heads, length, causal = config
    pattern = longnet_pattern(lengths, rates, causal)
    expected = longnet_reference_multiplicity(lengths, rates, heads, length, causal)
    dense = sd.dense(pattern, length, heads=heads)
    assert dense.dtype == torch.int32
    assert torch.equal(dense.long(), expected)
    counts = sd.count(pattern, length, heads=heads, tile=tile)
    assert list(counts.per_head) == [int(x) for x in (expected > 0).sum((1, 2))]
    assert list(counts.per_head_with_multiplicity) == [int(x) for x in expected.sum((1, 2))]
    assert counts.pairs_with_multiplicity == int(expected.sum())
    again = sd.parse(str(pattern))
    assert again == pattern and hash(again) == hash(pattern)


@SETTINGS
@given(longnet_configs())
def test_longnet_formula_counts_with_multiplicity(config):
    lengths, rates, _, length, _ = config
    pattern = sd.longnet(lengths, rates)  # one head (its head-group count)
    expected = longnet_reference_multiplicity(lengths, rates, 1, length, False)
    assert int(sd.formula(pattern).subs(N, length)) == int(expected.sum())


@SETTINGS
@given(longnet_configs(), st.sampled_from([16, 32]), st.integers(1, 2))
def test_longnet_attention_is_the_lse_merge_of_its_branches_with_gradients(config, block, batch):
    lengths, rates, heads, length, causal = config
    pattern = longnet_pattern(lengths, rates, causal)
    gen = torch.Generator().manual_seed(length * 31 + heads)
    q, k, v = (torch.randn(batch, heads, length, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = sd.compile(pattern, block_size=block)(q, k, v)
    merged = merged_branches(lengths, rates, causal, q, k, v)
    reference, _ = reference_attention(pattern, q, k, v)
    torch.testing.assert_close(out, merged, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((merged * weights).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_longnet_float32_outputs_match_the_reference():
    pattern = sd.longnet([16, 32, 48], [1, 2, 3]) & sd.causal()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 100, 16, generator=gen) for _ in range(3))
    out = sd.compile(pattern, block_size=16)(q, k, v)
    torch.testing.assert_close(out.double(), reference_attention(pattern, q, k, v)[0], rtol=1e-4, atol=1e-5)


def test_longnet_module_takes_any_head_count_and_bnhd_inputs():
    module = sd.LongNetAttention([8, 16, 24], [1, 2, 3])
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 50, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        out = module(q, k, v, is_causal=causal)
        ref = merged_branches([8, 16, 24], [1, 2, 3], causal, *(t.transpose(1, 2) for t in (q, k, v)))
        torch.testing.assert_close(out, ref.transpose(1, 2))
    assert module.pattern_for(True) == sd.longnet([8, 16, 24], [1, 2, 3]) & sd.causal()
    with pytest.raises(ValueError, match="dilation_rates"):
        sd.LongNetAttention([8], [1, 2])


def test_longnet_paper_configuration_counts_every_branch():
    lengths, rates = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]
    counts = sd.count(sd.longnet(lengths, rates), 32768, heads=12, tile=512)
    # Head h keeps, in the branch (w, r), the positions j, j + r, ... of each segment, j = h //
    # ceil(12 / r): their square per segment, 32768 / w segments.
    expected = tuple(sum((32768 // w) * len(range(h // math.ceil(12 / r), w, r)) ** 2
                         for w, r in zip(lengths, rates)) for h in range(12))
    assert counts.per_head_with_multiplicity == expected
    assert counts.pairs < counts.pairs_with_multiplicity
    assert "with multiplicity" in str(counts)


@pytest.mark.parametrize("build", [
    lambda: (sd.window(1) + sd.chunks(2)).starting_at(1),
    lambda: sd.cycle_heads(sd.causal(), sd.window(1) + sd.chunks(2)),
    lambda: sd.documents("d").within(sd.window(1) + sd.chunks(2)),
    lambda: sd.longnet([4], [2]).starting_at(1),
    lambda: sd.parse("cycle_heads(longnet([4], [2]))"),
    lambda: sd.parse("documents('d').within(longnet([4], [2]))"),
])
def test_a_multiset_is_refused_where_each_pair_counts_once(build):
    """Offsets, documents' rules and cyclic head groups take sets: a multiset there is
    refused when the pattern is built (its counts would be lost, even inside a sum)."""
    with pytest.raises(ValueError, match="must allow each pair once"):
        build()


def test_longnet_arguments_are_checked():
    with pytest.raises(ValueError, match="segment_lengths"):
        sd.longnet([8, 16], [1])
    with pytest.raises(ValueError, match=r"dilation_rates\[0\] must be <= segment_lengths\[0\]"):
        sd.longnet([2], [3])
    with pytest.raises(ValueError, match="rate"):
        sd.dilated_heads(2, 3)


def test_longnet_structure_for_plans():
    pattern = sd.longnet([8, 16], [1, 2])
    assert pattern.branches() == (n.DilatedHeads(8, 1), n.DilatedHeads(16, 2))
    assert pattern.expand() == sd.dilated_heads(8, 1) + sd.dilated_heads(16, 2)
    assert n.DilatedHeads(16, 3).groups(5) == [(range(0, 2), n.Dilated(16, 3, 0)),
                                               (range(2, 4), n.Dilated(16, 3, 1)),
                                               (range(4, 5), n.Dilated(16, 3, 2))]
    assert n.DilatedHeads(16, 4).groups(5) == [(range(0, 2), n.Dilated(16, 4, 0)),
                                               (range(2, 4), n.Dilated(16, 4, 1)),
                                               (range(4, 5), n.Dilated(16, 4, 2))]  # group 3 is empty
    assert multiset_terms(pattern & sd.causal()) == (sd.dilated_heads(8, 1) & sd.causal(),
                                                     sd.dilated_heads(16, 2) & sd.causal())
    assert sd.parse(str(pattern.expand())) == pattern.expand()


# -- multisets in general -----------------------------------------------------------------------

SETS = patterns(max_depth=2, allow_buffers=False)


@st.composite
def multisets(draw):
    """A multiset expression over generated set patterns, with every operator that takes one."""
    a, b, c = draw(SETS), draw(SETS), draw(SETS)
    base = draw(st.sampled_from(["a+b", "a+a", "longnet"]))
    m = {"a+b": a + b, "a+a": a + a, "longnet": sd.longnet([draw(st.integers(1, 20))], [1])
         + sd.dilated_heads(draw(st.integers(2, 20)), 2)}[base]
    shape = draw(st.sampled_from(["m", "m&c", "c&m", "m|c", "c|m", "m-c", "c-m", "~m", "m+c", "heads",
                                  "m&m", "score"]))
    return {"m": m, "m&c": m & c, "c&m": c & m, "m|c": m | c, "c|m": c | m, "m-c": m - c, "c-m": c - m,
            "~m": ~m, "m+c": m + c, "heads": sd.heads(m, c), "m&m": m & (b + c),
            "score": m.score(sd.softcap(3.0))}[shape]


def multiplicity_by_meaning(p: n.Pattern, length: int, heads: int) -> torch.Tensor:
    """The multiplicities of ``p`` from the meaning of each operator, on dense set tensors."""
    def of(node):
        if isinstance(node, n.Sum):
            return sum(of(part) for part in node.parts)
        if isinstance(node, n.Intersection):
            out = of(node.parts[0])
            for part in node.parts[1:]:
                out = out * of(part)
            return out
        if isinstance(node, n.Union):
            out = of(node.parts[0])
            for part in node.parts[1:]:
                out = torch.maximum(out, of(part))
            return out
        if isinstance(node, n.Difference):
            return of(node.left) * (of(node.right) == 0)
        if isinstance(node, n.Complement):
            return (of(node.inner) == 0).long()
        if isinstance(node, n.Scored):
            return of(node.pattern)
        if isinstance(node, n.LongNet):
            return of(node.expand())
        if isinstance(node, n.Heads):
            groups = [len(g) for g in n_head_groups(heads, len(node.parts))]
            return torch.cat([of(part)[sum(groups[:i]):sum(groups[:i + 1])] for i, part in enumerate(node.parts)])
        assert not is_multiset(node)
        return sd.dense(node, length, heads=heads).long()
    return of(p)


def n_head_groups(heads, groups):
    from sparsedsl.lang.groups import head_groups
    return head_groups(heads, groups)


@SETTINGS
@given(multisets(), st.integers(1, 40), st.integers(0, 2), st.sampled_from([3, 8]))
def test_multiset_dense_lowering_tiles_and_counts_agree(pattern, length, extra_heads, tile):
    heads = min_heads(pattern) + extra_heads
    expected = multiplicity_by_meaning(pattern, length, heads)
    dense = sd.dense(pattern, length, heads=heads)
    assert torch.equal(dense.long() if dense.dtype != torch.bool else dense.long(), expected)
    assert is_multiset(pattern) == (dense.dtype == torch.int32)
    # Terms add up to the multiplicities; the lowerings agree with the dense form.
    terms = sum(sd.dense(t, length, heads=heads).long() for t in multiset_terms(pattern))
    assert torch.equal(terms, expected)
    ctx = Context(length, length, heads)
    h = torch.arange(heads)[:, None, None]
    q = torch.arange(length)[None, :, None]
    k = torch.arange(length)[None, None, :]
    zero = torch.zeros((), dtype=torch.int64)
    assert torch.equal(lower_mask(pattern, ctx)(zero, h, q, k).expand(heads, length, length), expected > 0)
    assert torch.equal(lower_multiplicity(pattern, ctx)(zero, h, q, k).long().expand(heads, length, length),
                       expected)
    # Tile classes by where a pair is allowed.
    counts = sd.count(pattern, length, heads=heads, tile=tile)
    assert counts.pairs == int((expected > 0).sum())
    assert counts.pairs_with_multiplicity == int(expected.sum())
    lowering = sd.compile(pattern).lowering(length, heads=heads, tiles=(tile, tile))
    states = lowering.states[0].expand(heads, -1, -1)
    cells = torch.nn.functional.pad((expected > 0).float(), (0, -length % tile, 0, -length % tile))
    grid = cells.unfold(1, tile, tile).unfold(2, tile, tile).sum((-1, -2))
    assert torch.equal(states == EMPTY, grid == 0)
    assert not bool((states == FULL)[grid != tile * tile].any())
    assert bool(((states == PARTIAL) | (states == FULL))[grid > 0].all())
    again = sd.parse(str(pattern))
    assert again == pattern and hash(again) == hash(pattern)


@SETTINGS
@given(multisets(), st.integers(1, 40), st.integers(0, 2))
def test_multiset_attention_equals_the_reference_with_gradients(pattern, length, extra_heads):
    heads = min_heads(pattern) + extra_heads
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, heads, length, 4, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    out = sd.compile(pattern, block_size=16)(q, k, v)
    reference, _ = reference_attention(pattern, q, k, v)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)
    assert not out.isnan().any()
    got = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(reference.sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_sum_counts_a_pair_twice_in_one_softmax():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64) for _ in range(3))
    doubled = sd.compile(sd.causal() + sd.window(0))(q, k, v)
    scores = (q @ k.transpose(-1, -2))[0, 0] * 0.5
    weights = torch.exp(scores).tril() * (1 + torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(doubled[0, 0], (weights / weights.sum(-1, keepdim=True)) @ v[0, 0])


def test_multiset_operators_errors_and_text():
    a, b = sd.window(1), sd.causal()
    assert str(a + b - sd.window(0)) == "window(1) + causal() - window(0)"
    assert str(sd.window(0) - (a + b)) == "window(0) - (window(1) + causal())"
    assert str((a - b) + b) == "(window(1) - causal()) + causal()"
    assert str(~(a + b) & b) == "~(window(1) + causal()) & causal()"
    for text in ["window(1) + causal() | prefix(2)", "heads(window(1) + causal(), full())",
                 "(window(1) + causal()).score(alibi())", "longnet([4, 8], [1, 2]) & causal() + full()"]:
        assert str(sd.parse(text)) == str(sd.parse(str(sd.parse(text))))
    assert a + (b + a) == a + b + a
    with pytest.raises(sd.PatternOperandError, match="both count some pairs more than once"):
        (a + b) | (b + a)
    with pytest.raises(sd.PatternArgumentError, match="within"):
        sd.blocks(8).within(a + b)
    with pytest.raises(sd.PatternOperandError, match="score modifications"):
        a + b.score(sd.alibi())
    with pytest.raises(sd.PatternOperandError):
        sum([a, b])
    with pytest.raises(sd.PatternSyntaxError, match="both count"):
        sd.parse("(window(1) + causal()) | (causal() + full())")


def test_mask_only_plans_refuse_a_multiset():
    explanation = sd.compile(sd.causal() + sd.causal()).explain(256, device="cpu")
    text = str(explanation)
    assert "sdpa" in text and "gather" in text.split("*")[-1]
    module = sd.compile(sd.longnet([64], [2]))
    assert module.score_mod(128, heads=2) is not None


def test_show_render_and_diagram_show_multiplicities(tmp_path):
    pattern = sd.longnet([16, 32], [1, 2]) & sd.causal()
    text = sd.show(pattern, 64, heads=2, tile=8, file=io.StringIO())
    assert "with multiplicity" in text and "2" in text.split("heads")[1]
    from sparsedsl.draw.render import panels
    found, _ = panels(pattern, 64, heads=2, max_cells=64)
    for panel in found:
        dense = sd.dense(pattern, 64, heads=2)[panel["heads"][0]].double()
        torch.testing.assert_close(panel["cells"].fractions, dense)
    assert sd.render(pattern, 64, tmp_path / "p.png", heads=2).exists()
