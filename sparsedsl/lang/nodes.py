"""The pattern language: immutable, hashable expression nodes and their text form.

A pattern is a boolean relation ``allowed(b, h, q, k)`` over batch, head, query position and
key position (docs/language.md). Nodes only *describe* a pattern; the passes in
:mod:`sparsedsl.passes` give them meaning (dense reference, ``mask_mod``, tile classes,
counts). Every node is a frozen dataclass, so ``==`` and ``hash`` are structural, and
``str(p)`` is source text that :func:`sparsedsl.parse` turns back into an equal pattern.

Positions are absolute indices: ``0 <= q < Q`` and ``0 <= k < K``. When ``Q != K`` the
query and key sequences are aligned at their start (query ``i`` and key ``i`` are the same
position), so ``causal()`` with ``Q < K`` lets query ``i`` see keys ``0..i``.
"""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass
from typing import Callable

from .checks import (
    INDEX_LIMIT,
    PatternArgumentError,
    PatternOperandError,
    check_int,
    check_int_list,
    check_name,
    check_number,
)

# Operator precedence of the text form, as in Python: ``|`` < ``&`` < ``-`` < ``~`` < call.
_UNION, _INTERSECTION, _DIFFERENCE, _COMPLEMENT, _ATOM = 1, 2, 3, 4, 5


def _wrap(node: "Pattern", min_prec: int) -> str:
    text = str(node)
    return f"({text})" if node.precedence < min_prec else text


def _list(values: tuple) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"


class Pattern:
    """Base class of every pattern node.

    Combine patterns with ``|`` (union), ``&`` (intersection), ``-`` (difference) and ``~``
    (complement); attach score modifications with :meth:`score`.
    """

    precedence = _ATOM

    # -- combinators -------------------------------------------------------------------
    def __or__(self, other: "Pattern") -> "Pattern":
        parts, multiset = _union_parts((self, other))
        union = Union(parts)
        object.__setattr__(union, "_multiset", multiset)  # so that a chain of '|' stays linear
        return union

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection(_flattened("&", (self, other), Intersection))

    def __sub__(self, other: "Pattern") -> "Pattern":
        return Difference(*_operands("-", (self, other)))

    def __invert__(self) -> "Pattern":
        return Complement(*_operands("~", (self,)))

    # Reached with a non-pattern on the left (``None | p``): refused by the same checks.
    def __ror__(self, other) -> "Pattern":
        return Union(_union_parts((other, self))[0])

    def __rand__(self, other) -> "Pattern":
        return Intersection(_flattened("&", (other, self), Intersection))

    def __rsub__(self, other) -> "Pattern":
        return Difference(*_operands("-", (other, self)))

    def __add__(self, other: "Pattern") -> "Pattern":
        """Multiset union: a pair allowed by both sides counts twice in the softmax
        (see :class:`Sum`)."""
        return Sum(_flattened("+", (self, other), Sum))

    def __radd__(self, other) -> "Pattern":
        return Sum(_flattened("+", (other, self), Sum))

    def score(self, *mods: "ScoreMod | Callable") -> "Scored":
        """Return this pattern with score modifications applied in order.

        Each ``mod`` is :func:`alibi`, :func:`softcap`, :func:`bias` or a plain function
        ``(score, b, h, q, k) -> score`` written with torch operations.
        """
        if not mods:
            raise PatternArgumentError("score(): give at least one score modification")
        return Scored(self, tuple(_as_score_mod(m) for m in mods))

    def starting_at(self, offset: int) -> "Pattern":
        """This pattern on the positions from ``offset`` on, counted from ``offset``: a pair
        is allowed iff ``q >= offset``, ``k >= offset`` and this pattern allows ``(q -
        offset, k - offset)``; see :class:`Shifted`."""
        where = ".starting_at()"
        offset = check_int(where, "offset", offset)
        return Shifted(_relative_rule(where, "pattern", self, in_document=False), offset)

    # -- introspection -----------------------------------------------------------------
    def children(self) -> tuple["Pattern", ...]:
        """The sub-patterns this node combines (empty for primitives)."""
        return ()

    def buffer_names(self) -> frozenset[str]:
        """Names of the tensors that must be bound by keyword at call time."""
        names = frozenset(self._own_buffers())
        for child in self.children():
            names |= child.buffer_names()
        return names

    def _own_buffers(self) -> tuple[str, ...]:
        return ()

    def __repr__(self) -> str:
        return str(self)


def _operands(op: str, operands: tuple) -> tuple:
    """``operands`` of operator ``op``, each checked to be a pattern without score
    modifications (:class:`PatternOperandError` naming the operand otherwise)."""
    for side in operands:
        if not isinstance(side, Pattern):
            shown = repr(side) if len(repr(side)) <= 80 else repr(side)[:77] + "..."
            raise PatternOperandError(
                f"operator {op!r}: operands must be patterns, got {shown} ({type(side).__name__})"
            )
        if isinstance(side, Scored):
            raise PatternOperandError(
                f"operator {op!r}: {side} carries score modifications; combine patterns first "
                f"and call .score(...) last"
            )
    return operands


