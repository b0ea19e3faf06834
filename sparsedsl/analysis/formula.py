"""``sparsedsl.formula``: the number of allowed pairs as a closed form in ``N``.

``formula(pattern)`` is a ``sympy`` expression in ``N = Symbol("N", integer=True,
positive=True)`` equal, for every ``N >= 1``, to ``count(pattern, N).pairs`` with ``Q = K =
N`` and ``H`` heads, ``H`` the pattern's head-group count (one head per group of the widest
``heads``/``segments``; 1 without groups): the sum over those heads. Closed forms use
``floor``, ``Mod``, ``Min``, ``Max`` and ``Piecewise``.

How it is derived. A head-free pattern is written as a signed sum of indicator functions of
*atoms*, sets whose counts have closed forms (inclusion–exclusion: ``1[a | b] = 1[a] +
1[b] - 1[a & b]``, ``1[~a] = 1 - 1[a]``, ``1[a - b] = 1[a] - 1[a & b]``); a product of atoms
is their intersection, which must again be an atom:

* ``Band(lo, hi, rate, rows, cols)``: ``lo <= k - q <= hi``, ``rate | k - q``, ``q < rows``,
  ``k < cols`` (``None``: unbounded). ``full``, ``causal``, ``window``, ``dilated_window``,
  ``strided``, ``prefix`` and the two halves of ``global_tokens``.
* ``Seg(size, rate, offset)``: ``dilated(size, rate, offset)``; ``chunks(s)`` is ``Seg(s, 1, 0)``.
* ``SegBand(size, band)``: a band inside ``chunks(size)``.
* ``BlockForm(size, band, within)``: a ``blocks(size)`` pattern, its block rules an atom on
  block indices, its ``.within`` rule a signed sum of atoms on block-relative positions.

Where an intersection is not an atom (say ``dilated(16, 2) & window(3)``), or a node has no
closed form (``documents``, ``.layout``, ``.random``), :class:`NoClosedFormError` names the
sub-pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import sympy as sp

from ..lang import nodes as n
from ..lang.inspect import head_group_count, mask_part
from .headsplit import resolve_head

N = sp.Symbol("N", integer=True, positive=True)


class NoClosedFormError(ValueError):
    """The pattern (or the named sub-pattern) has no closed form here."""


# ---------------------------------------------------------------------------------------
# Atoms
# ---------------------------------------------------------------------------------------

Bound = Optional[int]  # None: unbounded


@dataclass(frozen=True)
class Band:
    """``lo <= k - q <= hi`` and ``rate | (k - q)``, ``q < rows``, ``k < cols``."""

    lo: Bound = None
    hi: Bound = None
    rate: int = 1
    rows: Bound = None
    cols: Bound = None

    @property
    def limited(self) -> bool:
        return self.rows is not None or self.cols is not None

    def is_empty(self) -> bool:
        if self.lo is not None and self.hi is not None:
            if self.lo > self.hi:
                return True
            return self.hi // self.rate * self.rate < self.lo  # no multiple of rate inside
        return self.rows == 0 or self.cols == 0


UNIVERSE = Band()


@dataclass(frozen=True)
class Seg:
    """``q // size == k // size`` and ``(p % size) % rate == offset`` for ``p = q, k``."""

    size: int
    rate: int = 1
    offset: int = 0


@dataclass(frozen=True)
class SegBand:
    """A band without row/column limits, inside ``chunks(size)``."""

    size: int
    band: Band


@dataclass(frozen=True)
class BlockForm:
    """``blocks(size)``: block pairs in ``band`` (block indices) and ``within`` (a signed sum
    of atoms, as ``((atom, coefficient), ...)``) on block-relative positions."""

    size: int
    band: Band
    within: tuple


Atom = object
Poly = dict  # atom -> int coefficient


class _NoMeet(Exception):
    pass


def _lo_max(a: Bound, b: Bound) -> Bound:
    return b if a is None else a if b is None else max(a, b)


def _hi_min(a: Bound, b: Bound) -> Bound:
    return b if a is None else a if b is None else min(a, b)


