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

* ``Diagonals(lo, hi, rate, rows, cols)``: the pairs on diagonals ``d = k - q`` with ``lo
  <= d <= hi`` and ``rate | d``, in rows ``q < rows`` and columns ``k < cols`` (``None``:
  unbounded). ``full``, ``causal``, ``window``, ``dilated_window``, ``strided``, ``prefix``
  and the two halves of ``global_tokens``.
* ``Seg(size, rate, offset)``: ``dilated(size, rate, offset)``; ``chunks(s)`` is ``Seg(s, 1, 0)``.
* ``SegDiagonals(size, diagonals)``: unlimited ``Diagonals`` inside ``chunks(size)``.
* ``BlockForm(size, diagonals, within)``: a ``blocks(size)`` pattern, its block rules
  ``Diagonals`` of block indices, its ``.within`` rule a signed sum of atoms on
  block-relative positions.

What each node and each block rule contributes is one ``functools.singledispatch`` entry
per class; a class without one is refused with a ``TypeError`` naming it.

Where an intersection is not an atom (say ``dilated(16, 2) & window(3)``), or a node has no
closed form (``documents``, ``.layout``, ``.random``), :class:`NoClosedFormError` names the
sub-pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import singledispatch
from typing import Optional

import sympy as sp

from ..lang import nodes as n
from ..lang.multiset import multiset_terms
from ..lang.queries import head_group_count, mask_part
from .headsplit import resolve_head

N = sp.Symbol("N", integer=True, positive=True)


class NoClosedFormError(ValueError):
    """The pattern (or the named sub-pattern) has no closed form here."""


# ---------------------------------------------------------------------------------------
# Atoms
# ---------------------------------------------------------------------------------------

Bound = Optional[int]  # None: unbounded


@dataclass(frozen=True)
class Diagonals:
    """The pairs with ``lo <= k - q <= hi``, ``rate | (k - q)``, ``q < rows`` and ``k <
    cols`` (``None``: unbounded)."""

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


UNIVERSE = Diagonals()


@dataclass(frozen=True)
class Seg:
    """``q // size == k // size`` and ``(p % size) % rate == offset`` for ``p = q, k``."""

    size: int
    rate: int = 1
    offset: int = 0


@dataclass(frozen=True)
class SegDiagonals:
    """``Diagonals`` without row/column limits, inside ``chunks(size)``."""

    size: int
    diagonals: Diagonals


@dataclass(frozen=True)
class BlockForm:
    """``blocks(size)``: block pairs in ``diagonals`` (of block indices) and ``within`` (a
    signed sum of atoms, as ``((atom, coefficient), ...)``) on block-relative positions."""

    size: int
    diagonals: Diagonals
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
    if isinstance(a, Diagonals) and isinstance(b, Diagonals):
        both = Diagonals(_lo_max(a.lo, b.lo), _hi_min(a.hi, b.hi), math.lcm(a.rate, b.rate),
                         _hi_min(a.rows, b.rows), _hi_min(a.cols, b.cols))
        return None if both.is_empty() else both
    if isinstance(b, Diagonals) and not isinstance(a, Diagonals):
        a, b = b, a
    if isinstance(a, Diagonals):  # b is not Diagonals
        if a.limited:
            raise _NoMeet
        if isinstance(b, Seg) and b.rate == 1:
            return SegDiagonals(b.size, a)
        if isinstance(b, SegDiagonals):
            inner = _meet(a, b.diagonals)
            return None if inner is None else SegDiagonals(b.size, inner)
        raise _NoMeet
    if isinstance(a, Seg) and isinstance(b, Seg):
        if a.size == b.size:
            joined = _crt(a.rate, a.offset, b.rate, b.offset)
            return None if joined is None else Seg(a.size, *joined)
        if a.rate == b.rate == 1 and max(a.size, b.size) % min(a.size, b.size) == 0:
            return Seg(min(a.size, b.size))
        raise _NoMeet
    if isinstance(a, SegDiagonals) and isinstance(b, Seg) or isinstance(a, Seg) and isinstance(b, SegDiagonals):
        seg, sb = (a, b) if isinstance(a, Seg) else (b, a)
        if seg.rate == 1 and seg.size == sb.size:
            return sb
        raise _NoMeet
    if isinstance(a, SegDiagonals) and isinstance(b, SegDiagonals) and a.size == b.size:
        inner = _meet(a.diagonals, b.diagonals)
        return None if inner is None else SegDiagonals(a.size, inner)
    if isinstance(a, BlockForm) and isinstance(b, BlockForm) and a.size == b.size:
        diagonals = _meet(a.diagonals, b.diagonals)
        within = _product(dict(a.within), dict(b.within))
        if diagonals is None or not within:
            return None
        return BlockForm(a.size, diagonals, _frozen(within))
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


