"""The dense reference: a pattern materialised as a boolean tensor.

Written directly from the semantics table of the language (docs/language.md) and independent of every fast path
(``mask_mod`` lowering, tile classification), so that those can be tested against it. Memory
is ``O(heads * Q * K)``: small sizes only.
"""

from __future__ import annotations

import functools
import operator
from functools import singledispatch

import torch

from ..lang import nodes as n
from ..lang.groups import head_groups
from ..lang.multiset import is_multiset
from ..lang.randomblocks import random_block_layout, random_causal_block_layout
from ..budget import check_memory
from ..lang.checks import INDEX_LIMIT, PatternArgumentError, check_int
from .context import Context


def dense(pattern: n.Pattern, q_len: int, kv_len: int | None = None, heads: int = 1, *,
          q_offset: int = 0, **buffers: torch.Tensor) -> torch.Tensor:
    """``allowed`` as a bool tensor: ``[heads, q_len, kv_len]``, or ``[batch, heads, q_len,
    kv_len]`` when a ``documents`` tensor has a batch dimension. Query row ``i`` is position
    ``q_offset + i`` (the rows ``q_offset ..`` of the ``(q_offset + q_len) x kv_len``
    matrix; ``kv_len`` defaults to ``q_offset + q_len``).

    For a multiset pattern (``a + b``, ``longnet``; see
    :func:`sparsedsl.lang.multiset.is_multiset`) the tensor is the int32 multiplicity
    ``m`` of each pair instead (``m > 0`` where allowed)."""
    if not isinstance(pattern, n.Pattern):
        raise PatternArgumentError(f"dense(): argument 'pattern' must be a pattern, got {pattern!r}")
    q_offset = check_int("dense()", "q_offset", q_offset, minimum=0)
    q_len = check_int("dense()", "q_len", q_len, minimum=1)
    if q_offset + q_len > INDEX_LIMIT:
        raise PatternArgumentError(
            f"dense(): argument 'q_offset' is {q_offset:,}: the last query position q_offset + "
            f"q_len - 1 = {q_offset + q_len - 1:,} must be below 2**31 - 1 (32-bit kernel indices)")
    kv_len = q_offset + q_len if kv_len is None else kv_len
    ctx = Context.make(pattern, q_offset + q_len, kv_len, heads, buffers=buffers, where="dense()")
    batch = max((b.shape[0] for name, b in ctx.buffers.items() if b.dim() == 2 and name in _document_names(pattern)),
                default=1)
    counts = is_multiset(pattern)
    check_memory("dense()", f"a dense [{batch}, {ctx.heads}, {q_len:,}, {ctx.kv_len:,}] mask (and its int64 "
                 f"position temporaries)",
                 q_len * ctx.kv_len * (batch * ctx.heads * (4 if counts else 1) + DENSE_TEMPORARY_BYTES))
    q = torch.arange(q_offset, ctx.q_len)[:, None]
    k = torch.arange(ctx.kv_len)[None, :]
    allowed = (_multiplicity if counts else _dense)(pattern, ctx, q, k)  # [B or 1, H or 1, Q, K]
    allowed = allowed.expand(allowed.shape[0], ctx.heads, q_len, ctx.kv_len)
    return allowed[0].clone() if allowed.shape[0] == 1 else allowed.clone()


#: Bytes per ``(q, k)`` pair of the temporaries a dense build holds beside its result (two
#: int64 grids of positions or differences at most).
DENSE_TEMPORARY_BYTES = 16


def _document_names(pattern: n.Pattern) -> set[str]:
    """Names of the ``documents(...)`` tensors of ``pattern`` (those may add a batch)."""
    names = {pattern.name} if isinstance(pattern, n.Documents) else set()
    for child in pattern.children():
        names |= _document_names(child)
    return names


def _lift(grid: torch.Tensor) -> torch.Tensor:
    """A ``[Q, K]`` relation as ``[1, 1, Q, K]``."""
    return grid[None, None]


