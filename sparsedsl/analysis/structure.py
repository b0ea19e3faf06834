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

Each fact is a :func:`functools.singledispatch` table with an entry for every node class
(and every block rule class, for ``blocks``); a type without an entry gets the answer that
claims nothing (not covered, or an unbounded diagonal support).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import singledispatch

import torch

from ..lang import nodes as n
from ..lang.queries import depends_on_heads


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


@singledispatch
def periodicity(pattern: n.Pattern) -> Periodicity | None:
    """The period and bounds of a head-free pattern, or ``None`` when it has none we know
    (``documents``, ``heads``, ``segments``, and node types without a rule)."""
    return None


@periodicity.register(n.Full)
@periodicity.register(n.Causal)
@periodicity.register(n.Window)
@periodicity.register(n.DilatedWindow)
@periodicity.register(n.Strided)
def _(pattern: n.Pattern) -> Periodicity:
    return Periodicity(1)


@periodicity.register
def _(pattern: n.Chunks) -> Periodicity:
    return Periodicity(pattern.size)


@periodicity.register
def _(pattern: n.Dilated) -> Periodicity:
    return Periodicity(pattern.segment)


@periodicity.register
def _(pattern: n.GlobalTokens) -> Periodicity:
    return Periodicity(1, pattern.n, pattern.n)


@periodicity.register
def _(pattern: n.Prefix) -> Periodicity:
    return Periodicity(1, 0, pattern.n)


@periodicity.register(n.Documents)
@periodicity.register(n.Heads)
@periodicity.register(n.Segments)
@periodicity.register(n.DilatedHeads)
@periodicity.register(n.LongNet)
def _(pattern: n.Pattern) -> None:
    return None  # call-time tensors; head groups (resolve them per head first)


@periodicity.register
def _(pattern: n.Blocks) -> Periodicity | None:
    bound = 0
    for rule in pattern.rules:
        rule_bound = _rule_bound(rule)
        if rule_bound is None:
            return None
        bound = max(bound, rule_bound * pattern.size)
    if pattern.within_ is not None and _varies_by_head_or_tensor(pattern.within_):
        return None
    # The within-rule only sees q % size and k % size, so ``size`` is a period of it.
    return Periodicity(pattern.size, bound, bound)


@periodicity.register
def _(pattern: n.Scored) -> Periodicity | None:
    return periodicity(pattern.pattern)


@periodicity.register(n.Sum)
@periodicity.register(n.Union)
@periodicity.register(n.Intersection)
@periodicity.register(n.Difference)
@periodicity.register(n.Complement)
def _(pattern: n.Pattern) -> Periodicity | None:
    result = Periodicity(1)
    for child in pattern.children():
        part = periodicity(child)
        if part is None:
            return None
        result = result.combine(part)
    return result


@singledispatch
def _rule_bound(rule: n.BlockRule) -> int | None:
    """The block index from which a block rule is invariant along the diagonal (``0``:
    everywhere), or ``None`` when it is not (random and bound blocks, rules without one)."""
    return None


@_rule_bound.register(n.BlockLocal)
@_rule_bound.register(n.BlockDilated)
def _(rule: n.BlockRule) -> int:
    return 0


@_rule_bound.register
def _(rule: n.BlockGlobal) -> int:
    return rule.n


@_rule_bound.register(n.BlockRandom)
@_rule_bound.register(n.BlockLayout)
def _(rule: n.BlockRule) -> None:
    return None


def _varies_by_head_or_tensor(pattern: n.Pattern) -> bool:
    """Whether ``pattern`` has head groups or reads call-time tensors."""
    return depends_on_heads(pattern) or bool(pattern.buffer_names())


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


@singledispatch
def _signature(node: n.Pattern, q0, k0, t: int, cols: list) -> bool:
    """Append ``node``'s columns to ``cols``; ``False`` when the node is not covered
    (call-time tensors, head groups, random blocks, and node types without a rule).
    ``k0 - q0`` is the tiles' corner diagonal: a pair ``(u, v)`` of a tile has ``k - q =
    k0 - q0 + (v - u)`` with ``|v - u| < t``."""
    return False