def _meet(a: Atom, b: Atom) -> Atom | None:
    """The intersection of two atoms (``None``: empty); raises :class:`_NoMeet`."""
    if a == UNIVERSE or a == b:
        return b
    if b == UNIVERSE:
        return a
    if isinstance(a, Band) and isinstance(b, Band):
        band = Band(_lo_max(a.lo, b.lo), _hi_min(a.hi, b.hi), math.lcm(a.rate, b.rate),
                    _hi_min(a.rows, b.rows), _hi_min(a.cols, b.cols))
        return None if band.is_empty() else band
    if isinstance(b, Band) and not isinstance(a, Band):
        a, b = b, a
    if isinstance(a, Band):  # b is not a band
        if a.limited:
            raise _NoMeet
        if isinstance(b, Seg) and b.rate == 1:
            return SegBand(b.size, a)
        if isinstance(b, SegBand):
            inner = _meet(a, b.band)
            return None if inner is None else SegBand(b.size, inner)
        raise _NoMeet
    if isinstance(a, Seg) and isinstance(b, Seg):
        if a.size == b.size:
            joined = _crt(a.rate, a.offset, b.rate, b.offset)
            return None if joined is None else Seg(a.size, *joined)
        if a.rate == b.rate == 1 and max(a.size, b.size) % min(a.size, b.size) == 0:
            return Seg(min(a.size, b.size))
        raise _NoMeet
    if isinstance(a, SegBand) and isinstance(b, Seg) or isinstance(a, Seg) and isinstance(b, SegBand):
        seg, sb = (a, b) if isinstance(a, Seg) else (b, a)
        if seg.rate == 1 and seg.size == sb.size:
            return sb
        raise _NoMeet
    if isinstance(a, SegBand) and isinstance(b, SegBand) and a.size == b.size:
        inner = _meet(a.band, b.band)
        return None if inner is None else SegBand(a.size, inner)
    if isinstance(a, BlockForm) and isinstance(b, BlockForm) and a.size == b.size:
        band = _meet(a.band, b.band)
        within = _product(dict(a.within), dict(b.within))
        if band is None or not within:
            return None
        return BlockForm(a.size, band, _frozen(within))
    raise _NoMeet


def _crt(r1: int, o1: int, r2: int, o2: int) -> tuple[int, int] | None:
    """``x ≡ o1 (mod r1)`` and ``x ≡ o2 (mod r2)`` as ``x ≡ o (mod lcm)``, or None."""
    lcm = math.lcm(r1, r2)
    for x in range(o1, lcm, r1):
        if x % r2 == o2:
            return lcm, x
    return None


def _frozen(poly: Poly) -> tuple:
    return tuple(sorted(poly.items(), key=lambda kv: repr(kv[0])))


# ---------------------------------------------------------------------------------------
# Indicator polynomials
# ---------------------------------------------------------------------------------------


def _add(p: Poly, q: Poly, scale: int = 1) -> Poly:
    out = dict(p)
    for atom, c in q.items():
        out[atom] = out.get(atom, 0) + scale * c
        if out[atom] == 0:
            del out[atom]
    return out