def _union_parts(operands: tuple) -> tuple[tuple, bool]:
    """The parts of the union of ``operands`` and whether it is a multiset: at most one
    operand may be (a union takes the larger count of each pair, which only a set against a
    multiset makes plain). Whether an operand is a multiset is computed once per node."""
    parts = _flattened("|", operands, Union)
    multisets = [side for side in operands if _is_multiset(side)]
    if len(multisets) > 1:
        raise PatternOperandError(
            f"operator '|': {_wrap(multisets[0], _ATOM)} and {_wrap(multisets[1], _ATOM)} both count "
            f"some pairs more than once; a union keeps the larger count of each pair, which is "
            f"defined here between a multiset and sets only: add multisets with '+'")
    return parts, bool(multisets)


def _is_multiset(node: "Pattern") -> bool:
    """:func:`~sparsedsl.lang.multiset.is_multiset` of ``node``, kept on the node."""
    from .multiset import is_multiset

    if "_multiset" not in node.__dict__:
        object.__setattr__(node, "_multiset", is_multiset(node))
    return node.__dict__["_multiset"]


def _flattened(op: str, operands: tuple, kind: type) -> tuple:
    """The parts of ``kind`` (a union or intersection) of checked ``operands``: operands of
    the same kind contribute their parts."""
    parts: list[Pattern] = []
    for side in _operands(op, operands):
        parts.extend(side.parts if isinstance(side, kind) else (side,))
    return tuple(parts)


# ---------------------------------------------------------------------------------------
# Token-level primitives
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Full(Pattern):
    """Every query attends to every key."""

    def __str__(self) -> str:
        return "full()"


@dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """``k <= q`` (start-aligned positions; see the module docstring)."""

    def __str__(self) -> str:
        return "causal()"


@dataclass(frozen=True, repr=False)
class Window(Pattern):
    """``q - before <= k <= q + after``."""

    before: int
    after: int

    def __str__(self) -> str:
        if self.after == self.before:
            return f"window({self.before})"
        return f"window({self.before}, {self.after})"


@dataclass(frozen=True, repr=False)
class DilatedWindow(Pattern):
    """``q - before <= k <= q + after`` and ``(q - k) % rate == 0``."""

    before: int
    after: int
    rate: int

    def __str__(self) -> str:
        return f"dilated_window({self.before}, {self.after}, {self.rate})"


@dataclass(frozen=True, repr=False)
class Chunks(Pattern):
    """``q // size == k // size``."""

    size: int

    def __str__(self) -> str:
        return f"chunks({self.size})"


@dataclass(frozen=True, repr=False)
class Strided(Pattern):
    """``(q - k) % stride == 0`` (Sparse Transformer's strided head)."""

    stride: int

    def __str__(self) -> str:
        return f"strided({self.stride})"


@dataclass(frozen=True, repr=False)
class Dilated(Pattern):
    """LongNet: same segment, ``(q % segment) % rate == offset`` and likewise for ``k``."""

    segment: int
    rate: int
    offset: int = 0

    def __str__(self) -> str:
        if self.offset == 0:
            return f"dilated({self.segment}, {self.rate})"
        return f"dilated({self.segment}, {self.rate}, {self.offset})"


@dataclass(frozen=True, repr=False)
class GlobalTokens(Pattern):
    """``q < n or k < n``: the first ``n`` tokens see and are seen by everything."""

    n: int

    def __str__(self) -> str:
        return f"global_tokens({self.n})"


@dataclass(frozen=True, repr=False)
class Prefix(Pattern):
    """``k < n`` (prefix-LM is ``causal() | prefix(n)``)."""

    n: int

    def __str__(self) -> str:
        return f"prefix({self.n})"


@dataclass(frozen=True, repr=False)
class Documents(Pattern):
    """``ids[q] == ids[k]`` with ``ids`` a ``[L]`` or ``[B, L]`` integer tensor bound as
    ``name=`` at call time, ``L = max(Q, K)``: queries and keys share positions (start
    aligned), so one id per position covers both."""

    name: str

    def __str__(self) -> str:
        return f"documents({self.name!r})"

    def _own_buffers(self) -> tuple[str, ...]:
        return (self.name,)

    def within(self, rule: "Pattern") -> "Pattern":
        """Keep a pair of one document only if ``rule`` holds on the positions counted
        from the document's first position; see :class:`DocumentWithin`."""
        return DocumentWithin(self.name, _relative_rule("documents().within()", "rule", rule, in_document=True))


# ---------------------------------------------------------------------------------------
# Block-level rules and the block builder
# ---------------------------------------------------------------------------------------