@_signature.register
def _(node: n.Full, q0, k0, t, cols):
    return True


@_signature.register
def _(node: n.Causal, q0, k0, t, cols):
    cols.append(_clamp(k0 - q0, t))
    return True


@_signature.register
def _(node: n.Window, q0, k0, t, cols):
    cols.extend(_window_columns(node.before, node.after, k0 - q0, t))
    return True


@_signature.register
def _(node: n.DilatedWindow, q0, k0, t, cols):
    d = k0 - q0
    cols.extend(_window_columns(node.before, node.after, d, t))
    cols.append(d % node.rate)
    return True


def _window_columns(before: int, after: int, d, bound: int) -> list:
    """Columns fixing ``-before <= d + x <= after`` for every ``|x| < bound``."""
    return [_clamp(d + before, bound), _clamp(after - d, bound)]


@_signature.register
def _(node: n.Strided, q0, k0, t, cols):
    cols.append((k0 - q0) % node.stride)
    return True


@_signature.register
def _(node: n.Chunks, q0, k0, t, cols):
    cols.extend(_segment_columns(q0, k0, node.size, t))
    return True


@_signature.register
def _(node: n.Dilated, q0, k0, t, cols):
    cols.extend(_segment_columns(q0, k0, node.segment, t, node.rate))
    return True


@_signature.register
def _(node: n.GlobalTokens, q0, k0, t, cols):
    cols.append((node.n - q0).clamp(0, t))
    cols.append((node.n - k0).clamp(0, t))
    return True


@_signature.register
def _(node: n.Prefix, q0, k0, t, cols):
    cols.append((node.n - k0).clamp(0, t))
    return True


@_signature.register(n.Documents)
@_signature.register(n.Heads)
@_signature.register(n.Segments)
@_signature.register(n.DilatedHeads)
@_signature.register(n.LongNet)
def _(node: n.Pattern, q0, k0, t, cols):
    return False  # call-time tensors; head groups (resolve them per head first)


@_signature.register
def _(node: n.Blocks, q0, k0, t, cols):
    size = node.size
    qa, ka = q0 % size, k0 % size  # fix every position's block offset and remainder
    qb, kb = q0 // size, k0 // size
    reach = (size + t - 2) // size + 1  # block offsets inside the tile stay below this
    cols.extend((qa, ka))
    for rule in node.rules:
        if not _rule_signature(rule, qb, kb, reach, cols):
            return False
    if node.causal_:
        cols.append(_clamp(kb - qb, reach))
    if node.within_ is not None and _varies_by_head_or_tensor(node.within_):
        return False
    return True


@_signature.register
def _(node: n.Scored, q0, k0, t, cols):
    return _signature(node.pattern, q0, k0, t, cols)


@_signature.register(n.Sum)
@_signature.register(n.Union)
@_signature.register(n.Intersection)
@_signature.register(n.Difference)
@_signature.register(n.Complement)
def _(node: n.Pattern, q0, k0, t, cols):
    return all(_signature(c, q0, k0, t, cols) for c in node.children())


@singledispatch
def _rule_signature(rule: n.BlockRule, qb, kb, reach: int, cols: list) -> bool:
    """Append a block rule's columns for tiles whose corners lie in blocks ``(qb, kb)`` and
    whose block offsets stay below ``reach``; ``False`` when the rule is not covered (random
    and bound blocks, rule types without a rule)."""
    return False


@_rule_signature.register
def _(rule: n.BlockLocal, qb, kb, reach, cols):
    cols.extend(_window_columns(rule.window, rule.window, kb - qb, reach))
    return True


@_rule_signature.register
def _(rule: n.BlockDilated, qb, kb, reach, cols):
    db = kb - qb
    cols.extend(db % r for r in rule.rates)
    if rule.window is not None:
        cols.extend(_window_columns(rule.window, rule.window, db, reach))
    return True


@_rule_signature.register
def _(rule: n.BlockGlobal, qb, kb, reach, cols):
    cols.append((rule.n - qb).clamp(0, reach))
    cols.append((rule.n - kb).clamp(0, reach))
    return True