def _product(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for a, ca in p.items():
        for b, cb in q.items():
            m = _meet(a, b)
            if m is not None:
                out = _add(out, {m: ca * cb})
    return out


def _poly(node: n.Pattern) -> Poly:
    """The signed sum of atoms of a head-free pattern."""
    try:
        return _poly_of(node)
    except _NoMeet:
        raise NoClosedFormError(
            f"formula(): no closed form for {node}: an intersection of its parts is not one "
            f"of the shapes with a known count"
        ) from None


def _poly_of(node: n.Pattern) -> Poly:
    if isinstance(node, n.Full):
        return {UNIVERSE: 1}
    if isinstance(node, n.Causal):
        return {Band(hi=0): 1}
    if isinstance(node, n.Window):
        return {Band(-node.before, node.after): 1}
    if isinstance(node, n.DilatedWindow):
        band = Band(-node.before, node.after, node.rate)
        return {} if band.is_empty() else {band: 1}
    if isinstance(node, n.Strided):
        return {Band(rate=node.stride): 1}
    if isinstance(node, n.Chunks):
        return {Seg(node.size): 1}
    if isinstance(node, n.Dilated):
        return {Seg(node.segment, node.rate, node.offset): 1}
    if isinstance(node, n.Prefix):
        return {Band(cols=node.n): 1}
    if isinstance(node, n.GlobalTokens):
        rows, cols, both = Band(rows=node.n), Band(cols=node.n), Band(rows=node.n, cols=node.n)
        return {rows: 1, cols: 1, both: -1}
    if isinstance(node, n.Blocks):
        return _blocks_poly(node)
    if isinstance(node, n.Union):
        out = _poly(node.parts[0])
        for part in node.parts[1:]:
            other = _poly(part)
            out = _add(_add(out, other), _product(out, other), -1)
        return out
    if isinstance(node, n.Intersection):
        out = _poly(node.parts[0])
        for part in node.parts[1:]:
            out = _product(out, _poly(part))
        return out
    if isinstance(node, n.Difference):
        left = _poly(node.left)
        return _add(left, _product(left, _poly(node.right)), -1)
    if isinstance(node, n.Complement):
        return _add({UNIVERSE: 1}, _poly(node.inner), -1)
    if isinstance(node, n.Scored):
        return _poly(node.pattern)
    raise NoClosedFormError(f"formula(): {node} has no closed form (its pairs depend on "
                            f"call-time tensors or on a seeded choice)")


def _blocks_poly(node: n.Blocks) -> Poly:
    rules: Poly = {} if node.rules else {UNIVERSE: 1}
    for rule in node.rules:
        if isinstance(rule, n.BlockLocal):
            part = {Band(-rule.window, rule.window): 1}
        elif isinstance(rule, n.BlockDilated):
            part = {}
            for r in rule.rates:  # union over rates
                w = rule.window
                one = {Band(None if w is None else -w, w, r): 1}
                part = _add(_add(part, one), _product(part, one), -1)
        elif isinstance(rule, n.BlockGlobal):
            g = rule.n
            part = {Band(rows=g): 1, Band(cols=g): 1, Band(rows=g, cols=g): -1}
        else:
            raise NoClosedFormError(
                f"formula(): {node} has no closed form: .{rule} picks blocks from a "
                f"{'seeded choice' if isinstance(rule, n.BlockRandom) else 'call-time tensor'}")
        rules = _add(_add(rules, part), _product(rules, part), -1)
    if node.causal_:
        rules = _product(rules, {Band(hi=0): 1})
    within = _poly(node.within_) if node.within_ is not None else {UNIVERSE: 1}
    return {BlockForm(node.size, band, _frozen(within)): c for band, c in rules.items()}


# ---------------------------------------------------------------------------------------
# Counting atoms on rectangles [0, a) x [0, b)
# ---------------------------------------------------------------------------------------


def _is_num(x) -> bool:
    return isinstance(x, int) or (isinstance(x, sp.Basic) and x.is_Integer)


def _min(a, b):
    if b is None:
        return a
    return sp.Min(a, b)


def _sum_min(x, y, e0: int, e1: Bound):
    """``sum_{e=e0}^{e1} max(0, min(x - e, y))`` for ``e0 >= 0`` (``e1`` None: unbounded),
    ``x, y >= 0``."""
    last = x - 1 if e1 is None else sp.Min(e1, x - 1)
    z = sp.Min(sp.Max(x - y, e0 - 1), last)
    value = y * (z - e0 + 1) + (last - z) * x - (last * (last + 1) - z * (z + 1)) / 2
    return sp.Piecewise((value, sp.Ge(last, e0)), (0, True))


def _band_rect(band: Band, a, b):
    """Pairs of a rate-1 band in rows ``[0, a)`` x columns ``[0, b)``."""
    a, b = _min(a, band.rows), _min(b, band.cols)
    lo, hi = band.lo, band.hi
    total = sp.Integer(0)
    if hi is None or hi >= 0:  # d = k - q >= 0: rows q < min(a, b - d)
        total += _sum_min(b, a, max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:  # d = -e < 0: rows q in [e, min(a, b + e))
        total += _sum_min(a, b, max(1, -hi) if hi is not None else 1, None if lo is None else -lo)
    return total


def _band_square(band: Band, x):
    """Pairs of an unlimited band on an ``x x x`` square (any rate)."""
    r = band.rate

    def upto(h):  # sum over multiples d of r in [0, h] of (x - d)_+ ; h None: unbounded
        if h is not None and h < 0:
            return sp.Integer(0)
        cap = sp.floor((x - 1) / r)
        terms = (cap if h is None else sp.Min(h // r, cap)) + 1
        return terms * x - r * terms * (terms - 1) / 2

    lo, hi = band.lo, band.hi
    total = sp.Integer(0)
    if hi is None or hi >= 0:
        low = 0 if lo is None or lo <= 0 else lo
        total += upto(hi) - (upto(low - 1) if low > 0 else 0)
    if lo is None or lo < 0:
        start = 1 if hi is None or hi >= 0 else -hi
        total += upto(None if lo is None else -lo) - upto(start - 1)
    return total


def _kept(length, size: int, rate: int, offset: int):
    """Positions ``p`` in ``[0, length)`` (inside one segment, ``length <= size``) with
    ``p % rate == offset``."""
    return sp.floor((length - offset + rate - 1) / sp.Integer(rate))


def _seg_square(seg: Seg, x):
    full = _kept(seg.size, seg.size, seg.rate, seg.offset) if seg.offset < seg.size else 0
    return sp.floor(x / seg.size) * full ** 2 + _kept(sp.Mod(x, seg.size), seg.size, seg.rate, seg.offset) ** 2


def _seg_rect(seg: Seg, a, b):
    """``dilated`` on ``[0, a) x [0, b)`` with ``a <= b`` and ``b`` a number."""
    s, r, o = seg.size, seg.rate, seg.offset
    full = _kept(s, s, r, o) if o < s else 0
    j = sp.floor(a / s)
    last_b = b // s
    k_side = sp.Piecewise((full, sp.Lt(j, last_b)), (_kept(b % s, s, r, o), True))
    return j * full ** 2 + _kept(sp.Mod(a, s), s, r, o) * k_side


def _rect(atom: Atom, a, b, le: bool = False):
    """Pairs of ``atom`` in ``[0, a) x [0, b)``. Either ``a`` and ``b`` are the same
    expression (a square), or both are numbers, or ``le`` says the symbolic side is at
    most the numeric one."""
    square = sp.expand(a - b) == 0
    if _is_num(a) and _is_num(b):
        return sp.Integer(_numeric_rect(atom, int(a), int(b)))
    if isinstance(atom, Band):
        if atom.lo is None and atom.hi is None and atom.rate == 1:
            return _min(a, atom.rows) * _min(b, atom.cols)
        if square and not atom.limited:
            return _band_square(atom, a)
        if atom.rate == 1:
            return _band_rect(atom, a, b)
        raise _NoMeet
    if isinstance(atom, Seg):
        if square:
            return _seg_square(atom, a)
        if le and _is_num(b):
            return _seg_rect(atom, a, int(b))
        if le and _is_num(a):
            return _seg_rect(atom, b, int(a))
        raise _NoMeet
    if isinstance(atom, SegBand) and square:
        s = atom.size
        return sp.floor(a / s) * _band_square(atom.band, sp.Integer(s)) + _band_square(atom.band, sp.Mod(a, s))
    if isinstance(atom, BlockForm) and square:
        return _blocks_square(atom, a)
    raise _NoMeet


def _numeric_rect(atom: Atom, a: int, b: int) -> int:
    """Exact count by summation over rows (numbers only)."""
    if a <= 0 or b <= 0:
        return 0
    if isinstance(atom, Band):
        rows, cols = min(a, atom.rows if atom.rows is not None else a), min(b, atom.cols if atom.cols is not None else b)
        total = 0
        for q in range(rows):
            lo = q + (atom.lo if atom.lo is not None else -q)
            hi = q + (atom.hi if atom.hi is not None else cols)
            lo, hi = max(lo, 0), min(hi, cols - 1)
            if lo <= hi:
                total += (hi - q) // atom.rate - (lo - q - 1) // atom.rate
        return total
    if isinstance(atom, Seg):
        s, r, o = atom.size, atom.rate, atom.offset
        total = 0
        for j in range(0, min(a, b), s):
            kq = len(range(o, min(s, a - j), r))
            kk = len(range(o, min(s, b - j), r))
            total += kq * kk
        return total
    if isinstance(atom, SegBand):
        s = atom.size
        total = 0
        for j in range(0, min(a, b), s):
            total += _numeric_rect(atom.band, min(s, a - j), min(s, b - j))
        return total
    if isinstance(atom, BlockForm):
        if a == b:
            return int(_blocks_square(atom, sp.Integer(a)))
    raise _NoMeet


def _within_rect(within: tuple, a, b, le: bool):
    return sum((c * _rect(atom, a, b, le) for atom, c in within), sp.Integer(0))


def _blocks_square(form: BlockForm, x):
    """``blocks(size)`` on ``x x x``: ``M`` whole blocks and a last block of ``R`` tokens."""
    s, band = form.size, form.band
    m, rem = sp.floor(x / s), sp.Mod(x, s)
    lo, hi, r = band.lo, band.hi, band.rate
    whole = _rect(band, m, m)

    def multiples(lo_, hi_):  # multiples of r in [lo_, hi_]
        return sp.Max(0, sp.floor(hi_ / sp.Integer(r)) - sp.floor((lo_ - 1) / sp.Integer(r)))

    def below(limit):
        return sp.true if limit is None else sp.Lt(m, limit)

    # the last block row against whole block columns: d = kb - m in [-m, -1]
    row_lo = -m if lo is None else sp.Max(lo, -m)
    row_hi = sp.Integer(-1) if hi is None else sp.Min(hi, -1)
    if band.cols is not None:
        row_hi = sp.Min(row_hi, band.cols - 1 - m)
    last_row = sp.Piecewise((multiples(row_lo, row_hi), below(band.rows)), (0, True))
    # whole block rows against the last block column: d = m - qb in [1, m]
    col_lo = sp.Integer(1) if lo is None else sp.Max(lo, 1)
    if band.rows is not None:
        col_lo = sp.Max(col_lo, m - band.rows + 1)
    col_hi = m if hi is None else sp.Min(hi, m)
    last_col = sp.Piecewise((multiples(col_lo, col_hi), below(band.cols)), (0, True))
    on_diagonal = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    corner = sp.Piecewise((1, sp.And(below(band.rows), below(band.cols))), (0, True)) if on_diagonal else 0

    w_full = _within_rect(form.within, sp.Integer(s), sp.Integer(s), False)
    w_row = _within_rect(form.within, rem, sp.Integer(s), True)
    w_col = _within_rect(form.within, sp.Integer(s), rem, True)
    w_corner = _within_rect(form.within, rem, rem, False)
    return whole * w_full + last_row * w_row + last_col * w_col + corner * w_corner


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def formula(pattern: n.Pattern) -> sp.Expr:
    """Allowed pairs of ``pattern`` with ``Q = K = N``, summed over ``H`` heads, ``H`` the
    pattern's head-group count (1 without ``heads``/``segments``), as a ``sympy`` expression
    in ``N`` (:data:`N`). Raises :class:`NoClosedFormError` (a ``ValueError``) naming the
    sub-pattern that has none. See the module docstring."""
    if not isinstance(pattern, n.Pattern):
        raise TypeError(f"formula(): argument 'pattern' must be a pattern, got {pattern!r}")
    core = mask_part(pattern)
    heads = head_group_count(core)
    total = sp.Integer(0)
    cache: dict = {}
    for h in range(heads):
        resolved = resolve_head(core, h, heads)
        if resolved not in cache:
            cache[resolved] = _head_formula(resolved)
        total += cache[resolved]
    return total


def _head_formula(pattern: n.Pattern) -> sp.Expr:
    poly = _poly(pattern)
    total = sp.Integer(0)
    for atom, c in poly.items():
        try:
            total += c * _rect(atom, N, N)
        except _NoMeet:
            raise NoClosedFormError(
                f"formula(): no closed form for {pattern}: one of its parts ({_describe(atom)}) "
                f"has no known count") from None
    return total


def _describe(atom: Atom) -> str:
    return repr(atom)
