"""Attention of one rank's rows over its compact key/value buffer.

A rank holds keys and values only for the positions its rows need (see :mod:`.plan`), one
buffer per class of key/value heads that need the same positions (one class of every
head, holding whole tiles, unless the pattern has ``dilated_heads`` branches): ``held``
sorted intervals of absolute positions, stored one after the other. A piece of rows
``[o, o + L)`` is attended over those buffers in one of two exact ways:

* **shifted**: when the piece's needed positions (in any head) are one interval
  ``[a, b)`` with ``a <= o``, and the pattern is the same when every position moves by
  ``a`` (:func:`~sparsedsl.lang.queries.translation_period` divides ``a``), the piece is ``compiled(q, k[a:b],
  v[a:b], q_offset=o - a)``: the compiled module runs on the slice as if it started the
  sequence, with whatever plan it picks there (the lattice plan for a LongNet shard of
  whole segments, the branches plan for ``longnet(...)``, bands for windows, ...), a
  multiset's ``log m`` included;
* **mapped**: otherwise, per class, key ``j`` of the buffer stands for absolute position
  ``positions[j]``. The piece's tile states (``compiled.lowering(...)`` over the whole key
  axis) are kept for the class's heads and held tiles only, and each chunk of query tiles
  attends to the held positions of the tiles it does not leave empty, masked by the
  pattern evaluated on absolute positions and heads, with the compiled ``score_mod``
  (which adds ``log m`` for a multiset: one softmax over the multiset). Differentiable,
  on any device and dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ..compiler.module import CompiledPattern
from ..lang import nodes as n
from ..lang.queries import anchored_rows, score_mods, translation_period
from ..passes.lowering import lowering as lower_rows
from ..passes.tiles import EMPTY
from .spans import Spans

#: Score elements held at once by the mapped path.
SCORE_BUDGET = 1 << 24


def attend_piece(compiled: CompiledPattern, q: torch.Tensor, held_k: tuple, held_v: tuple, held: tuple,
                 kv_classes: tuple, piece: range, piece_needed: tuple, seq_len: int,
                 scale: float | None, buffers: dict) -> torch.Tensor:
    """Output rows of the piece ``piece`` (``q [B, H, len(piece), D]``).

    Per class ``c`` of key/value heads (``kv_classes[c]``: their indices, None for all):
    the compact buffer ``held_k[c]``/``held_v[c]`` (``[B, heads of c, M, D]``, positions
    ``held[c]``, a one-set :class:`~.spans.Spans` of ``M`` positions) and the positions
    the piece's rows need there, ``piece_needed[c]`` (a subset of ``held[c]``)."""
    buffers = _piece_buffers(compiled, buffers, piece)
    shifted = _shifted_source(compiled, held_k, held_v, held, kv_classes, piece, piece_needed, buffers)
    if shifted is not None:
        start, k, v = shifted
        return compiled(q, k, v, q_offset=piece.start - start, scale=scale)
    heads = q.shape[1]
    per_kv = heads // sum(k.shape[1] for k in held_k)
    outputs, order = [], []
    for k, v, positions, kv_heads in zip(held_k, held_v, held, kv_classes):
        q_heads = torch.arange(heads, device=q.device) if kv_heads is None else \
            (torch.tensor(kv_heads, device=q.device)[:, None] * per_kv + torch.arange(per_kv, device=q.device)).flatten()
        part = q if kv_heads is None else q.index_select(1, q_heads)
        outputs.append(_mapped(compiled, part, k, v, positions, q_heads, heads, piece, seq_len, scale, buffers))
        order.append(q_heads)
    if len(outputs) == 1:
        return outputs[0]
    return torch.cat(outputs, dim=1).index_select(1, torch.argsort(torch.cat(order)))


def _piece_buffers(compiled: CompiledPattern, buffers: dict, piece: range) -> dict:
    """``buffers`` (for the whole sequence) as the piece's rows read them: a ``bias``
    ``[..., N, N]`` cut to its first ``piece.stop`` rows, the ``(piece.start + rows) x N``
    matrix a call at offset ``piece.start`` covers; other tensors whole."""
    biases = {mod.name for mod in score_mods(compiled.pattern) if isinstance(mod, n.Bias)}
    return {name: t[..., :piece.stop, :] if name in biases else t for name, t in buffers.items()}