@_rule_signature.register(n.BlockRandom)
@_rule_signature.register(n.BlockLayout)
def _(rule: n.BlockRule, qb, kb, reach, cols):
    return False


# ---------------------------------------------------------------------------------------
# Diagonal support
# ---------------------------------------------------------------------------------------

INF = math.inf


@singledispatch
def diagonal_support(pattern: n.Pattern) -> tuple[float, float]:
    """``(lo, hi)``: in the periodic region of :func:`periodicity` (``q >= q_bound``,
    ``k >= k_bound``) every allowed pair has ``lo <= k - q <= hi`` (``±inf``: unbounded;
    ``lo > hi``: nothing is allowed there). A sound superset, for head-free patterns;
    unbounded for node types without a rule."""
    return (-INF, INF)


@diagonal_support.register(n.Full)
@diagonal_support.register(n.Strided)
@diagonal_support.register(n.Documents)
@diagonal_support.register(n.Heads)
@diagonal_support.register(n.Segments)
@diagonal_support.register(n.Complement)
def _(pattern: n.Pattern) -> tuple[float, float]:
    return (-INF, INF)


@diagonal_support.register
def _(pattern: n.Causal) -> tuple[float, float]:
    return (-INF, 0)


@diagonal_support.register(n.Window)
@diagonal_support.register(n.DilatedWindow)
def _(pattern: n.Pattern) -> tuple[float, float]:
    return (-pattern.before, pattern.after)


@diagonal_support.register
def _(pattern: n.Chunks) -> tuple[float, float]:
    return (-(pattern.size - 1), pattern.size - 1)


@diagonal_support.register
def _(pattern: n.Dilated) -> tuple[float, float]:
    return (-(pattern.segment - 1), pattern.segment - 1)


@diagonal_support.register(n.GlobalTokens)
@diagonal_support.register(n.Prefix)
def _(pattern: n.Pattern) -> tuple[float, float]:
    return (1, 0)


@diagonal_support.register
def _(pattern: n.Blocks) -> tuple[float, float]:
    size = pattern.size
    if not pattern.rules:
        lo, hi = -INF, INF
    else:
        lo, hi = 1, 0
        for rule in pattern.rules:
            blo, bhi = _rule_diagonals(rule)
            if blo <= bhi:  # block diagonals [blo, bhi] hold token diagonals within size - 1
                lo, hi = _hull((lo, hi), (blo * size - (size - 1), bhi * size + (size - 1)))
    if pattern.causal_:
        hi = min(hi, size - 1)
    return (lo, hi)


@diagonal_support.register
def _(pattern: n.Scored) -> tuple[float, float]:
    return diagonal_support(pattern.pattern)


@diagonal_support.register
def _(pattern: n.DilatedHeads) -> tuple[float, float]:
    return (-(pattern.segment - 1), pattern.segment - 1)


@diagonal_support.register
def _(pattern: n.LongNet) -> tuple[float, float]:
    return diagonal_support(pattern.expand())


@diagonal_support.register(n.Sum)
@diagonal_support.register(n.Union)
def _(pattern: n.Pattern) -> tuple[float, float]:
    out = (1, 0)
    for part in pattern.parts:
        out = _hull(out, diagonal_support(part))
    return out


@diagonal_support.register
def _(pattern: n.Intersection) -> tuple[float, float]:
    lo, hi = -INF, INF
    for part in pattern.parts:
        plo, phi = diagonal_support(part)
        lo, hi = max(lo, plo), min(hi, phi)
    return (lo, hi)


@diagonal_support.register
def _(pattern: n.Difference) -> tuple[float, float]:
    return diagonal_support(pattern.left)


@singledispatch
def _rule_diagonals(rule: n.BlockRule) -> tuple[float, float]:
    """``(lo, hi)``: in the periodic region, every block pair a block rule allows has ``lo
    <= kb - qb <= hi`` (``lo > hi``: it allows none there); unbounded for rule types
    without a rule."""
    return (-INF, INF)