@singledispatch
def _dense(node, ctx: Context, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B or 1, H or 1, Q, K]`` bool for positions ``q`` (column) and ``k`` (row)."""
    raise TypeError(f"dense(): no reference for node type {type(node).__name__}")


@_dense.register
def _(node: n.Full, ctx, q, k):
    return _lift(torch.ones(q.shape[0], k.shape[1], dtype=torch.bool))


@_dense.register
def _(node: n.Causal, ctx, q, k):
    return _lift(k <= q)


@_dense.register
def _(node: n.Window, ctx, q, k):
    return _lift((k >= q - node.before) & (k <= q + node.after))


@_dense.register
def _(node: n.DilatedWindow, ctx, q, k):
    inside = (k >= q - node.before) & (k <= q + node.after)
    return _lift(inside & ((q - k) % node.rate == 0))


@_dense.register
def _(node: n.Chunks, ctx, q, k):
    return _lift(q // node.size == k // node.size)


@_dense.register
def _(node: n.Strided, ctx, q, k):
    return _lift((q - k) % node.stride == 0)


@_dense.register
def _(node: n.Dilated, ctx, q, k):
    same_segment = q // node.segment == k // node.segment
    q_kept = (q % node.segment) % node.rate == node.offset
    k_kept = (k % node.segment) % node.rate == node.offset
    return _lift(same_segment & q_kept & k_kept)


@_dense.register
def _(node: n.GlobalTokens, ctx, q, k):
    return _lift((q < node.n) | (k < node.n))


@_dense.register
def _(node: n.Prefix, ctx, q, k):
    return _lift((k < node.n).expand(q.shape[0], k.shape[1]))


@_dense.register
def _(node: n.Documents, ctx, q, k):
    ids = ctx.document_ids(node.name).cpu()  # [B, L]
    return (ids[:, q[:, 0]][:, :, None] == ids[:, k[0, :]][:, None, :])[:, None]


@_dense.register
def _(node: n.Blocks, ctx, q, k):
    qb, kb = q // node.size, k // node.size
    num_qb, num_kb = -(-ctx.q_len // node.size), -(-ctx.kv_len // node.size)
    if node.rules:
        allowed = torch.zeros(1, 1, q.shape[0], k.shape[1], dtype=torch.bool)
        for rule in node.rules:
            allowed = allowed | _dense_block_rule(rule, ctx, qb, kb, num_qb, num_kb)
    else:
        allowed = torch.ones(1, 1, q.shape[0], k.shape[1], dtype=torch.bool)
    if node.causal_:
        allowed = allowed & _lift(kb <= qb)
    if node.within_ is not None:
        rel = torch.arange(node.size)
        rule = _dense(node.within_, ctx.relative(node.size), rel[:, None], rel[None, :])  # [1, H?, size, size]
        allowed = allowed & rule[:, :, q[:, 0] % node.size][:, :, :, k[0, :] % node.size]
    return allowed


def _dense_block_rule(rule, ctx, qb, kb, num_qb, num_kb) -> torch.Tensor:
    if isinstance(rule, n.BlockLocal):
        return _lift((qb - kb).abs() <= rule.window)
    if isinstance(rule, n.BlockDilated):
        hit = torch.zeros_like(qb - kb, dtype=torch.bool)
        for r in rule.rates:
            hit = hit | ((qb - kb) % r == 0)
        if rule.window is not None:
            hit = hit & ((qb - kb).abs() <= rule.window)
        return _lift(hit)
    if isinstance(rule, n.BlockGlobal):
        return _lift((qb < rule.n) | (kb < rule.n))
    if isinstance(rule, n.BlockRandom):
        layout = random_block_layout(num_qb, num_kb, rule.per_row, rule.seed)
        return _lift(layout[qb[:, 0]][:, kb[0, :]])
    if isinstance(rule, n.BlockRandomCausal):
        layout = random_causal_block_layout(num_qb, num_kb, rule.per_row, rule.seed)
        return _lift(layout[qb[:, 0]][:, kb[0, :]])
    if isinstance(rule, n.BlockLayout):
        layout = ctx.block_layout(rule.name, num_qb, num_kb).cpu()  # [H?, nqb, nkb] or [B, H?, nqb, nkb]
        if layout.dim() == 4:
            return layout[:, :, qb[:, 0]][:, :, :, kb[0, :]]
        return layout[:, qb[:, 0]][:, :, kb[0, :]][None]
    raise TypeError(f"dense(): no reference for block rule {type(rule).__name__}")


@_dense.register
def _(node: n.Heads, ctx, q, k):
    # Head h takes part g(h) evaluated at the same absolute head h (as the mask_mod does).
    groups = head_groups(ctx.heads, len(node.parts))
    parts = [_dense(p, ctx, q, k) for p in node.parts]
    batch = max(p.shape[0] for p in parts)
    return torch.cat(
        [p.expand(batch, ctx.heads, q.shape[0], k.shape[1])[:, g.start:g.stop]
         for p, g in zip(parts, groups)], dim=1
    )


@_dense.register
def _(node: n.Segments, ctx, q, k):
    return _dense(node.expand(), ctx, q, k)


@_dense.register
def _(node: n.Union, ctx, q, k):
    return functools.reduce(operator.or_, (_dense(p, ctx, q, k) for p in node.parts))


@_dense.register
def _(node: n.Intersection, ctx, q, k):
    return functools.reduce(operator.and_, (_dense(p, ctx, q, k) for p in node.parts))


@_dense.register
def _(node: n.Difference, ctx, q, k):
    return _dense(node.left, ctx, q, k) & ~_dense(node.right, ctx, q, k)


@_dense.register
def _(node: n.Complement, ctx, q, k):
    return ~_dense(node.inner, ctx, q, k)


@_dense.register
def _(node: n.Scored, ctx, q, k):
    return _dense(node.pattern, ctx, q, k)


@_dense.register
def _(node: n.Queries, ctx, q, k):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.q_len)
    return _lift(((q >= lo) & (q < hi)).expand(q.shape[0], k.shape[1]))


@_dense.register
def _(node: n.Keys, ctx, q, k):
    lo, hi = n.range_bounds(node.start, node.stop, ctx.kv_len)
    return _lift(((k >= lo) & (k < hi)).expand(q.shape[0], k.shape[1]))


@_dense.register
def _(node: n.Shifted, ctx, q, k):
    offset = node.offset
    inner_ctx = Context(max(1, ctx.q_len - offset), max(1, ctx.kv_len - offset), ctx.heads)
    inner = _dense(node.inner, inner_ctx, (q - offset).clamp(min=0), (k - offset).clamp(min=0))
    return inner & _lift((q >= offset) & (k >= offset))


@_dense.register
def _(node: n.DocumentWithin, ctx, q, k):
    ids = ctx.document_ids(node.name).cpu()  # [B, L]
    length = ids.shape[1]
    same = ids[:, :, None] == ids[:, None, :]  # [B, L, L]
    first = same.to(torch.int8).argmax(-1)  # the first position of each position's document
    relative = torch.arange(length) - first  # [B, L]
    positions = torch.arange(length)
    rule = _dense(node.rule, Context(length, length, ctx.heads), positions[:, None], positions[None, :])[0]
    per_batch = [rule[:, relative[b, q[:, 0]]][:, :, relative[b, k[0, :]]] for b in range(ids.shape[0])]
    in_document = ids[:, q[:, 0]][:, :, None] == ids[:, k[0, :]][:, None, :]
    return torch.stack(per_batch) & in_document[:, None]


@_dense.register
def _(node: n.CycleHeads, ctx, q, k):
    # Head h takes part h % n evaluated at the same absolute head h.
    parts = [_dense(p, ctx, q, k) for p in node.parts]
    batch = max(p.shape[0] for p in parts)
    full = [p.expand(batch, ctx.heads, q.shape[0], k.shape[1]) for p in parts]
    return torch.cat([full[h % len(parts)][:, h:h + 1] for h in range(ctx.heads)], dim=1)


@_dense.register
def _(node: n.DilatedHeads, ctx, q, k):
    parts = [_dense(part, ctx, q, k).expand(1, len(heads), q.shape[0], k.shape[1])
             for heads, part in node.groups(ctx.heads)]
    return torch.cat(parts, dim=1)


@_dense.register
def _(node: n.LongNet, ctx, q, k):
    return _dense(node.expand(), ctx, q, k)


@_dense.register
def _(node: n.Sum, ctx, q, k):  # allowed: some part allows the pair
    return functools.reduce(operator.or_, (_dense(p, ctx, q, k) for p in node.parts))


# ---------------------------------------------------------------------------------------
# Multiplicities of multiset patterns
# ---------------------------------------------------------------------------------------

MULTIPLICITY = torch.int32


@singledispatch
def _multiplicity(node, ctx: Context, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B or 1, H or 1, Q, K]`` int32 multiplicities (see :class:`sparsedsl.lang.nodes.Sum`);
    a set pattern's are its ``allowed`` as 0 or 1."""
    return _dense(node, ctx, q, k).to(MULTIPLICITY)