def _or(p: Poly, q: Poly) -> Poly:
    """The signed sum of atoms of the union of ``p`` and ``q``: ``p + q - p q``."""
    return _add(_add(p, q), _product(p, q), -1)


@singledispatch
def _poly_of(node: n.Pattern) -> Poly:
    """The signed sum of atoms of one node (see the module docstring)."""
    raise TypeError(f"formula(): no rule for node type {type(node).__name__}")


@_poly_of.register
def _(node: n.Full) -> Poly:
    return {UNIVERSE: 1}


@_poly_of.register
def _(node: n.Causal) -> Poly:
    return {Diagonals(hi=0): 1}


@_poly_of.register
def _(node: n.Window) -> Poly:
    return {Diagonals(-node.before, node.after): 1}


@_poly_of.register
def _(node: n.DilatedWindow) -> Poly:
    diagonals = Diagonals(-node.before, node.after, node.rate)
    return {} if diagonals.is_empty() else {diagonals: 1}


@_poly_of.register
def _(node: n.Strided) -> Poly:
    return {Diagonals(rate=node.stride): 1}


@_poly_of.register
def _(node: n.Chunks) -> Poly:
    return {Seg(node.size): 1}


@_poly_of.register
def _(node: n.Dilated) -> Poly:
    return {Seg(node.segment, node.rate, node.offset): 1}


@_poly_of.register
def _(node: n.Prefix) -> Poly:
    return {Diagonals(cols=node.n): 1}


@_poly_of.register
def _(node: n.GlobalTokens) -> Poly:
    return _first_rows_or_columns(node.n)


def _first_rows_or_columns(count: int) -> Poly:
    """``q < count or k < count``."""
    return {Diagonals(rows=count): 1, Diagonals(cols=count): 1, Diagonals(rows=count, cols=count): -1}


@_poly_of.register
def _(node: n.Documents) -> Poly:
    raise NoClosedFormError(f"formula(): {node} has no closed form (its pairs depend on a "
                            f"call-time tensor)")


@_poly_of.register(n.Heads)
@_poly_of.register(n.Segments)
@_poly_of.register(n.DilatedHeads)
@_poly_of.register(n.LongNet)
def _(node: n.Pattern) -> Poly:
    raise NoClosedFormError(f"formula(): {node} gives heads different patterns: each head "
                            f"has its own closed form (resolve the head first)")


@_poly_of.register
def _(node: n.Blocks) -> Poly:
    rules: Poly = {} if node.rules else {UNIVERSE: 1}
    for rule in node.rules:
        rules = _or(rules, _rule_poly(rule, node))
    if node.causal_:
        rules = _product(rules, {Diagonals(hi=0): 1})
    within = _poly(node.within_) if node.within_ is not None else {UNIVERSE: 1}
    return {BlockForm(node.size, diagonals, _frozen(within)): c for diagonals, c in rules.items()}


@_poly_of.register(n.Sum)  # the indicator of where some part allows a pair
@_poly_of.register(n.Union)
def _(node: n.Pattern) -> Poly:
    out = _poly(node.parts[0])
    for part in node.parts[1:]:
        out = _or(out, _poly(part))
    return out


@_poly_of.register
def _(node: n.Intersection) -> Poly:
    out = _poly(node.parts[0])
    for part in node.parts[1:]:
        out = _product(out, _poly(part))
    return out


@_poly_of.register
def _(node: n.Difference) -> Poly:
    left = _poly(node.left)
    return _add(left, _product(left, _poly(node.right)), -1)


