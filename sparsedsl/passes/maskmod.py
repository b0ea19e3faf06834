"""Lowering a pattern to FlexAttention's ``mask_mod`` and ``score_mod``.

Every lowered function is written with torch operations only (no Python branching on tensor
values, no in-place writes), so the same function runs under FlexAttention's ``vmap`` with
0-d index tensors and on broadcast index grids (the block-mask builder refines undecided tiles
by calling it on ``[n, T, 1]`` / ``[n, 1, T]`` grids). Tensors a pattern needs (document ids,
block layouts, random-block layouts, ALiBi slopes, biases) are captured on the context's device;
indices into them are clamped, so positions in the kernel's padding never read out of bounds.
"""

from __future__ import annotations

import functools
import math
import operator
from functools import singledispatch
from typing import Callable

import torch

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.queries import score_mods
from ..lang.randomblocks import random_block_layout, random_causal_block_layout
from .context import Context

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def lower_mask(pattern: n.Pattern, ctx: Context) -> MaskFn:
    """``mask_mod(b, h, q, k) -> bool`` equal to ``allowed(b, h, q, k)`` for in-range indices."""
    return _lower(pattern, ctx)


def rows_from(mask_mod: MaskFn, first_row, device) -> MaskFn:
    """``mask_mod`` on row indices: query index ``i`` is position ``first_row + i``. The
    offset is held in a 0-d tensor (``first_row`` may be one already), so compiled kernels
    do not specialise on it."""
    if isinstance(first_row, int) and first_row == 0:
        return mask_mod
    offset = _offset_tensor(first_row, device)
    return lambda b, h, q, k: mask_mod(b, h, q + offset, k)


def score_rows_from(score_mod: ScoreFn | None, first_row, device) -> ScoreFn | None:
    """``score_mod`` on row indices, as :func:`rows_from`."""
    if score_mod is None or (isinstance(first_row, int) and first_row == 0):
        return score_mod
    offset = _offset_tensor(first_row, device)
    return lambda score, b, h, q, k: score_mod(score, b, h, q + offset, k)


def _offset_tensor(first_row, device) -> torch.Tensor:
    return first_row if isinstance(first_row, torch.Tensor) else torch.tensor(first_row, device=device)


@singledispatch
def _lower(node, ctx: Context) -> MaskFn:
    raise TypeError(f"mask_mod: no lowering for node type {type(node).__name__}")


@_lower.register
def _(node: n.Full, ctx):
    return lambda b, h, q, k: (q >= 0) & (k >= 0)


@_lower.register
def _(node: n.Causal, ctx):
    return lambda b, h, q, k: k <= q


@_lower.register
def _(node: n.Window, ctx):
    before, after = node.before, node.after
    return lambda b, h, q, k: (k - q >= -before) & (k - q <= after)


@_lower.register
def _(node: n.DilatedWindow, ctx):
    before, after, rate = node.before, node.after, node.rate
    return lambda b, h, q, k: (k - q >= -before) & (k - q <= after) & ((q - k) % rate == 0)


@_lower.register
def _(node: n.Chunks, ctx):
    size = node.size
    return lambda b, h, q, k: q // size == k // size


@_lower.register
def _(node: n.Strided, ctx):
    stride = node.stride
    return lambda b, h, q, k: (q - k) % stride == 0