class BlockRule:
    """A rule on block coordinates ``(qb, kb)``; see :class:`Blocks`."""

    def buffer_names(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class BlockLocal(BlockRule):
    """``|qb - kb| <= window``."""

    window: int

    def __str__(self) -> str:
        return f"local({self.window})"


@dataclass(frozen=True)
class BlockDilated(BlockRule):
    """``(qb - kb) % r == 0`` for some ``r`` in ``rates``, and ``|qb - kb| <= window`` if given."""

    rates: tuple[int, ...]
    window: int | None = None

    def __str__(self) -> str:
        if self.window is None:
            return f"dilated({_list(self.rates)})"
        return f"dilated({_list(self.rates)}, window={self.window})"


@dataclass(frozen=True)
class BlockGlobal(BlockRule):
    """``qb < n or kb < n``: the first ``n`` block rows and columns."""

    n: int

    def __str__(self) -> str:
        return f"global_({self.n})"


@dataclass(frozen=True)
class BlockRandom(BlockRule):
    """``per_row`` distinct key blocks per query-block row, chosen by a seeded hash.

    Row ``qb`` among ``n`` key blocks takes ``m = min(per_row, n)`` of them by Floyd's
    sampling: for ``j = n - m, ..., n - 1`` in turn, ``t = hash(seed, qb, j) mod (j + 1)``
    unless the row has taken it, and then ``j`` (:mod:`sparsedsl.lang.randomblocks`). The
    choice is a pure function of ``(seed, qb, n)`` in exact integer arithmetic, so every
    device sees the same blocks. Rows with fewer than ``per_row`` key blocks keep them all.
    """

    per_row: int
    seed: int

    def __str__(self) -> str:
        return f"random({self.per_row}, {self.seed})"


@dataclass(frozen=True)
class BlockLayout(BlockRule):
    """An explicit ``[nqb, nkb]`` or ``[H, nqb, nkb]`` bool tensor bound as ``name=``.

    Blocks outside the tensor's extent are not allowed."""

    name: str

    def __str__(self) -> str:
        return f"layout({self.name!r})"

    def buffer_names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, repr=False)
class Blocks(Pattern):
    """Block-level pattern on tiles of ``size`` tokens (``qb = q // size``, ``kb = k // size``).

    A pair is allowed iff
      * some rule in ``rules`` holds on ``(qb, kb)`` (no rules: every block pair),
      * and ``kb <= qb`` when ``causal``,
      * and ``within`` (if given) holds on block-relative positions ``(q % size, k % size)``.

    Built with ``blocks(size)`` and chained methods; rules combine by union.
    """

    size: int
    rules: tuple[BlockRule, ...] = ()
    causal_: bool = False
    within_: Pattern | None = None

    def _with_rule(self, rule: BlockRule) -> "Blocks":
        self._check_open(str(rule))
        return Blocks(self.size, self.rules + (rule,), self.causal_, None)

    def _check_open(self, method: str) -> None:
        if self.within_ is not None:
            raise PatternArgumentError(
                f"blocks(...).{method}: call .within(...) last (this pattern already has "
                f".within({self.within_}))"
            )

    def local(self, window: int) -> "Blocks":
        """Add block pairs with ``|qb - kb| <= window``."""
        return self._with_rule(BlockLocal(check_int("blocks().local()", "window", window)))

    def dilated(self, rates, window: int | None = None) -> "Blocks":
        """Add block pairs with ``(qb - kb) % r == 0`` for some ``r`` in ``rates``, and
        ``|qb - kb| <= window`` when ``window`` is given."""
        where = "blocks().dilated()"
        if isinstance(rates, int) and not isinstance(rates, bool):
            rates = [rates]
        rates = check_int_list(where, "rates", rates, minimum=1)
        if window is not None:
            window = check_int(where, "window", window)
        return self._with_rule(BlockDilated(rates, window))

    def global_(self, n: int) -> "Blocks":
        """Add the first ``n`` block rows and block columns."""
        return self._with_rule(BlockGlobal(check_int("blocks().global_()", "n", n, minimum=1)))

    def random(self, per_row: int, seed: int = 0) -> "Blocks":
        """Add ``per_row`` seeded random key blocks to every query-block row (BigBird)."""
        where = "blocks().random()"
        return self._with_rule(
            BlockRandom(check_int(where, "per_row", per_row, minimum=1), check_int(where, "seed", seed))
        )

    def random_causal(self, per_row: int, seed: int = 0) -> "Blocks":
        """Add ``per_row`` seeded random key blocks at or before the diagonal (``kb <= qb``)
        to every query-block row; see :class:`BlockRandomCausal`."""
        where = "blocks().random_causal()"
        return self._with_rule(BlockRandomCausal(check_int(where, "per_row", per_row, minimum=1),
                                                 check_int(where, "seed", seed)))

    def layout(self, name: str) -> "Blocks":
        """Add the block pairs of a bool layout tensor bound as ``name=`` at call time."""
        return self._with_rule(BlockLayout(check_name("blocks().layout()", "name", name)))

    def causal(self) -> "Blocks":
        """Keep only block pairs with ``kb <= qb``."""
        self._check_open("causal()")
        return Blocks(self.size, self.rules, True, None)

    def within(self, rule: Pattern) -> "Blocks":
        """Keep a pair only if ``rule`` holds on block-relative positions
        ``(q % size, k % size)``."""
        self._check_open("within()")
        if not isinstance(rule, Pattern) or isinstance(rule, Scored):
            raise PatternArgumentError(
                f"blocks().within(): argument 'rule' must be a pattern without score "
                f"modifications, got {rule!r}"
            )
        from .multiset import is_multiset

        if is_multiset(rule):
            raise PatternArgumentError(
                f"blocks().within(): argument 'rule' must allow each pair once, got the multiset "
                f"{rule}; add the block patterns instead: blocks(...).within(a) + blocks(...).within(b)"
            )
        if rule.buffer_names():
            raise PatternArgumentError(
                f"blocks().within(): argument 'rule' cannot use call-time tensors "
                f"({', '.join(sorted(rule.buffer_names()))}), got {rule}"
            )
        return Blocks(self.size, self.rules, self.causal_, rule)

    def children(self) -> tuple[Pattern, ...]:
        return () if self.within_ is None else (self.within_,)

    def _own_buffers(self) -> tuple[str, ...]:
        return tuple(n for rule in self.rules for n in rule.buffer_names())

    def __str__(self) -> str:
        text = f"blocks({self.size})" + "".join(f".{rule}" for rule in self.rules)
        if self.causal_:
            text += ".causal()"
        if self.within_ is not None:
            text += f".within({self.within_})"
        return text