@_poly_of.register
def _(node: n.Complement) -> Poly:
    return _add({UNIVERSE: 1}, _poly(node.inner), -1)


@_poly_of.register
def _(node: n.Scored) -> Poly:
    return _poly(node.pattern)


@singledispatch
def _rule_poly(rule: n.BlockRule, node: n.Blocks) -> Poly:
    """The signed sum of ``Diagonals`` of block indices of one block rule of ``node``."""
    raise TypeError(f"formula(): no rule for block rule type {type(rule).__name__}")


@_rule_poly.register
def _(rule: n.BlockLocal, node: n.Blocks) -> Poly:
    return {Diagonals(-rule.window, rule.window): 1}


@_rule_poly.register
def _(rule: n.BlockDilated, node: n.Blocks) -> Poly:
    w = rule.window
    out: Poly = {}
    for r in rule.rates:  # union over rates
        out = _or(out, {Diagonals(None if w is None else -w, w, r): 1})
    return out


@_rule_poly.register
def _(rule: n.BlockGlobal, node: n.Blocks) -> Poly:
    return _first_rows_or_columns(rule.n)


@_rule_poly.register
def _(rule: n.BlockRandom, node: n.Blocks) -> Poly:
    raise NoClosedFormError(f"formula(): {node} has no closed form: .{rule} picks blocks from a seeded choice")


@_rule_poly.register
def _(rule: n.BlockLayout, node: n.Blocks) -> Poly:
    raise NoClosedFormError(f"formula(): {node} has no closed form: .{rule} picks blocks from a call-time tensor")


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


