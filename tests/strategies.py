"""Hypothesis strategies shared by the whole test suite.

Public names:

* ``patterns(max_depth=3, allow_buffers=True, allow_scores=False)`` -- random pattern
  expressions over the whole vocabulary of DESIGN.md §2.
* ``pattern_cases(max_depth=3, allow_buffers=True, allow_scores=False, max_len=300,
  max_heads=4, vary_layout_shape=False)`` -- ``(pattern, q_len, kv_len, heads, buffers)``.
* ``min_heads(pattern)`` -- the fewest heads the pattern's head groups need.
* ``bind_buffers(pattern, q_len, kv_len, heads, rng, *, vary_layout_shape=False)`` -- a dict
  binding every name of ``pattern.buffer_names()`` (usable without hypothesis).

Buffer names used by generated patterns: ``documents('doc')``, ``blocks(s).layout('lay')``,
``.score(bias('bias'))``. Sizes are kept small so that a dense ``[B, H, Q, K]`` reference of
a case costs at most a few hundred thousand booleans.
"""

from __future__ import annotations

import random as _random

import torch
from hypothesis import strategies as st

from sparsedsl import (
    alibi,
    bias,
    blocks,
    causal,
    chunks,
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

__all__ = [
    "BLOCK_SIZES",
    "bind_buffers",
    "block_builders",
    "layout_block_size",
    "min_heads",
    "pattern_cases",
    "patterns",
    "primitives",
    "within_rules",
]

#: Block sizes drawn by ``blocks(size)``: small, with non powers of two.
BLOCK_SIZES = (1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 32, 48)

#: Lengths that are worth hitting often (1, powers of two and their neighbours).
_SPECIAL_LENGTHS = (1, 2, 3, 5, 8, 16, 17, 31, 64, 100, 127, 128, 129, 200, 255, 256, 300)

_MAX_GROUPS = 4  # heads(...) / segments(...) never need more than 4 heads

#: Node kinds drawn at each level of a generated expression (leaves weighted up).
_COMBINATORS = ("leaf", "leaf", "leaf", "blocks", "|", "&", "-", "~", "heads")
_WITHIN_COMBINATORS = ("leaf", "leaf", "leaf", "|", "&", "-", "~", "heads")


# ---------------------------------------------------------------------------------------
# Helpers usable without hypothesis
# ---------------------------------------------------------------------------------------


def min_heads(pattern: n.Pattern) -> int:
    """The smallest head count ``pattern`` can be evaluated with.

    ``heads(p0, ..., p_{G-1})`` needs ``G`` heads and ``segments(lengths, ...)`` needs
    ``len(lengths)``; nested groups (inside ``heads`` parts, combinators, ``.within`` rules)
    are split over the same global heads, so the requirement is the maximum over the tree.
    """
    need = 1
    if isinstance(pattern, n.Heads):
        need = len(pattern.parts)
    elif isinstance(pattern, n.Segments):
        need = len(pattern.lengths)
    for child in pattern.children():  # Blocks' child is its within-rule
        need = max(need, min_heads(child))
    return need


def _walk(pattern: n.Pattern):
    yield pattern
    for child in pattern.children():
        yield from _walk(child)


def layout_block_size(pattern: n.Pattern, name: str) -> int | None:
    """The block size of the first ``blocks(size)`` (pre-order) that uses ``.layout(name)``.

    If several block sizes use the same name, the tensor is shaped for the first one; the
    context crops (or pads with False) the layout to every other block grid."""
    for node in _walk(pattern):
        if isinstance(node, n.Blocks):
            for rule in node.rules:
                if isinstance(rule, n.BlockLayout) and rule.name == name:
                    return node.size
    return None


def _buffer_kinds(pattern: n.Pattern) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for node in _walk(pattern):
        if isinstance(node, n.Documents):
            kinds.setdefault(node.name, "documents")
        elif isinstance(node, n.Blocks):
            for rule in node.rules:
                if isinstance(rule, n.BlockLayout):
                    kinds.setdefault(rule.name, "layout")
        elif isinstance(node, n.Scored):
            for mod in node.mods:
                if isinstance(mod, n.Bias):
                    kinds.setdefault(mod.name, "bias")
    return kinds


def _document_ids(length: int, gen: torch.Generator, rng: _random.Random) -> torch.Tensor:
    """Sorted random document ids ``[length]`` (1..6 documents of random lengths)."""
    num_docs = rng.randint(1, 6)
    ids = torch.randint(0, num_docs, (length,), generator=gen, dtype=torch.int64)
    return torch.sort(ids).values


def bind_buffers(pattern: n.Pattern, q_len: int, kv_len: int, heads: int, rng,
                 *, vary_layout_shape: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for every name in ``pattern.buffer_names()``.

    * ``documents(name)``: int64 sorted ids of length ``max(q_len, kv_len)``, sometimes
      batched as ``[2, L]``.
    * ``.layout(name)``: a random bool ``[nqb, nkb]`` or ``[heads, nqb, nkb]`` tensor for the
      first block size using it (``nqb = ceil(q_len / size)``); with ``vary_layout_shape``
      the extents are sometimes one block short or long (the context crops / pads).
    * ``bias(name)``: random float32 ``[heads, q_len, kv_len]``.

    ``rng`` is a ``random.Random`` (or an int seed); tensors come from a torch generator
    seeded by it, so the result is reproducible.
    """
    if not isinstance(rng, _random.Random):
        rng = _random.Random(rng)
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    length = max(q_len, kv_len)
    out: dict[str, torch.Tensor] = {}
    for name, kind in sorted(_buffer_kinds(pattern).items()):
        if kind == "documents":
            if rng.random() < 0.3:
                out[name] = torch.stack([_document_ids(length, gen, rng) for _ in range(2)])
            else:
                out[name] = _document_ids(length, gen, rng)
        elif kind == "layout":
            size = layout_block_size(pattern, name)
            nqb, nkb = -(-q_len // size), -(-kv_len // size)
            if vary_layout_shape and rng.random() < 0.3:
                nqb = max(1, nqb + rng.choice((-1, 1)))
                nkb = max(1, nkb + rng.choice((-1, 0, 1)))
            density = rng.choice((0.1, 0.3, 0.5, 0.9))
            shape = (nqb, nkb) if rng.random() < 0.6 else (heads, nqb, nkb)
            out[name] = torch.rand(shape, generator=gen) < density
        else:  # bias
            out[name] = torch.randn(heads, q_len, kv_len, generator=gen, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------
# Pattern strategies
# ---------------------------------------------------------------------------------------

_windows = st.integers(0, 40)


@st.composite
def _window(draw):
    before = draw(_windows)
    if draw(st.booleans()):
        return window(before)
    return window(before, draw(_windows))  # asymmetric (or explicitly symmetric)


@st.composite
def _dilated_window(draw):
    return dilated_window(draw(_windows), draw(_windows), draw(st.integers(1, 6)))


@st.composite
def _dilated(draw):
    segment = draw(st.integers(1, 48))
    rate = draw(st.integers(1, min(segment, 8)))
    offset = draw(st.integers(0, rate - 1))
    if offset == 0 and draw(st.booleans()):
        return dilated(segment, rate)
    return dilated(segment, rate, offset)


@st.composite
def _segments(draw):
    groups = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 48)) for _ in range(groups)]
    rates = [draw(st.integers(1, min(length, 6))) for length in lengths]
    if draw(st.booleans()):
        return segments(lengths, rates)  # default offsets i % rates[i]
    offsets = [draw(st.integers(0, r - 1)) for r in rates]
    return segments(lengths, rates, offsets)


def primitives(allow_buffers: bool = True) -> st.SearchStrategy[n.Pattern]:
    """Token-level primitives (and ``segments``), ``documents('doc')`` when allowed."""
    options = [
        st.just(full()),
        st.just(causal()),
        _window(),
        _dilated_window(),
        st.builds(chunks, st.integers(1, 48)),
        st.builds(strided, st.integers(1, 16)),
        _dilated(),
        st.builds(global_tokens, st.integers(1, 40)),
        st.builds(prefix, st.integers(1, 64)),
        _segments(),
    ]
    if allow_buffers:
        options.append(st.just(documents("doc")))
    return st.sampled_from(options).flatmap(lambda strategy: strategy)


def within_rules(max_depth: int = 1) -> st.SearchStrategy[n.Pattern]:
    """Token-level rules without buffers for ``blocks(size).within(rule)``: primitives,
    ``segments([...], [...])``, ``heads(...)`` and combinators of them."""
    return _combined(max_depth, lambda: primitives(allow_buffers=False), within_rules,
                     kinds=_WITHIN_COMBINATORS)


def _combined(max_depth, leaves, recurse, kinds=_COMBINATORS, **kwargs):
    """Leaves, or ``| & - ~ heads(...)`` of patterns one level shallower."""

    @st.composite
    def strategy(draw):
        kind = "leaf" if max_depth <= 0 else draw(st.sampled_from(kinds))
        if kind == "leaf":
            return draw(leaves())
        if kind == "blocks":
            return draw(block_builders(within_depth=min(max_depth - 1, 2), **kwargs))
        sub = recurse(max_depth - 1, **kwargs)
        if kind == "~":
            return ~draw(sub)
        if kind == "heads":
            return heads(*(draw(sub) for _ in range(draw(st.integers(1, _MAX_GROUPS)))))
        left, right = draw(sub), draw(sub)
        if kind == "|":
            return left | right
        if kind == "&":
            return left & right
        return left - right

    return strategy()


@st.composite
def block_builders(draw, allow_buffers: bool = True, within_depth: int = 1):
    """``blocks(size)`` with any subset (in any order, repeats allowed) of ``.local``,
    ``.dilated``, ``.global_``, ``.random``, ``.layout('lay')``, then maybe ``.causal()``,
    then maybe ``.within(rule)``."""
    p = blocks(draw(st.sampled_from(BLOCK_SIZES)))
    kinds = ["local", "dilated", "global", "random"] + (["layout"] if allow_buffers else [])
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=3)):
        if kind == "local":
            p = p.local(draw(st.integers(0, 4)))
        elif kind == "dilated":
            rates = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
            if draw(st.booleans()):
                p = p.dilated(rates)
            else:
                p = p.dilated(rates, window=draw(st.integers(0, 6)))
        elif kind == "global":
            p = p.global_(draw(st.integers(1, 3)))
        elif kind == "random":
            p = p.random(draw(st.integers(1, 4)), draw(st.integers(0, 1000)))
        else:
            p = p.layout("lay")
    if draw(st.booleans()):
        p = p.causal()
    if within_depth >= 0 and draw(st.booleans()):
        p = p.within(draw(within_rules(within_depth)))
    return p


def _score_mods(allow_buffers: bool):
    options = [st.just(alibi()), st.builds(softcap, st.floats(0.5, 50.0))]
    if allow_buffers:
        options.append(st.just(bias("bias")))
    return st.lists(st.one_of(options), min_size=1, max_size=2)


def _patterns(max_depth: int, allow_buffers: bool) -> st.SearchStrategy[n.Pattern]:
    def leaves():
        return st.sampled_from((True, True, False)).flatmap(
            lambda token: primitives(allow_buffers) if token else block_builders(allow_buffers))
    return _combined(max_depth, leaves, _patterns, allow_buffers=allow_buffers)


def patterns(max_depth: int = 3, allow_buffers: bool = True,
             allow_scores: bool = False) -> st.SearchStrategy[n.Pattern]:
    """Random pattern expressions using every primitive, block builders, ``heads``,
    ``segments`` and ``| & - ~``; with ``allow_scores`` the top is sometimes wrapped in
    ``.score(alibi() / softcap(c) / bias('bias'))``. Never needs more than 4 heads."""
    base = _patterns(max_depth, allow_buffers)
    if not allow_scores:
        return base

    @st.composite
    def scored(draw):
        p = draw(base)
        if draw(st.booleans()):
            p = p.score(*draw(_score_mods(allow_buffers)))
        return p

    return scored()


def _lengths(max_len: int) -> st.SearchStrategy[int]:
    special = [v for v in _SPECIAL_LENGTHS if v <= max_len] or [1]
    return st.sampled_from((False, False, True)).flatmap(
        lambda use_special: st.sampled_from(special) if use_special else st.integers(1, max_len))


@st.composite
def pattern_cases(draw, max_depth: int = 3, allow_buffers: bool = True,
                  allow_scores: bool = False, max_len: int = 300, max_heads: int = 4,
                  vary_layout_shape: bool = False):
    """``(pattern, q_len, kv_len, heads, buffers)`` with ``1 <= q_len, kv_len <= max_len``
    (``Q != K`` often), ``heads`` in ``1..max_heads`` raised to ``min_heads(pattern)``, and
    ``buffers`` binding every name of ``pattern.buffer_names()`` (see :func:`bind_buffers`)."""
    # Sizes first: hypothesis favours simple values for draws made late in a long example.
    q_len = draw(_lengths(max_len))
    kv_len = q_len if draw(st.sampled_from((False, False, True))) else draw(_lengths(max_len))
    wanted_heads = draw(st.integers(1, max_heads))
    seed = draw(st.integers(0, 2**32 - 1))
    pattern = draw(patterns(max_depth, allow_buffers, allow_scores))
    num_heads = max(wanted_heads, min_heads(pattern))
    buffers = bind_buffers(pattern, q_len, kv_len, num_heads, _random.Random(seed),
                           vary_layout_shape=vary_layout_shape)
    return pattern, q_len, kv_len, num_heads, buffers