# ---------------------------------------------------------------------------------------
# Head groups
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Heads(Pattern):
    """Head groups: heads are split into ``len(parts)`` contiguous groups as evenly as
    possible (the first ``H % G`` groups get one extra head); head ``h`` of group ``i`` is
    allowed what ``parts[i]`` allows at the same head index ``h`` (so a nested ``heads`` or
    ``alibi`` inside a part sees absolute head indices). Needs at least as many heads as
    groups."""

    parts: tuple[Pattern, ...]

    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __str__(self) -> str:
        return "heads(" + ", ".join(str(p) for p in self.parts) + ")"


@dataclass(frozen=True, repr=False)
class Segments(Pattern):
    """LongNet head-grouped rule: ``heads(dilated(lengths[i], dilations[i], offsets[i]) ...)``.

    ``offsets`` defaults to ``i % dilations[i]``."""

    lengths: tuple[int, ...]
    dilations: tuple[int, ...]
    offsets: tuple[int, ...]

    def expand(self) -> Heads:
        """The equivalent :class:`Heads` of :class:`Dilated` parts."""
        return Heads(tuple(Dilated(*t) for t in zip(self.lengths, self.dilations, self.offsets)))

    def children(self) -> tuple[Pattern, ...]:
        return ()

    def __str__(self) -> str:
        text = f"segments({_list(self.lengths)}, {_list(self.dilations)}"
        if self.offsets != _default_offsets(self.dilations):
            text += f", {_list(self.offsets)}"
        return text + ")"


def _default_offsets(dilations: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i % r for i, r in enumerate(dilations))