def _shifted_source(compiled, held_k, held_v, held, kv_classes, piece, piece_needed, buffers):
    """``(start, k, v)`` when the piece runs shifted (see the module docstring): the keys
    and values of every key/value head at the positions ``[start, stop)`` the piece needs
    in some head, taken from the compact buffers (a view when one class of every head
    holds them all; else each class's held positions placed at theirs, the positions a
    class does not hold left zero: the pattern masks them for its heads); None when it
    does not run shifted."""
    period = translation_period(compiled.pattern)
    needed = piece_needed[0] if len(piece_needed) == 1 else Spans.of(
        1, *(np.concatenate([getattr(p, a) for p in piece_needed]) for a in ("ids", "starts", "stops")))
    interval = needed.contiguous()
    if interval is None or buffers or period is None:
        return None
    start, stop = interval
    if start > piece.start or start % period:
        return None
    if kv_classes == (None,):
        first = int(held[0].covered_below(np.array([start]))[0])
        return start, held_k[0].narrow(2, first, stop - start), held_v[0].narrow(2, first, stop - start)
    window = Spans.of(1, 0, start, stop)
    ks, vs = [], []
    for k, v, positions in zip(held_k, held_v, held):
        inside = positions.intersect(window).positions()
        index = torch.from_numpy(positions.covered_below(inside)).to(k.device)
        places = torch.from_numpy(inside - start).to(k.device)
        ks.append(k.new_zeros(*k.shape[:2], stop - start, k.shape[3]).index_copy(2, places, k.index_select(2, index)))
        vs.append(v.new_zeros(*v.shape[:2], stop - start, v.shape[3]).index_copy(2, places, v.index_select(2, index)))
    order = torch.argsort(torch.tensor([h for heads in kv_classes for h in heads], device=held_k[0].device))
    return start, torch.cat(ks, dim=1).index_select(1, order), torch.cat(vs, dim=1).index_select(1, order)


def _mapped(compiled: CompiledPattern, q, k, v, held: Spans, q_heads: torch.Tensor, heads: int, piece: range,
            seq_len: int, scale: float | None, buffers: dict) -> torch.Tensor:
    """The mapped path (see the module docstring) for the query heads ``q_heads`` of
    ``heads`` (``q [B, len(q_heads), rows, D]``) over one class's compact buffer."""
    batch, _, rows, head_dim = q.shape
    device = q.device
    # The piece's rows of the seq_len x seq_len matrix: ranges of rows counted from its end
    # are anchored there, not at the piece's end.
    lowering = lower_rows(anchored_rows(compiled.pattern, seq_len), rows, seq_len, piece.start,
                          (compiled.q_block, compiled.kv_block), heads=heads, device=device, buffers=buffers,
                          where="sequence_parallel_attention()")
    q_block, kv_block = lowering.grid.q_block, lowering.grid.kv_block
    positions = held.positions()
    tiles, tile_of_entry = np.unique(positions // kv_block, return_inverse=True)  # the held tiles
    states = lowering.states if lowering.states.shape[1] == 1 else lowering.states.index_select(1, q_heads)
    live = states.index_select(-1, torch.from_numpy(tiles).to(device)) != EMPTY  # [Bs, Hs, nq, held tiles]
    tile_of_entry = torch.from_numpy(tile_of_entry.reshape(-1)).to(device)
    positions = torch.from_numpy(positions).to(device)
    score_mod = compiled.score_mod(rows, seq_len, heads=heads, device=device, q_offset=piece.start, **buffers)
    scale = head_dim ** -0.5 if scale is None else scale
    widest = max(1, int(live.sum(-1).max())) if live.numel() else 1
    per_chunk = max(1, SCORE_BUDGET // (batch * len(q_heads) * q_block * kv_block * widest))
    outputs = []
    for first in range(0, live.shape[2], per_chunk):
        last = min(first + per_chunk, live.shape[2])
        columns = live[:, :, first:last].any(2).any(1).any(0)
        keys = columns[tile_of_entry].nonzero().flatten()  # entries of the chunk's live tiles
        outputs.append(_masked_rows(q[:, :, first * q_block:last * q_block], k, v, keys, positions, q_heads,
                                    lowering.position_mask, score_mod, piece.start, first * q_block, scale))
    return torch.cat(outputs, dim=2)


def _masked_rows(q, k, v, keys, positions, q_heads, position_mask, score_mod, q_start: int, row: int,
                 scale: float) -> torch.Tensor:
    """Rows ``q`` (row ``row`` of the piece first, heads ``q_heads``) over the buffer
    entries ``keys``: one softmax per row over its allowed keys, scores modified by
    ``score_mod`` (which adds ``log m`` for a multiset); 0 for a row with none."""
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
    h = q_heads.view(1, -1, 1, 1)
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
    # A row without keys divides its zeros by 1: its gradient stays finite (a division by a
    # tiny total would send an upstream gradient to inf, and inf times 0 to NaN).
    out = (weights @ vv) / torch.where(total > 0, total, 1.0)
    return out.to(q.dtype)