def _diagonals_rect(diagonals: Diagonals, a, b):
    """Pairs of rate-1 ``diagonals`` in rows ``[0, a)`` x columns ``[0, b)``."""
    a, b = _min(a, diagonals.rows), _min(b, diagonals.cols)
    lo, hi = diagonals.lo, diagonals.hi
    total = sp.Integer(0)
    if hi is None or hi >= 0:  # d = k - q >= 0: rows q < min(a, b - d)
        total += _sum_min(b, a, max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:  # d = -e < 0: rows q in [e, min(a, b + e))
        total += _sum_min(a, b, max(1, -hi) if hi is not None else 1, None if lo is None else -lo)
    return total


def _diagonals_square(diagonals: Diagonals, x):
    """Pairs of unlimited ``diagonals`` on an ``x x x`` square (any rate)."""
    r = diagonals.rate

    def upto(h):  # sum over multiples d of r in [0, h] of (x - d)_+ ; h None: unbounded
        if h is not None and h < 0:
            return sp.Integer(0)
        cap = sp.floor((x - 1) / r)
        terms = (cap if h is None else sp.Min(h // r, cap)) + 1
        return terms * x - r * terms * (terms - 1) / 2

    lo, hi = diagonals.lo, diagonals.hi
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
    if _is_num(a) and _is_num(b):
        return sp.Integer(_numeric_rect(atom, int(a), int(b)))
    return _symbolic_rect(atom, a, b, sp.expand(a - b) == 0, le)


@singledispatch
def _symbolic_rect(atom: Atom, a, b, square: bool, le: bool):
    """:func:`_rect` of one atom type, ``a`` or ``b`` symbolic (``square``: ``a == b``);
    raises :class:`_NoMeet` where the atom has no closed form on that rectangle."""
    raise TypeError(f"formula(): no count for atom type {type(atom).__name__}")


@_symbolic_rect.register
def _(atom: Diagonals, a, b, square, le):
    if atom.lo is None and atom.hi is None and atom.rate == 1:
        return _min(a, atom.rows) * _min(b, atom.cols)
    if square and not atom.limited:
        return _diagonals_square(atom, a)
    if atom.rate == 1:
        return _diagonals_rect(atom, a, b)
    raise _NoMeet


@_symbolic_rect.register
def _(atom: Seg, a, b, square, le):
    if square:
        return _seg_square(atom, a)
    if le and _is_num(b):
        return _seg_rect(atom, a, int(b))
    if le and _is_num(a):
        return _seg_rect(atom, b, int(a))
    raise _NoMeet


@_symbolic_rect.register
def _(atom: SegDiagonals, a, b, square, le):
    if not square:
        raise _NoMeet
    s = atom.size
    return sp.floor(a / s) * _diagonals_square(atom.diagonals, sp.Integer(s)) + \
        _diagonals_square(atom.diagonals, sp.Mod(a, s))


@_symbolic_rect.register
def _(atom: BlockForm, a, b, square, le):
    if not square:
        raise _NoMeet
    return _blocks_square(atom, a)


def _numeric_rect(atom: Atom, a: int, b: int) -> int:
    """Exact count by summation over rows (numbers only)."""
    if a <= 0 or b <= 0:
        return 0
    return _summed_rect(atom, a, b)


@singledispatch
def _summed_rect(atom: Atom, a: int, b: int) -> int:
    """:func:`_numeric_rect` of one atom type, ``a, b >= 1``."""
    raise TypeError(f"formula(): no count for atom type {type(atom).__name__}")


@_summed_rect.register
def _(atom: Diagonals, a, b):
    rows, cols = min(a, atom.rows if atom.rows is not None else a), min(b, atom.cols if atom.cols is not None else b)
    total = 0
    for q in range(rows):
        lo = q + (atom.lo if atom.lo is not None else -q)
        hi = q + (atom.hi if atom.hi is not None else cols)
        lo, hi = max(lo, 0), min(hi, cols - 1)
        if lo <= hi:
            total += (hi - q) // atom.rate - (lo - q - 1) // atom.rate
    return total


@_summed_rect.register
def _(atom: Seg, a, b):
    s, r, o = atom.size, atom.rate, atom.offset
    total = 0
    for j in range(0, min(a, b), s):
        kq = len(range(o, min(s, a - j), r))
        kk = len(range(o, min(s, b - j), r))
        total += kq * kk
    return total


@_summed_rect.register
def _(atom: SegDiagonals, a, b):
    s = atom.size
    total = 0
    for j in range(0, min(a, b), s):
        total += _numeric_rect(atom.diagonals, min(s, a - j), min(s, b - j))
    return total


@_summed_rect.register
def _(atom: BlockForm, a, b):
    if a != b:
        raise _NoMeet
    return int(_blocks_square(atom, sp.Integer(a)))


def _within_rect(within: tuple, a, b, le: bool):
    return sum((c * _rect(atom, a, b, le) for atom, c in within), sp.Integer(0))


_M = sp.Symbol("M", integer=True, nonnegative=True)
_R = sp.Symbol("R", integer=True, nonnegative=True)


def _blocks_square(form: BlockForm, x):
    """``blocks(size)`` on ``x x x``: ``M = floor(x / size)`` whole blocks and a last block
    of ``R = x mod size`` tokens. The terms in ``M`` and in ``R`` are made explicit
    separately (:func:`tidy`), then ``M`` and ``R`` are put back in terms of ``x``."""
    s = form.size
    m, rem = _M, _R
    parts = _blocks_terms(form, m, rem)
    expr = sum((tidy(pm, _M, 0) * tidy(pr, _R, 0, s - 1) for pm, pr in parts), sp.Integer(0))
    return expr.xreplace({_M: sp.floor(x / s), _R: sp.Mod(x, s)})


def _blocks_terms(form: BlockForm, m, rem) -> list:
    """``[(term in M, term in R), ...]`` whose products sum to the count."""
    s, diagonals = form.size, form.diagonals
    lo, hi, r = diagonals.lo, diagonals.hi, diagonals.rate
    whole = _rect(diagonals, m, m)

    def multiples(lo_, hi_):  # multiples of r in [lo_, hi_]
        return sp.Max(0, sp.floor(hi_ / sp.Integer(r)) - sp.floor((lo_ - 1) / sp.Integer(r)))

    def below(limit):
        return sp.true if limit is None else sp.Lt(m, limit)

    # the last block row against whole block columns: d = kb - m in [-m, -1]
    row_lo = -m if lo is None else sp.Max(lo, -m)
    row_hi = sp.Integer(-1) if hi is None else sp.Min(hi, -1)
    if diagonals.cols is not None:
        row_hi = sp.Min(row_hi, diagonals.cols - 1 - m)
    last_row = sp.Piecewise((multiples(row_lo, row_hi), below(diagonals.rows)), (0, True))
    # whole block rows against the last block column: d = m - qb in [1, m]
    col_lo = sp.Integer(1) if lo is None else sp.Max(lo, 1)
    if diagonals.rows is not None:
        col_lo = sp.Max(col_lo, m - diagonals.rows + 1)
    col_hi = m if hi is None else sp.Min(hi, m)
    last_col = sp.Piecewise((multiples(col_lo, col_hi), below(diagonals.cols)), (0, True))
    on_diagonal = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    corner = sp.Piecewise((1, sp.And(below(diagonals.rows), below(diagonals.cols))), (0, True)) if on_diagonal else 0

    w_full = _within_rect(form.within, sp.Integer(s), sp.Integer(s), False)
    w_row = _within_rect(form.within, rem, sp.Integer(s), True)
    w_col = _within_rect(form.within, sp.Integer(s), rem, True)
    w_corner = _within_rect(form.within, rem, rem, False)
    return [(whole, w_full), (last_row, w_row), (last_col, w_col), (corner, w_corner)]


# ---------------------------------------------------------------------------------------
# Ranges, offsets, positions inside documents, cyclic head groups
# ---------------------------------------------------------------------------------------


@_poly_of.register
def _(node: n.Queries) -> Poly:
    return _range_poly(node, "rows")


@_poly_of.register
def _(node: n.Keys) -> Poly:
    return _range_poly(node, "cols")


def _range_poly(node, axis: str) -> Poly:
    """``start <= p < stop`` on the rows or columns: ``1[p < stop] - 1[p < start]``."""
    if node.from_end():
        raise NoClosedFormError(f"formula(): {node} counts from the end of the sequence, which has "
                                f"no closed form here")
    out: Poly = {UNIVERSE: 1} if node.stop is None else {Diagonals(**{axis: node.stop}): 1}
    return out if node.start == 0 else _add(out, {Diagonals(**{axis: node.start}): 1}, -1)


@dataclass(frozen=True)
class Shifted:
    """``pattern.starting_at(offset)``: the signed sum of atoms ``inner`` counted on the
    positions from ``offset`` on."""

    offset: int
    inner: tuple


@_poly_of.register
def _(node: n.Shifted) -> Poly:
    return {Shifted(node.offset, _frozen(_poly(node.inner))): 1}


@_symbolic_rect.register
def _(atom: Shifted, a, b, square, le):
    if not square:
        raise _NoMeet
    inner = _within_rect(atom.inner, a - atom.offset, a - atom.offset, False)
    return sp.Piecewise((inner, sp.Gt(a, atom.offset)), (0, True))


@_summed_rect.register
def _(atom: Shifted, a, b):
    return sum(c * _numeric_rect(inner, a - atom.offset, b - atom.offset) for inner, c in atom.inner)


@_poly_of.register
def _(node: n.DocumentWithin) -> Poly:
    raise NoClosedFormError(f"formula(): {node} has no closed form (its pairs depend on a "
                            f"call-time tensor)")


@_poly_of.register
def _(node: n.CycleHeads) -> Poly:
    raise NoClosedFormError(f"formula(): {node} gives heads different patterns: each head "
                            f"has its own closed form (resolve the head first)")


@_rule_poly.register
def _(rule: n.BlockRandomCausal, node: n.Blocks) -> Poly:
    raise NoClosedFormError(f"formula(): {node} has no closed form: .{rule} picks blocks from a seeded choice")


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def formula(pattern: n.Pattern) -> sp.Expr:
    """Allowed pairs of ``pattern`` with ``Q = K = N``, summed over ``H`` heads, ``H`` the
    pattern's head-group count (1 without ``heads``/``segments``), as a ``sympy`` expression
    in ``N`` (:data:`N`). For a multiset pattern (``a + b``, ``longnet``), the pairs counted
    with multiplicity (``count(...).pairs_with_multiplicity``): the sum of the closed forms
    of its terms (:func:`sparsedsl.lang.multiset.multiset_terms`). Raises
    :class:`NoClosedFormError` (a ``ValueError``) naming the sub-pattern that has none. See
    the module docstring."""
    if not isinstance(pattern, n.Pattern):
        raise TypeError(f"formula(): argument 'pattern' must be a pattern, got {pattern!r}")
    core = mask_part(pattern)
    heads = head_group_count(core)
    total = sp.Integer(0)
    cache: dict = {}
    for term in multiset_terms(core):
        for h in range(heads):
            resolved = resolve_head(term, h, heads)
            if resolved not in cache:
                cache[resolved] = _head_formula(resolved)
            total += cache[resolved]
    return tidy(total)


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


# ---------------------------------------------------------------------------------------
# Presentation: Min/Max of linear terms as explicit branches
# ---------------------------------------------------------------------------------------


def _piecewise_linear(expr, var) -> bool:
    """Built from ``var``, rationals, ``+``, rational multiples, ``floor``, ``Mod`` (by an
    integer), ``Min`` and ``Max`` only (what :func:`_exact_values` evaluates)."""
    if expr == var or expr.is_Rational:
        return True
    if isinstance(expr, (sp.Add, sp.Min, sp.Max)):
        return all(_piecewise_linear(a, var) for a in expr.args)
    if isinstance(expr, sp.floor):
        return _piecewise_linear(expr.args[0], var)
    if isinstance(expr, sp.Mod):
        return _piecewise_linear(expr.args[0], var) and expr.args[1].is_Integer
    if isinstance(expr, sp.Mul):
        rest = [a for a in expr.args if not a.is_Rational]
        return len(rest) == 1 and _piecewise_linear(rest[0], var)
    return False


def _exact_values(expr, var, values):
    """``(numerators, denominator)``: ``expr`` at every ``var`` in ``values`` (int64 numpy
    array), exactly, as integers over one denominator."""
    import numpy as np

    if expr == var:
        return values, 1
    if expr.is_Rational:
        return np.full(values.shape, int(expr.p), dtype=np.int64), int(expr.q)
    if isinstance(expr, (sp.Add, sp.Min, sp.Max)):
        parts = [_exact_values(a, var, values) for a in expr.args]
        den = math.lcm(*(d for _, d in parts))
        nums = [num * (den // d) for num, d in parts]
        if isinstance(expr, sp.Add):
            return sum(nums[1:], nums[0]), den
        stack = np.stack(nums)
        return (stack.min(0) if isinstance(expr, sp.Min) else stack.max(0)), den
    if isinstance(expr, sp.floor):
        num, den = _exact_values(expr.args[0], var, values)
        return num // den, 1
    if isinstance(expr, sp.Mod):
        num, den = _exact_values(expr.args[0], var, values)
        m = int(expr.args[1])
        return num % (m * den), den
    if isinstance(expr, sp.Mul):
        coeff = sp.Integer(1)
        rest = None
        for a in expr.args:
            if a.is_Rational:
                coeff *= a
            else:
                rest = a
        num, den = _exact_values(rest, var, values)
        return num * int(coeff.p), den * int(coeff.q)
    raise TypeError(expr)


def _constants(exprs) -> tuple[int, int]:
    """Sum of the integers and largest denominator appearing in ``exprs``."""
    total, den = 0, 1
    for e in exprs:
        for a in sp.preorder_traversal(e):
            if isinstance(a, sp.Rational):
                total += abs(int(a.p)) + (int(a.q) if a.q != 1 else 0)
                den = max(den, int(a.q))
            if isinstance(a, sp.Mod):
                den = max(den, int(a.args[1]))
    return total, den


def tidy(expr: sp.Expr, var: sp.Symbol = N, first: int = 1, last: int | None = None) -> sp.Expr:
    """``expr`` (in ``var``, for integers ``first <= var <= last``; ``last`` None: unbounded)
    with every ``Min``/``Max`` (and ``Piecewise`` condition) resolved into
    explicit branches ``Piecewise((expr_k, N >= b_k), ..., (expr_0, True))`` where their
    choices settle as ``N`` grows (``Min(256, N - 1)``, ``Min(1, floor(N/4) - 1)``).
    Expressions whose choices keep changing come back unchanged.

    Pieces built from ``var`` and ``floor`` of it with constants ``c_i`` and denominators up
    to ``q`` cross below ``q * sum |c_i|``; the choices are read exactly at every value up
    to twice that bound (or up to ``last``), must have settled by half of it, and the result
    is checked equal to ``expr`` at every branch start and around it."""
    import numpy as np

    switches = [a for a in sp.preorder_traversal(expr) if isinstance(a, (sp.Min, sp.Max, sp.Piecewise))]
    if not switches:
        return sp.expand(expr)
    sides = []
    for s in switches:
        if isinstance(s, sp.Piecewise):
            for _, cond in s.args:
                if cond is sp.true:
                    continue
                if not isinstance(cond, (sp.Ge, sp.Gt, sp.Le, sp.Lt)):
                    return expr
                sides.extend((cond.lhs, cond.rhs))
        else:
            sides.extend(s.args)
    if not all(_piecewise_linear(side, var) for side in sides):
        return expr
    if last is None:
        total, den = _constants(sides)
        limit = first + 2 * (total + 2) * den + 16
    else:
        limit = last
    if limit - first > 1 << 21:
        return expr
    values = np.arange(first, limit + 1, dtype=np.int64)

    def holds(cond):
        (a, da), (b, db) = _exact_values(cond.lhs, var, values), _exact_values(cond.rhs, var, values)
        a, b = a * db, b * da
        return {sp.Ge: a >= b, sp.Gt: a > b, sp.Le: a <= b, sp.Lt: a < b}[type(cond)]

    columns = []
    for s in switches:
        if isinstance(s, sp.Piecewise):
            picked = np.full(values.shape, len(s.args) - 1)
            for idx in reversed(range(len(s.args))):
                cond = s.args[idx][1]
                picked = np.where(True if cond is sp.true else holds(cond), idx, picked)
            columns.append(picked)
        else:
            parts = [_exact_values(a, var, values) for a in s.args]
            common = math.lcm(*(d for _, d in parts))
            stack = np.stack([num * (common // d) for num, d in parts])
            columns.append(stack.argmin(0) if isinstance(s, sp.Min) else stack.argmax(0))
    table = np.stack(columns, 1)
    change = np.flatnonzero(np.any(table[1:] != table[:-1], axis=1)) + 1
    if last is None and change.size and change[-1] > (limit - first) // 2:
        return expr  # the choices have not settled
    starts = [0] + change.tolist()

    def resolved(choice) -> sp.Expr:
        mapping = {s: (s.args[int(i)][0] if isinstance(s, sp.Piecewise) else s.args[int(i)])
                   for s, i in zip(switches, choice)}
        out = expr
        for _ in range(len(switches) + 1):
            new = out.xreplace(mapping)
            if new == out:
                break
            out = new
        return sp.expand(out)

    pieces: list[list] = []  # [first N, last N (None: unbounded), expression]
    for pos, idx in enumerate(starts):
        poly = resolved(table[idx])
        if poly.has(sp.Min, sp.Max, sp.Piecewise):
            return expr
        end = int(values[starts[pos + 1] - 1]) if pos + 1 < len(starts) else None
        pieces.append([int(values[idx]), end, poly])
    # Merge a piece into its successor where the successor's expression agrees on it.
    merged: list[list] = []
    for piece in pieces:
        merged.append(piece)
        while len(merged) >= 2:
            prev, cur = merged[-2], merged[-1]
            if prev[2] == cur[2] or all(cur[2].subs(var, v) == prev[2].subs(var, v)
                                        for v in range(prev[0], prev[1] + 1)):
                merged[-2:] = [[prev[0], cur[1], cur[2]]]
            else:
                break
    if len(merged) == 1:
        result = merged[0][2]
    else:
        branches = [(poly, sp.Ge(var, start)) for start, _, poly in reversed(merged[1:])]
        result = sp.Piecewise(*branches, (merged[0][2], True))
    top = limit if last is not None else 2 * limit + 7
    checks = {first, first + 1, first + 2, limit, top}
    for start, _, _ in pieces:
        checks.update(v for v in (start - 1, start, start + 1, start + 2) if first <= v <= top)
    for v in sorted(checks):
        if result.subs(var, v) != expr.subs(var, v):
            return expr
    return result