# ---------------------------------------------------------------------------------------
# Combinators
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Union(Pattern):
    """Allowed where any part is allowed."""

    parts: tuple[Pattern, ...]
    precedence = _UNION

    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __str__(self) -> str:
        return " | ".join(_wrap(p, _UNION + 1) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Intersection(Pattern):
    """Allowed where every part is allowed."""

    parts: tuple[Pattern, ...]
    precedence = _INTERSECTION

    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __str__(self) -> str:
        return " & ".join(_wrap(p, _INTERSECTION + 1) for p in self.parts)


@dataclass(frozen=True, repr=False)
class Difference(Pattern):
    """Allowed where ``left`` is allowed and ``right`` is not."""

    left: Pattern
    right: Pattern
    precedence = _DIFFERENCE

    def children(self) -> tuple[Pattern, ...]:
        return (self.left, self.right)

    def __str__(self) -> str:
        return f"{_wrap(self.left, _DIFFERENCE)} - {_wrap(self.right, _DIFFERENCE + 1)}"


@dataclass(frozen=True, repr=False)
class Complement(Pattern):
    """Allowed where ``inner`` is not."""

    inner: Pattern
    precedence = _COMPLEMENT

    def children(self) -> tuple[Pattern, ...]:
        return (self.inner,)

    def __str__(self) -> str:
        return f"~{_wrap(self.inner, _COMPLEMENT)}"


# ---------------------------------------------------------------------------------------
# Ranges, offsets, positions inside documents, cyclic head groups
# ---------------------------------------------------------------------------------------


def range_bounds(start: int, stop: int | None, length: int) -> tuple[int, int]:
    """``(lo, hi)`` of the range ``start:stop`` over ``length`` positions, as Python's
    slices read it: a negative bound counts from the end (``length + bound``), ``stop=None``
    is the end, and both are clamped to ``[0, length]``; ``lo <= hi`` (``lo == hi``: an empty
    range)."""
    def bound(value: int) -> int:
        return min(max(value + length if value < 0 else value, 0), length)
    lo = bound(start)
    return lo, length if stop is None else max(lo, bound(stop))


def _range_text(name: str, start: int, stop: int | None) -> str:
    return f"{name}({start})" if stop is None else f"{name}({start}, {stop})"


def _range_args(where: str, start, stop) -> tuple[int, int | None]:
    start = check_int(where, "start", start, minimum=-INDEX_LIMIT)
    if stop is not None:
        stop = check_int(where, "stop", stop, minimum=-INDEX_LIMIT)
        if (start < 0) == (stop < 0) and stop <= start:
            raise PatternArgumentError(
                f"{where}: argument 'stop' must be greater than start ({start}), got {stop} "
                f"(the range would be empty at every length)")
    return start, stop


@dataclass(frozen=True, repr=False)
class Queries(Pattern):
    """``lo <= q < hi``, every key: the query rows ``start:stop`` of the ``Q x K`` matrix,
    read as Python's slices (:func:`range_bounds` over ``Q``): a negative bound counts from
    the last query position, ``stop=None`` is the end. ``Q`` counts every query position of
    the matrix (with ``q_offset``, the rows before it too). Inside ``blocks(size).within``
    the positions are block-relative and the end is the block's."""

    start: int
    stop: int | None = None

    def __str__(self) -> str:
        return _range_text("queries", self.start, self.stop)

    def from_end(self) -> bool:
        """Whether a bound counts from the end (is negative)."""
        return self.start < 0 or (self.stop is not None and self.stop < 0)


@dataclass(frozen=True, repr=False)
class Keys(Pattern):
    """``lo <= k < hi``, every query: the key columns ``start:stop`` of the ``Q x K``
    matrix, read as Python's slices over ``K`` (see :class:`Queries`)."""

    start: int
    stop: int | None = None

    def __str__(self) -> str:
        return _range_text("keys", self.start, self.stop)

    def from_end(self) -> bool:
        """Whether a bound counts from the end (is negative)."""
        return self.start < 0 or (self.stop is not None and self.stop < 0)


@dataclass(frozen=True, repr=False)
class Shifted(Pattern):
    """``inner`` on the positions from ``offset`` on: a pair is allowed iff ``q >= offset``,
    ``k >= offset`` and ``inner`` allows ``(q - offset, k - offset)`` on the ``(Q - offset)
    x (K - offset)`` matrix of those positions (so a range counted from the end counts from
    the same end). ``chunks(64).starting_at(100)`` cuts chunks from position 100; nothing
    before 100 is allowed. Built with ``pattern.starting_at(offset)``."""

    inner: Pattern
    offset: int

    def children(self) -> tuple[Pattern, ...]:
        return (self.inner,)

    def __str__(self) -> str:
        return f"{_wrap(self.inner, _ATOM)}.starting_at({self.offset})"


@dataclass(frozen=True, repr=False)
class DocumentWithin(Pattern):
    """``ids[q] == ids[k]`` and ``rule`` allows ``(q - s, k - s)``, ``s`` the first position
    of the document (the first position whose id is ``ids[q]``, in the same batch row).
    ``ids`` is bound as ``name=`` as for :class:`Documents`. The rule sees an ``L x L``
    matrix (``L = max(Q, K)``) and cannot count from its end. Built with
    ``documents(name).within(rule)``: a prefix-LM, window or chunks inside each packed
    document."""

    name: str
    rule: Pattern

    def children(self) -> tuple[Pattern, ...]:
        return (self.rule,)

    def _own_buffers(self) -> tuple[str, ...]:
        return (self.name,)

    def __str__(self) -> str:
        return f"documents({self.name!r}).within({self.rule})"


@dataclass(frozen=True, repr=False)
class CycleHeads(Pattern):
    """Heads assigned cyclically: head ``h`` is allowed what ``parts[h % len(parts)]``
    allows at the same head index ``h`` (DeepSpeed's ``num_different_global_patterns``).
    Any number of heads runs it; with fewer heads than parts the last parts are unused."""

    parts: tuple[Pattern, ...]

    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __str__(self) -> str:
        return "cycle_heads(" + ", ".join(str(p) for p in self.parts) + ")"


@dataclass(frozen=True)
class BlockRandomCausal(BlockRule):
    """``per_row`` distinct key blocks at or before the diagonal (``kb <= qb``) per
    query-block row: the choice of :class:`BlockRandom` among the ``n = qb + 1`` blocks ``0
    .. qb`` (Floyd's steps ``j = n - m, ..., n - 1``, ``t = hash(seed, qb, j) mod (j + 1)``
    unless taken, then ``j``). A row's choice depends only on ``(seed, qb)``: rows with
    fewer than ``per_row`` such blocks keep them all, and a chosen block past the last key
    block is not there (BigBird's unidirectional random blocks)."""

    per_row: int
    seed: int

    def __str__(self) -> str:
        return f"random_causal({self.per_row}, {self.seed})"


def _relative_rule(where: str, name: str, rule, *, in_document: bool) -> Pattern:
    """``rule`` checked to be a pattern evaluated on relative positions: no score
    modifications, no call-time tensors; inside a document, no range counted from the end
    (a document's end is not the sequence's)."""
    if not isinstance(rule, Pattern) or isinstance(rule, Scored):
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be a pattern without score modifications (call "
            f".score(...) last), got {rule!r}")
    if rule.buffer_names():
        raise PatternArgumentError(
            f"{where}: argument {name!r} cannot use call-time tensors "
            f"({', '.join(sorted(rule.buffer_names()))}), got {rule}")
    _check_set(where, name, rule)
    if in_document:
        counted = _from_end_ranges(rule)
        if counted:
            raise PatternArgumentError(
                f"{where}: {counted[0]} counts from the end of the sequence, which is not the end "
                f"of a document; count from the document's start (non-negative bounds)")
    return rule


def _check_set(where: str, name: str, rule: Pattern) -> None:
    """Refuse a multiset ``rule`` where each pair must count once (offsets, documents'
    rules, cyclic head groups): its counts would be lost there."""
    if _is_multiset(rule):
        raise PatternArgumentError(
            f"{where}: argument {name!r} must allow each pair once, got the multiset {rule} "
            f"(apply it to each part, then add them with '+')")


def _from_end_ranges(rule: Pattern) -> list[Pattern]:
    """The ranges of ``rule`` that count from the end of its own positions (those inside a
    ``blocks(...).within`` count from the end of a block)."""
    if isinstance(rule, (Queries, Keys)):
        return [rule] if rule.from_end() else []
    if isinstance(rule, Blocks):
        return []
    return [r for child in rule.children() for r in _from_end_ranges(child)]


def queries(start: int, stop: int | None = None) -> Pattern:
    """The query rows ``start:stop`` (Python's slice reading; negative counts from the end),
    every key; see :class:`Queries`."""
    return Queries(*_range_args("queries()", start, stop))


def keys(start: int, stop: int | None = None) -> Pattern:
    """The key columns ``start:stop`` (Python's slice reading; negative counts from the
    end), every query; see :class:`Keys`."""
    return Keys(*_range_args("keys()", start, stop))


def cycle_heads(*parts: Pattern) -> Pattern:
    """Head ``h`` uses ``parts[h % len(parts)]``; see :class:`CycleHeads`."""
    if not parts:
        raise PatternArgumentError("cycle_heads(): give at least one pattern")
    for i, p in enumerate(parts):
        if not isinstance(p, Pattern) or isinstance(p, Scored):
            raise PatternArgumentError(
                f"cycle_heads(): argument {i} must be a pattern without score modifications, "
                f"got {p!r}")
        _check_set("cycle_heads()", str(i), p)
    return CycleHeads(tuple(parts))


def _check_score_signature(fn: Callable) -> None:
    """Refuse a plain score function that cannot take ``(score, b, h, q, k)``, naming it
    (functions whose signature Python cannot read are accepted as they are)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(0, 0, 0, 0, 0)
    except TypeError:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        raise PatternArgumentError(
            f"score(): score function {name}{signature} must take the five arguments "
            f"(score, b, h, q, k) and return the new score") from None


# ---------------------------------------------------------------------------------------
# Score modifications
# ---------------------------------------------------------------------------------------


class ScoreMod:
    """A modification of the scaled score ``q·k * scale`` of allowed pairs."""

    def buffer_names(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class Alibi(ScoreMod):
    """ALiBi: ``score - slope[h] * |q - k|`` with the paper's geometric slopes for H heads."""

    def __str__(self) -> str:
        return "alibi()"


@dataclass(frozen=True)
class Softcap(ScoreMod):
    """``cap * tanh(score / cap)`` (Gemma-2 style logit soft-capping)."""

    cap: float

    def __str__(self) -> str:
        return f"softcap({self.cap!r})"


@dataclass(frozen=True)
class Bias(ScoreMod):
    """``score + bias[b, h, q, k]``: a tensor bound as ``name=`` at call time, of shape
    ``[Q, K]``, ``[H, Q, K]`` or ``[B, H, Q, K]`` (broadcast over missing dimensions)."""

    name: str

    def __str__(self) -> str:
        return f"bias({self.name!r})"

    def buffer_names(self) -> tuple[str, ...]:
        return (self.name,)


@dataclass(frozen=True, eq=False)
class FunctionMod(ScoreMod):
    """A plain ``(score, b, h, q, k) -> score`` function (compared by identity; its text
    form names the function but cannot be parsed back)."""

    fn: Callable

    def __eq__(self, other) -> bool:
        return isinstance(other, FunctionMod) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(id(self.fn))

    def __str__(self) -> str:
        # An identifier prints bare; any other name (``<lambda>``) as a string literal, so
        # that the text still parses and the parser refuses it by name.
        name = getattr(self.fn, "__name__", None)
        if not isinstance(name, str):
            return "score_function"
        return name if name.isidentifier() and not keyword.iskeyword(name) else repr(name)


def _as_score_mod(mod) -> ScoreMod:
    if isinstance(mod, ScoreMod):
        return mod
    if callable(mod) and not isinstance(mod, Pattern):
        _check_score_signature(mod)
        return FunctionMod(mod)
    raise PatternArgumentError(
        f"score(): each modification must be alibi(), softcap(c), bias(name) or a function "
        f"(score, b, h, q, k) -> score, got {mod!r}"
    )


@dataclass(frozen=True, repr=False)
class Scored(Pattern):
    """``pattern`` with score modifications applied in order to allowed pairs."""

    pattern: Pattern
    mods: tuple[ScoreMod, ...]

    def score(self, *mods) -> "Scored":
        extra = Pattern.score(self.pattern, *mods).mods
        return Scored(self.pattern, self.mods + extra)

    def children(self) -> tuple[Pattern, ...]:
        return (self.pattern,)

    def _own_buffers(self) -> tuple[str, ...]:
        return tuple(n for m in self.mods for n in m.buffer_names())

    def __str__(self) -> str:
        return _wrap(self.pattern, _ATOM) + "".join(f".score({m})" for m in self.mods)


# ---------------------------------------------------------------------------------------
# Public constructors (the vocabulary of the text form)
# ---------------------------------------------------------------------------------------


def full() -> Pattern:
    """Every query attends to every key."""
    return Full()


def causal() -> Pattern:
    """``k <= q``."""
    return Causal()


def window(before: int, after: int | None = None) -> Pattern:
    """``q - before <= k <= q + after`` (``after`` defaults to ``before``)."""
    before = check_int("window()", "before", before)
    after = before if after is None else check_int("window()", "after", after)
    return Window(before, after)


def dilated_window(before: int, after: int, rate: int) -> Pattern:
    """In ``window(before, after)`` and ``(q - k) % rate == 0``."""
    where = "dilated_window()"
    return DilatedWindow(
        check_int(where, "before", before),
        check_int(where, "after", after),
        check_int(where, "rate", rate, minimum=1),
    )


def chunks(size: int) -> Pattern:
    """``q // size == k // size``."""
    return Chunks(check_int("chunks()", "size", size, minimum=1))


def strided(stride: int) -> Pattern:
    """``(q - k) % stride == 0``."""
    return Strided(check_int("strided()", "stride", stride, minimum=1))


def dilated(segment: int, rate: int, offset: int = 0) -> Pattern:
    """Same ``segment``-token segment, and ``(q % segment) % rate == offset`` and likewise
    for ``k``. Requires ``rate <= segment`` and ``0 <= offset < rate``."""
    where = "dilated()"
    segment = check_int(where, "segment", segment, minimum=1)
    rate = check_int(where, "rate", rate, minimum=1)
    offset = check_int(where, "offset", offset)
    if rate > segment:
        raise PatternArgumentError(
            f"{where}: argument 'rate' must be <= segment ({segment}), got {rate}"
        )
    if offset >= rate:
        raise PatternArgumentError(
            f"{where}: argument 'offset' must be < rate ({rate}), got {offset}"
        )
    return Dilated(segment, rate, offset)


def global_tokens(n: int) -> Pattern:
    """``q < n or k < n``."""
    return GlobalTokens(check_int("global_tokens()", "n", n, minimum=1))


def prefix(n: int) -> Pattern:
    """``k < n``."""
    return Prefix(check_int("prefix()", "n", n, minimum=1))


def documents(name: str) -> Pattern:
    """``ids[q] == ids[k]``, ``ids`` bound as ``name=`` at call time."""
    return Documents(check_name("documents()", "name", name))


def blocks(size: int) -> Blocks:
    """Start a block-level pattern on tiles of ``size`` tokens; see :class:`Blocks`."""
    return Blocks(check_int("blocks()", "size", size, minimum=1))


def heads(*parts: Pattern) -> Pattern:
    """Head groups: group ``i`` of the heads uses ``parts[i]``; see :class:`Heads`."""
    if not parts:
        raise PatternArgumentError("heads(): give at least one pattern")
    for i, p in enumerate(parts):
        if not isinstance(p, Pattern) or isinstance(p, Scored):
            raise PatternArgumentError(
                f"heads(): argument {i} must be a pattern without score modifications, got {p!r}"
            )
    return Heads(tuple(parts))


def segments(lengths, dilations, offsets=None) -> Pattern:
    """LongNet head groups: group ``i`` uses ``dilated(lengths[i], dilations[i], offsets[i])``."""
    where = "segments()"
    lengths = check_int_list(where, "lengths", lengths, minimum=1)
    dilations = check_int_list(where, "dilations", dilations, minimum=1)
    if len(lengths) != len(dilations):
        raise PatternArgumentError(
            f"{where}: 'lengths' and 'dilations' must have the same length, got "
            f"{len(lengths)} lengths {list(lengths)} and {len(dilations)} dilations {list(dilations)}"
        )
    if offsets is None:
        offsets = _default_offsets(dilations)
    else:
        offsets = check_int_list(where, "offsets", offsets)
        if len(offsets) != len(lengths):
            raise PatternArgumentError(
                f"{where}: 'offsets' must have one entry per segment ({len(lengths)}), got {list(offsets)}"
            )
    for i, (length, rate, offset) in enumerate(zip(lengths, dilations, offsets)):
        if rate > length:
            raise PatternArgumentError(
                f"{where}: dilations[{i}] must be <= lengths[{i}] ({length}), got {rate}"
            )
        if offset >= rate:
            raise PatternArgumentError(
                f"{where}: offsets[{i}] must be < dilations[{i}] ({rate}), got {offset}"
            )
    return Segments(lengths, dilations, offsets)


def alibi() -> ScoreMod:
    """ALiBi linear biases: ``score - slope[h] * |q - k|``."""
    return Alibi()


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)``."""
    return Softcap(check_number("softcap()", "cap", cap))


def bias(name: str) -> ScoreMod:
    """Add a tensor bound as ``name=`` at call time to the scores."""
    return Bias(check_name("bias()", "name", name))


# ---------------------------------------------------------------------------------------
# Multisets: a pair may count more than once in the softmax
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Sum(Pattern):
    """Multiset union ``a + b``: the multiplicity of a pair is the sum of its parts'.

    A pattern is a multiplicity ``m(b, h, q, k) >= 0`` (a set pattern's is 0 or 1), and
    attention is ``out = sum_k m exp(s) v / sum_k m exp(s)`` over each query row, i.e.
    ``log m`` added to the score ``s`` after every score modification; a row with no key
    of positive multiplicity outputs 0. That is exactly merging the outputs of the parts
    with weights ``softmax`` over their log-sum-exps (LongNet's merge of its branches).
    The other operators extend to multisets as follows: ``a & b`` multiplies counts (a set
    operand keeps a multiset's counts where it allows the pair: ``(a + b) & causal() ==
    (a & causal()) + (b & causal())`` in meaning), ``a | s`` of a multiset and sets takes
    the larger count (pairs only ``s`` allows count once; a union of two multisets is
    refused), ``a - b`` keeps ``a``'s counts where ``b`` allows nothing, and ``~a`` is the
    set of pairs ``a`` does not allow. ``.score(...)`` modifies the scores of every part
    alike. A pattern is allowed where its multiplicity is positive: that is what the mask,
    the tile classes and the distinct pair counts read."""

    parts: tuple[Pattern, ...]
    precedence = _DIFFERENCE  # Python's: ``+`` and ``-`` bind alike, left to right

    def children(self) -> tuple[Pattern, ...]:
        return self.parts

    def __str__(self) -> str:
        return " + ".join(_wrap(p, _DIFFERENCE + 1) for p in self.parts)


@dataclass(frozen=True, repr=False)
class DilatedHeads(Pattern):
    """One branch of LongNet as its reference code runs it: the heads are split into
    ``rate`` contiguous groups of ``ceil(H / rate)`` heads (the last non-empty group may be
    smaller, and groups past the last head are empty); head ``h`` is in group ``j = h //
    ceil(H / rate)`` and is allowed ``dilated(segment, rate, j)``: inside each
    ``segment``-token segment, the positions ``p`` with ``(p % segment) % rate == j``
    attend among themselves. Runs with any number of heads."""

    segment: int
    rate: int

    def group_size(self, num_heads: int) -> int:
        """Heads per group: ``ceil(num_heads / rate)``."""
        return -(-num_heads // self.rate)

    def groups(self, num_heads: int) -> list[tuple[range, Dilated]]:
        """``(heads, dilated(segment, rate, j))`` for each non-empty head group ``j``."""
        size = self.group_size(num_heads)
        return [(range(j * size, min((j + 1) * size, num_heads)), Dilated(self.segment, self.rate, j))
                for j in range(self.rate) if j * size < num_heads]

    def __str__(self) -> str:
        return f"dilated_heads({self.segment}, {self.rate})"


@dataclass(frozen=True, repr=False)
class LongNet(Pattern):
    """LongNet's dilated attention as its reference code computes it (torchscale's
    ``DilatedAttention``): every head runs every branch ``(segment_lengths[i],
    dilation_rates[i])`` (:class:`DilatedHeads`), and the branch outputs of a row are
    merged with weights ``softmax`` over their log-sum-exps, which is one softmax over the
    multiset ``dilated_heads(w0, r0) + dilated_heads(w1, r1) + ...`` (:meth:`expand`): a
    key that ``m`` branches allow counts ``m`` times."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]

    def branches(self) -> tuple[DilatedHeads, ...]:
        """The branches, in order: one :class:`DilatedHeads` per (segment, rate)."""
        return tuple(DilatedHeads(w, r) for w, r in zip(self.segment_lengths, self.dilation_rates))

    def expand(self) -> Pattern:
        """The equivalent multiset: the :class:`Sum` of the branches (the branch itself
        when there is one)."""
        branches = self.branches()
        return branches[0] if len(branches) == 1 else Sum(branches)

    def __str__(self) -> str:
        return f"longnet({_list(self.segment_lengths)}, {_list(self.dilation_rates)})"


@dataclass(frozen=True)
class LogMultiplicity(ScoreMod):
    """``score + log m``: how a multiset pattern's multiplicity ``m`` enters the softmax,
    after its written score modifications. Not written in pattern text: every multiset
    pattern carries it (:func:`sparsedsl.lang.queries.score_mods` lists it last)."""

    def __str__(self) -> str:
        return "log_multiplicity()"


def dilated_heads(segment: int, rate: int) -> Pattern:
    """One LongNet branch over head groups of ``ceil(H / rate)`` heads; see
    :class:`DilatedHeads`. Requires ``rate <= segment``."""
    where = "dilated_heads()"
    segment = check_int(where, "segment", segment, minimum=1)
    rate = check_int(where, "rate", rate, minimum=1)
    if rate > segment:
        raise PatternArgumentError(f"{where}: argument 'rate' must be <= segment ({segment}), got {rate}")
    return DilatedHeads(segment, rate)


def longnet(segment_lengths, dilation_rates) -> Pattern:
    """LongNet (Ding et al. 2023, arXiv:2307.02486) with its reference code's semantics.

    Every head runs every branch ``i`` (segment length ``w = segment_lengths[i]``, rate
    ``r = dilation_rates[i]``, ``r <= w``). In branch ``i`` the heads are split into ``r``
    contiguous groups of ``ceil(H / r)`` heads (the last non-empty group may be smaller;
    groups past the last head are empty), and the heads of group ``j`` attend inside each
    ``w``-token segment among the positions ``p`` with ``(p % w) % r == j``. The branches'
    outputs are merged by softmax over their log-sum-exps, so a key that ``m`` branches
    allow for a query counts ``m`` times in one softmax (``log m`` added to its score); a
    branch that does not cover a row adds nothing to it.

    Any sequence length works: segments are cut from position 0, and the last one is
    shorter when the length is not a multiple of ``w`` (only real positions attend; the
    reference code pads with zero vectors). A segment longer than the sequence is the
    whole sequence, which is the same pairs. ``longnet(...) & causal()`` makes every branch
    causal. Runs with any number of heads."""
    where = "longnet()"
    lengths = check_int_list(where, "segment_lengths", segment_lengths, minimum=1)
    rates = check_int_list(where, "dilation_rates", dilation_rates, minimum=1)
    if len(lengths) != len(rates):
        raise PatternArgumentError(
            f"{where}: 'segment_lengths' and 'dilation_rates' must have the same length, got "
            f"{len(lengths)} segment lengths {list(lengths)} and {len(rates)} dilation rates {list(rates)}")
    for i, (length, rate) in enumerate(zip(lengths, rates)):
        if rate > length:
            raise PatternArgumentError(
                f"{where}: dilation_rates[{i}] must be <= segment_lengths[{i}] ({length}), got {rate}")
    return LongNet(lengths, rates)