@_rule_diagonals.register(n.BlockLocal)
@_rule_diagonals.register(n.BlockDilated)
def _(rule: n.BlockRule) -> tuple[float, float]:
    return (-INF, INF) if rule.window is None else (-rule.window, rule.window)


@_rule_diagonals.register
def _(rule: n.BlockGlobal) -> tuple[float, float]:
    return (1, 0)  # the first block rows and columns lie before the periodic region


@_rule_diagonals.register(n.BlockRandom)
@_rule_diagonals.register(n.BlockLayout)
def _(rule: n.BlockRule) -> tuple[float, float]:
    return (-INF, INF)


def _hull(a: tuple, b: tuple) -> tuple:
    if a[0] > a[1]:
        return b
    if b[0] > b[1]:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


# ---------------------------------------------------------------------------------------
# Ranges, offsets, positions inside documents, cyclic head groups
# ---------------------------------------------------------------------------------------
# A range counted from the end depends on the lengths, not only on the positions: it has
# no periodicity, signature or bounded support here.


@periodicity.register
def _(pattern: n.Queries) -> Periodicity | None:
    if pattern.from_end():
        return None
    return Periodicity(1, pattern.start if pattern.stop is None else pattern.stop, 0)


@periodicity.register
def _(pattern: n.Keys) -> Periodicity | None:
    if pattern.from_end():
        return None
    return Periodicity(1, 0, pattern.start if pattern.stop is None else pattern.stop)


@periodicity.register
def _(pattern: n.Shifted) -> Periodicity | None:
    inner = periodicity(pattern.inner)
    if inner is None:
        return None
    return Periodicity(inner.period, inner.q_bound + pattern.offset, inner.k_bound + pattern.offset)


@periodicity.register(n.DocumentWithin)
@periodicity.register(n.CycleHeads)
def _(pattern: n.Pattern) -> None:
    return None  # call-time tensors; head groups (resolve them per head first)


def _range_columns(start: int, stop: int | None, p0, t: int) -> list:
    """Columns fixing which of the positions ``p0 .. p0 + t - 1`` lie in ``[start, stop)``."""
    cols = [(start - p0).clamp(0, t)]
    if stop is not None:
        cols.append((stop - p0).clamp(0, t))
    return cols


@_signature.register
def _(node: n.Queries, q0, k0, t, cols):
    if node.from_end():
        return False
    cols.extend(_range_columns(node.start, node.stop, q0, t))
    return True


@_signature.register
def _(node: n.Keys, q0, k0, t, cols):
    if node.from_end():
        return False
    cols.extend(_range_columns(node.start, node.stop, k0, t))
    return True


@_signature.register
def _(node: n.Shifted, q0, k0, t, cols):
    # Which rows and columns precede the offset, and the inner content at shifted corners.
    cols.extend(((node.offset - q0).clamp(0, t), (node.offset - k0).clamp(0, t)))
    return _signature(node.inner, q0 - node.offset, k0 - node.offset, t, cols)


@_signature.register(n.DocumentWithin)
@_signature.register(n.CycleHeads)
def _(node: n.Pattern, q0, k0, t, cols):
    return False  # call-time tensors; head groups (resolve them per head first)


@diagonal_support.register(n.Queries)
@diagonal_support.register(n.Keys)
def _(pattern: n.Pattern) -> tuple[float, float]:
    # Past a finite stop nothing is allowed; otherwise every diagonal may be.
    return (-INF, INF) if pattern.stop is None or pattern.from_end() else (1, 0)


@diagonal_support.register
def _(pattern: n.Shifted) -> tuple[float, float]:
    return diagonal_support(pattern.inner)  # a shift along the diagonal keeps k - q


@diagonal_support.register(n.DocumentWithin)
@diagonal_support.register(n.CycleHeads)
def _(pattern: n.Pattern) -> tuple[float, float]:
    return (-INF, INF)


_rule_bound.register(n.BlockRandomCausal, lambda rule: None)
_rule_signature.register(n.BlockRandomCausal, lambda rule, qb, kb, reach, cols: False)
_rule_diagonals.register(n.BlockRandomCausal, lambda rule: (-INF, 0))  # kb <= qb
