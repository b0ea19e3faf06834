"""Attention of one rank's rows over its compact key/value buffer.

A rank holds keys and values only for the positions of the tiles its rows need (see
:mod:`.plan`): ``held`` sorted intervals of absolute positions, stored one after the other.
A piece of rows ``[o, o + L)`` is attended over that buffer in one of two exact ways:

* **shifted**: when the piece's needed positions are one interval ``[a, b)`` with
  ``a <= o``, and the pattern is the same when every position moves by ``a``
  (:func:`translation_period` divides ``a``), the piece is ``compiled(q, k[a:b], v[a:b],
  q_offset=o - a)``: the compiled module runs on the slice as if it started the sequence,
  with whatever plan it picks there (the lattice plan for a LongNet shard of whole
  segments, bands for windows, ...);
* **mapped**: otherwise, key ``j`` of the buffer stands for absolute position
  ``positions[j]``. The piece's tile states (``compiled.lowering(...)`` over the whole key
  axis) are kept for the held tiles only, and each chunk of query tiles attends to the
  held tiles it does not leave empty, masked by the pattern evaluated on absolute
  positions. Differentiable, on any device and dtype.
"""

from __future__ import annotations

from functools import singledispatch

import numpy as np
import torch

from ..compiler.module import CompiledPattern
from ..lang import nodes as n
from ..passes.tiles import EMPTY
from .spans import Spans

#: Score elements held at once by the mapped path.
SCORE_BUDGET = 1 << 24


@singledispatch
def translation_period(node) -> int | None:
    """``T`` such that ``allowed(q + m T, k + m T) == allowed(q, k)`` for every ``m`` and
    every pair of positions (the same for score modifications), or None when no such
    period is known (absolute positions matter: global tokens, prefixes, random or bound
    layouts, bound tensors)."""
    return None


for _node, _period in ((n.Full, 1), (n.Causal, 1), (n.Window, 1), (n.DilatedWindow, 1), (n.Strided, 1)):
    translation_period.register(_node, lambda node, _p=_period: _p)
translation_period.register(n.Chunks, lambda node: node.size)
translation_period.register(n.Dilated, lambda node: node.segment)
translation_period.register(n.Segments, lambda node: _lcm(node.lengths))
translation_period.register(n.Complement, lambda node: translation_period(node.inner))
translation_period.register(n.Difference, lambda node: _lcm([translation_period(node.left),
                                                             translation_period(node.right)]))
for _node in (n.Heads, n.Union, n.Intersection):
    translation_period.register(_node, lambda node: _lcm([translation_period(p) for p in node.parts]))


@translation_period.register
def _(node: n.Blocks):
    if not all(isinstance(rule, (n.BlockLocal, n.BlockDilated)) for rule in node.rules):
        return None  # global, random and bound layouts name absolute blocks
    return node.size  # .within() reads positions relative to blocks of this size


@translation_period.register
def _(node: n.Scored):
    if not all(isinstance(mod, (n.Alibi, n.Softcap)) for mod in node.mods):
        return None  # a bound bias or a function may read absolute positions
    return translation_period(node.pattern)


def _lcm(periods) -> int | None:
    periods = list(periods)
    if None in periods:
        return None
    result = 1
    for p in periods:
        result = result * p // np.gcd(result, p)
    return int(result)


def attend_piece(compiled: CompiledPattern, q: torch.Tensor, held_k: torch.Tensor, held_v: torch.Tensor,
                 held: Spans, piece: range, piece_needed: Spans, seq_len: int, scale: float | None,
                 buffers: dict) -> torch.Tensor:
    """Output rows of the piece ``piece`` (``q [B, H, len(piece), D]``) attending over the
    compact buffer ``held_k``/``held_v`` (``[B, Hkv, M, D]``, positions ``held``, a one-set
    :class:`~.spans.Spans` of ``M`` positions); ``piece_needed``: the positions the piece's
    rows need (a subset of ``held``)."""
    interval = piece_needed.contiguous()
    period = translation_period(compiled.pattern)
    if interval is not None and not buffers and period is not None:
        start, stop = interval
        if start <= piece.start and start % period == 0:
            first = int(held.covered_below(np.array([start]))[0])
            return compiled(q, held_k.narrow(2, first, stop - start), held_v.narrow(2, first, stop - start),
                            q_offset=piece.start - start, scale=scale)
    return _mapped(compiled, q, held_k, held_v, held, piece, seq_len, scale, buffers)


def _mapped(compiled: CompiledPattern, q, k, v, held: Spans, piece: range, seq_len: int,
            scale: float | None, buffers: dict) -> torch.Tensor:
    """The mapped path (see the module docstring)."""
    batch, heads, rows, head_dim = q.shape
    device = q.device
    lowering = compiled.lowering(rows, seq_len, heads=heads, device=device, q_offset=piece.start,
                                 where="sequence_parallel_attention()", **buffers)
    q_block, kv_block = lowering.grid.q_block, lowering.grid.kv_block
    tiles = torch.from_numpy(np.unique(held.positions() // kv_block)).to(device) if k.shape[2] else \
        torch.zeros(0, dtype=torch.int64, device=device)
    live = lowering.states.index_select(-1, tiles) != EMPTY  # [Bs, Hs, nq, held tiles]
    positions = torch.from_numpy(held.positions()).to(device)
    score_mod = compiled.score_mod(rows, seq_len, heads=heads, device=device, q_offset=piece.start, **buffers)
    scale = head_dim ** -0.5 if scale is None else scale
    widest = max(1, int(live.sum(-1).max())) if live.numel() else 1
    per_chunk = max(1, SCORE_BUDGET // (batch * heads * q_block * kv_block * widest))
    outputs = []
    for first in range(0, live.shape[2], per_chunk):
        last = min(first + per_chunk, live.shape[2])
        columns = live[:, :, first:last].any(2).any(1).any(0).nonzero().flatten()
        keys = (columns[:, None] * kv_block + torch.arange(kv_block, device=device)).flatten()
        keys = keys[keys < k.shape[2]]
        outputs.append(_masked_rows(q[:, :, first * q_block:last * q_block], k, v, keys, positions,
                                    lowering.position_mask, score_mod, piece.start, first * q_block, scale))
    return torch.cat(outputs, dim=2)


def _masked_rows(q, k, v, keys, positions, position_mask, score_mod, q_start: int, row: int,
                 scale: float) -> torch.Tensor:
    """Rows ``q`` (row ``row`` of the piece first) over the buffer entries ``keys``: one
    softmax per row over its allowed keys; 0 for a row with none."""
    batch, heads = q.shape[:2]
    if not len(keys):  # no row of the chunk sees any key: zeros (still a function of q)
        return (q.sum(-1, keepdim=True) * 0).expand(*q.shape[:-1], v.shape[-1])
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = heads // k.shape[1]
    kk = k.index_select(2, keys).repeat_interleave(group, dim=1).to(compute)
    vv = v.index_select(2, keys).repeat_interleave(group, dim=1).to(compute)
    scores = (q.to(compute) @ kk.transpose(-1, -2)) * scale
    device = q.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_row = torch.arange(row, row + q.shape[2], device=device).view(1, 1, -1, 1)
    k_pos = positions[keys].view(1, 1, 1, -1)
    allowed = position_mask(b, h, q_row + q_start, k_pos)
    if score_mod is not None:
        scores = score_mod(scores, b, h, q_row, k_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.detach().amax(-1, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(scores - top)
    total = weights.sum(-1, keepdim=True)
    out = (weights @ vv) / total.clamp_min(torch.finfo(compute).tiny)
    return out.to(q.dtype)
