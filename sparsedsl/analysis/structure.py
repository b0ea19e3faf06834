"""Two structural facts about head-free patterns that make exact counting fast.

**Eventual periodicity.** Every buffer-free, random-free pattern is invariant under moving
a pair along the diagonal by some period ``P`` once both positions are past some bounds:
``allowed(q + P, k + P) == allowed(q, k)`` whenever ``q >= q_bound`` and ``k >= k_bound``.
(``window``, ``causal``, ``strided``, ``dilated_window`` have ``P = 1``; ``chunks(s)``,
``dilated(s, ...)`` and ``blocks(s)...`` have ``P = s``; ``global_tokens(n)`` and
``prefix(n)`` add bounds; combinators take the lcm of periods and the max of bounds.)
So on ``t x t`` tiles, a tile inside that region has the same content as the tile
``lcm(P, t) / t`` tiles further down the same diagonal: the whole region is a few tile
*classes* per diagonal (:func:`periodicity`).

**Tile signatures.** :func:`tile_signature` maps a tile (its first query and key position
and its extents) to a few integers such that two tiles with equal signatures have equal
contents *relative to their corners*: ``allowed(q0 + u, k0 + v)`` is the same for every
``(u, v)``. Tiles with equal signatures therefore have equal allowed-pair counts, and one
evaluation of the ``mask_mod`` on one of them counts them all. Each primitive keeps only
what its relation depends on (``window`` the clamped distances of the tile's diagonal to
the window edges, ``strided(s)`` the diagonal offset mod ``s``, ``global_tokens(n)`` how
many of the tile's rows/columns are below ``n``, ...); combinators concatenate.

Both return ``None`` for patterns they do not cover (call-time tensors, random blocks,
head groups not yet resolved with :func:`sparsedsl.analysis.headsplit.resolve_head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..lang import nodes as n


@dataclass(frozen=True)
class Periodicity:
    """``allowed(q + period, k + period) == allowed(q, k)`` for ``q >= q_bound`` and
    ``k >= k_bound``."""

    period: int
    q_bound: int = 0
    k_bound: int = 0

    def combine(self, other: "Periodicity") -> "Periodicity":
        return Periodicity(math.lcm(self.period, other.period),
                           max(self.q_bound, other.q_bound), max(self.k_bound, other.k_bound))


def periodicity(pattern: n.Pattern) -> Periodicity | None:
    """The period and bounds of a head-free pattern, or ``None`` when it has none we know."""
    if isinstance(pattern, (n.Full, n.Causal, n.Window, n.DilatedWindow, n.Strided)):
        return Periodicity(1)
    if isinstance(pattern, n.Chunks):
        return Periodicity(pattern.size)
    if isinstance(pattern, n.Dilated):
        return Periodicity(pattern.segment)
    if isinstance(pattern, n.GlobalTokens):
        return Periodicity(1, pattern.n, pattern.n)
    if isinstance(pattern, n.Prefix):
        return Periodicity(1, 0, pattern.n)
    if isinstance(pattern, n.Blocks):
        bound = 0
        for rule in pattern.rules:
            if isinstance(rule, n.BlockGlobal):
                bound = max(bound, rule.n * pattern.size)
            elif not isinstance(rule, (n.BlockLocal, n.BlockDilated)):
                return None
        if pattern.within_ is not None and _has_groups_or_buffers(pattern.within_):
            return None
        # The within-rule only sees q % size and k % size, so ``size`` is a period of it.
        return Periodicity(pattern.size, bound, bound)
    if isinstance(pattern, n.Scored):
        return periodicity(pattern.pattern)
    if isinstance(pattern, (n.Union, n.Intersection, n.Difference, n.Complement)):
        result = Periodicity(1)
        for child in pattern.children():
            part = periodicity(child)
            if part is None:
                return None
            result = result.combine(part)
        return result
    return None  # documents, heads, segments, unknown nodes


def _has_groups_or_buffers(pattern: n.Pattern) -> bool:
    if isinstance(pattern, (n.Heads, n.Segments, n.Documents)):
        return True
    return any(_has_groups_or_buffers(c) for c in pattern.children())


# ---------------------------------------------------------------------------------------
# Tile signatures
# ---------------------------------------------------------------------------------------


def tile_signature(pattern: n.Pattern, q0: torch.Tensor, k0: torch.Tensor, tile: int) -> list[torch.Tensor] | None:
    """Integer columns (each shaped like ``q0``) determining the content of tiles with
    corners ``(q0, k0)`` and extents at most ``tile`` (append the extents yourself), or
    ``None`` when the pattern is not covered. See the module docstring."""
    cols: list[torch.Tensor] = []
    return cols if _signature(pattern, q0, k0, tile, cols) else None


def _clamp(x: torch.Tensor, bound: int) -> torch.Tensor:
    return x.clamp(-bound, bound)


def _segment_columns(q0, k0, size: int, tile: int, period: int | None = None):
    """Columns fixing ``(q // size == k // size)`` and positions mod ``period`` inside a
    segment: the corners' offsets in their segments and the clamped segment difference;
    when both the tile's rows and columns stay inside one segment, the offsets only matter
    mod ``period`` (``None``: not at all)."""
    qa, ka = q0 % size, k0 % size
    diff = q0 // size - k0 // size
    reach = (size + tile - 2) // size + 1  # |diff| >= reach: never in the same segment
    inside = (qa + tile <= size) & (ka + tile <= size)
    small_q = qa % period if period else torch.zeros_like(qa)
    small_k = ka % period if period else torch.zeros_like(ka)
    return [
        inside.to(torch.int64),
        torch.where(inside, small_q, qa),
        torch.where(inside, small_k, ka),
        torch.where(inside, (diff == 0).to(torch.int64), _clamp(diff, reach)),
    ]


def _signature(node: n.Pattern, q0, k0, t: int, cols: list) -> bool:
    d = k0 - q0  # the tile's corner diagonal; k - q = d + (v - u), |v - u| < t
    if isinstance(node, n.Full):
        return True
    if isinstance(node, n.Causal):
        cols.append(_clamp(d, t))
        return True
    if isinstance(node, (n.Window, n.DilatedWindow)):
        cols.append(_clamp(d + node.before, t))
        cols.append(_clamp(node.after - d, t))
        if isinstance(node, n.DilatedWindow):
            cols.append(d % node.rate)
        return True
    if isinstance(node, n.Strided):
        cols.append(d % node.stride)
        return True
    if isinstance(node, n.Chunks):
        cols.extend(_segment_columns(q0, k0, node.size, t))
        return True
    if isinstance(node, n.Dilated):
        cols.extend(_segment_columns(q0, k0, node.segment, t, node.rate))
        return True
    if isinstance(node, n.GlobalTokens):
        cols.append((node.n - q0).clamp(0, t))
        cols.append((node.n - k0).clamp(0, t))
        return True
    if isinstance(node, n.Prefix):
        cols.append((node.n - k0).clamp(0, t))
        return True
    if isinstance(node, n.Blocks):
        return _blocks_signature(node, q0, k0, t, cols)
    if isinstance(node, n.Scored):
        return _signature(node.pattern, q0, k0, t, cols)
    if isinstance(node, (n.Union, n.Intersection, n.Difference, n.Complement)):
        return all(_signature(c, q0, k0, t, cols) for c in node.children())
    return False


def _blocks_signature(node: n.Blocks, q0, k0, t: int, cols: list) -> bool:
    size = node.size
    qa, ka = q0 % size, k0 % size  # fix every position's block offset and remainder
    qb, kb = q0 // size, k0 // size
    db = kb - qb
    reach = (size + t - 2) // size + 1  # block offsets inside the tile stay below this
    cols.extend((qa, ka))
    for rule in node.rules:
        if isinstance(rule, n.BlockLocal):
            cols.append(_clamp(db + rule.window, reach))
            cols.append(_clamp(rule.window - db, reach))
        elif isinstance(rule, n.BlockDilated):
            cols.extend(db % r for r in rule.rates)
            if rule.window is not None:
                cols.append(_clamp(db + rule.window, reach))
                cols.append(_clamp(rule.window - db, reach))
        elif isinstance(rule, n.BlockGlobal):
            cols.append((rule.n - qb).clamp(0, reach))
            cols.append((rule.n - kb).clamp(0, reach))
        else:
            return False
    if node.causal_:
        cols.append(_clamp(db, reach))
    if node.within_ is not None and _has_groups_or_buffers(node.within_):
        return False
    return True


# ---------------------------------------------------------------------------------------
# Diagonal support
# ---------------------------------------------------------------------------------------

INF = math.inf


def diagonal_support(pattern: n.Pattern) -> tuple[float, float]:
    """``(lo, hi)``: in the periodic region of :func:`periodicity` (``q >= q_bound``,
    ``k >= k_bound``) every allowed pair has ``lo <= k - q <= hi`` (``±inf``: unbounded;
    ``lo > hi``: nothing is allowed there). A sound superset, for head-free patterns."""
    if isinstance(pattern, (n.Full, n.Strided)):
        return (-INF, INF)
    if isinstance(pattern, n.Causal):
        return (-INF, 0)
    if isinstance(pattern, (n.Window, n.DilatedWindow)):
        return (-pattern.before, pattern.after)
    if isinstance(pattern, (n.Chunks, n.Dilated)):
        size = pattern.size if isinstance(pattern, n.Chunks) else pattern.segment
        return (-(size - 1), size - 1)
    if isinstance(pattern, (n.GlobalTokens, n.Prefix)):
        return (1, 0)
    if isinstance(pattern, n.Blocks):
        size = pattern.size
        if not pattern.rules:
            lo, hi = -INF, INF
        else:
            lo, hi = 1, 0
            for rule in pattern.rules:
                width = rule.window if isinstance(rule, (n.BlockLocal, n.BlockDilated)) else None
                if isinstance(rule, n.BlockGlobal):
                    continue
                if width is None:
                    lo, hi = -INF, INF
                else:
                    reach = (width + 1) * size - 1
                    lo, hi = _hull((lo, hi), (-reach, reach))
        if pattern.causal_:
            hi = min(hi, size - 1)
        return (lo, hi)
    if isinstance(pattern, n.Scored):
        return diagonal_support(pattern.pattern)
    if isinstance(pattern, n.Union):
        out = (1, 0)
        for part in pattern.parts:
            out = _hull(out, diagonal_support(part))
        return out
    if isinstance(pattern, n.Intersection):
        lo, hi = -INF, INF
        for part in pattern.parts:
            plo, phi = diagonal_support(part)
            lo, hi = max(lo, plo), min(hi, phi)
        return (lo, hi)
    if isinstance(pattern, n.Difference):
        return diagonal_support(pattern.left)
    return (-INF, INF)


def _hull(a: tuple, b: tuple) -> tuple:
    if a[0] > a[1]:
        return b
    if b[0] > b[1]:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))