@_lower.register
def _(node: n.Dilated, ctx):
    segment, rate, offset = node.segment, node.rate, node.offset

    def dilated_mask(b, h, q, k):
        return ((q // segment == k // segment)
                & ((q % segment) % rate == offset)
                & ((k % segment) % rate == offset))

    return dilated_mask


@_lower.register
def _(node: n.GlobalTokens, ctx):
    count = node.n
    return lambda b, h, q, k: (q < count) | (k < count)


@_lower.register
def _(node: n.Prefix, ctx):
    count = node.n
    return lambda b, h, q, k: (k < count) & (q >= 0)


@_lower.register
def _(node: n.Documents, ctx):
    ids = ctx.document_ids(node.name)  # [B, L]
    last = ids.shape[1] - 1
    if ids.shape[0] == 1:
        flat = ids[0]
        return lambda b, h, q, k: flat[q.clamp(0, last)] == flat[k.clamp(0, last)]
    return lambda b, h, q, k: ids[b, q.clamp(0, last)] == ids[b, k.clamp(0, last)]


@_lower.register
def _(node: n.Blocks, ctx):
    size = node.size
    num_qb, num_kb = -(-ctx.q_len // size), -(-ctx.kv_len // size)
    rules = [lower_block_rule(rule, ctx, num_qb, num_kb) for rule in node.rules]
    within = None if node.within_ is None else _lower(node.within_, ctx.relative(size))
    is_causal = node.causal_

    def blocks_mask(b, h, q, k):
        qb, kb = q // size, k // size
        if rules:
            allowed = rules[0](b, h, qb, kb)
            for rule in rules[1:]:
                allowed = allowed | rule(b, h, qb, kb)
        else:
            allowed = (qb >= 0) & (kb >= 0)
        if is_causal:
            allowed = allowed & (kb <= qb)
        if within is not None:
            allowed = allowed & within(b, h, q % size, k % size)
        return allowed

    return blocks_mask


def lower_block_rule(rule, ctx: Context, num_qb: int, num_kb: int):
    """``rule(b, h, qb, kb) -> bool`` on block coordinates."""
    if isinstance(rule, n.BlockLocal):
        w = rule.window
        return lambda b, h, qb, kb: (qb - kb).abs() <= w
    if isinstance(rule, n.BlockDilated):
        rates, window = rule.rates, rule.window

        def dilated_rule(b, h, qb, kb):
            d = qb - kb
            hit = d % rates[0] == 0
            for r in rates[1:]:
                hit = hit | (d % r == 0)
            return hit if window is None else hit & (d.abs() <= window)

        return dilated_rule
    if isinstance(rule, n.BlockGlobal):
        count = rule.n
        return lambda b, h, qb, kb: (qb < count) | (kb < count)
    if isinstance(rule, (n.BlockRandom, n.BlockRandomCausal)):
        layout = random_rule_layout(rule, ctx, num_qb, num_kb)
        return lambda b, h, qb, kb: layout[qb.clamp(0, num_qb - 1), kb.clamp(0, num_kb - 1)]
    if isinstance(rule, n.BlockLayout):
        layout = ctx.memoized(("layout", rule.name, num_qb, num_kb),
                              lambda: ctx.block_layout(rule.name, num_qb, num_kb))
        if layout.dim() == 4:  # a batch axis
            last_b, by_head = layout.shape[0] - 1, layout.shape[1] > 1
            return lambda b, h, qb, kb: layout[b.clamp(0, last_b), h if by_head else 0,
                                               qb.clamp(0, num_qb - 1), kb.clamp(0, num_kb - 1)]
        if layout.shape[0] == 1:
            flat = layout[0]
            return lambda b, h, qb, kb: flat[qb.clamp(0, num_qb - 1), kb.clamp(0, num_kb - 1)]
        return lambda b, h, qb, kb: layout[h, qb.clamp(0, num_qb - 1), kb.clamp(0, num_kb - 1)]
    raise TypeError(f"mask_mod: no lowering for block rule {type(rule).__name__}")


@_lower.register
def _(node: n.Heads, ctx):
    groups = head_groups(ctx.heads, len(node.parts))
    parts = [_lower(p, ctx) for p in node.parts]
    starts = [g.start for g in groups[1:]]

    def heads_mask(b, h, q, k):
        result = parts[0](b, h, q, k)
        for start, part in zip(starts, parts[1:]):
            result = torch.where(h >= start, part(b, h, q, k), result)
        return result

    return heads_mask


@_lower.register
def _(node: n.Segments, ctx):
    return _lower(node.expand(), ctx)


def _fold_parts(parts, ctx, combine):
    """``mask_mod`` combining the masks of ``parts`` left to right with ``combine``."""
    masks = [_lower(p, ctx) for p in parts]

    def folded_mask(b, h, q, k):
        return functools.reduce(combine, (mask(b, h, q, k) for mask in masks))

    return folded_mask


@_lower.register
def _(node: n.Union, ctx):
    return _fold_parts(node.parts, ctx, operator.or_)


@_lower.register
def _(node: n.Intersection, ctx):
    return _fold_parts(node.parts, ctx, operator.and_)


@_lower.register
def _(node: n.Difference, ctx):
    left, right = _lower(node.left, ctx), _lower(node.right, ctx)
    return lambda b, h, q, k: left(b, h, q, k) & ~right(b, h, q, k)


@_lower.register
def _(node: n.Complement, ctx):
    inner = _lower(node.inner, ctx)
    return lambda b, h, q, k: ~inner(b, h, q, k)


@_lower.register
def _(node: n.Scored, ctx):
    return _lower(node.pattern, ctx)


@_lower.register
def _(node: n.DilatedHeads, ctx):
    segment, rate, size = node.segment, node.rate, node.group_size(ctx.heads)

    def dilated_heads_mask(b, h, q, k):
        group = h // size  # head h keeps the positions of its group's offset
        return ((q // segment == k // segment)
                & ((q % segment) % rate == group)
                & ((k % segment) % rate == group))

    return dilated_heads_mask


@_lower.register
def _(node: n.LongNet, ctx):
    return _lower(node.expand(), ctx)


@_lower.register
def _(node: n.Sum, ctx):  # allowed: some part allows the pair
    return _fold_parts(node.parts, ctx, operator.or_)


# ---------------------------------------------------------------------------------------
# Multiplicities of multiset patterns
# ---------------------------------------------------------------------------------------


def lower_multiplicity(pattern: n.Pattern, ctx: Context) -> MaskFn:
    """``multiplicity(b, h, q, k) -> int32``: how many times the pair counts (see
    :class:`sparsedsl.lang.nodes.Sum`; 0 or 1 for a set pattern), written with torch
    operations as ``mask_mod`` is."""
    return _multiplicity(pattern, ctx)


@singledispatch
def _multiplicity(node, ctx: Context) -> MaskFn:
    mask = _lower(node, ctx)
    return lambda b, h, q, k: mask(b, h, q, k).to(torch.int32)


def _fold_multiplicities(parts, ctx, combine):
    counts = [_multiplicity(p, ctx) for p in parts]
    return lambda b, h, q, k: functools.reduce(combine, (count(b, h, q, k) for count in counts))


_multiplicity.register(n.Sum, lambda node, ctx: _fold_multiplicities(node.parts, ctx, operator.add))
_multiplicity.register(n.Union, lambda node, ctx: _fold_multiplicities(node.parts, ctx, torch.maximum))
_multiplicity.register(n.Intersection, lambda node, ctx: _fold_multiplicities(node.parts, ctx, operator.mul))
_multiplicity.register(n.LongNet, lambda node, ctx: _multiplicity(node.expand(), ctx))
_multiplicity.register(n.Scored, lambda node, ctx: _multiplicity(node.pattern, ctx))


@_multiplicity.register
def _(node: n.Difference, ctx):
    left, right = _multiplicity(node.left, ctx), _lower(node.right, ctx)
    return lambda b, h, q, k: torch.where(right(b, h, q, k), 0, left(b, h, q, k))


@_multiplicity.register
def _(node: n.Heads, ctx):
    starts = [g.start for g in head_groups(ctx.heads, len(node.parts))[1:]]
    parts = [_multiplicity(p, ctx) for p in node.parts]

    def heads_multiplicity(b, h, q, k):
        result = parts[0](b, h, q, k)
        for start, part in zip(starts, parts[1:]):
            result = torch.where(h >= start, part(b, h, q, k), result)
        return result

    return heads_multiplicity


# ---------------------------------------------------------------------------------------
# score_mod
# ---------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes (Press et al. 2022): ``2**(-8 i / n)`` for a power of two ``n``,
    and for other head counts the closest power of two's slopes followed by every other
    slope of twice that power."""
    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(base)
    if base < num_heads:
        slopes += power_of_two(2 * base)[0::2][: num_heads - base]
    return slopes


def lower_score(pattern: n.Pattern, ctx: Context) -> ScoreFn | None:
    """``score_mod(score, b, h, q, k)`` applying the pattern's modifications in order, or
    None when it has none. A multiset pattern's last modification adds ``log m`` (its
    multiplicity; pairs with ``m = 0`` are masked, so only ``m > 1`` changes a score)."""
    mods = [_log_multiplicity(pattern, ctx) if isinstance(m, n.LogMultiplicity) else _lower_score_mod(m, ctx)
            for m in score_mods(pattern)]
    if not mods:
        return None

    def score_mod(score, b, h, q, k):
        for mod in mods:
            score = mod(score, b, h, q, k)
        return score

    return score_mod


def _log_multiplicity(pattern: n.Pattern, ctx: Context) -> ScoreFn:
    count = lower_multiplicity(pattern, ctx)

    def log_multiplicity(score, b, h, q, k):
        return score + torch.log(count(b, h, q, k).clamp(min=1).to(score.dtype))

    return log_multiplicity


def _lower_score_mod(mod: n.ScoreMod, ctx: Context) -> ScoreFn:
    if isinstance(mod, n.Alibi):
        slopes = torch.tensor(alibi_slopes(ctx.heads), dtype=torch.float32, device=ctx.device)
        return lambda score, b, h, q, k: score - slopes[h] * (q - k).abs()
    if isinstance(mod, n.Softcap):
        # A 0-d tensor, not a Python float: torch.compile would otherwise lift the float to
        # a CPU scalar input after a recompile, which FlexAttention's lowering rejects. Held
        # in float64 and taken in the score's dtype, so float64 scores see the cap exactly.
        cap = torch.tensor(mod.cap, dtype=torch.float64, device=ctx.device)

        def softcapped(score, b, h, q, k):
            in_dtype = cap.to(score.dtype)
            return in_dtype * torch.tanh(score / in_dtype)

        return softcapped
    if isinstance(mod, n.Bias):
        values = _bias_tensor(mod.name, ctx)
        last_b, last_h = values.shape[0] - 1, values.shape[1] - 1
        last_q, last_k = ctx.q_len - 1, ctx.kv_len - 1
        return lambda score, b, h, q, k: score + values[
            b.clamp(0, last_b), h.clamp(0, last_h), q.clamp(0, last_q), k.clamp(0, last_k)
        ]
    if isinstance(mod, n.FunctionMod):
        return per_element(mod.fn)
    raise TypeError(f"score_mod: no lowering for {type(mod).__name__}")


class ScoreFunctionError(TypeError):
    """A plain score function returned something other than new scores: a floating tensor
    of its ``score`` argument's shape and dtype."""


def checked_score_function(fn: Callable) -> ScoreFn:
    """``fn`` (a plain ``(score, b, h, q, k) -> score`` function) with its result checked
    to be a tensor of the shape and dtype of ``score``: a scalar or a ``[..., :1]`` result
    would otherwise be broadcast silently, and another dtype fail deep in a kernel. The
    checks read only shapes and dtypes, so the wrapper traces and compiles as ``fn`` does
    (under FlexAttention's ``vmap`` every score is one element, so a broadcast result
    cannot be told from a per-pair one there)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)

    def checked(score, b, h, q, k):
        result = fn(score, b, h, q, k)
        if not isinstance(result, torch.Tensor):
            got = "None" if result is None else f"a {type(result).__name__} ({result!r:.60})"
        elif result.dtype != score.dtype or result.shape != score.shape:
            got = f"a {result.dtype} tensor of shape {list(result.shape)}"
        else:
            return result
        raise ScoreFunctionError(
            f"score function {name}: must return a tensor of the dtype and shape of its "
            f"'score' argument ({score.dtype}, shape {list(score.shape)}), got {got}"
        )

    return checked


def per_element(fn: Callable) -> ScoreFn:
    """A plain score function with FlexAttention's semantics on index grids of any shape:
    ``fn`` runs on each element alone (0-d ``score, b, h, q, k``), under :func:`torch.vmap`
    over the broadcast grid, as FlexAttention runs it; so a function that gathers a vector
    per position and reduces it (``torch.dot(table[q], table[k])``, ``.sum()``) means the
    same on every plan. Called with a 0-d score (inside FlexAttention's own ``vmap``), it
    calls ``fn`` directly, its result tied to ``score`` (a NaN score stays NaN): compiled
    FlexAttention keeps the unmodified score when a result folds to a constant. The result
    is checked (:func:`checked_score_function`); a function that cannot run per element
    raises :class:`ScoreFunctionError` naming it."""
    checked = checked_score_function(fn)
    name = _function_name(fn)
    each = torch.vmap(checked)

    def score_mod(score, b, h, q, k):
        if score.dim() == 0:
            return torch.where(torch.isnan(score), score, checked(score, b, h, q, k))
        grids = torch.broadcast_tensors(score, b, h, q, k)
        shape = grids[0].shape
        grids = [grid.reshape(-1) for grid in grids]
        try:
            return each(*grids).reshape(shape)
        except ScoreFunctionError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as err:
            raise ScoreFunctionError(
                f"score function {name}: cannot run on one (score, b, h, q, k) element at a time "
                f"under torch.vmap, as FlexAttention runs it: {err}") from err

    return score_mod


def _function_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def random_rule_layout(rule, ctx: Context, num_qb: int, num_kb: int) -> torch.Tensor:
    """The ``[nqb, nkb]`` bool layout of a ``.random(...)`` or ``.random_causal(...)`` rule
    on ``ctx``'s device, computed once per context."""
    choose = random_block_layout if isinstance(rule, n.BlockRandom) else random_causal_block_layout
    return ctx.memoized(("random", rule, num_qb, num_kb),
                        lambda: choose(num_qb, num_kb, rule.per_row, rule.seed, device=ctx.device))


def _bias_tensor(name: str, ctx: Context) -> torch.Tensor:
    values = ctx.buffer(name)
    shape = list(values.shape)
    ok = (
        values.dim() in (2, 3, 4)
        and values.is_floating_point()
        and shape[-2:] == [ctx.q_len, ctx.kv_len]
        and (values.dim() < 3 or shape[-3] in (1, ctx.heads))
    )
    if not ok:
        raise ValueError(
            f"bias({name!r}): {name} must be a floating tensor of shape [{ctx.q_len}, {ctx.kv_len}], "
            f"[heads, {ctx.q_len}, {ctx.kv_len}] or [batch, heads, {ctx.q_len}, {ctx.kv_len}], "
            f"got dtype={values.dtype}, shape={shape}"
        )
    while values.dim() < 4:
        values = values[None]
    return values.to(ctx.device)


# ---------------------------------------------------------------------------------------
# Ranges, offsets, positions inside documents, cyclic head groups
# ---------------------------------------------------------------------------------------


@_lower.register
def _(node: n.Queries, ctx):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.q_len)
    return lambda b, h, q, k: (q >= lo) & (q < hi) & (k >= 0)


@_lower.register
def _(node: n.Keys, ctx):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.kv_len)
    return lambda b, h, q, k: (k >= lo) & (k < hi) & (q >= 0)


def shifted_context(node: n.Shifted, ctx: Context) -> Context:
    """The context ``node.inner`` is evaluated in: the positions from ``node.offset`` on (at
    least one, so that a matrix with none still has sizes), same heads, layers and device."""
    return Context(max(1, ctx.q_len - node.offset), max(1, ctx.kv_len - node.offset), ctx.heads, ctx.device,
                   layers=ctx.layers)


@_lower.register
def _(node: n.Shifted, ctx):
    inner, offset = _lower(node.inner, shifted_context(node, ctx)), node.offset
    return lambda b, h, q, k: (q >= offset) & (k >= offset) & inner(b, h, q - offset, k - offset)


def document_context(ctx: Context) -> Context:
    """The context a ``documents(...).within(rule)`` rule is evaluated in: ``L x L``
    document-relative positions, ``L = max(Q, K)``, same heads, layers and device, no tensors."""
    length = max(ctx.q_len, ctx.kv_len)
    return Context(length, length, ctx.heads, ctx.device, layers=ctx.layers)


@_lower.register
def _(node: n.DocumentWithin, ctx):
    ids, relative = ctx.document_ids(node.name), ctx.document_positions(node.name)  # [B, L]
    rule, last = _lower(node.rule, document_context(ctx)), ids.shape[1] - 1
    if ids.shape[0] == 1:
        flat_ids, flat_rel = ids[0], relative[0]

        def one_row_mask(b, h, q, k):
            qc, kc = q.clamp(0, last), k.clamp(0, last)
            return (flat_ids[qc] == flat_ids[kc]) & rule(b, h, flat_rel[qc], flat_rel[kc])

        return one_row_mask

    def batched_mask(b, h, q, k):
        qc, kc = q.clamp(0, last), k.clamp(0, last)
        return (ids[b, qc] == ids[b, kc]) & rule(b, h, relative[b, qc], relative[b, kc])

    return batched_mask


@_lower.register
def _(node: n.CycleHeads, ctx):
    parts, count = [_lower(p, ctx) for p in node.parts], len(node.parts)

    def cycle_heads_mask(b, h, q, k):
        result = parts[0](b, h, q, k)
        for i, part in enumerate(parts[1:], start=1):
            result = torch.where(h % count == i, part(b, h, q, k), result)
        return result

    return cycle_heads_mask