@_multiplicity.register
def _(node: n.Sum, ctx, q, k):
    return functools.reduce(operator.add, (_multiplicity(p, ctx, q, k) for p in node.parts))


@_multiplicity.register
def _(node: n.LongNet, ctx, q, k):
    return _multiplicity(node.expand(), ctx, q, k)


@_multiplicity.register
def _(node: n.Union, ctx, q, k):
    return functools.reduce(torch.maximum, (_multiplicity(p, ctx, q, k) for p in node.parts))


@_multiplicity.register
def _(node: n.Intersection, ctx, q, k):
    return functools.reduce(operator.mul, (_multiplicity(p, ctx, q, k) for p in node.parts))


@_multiplicity.register
def _(node: n.Difference, ctx, q, k):
    return _multiplicity(node.left, ctx, q, k) * ~_dense(node.right, ctx, q, k)


@_multiplicity.register
def _(node: n.Heads, ctx, q, k):
    groups = head_groups(ctx.heads, len(node.parts))
    parts = [_multiplicity(p, ctx, q, k) for p in node.parts]
    batch = max(p.shape[0] for p in parts)
    return torch.cat([p.expand(batch, ctx.heads, q.shape[0], k.shape[1])[:, g.start:g.stop]
                      for p, g in zip(parts, groups)], dim=1)


@_multiplicity.register
def _(node: n.Scored, ctx, q, k):
    return _multiplicity(node.pattern, ctx, q, k)


def dense_attention_weights(pattern: n.Pattern, q: torch.Tensor, k: torch.Tensor, scale: float,
                            **buffers: torch.Tensor) -> torch.Tensor:
    """Attention probabilities ``[B, H, Q, K]`` of ``[B, H, N, D]`` inputs (``k`` may have
    fewer heads) from the dense mask, in float64 for float64 inputs and float32 otherwise,
    without gradient; rows with no allowed key are zeros. Score modifications are not
    applied. Memory is ``O(B * H * Q * K)``: small sizes only."""
    heads = q.shape[1]
    allowed = dense(pattern, q.shape[2], k.shape[2], heads=heads, **buffers).to(q.device)
    if allowed.dim() == 3:
        allowed = allowed[None]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        keys = k.to(compute).repeat_interleave(heads // k.shape[1], 1)
        scores = (q.to(compute) @ keys.transpose(-1, -2)) * scale
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
