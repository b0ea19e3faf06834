"""Sets of key positions as sorted, disjoint half-open intervals, many sets at once.

A :class:`Spans` holds ``groups`` sets: set ``g`` is the union of the intervals
``[starts[i], stops[i])`` with ``ids[i] == g``. Entries are sorted by ``(id, start)`` and,
after :meth:`Spans.merged`, disjoint and not touching within a set. Sizes are whatever the
sets need: a window's reach is one interval, however long the sequence. Everything is
int64 NumPy arithmetic on the intervals; no array of sequence length is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spans:
    """``groups`` sets of positions, as intervals ``[starts, stops)`` labelled by ``ids``."""

    groups: int
    ids: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @classmethod
    def of(cls, groups: int, ids, starts, stops) -> "Spans":
        """The sets of the given intervals (any order, overlaps and empty ones allowed)."""
        ids, starts, stops = (np.asarray(a, dtype=np.int64).ravel() for a in (ids, starts, stops))
        ids, starts, stops = np.broadcast_arrays(ids, starts, stops)
        keep = starts < stops
        return cls(groups, ids[keep], starts[keep], stops[keep]).merged()

    @classmethod
    def empty(cls, groups: int) -> "Spans":
        none = np.zeros(0, dtype=np.int64)
        return cls(groups, none, none, none)

    @classmethod
    def whole(cls, groups: int, length: int) -> "Spans":
        """Every set is ``[0, length)``."""
        return cls.of(groups, np.arange(groups), 0, length)

    def merged(self) -> "Spans":
        """The same sets with overlapping or touching intervals merged, sorted."""
        if not len(self.ids):
            return self
        # On one line, set g shifted to [g * width, (g + 1) * width): sorting by the shifted
        # start sorts by (set, start); a running maximum of the shifted stops never crosses
        # into the next set, and an interval opens a new run unless it starts at or before
        # the furthest stop so far.
        base = int(self.starts.min())
        shift = self.ids * (int(self.stops.max()) - base + 1) - base
        line = self.starts + shift
        if np.any(line[1:] < line[:-1]):  # intervals often come sorted already
            order = np.argsort(line)
            ids, starts, stops, shift = self.ids[order], self.starts[order], self.stops[order], shift[order]
        else:
            ids, starts, stops = self.ids, self.starts, self.stops
        furthest = np.maximum.accumulate(stops + shift)
        new = np.ones(len(ids), dtype=bool)
        new[1:] = starts[1:] + shift[1:] > furthest[:-1]
        first = np.flatnonzero(new)
        return Spans(self.groups, ids[first], starts[first], np.maximum.reduceat(stops, first))

    def union(self, other: "Spans") -> "Spans":
        """Set by set union."""
        return Spans.of(self.groups, np.concatenate([self.ids, other.ids]),
                        np.concatenate([self.starts, other.starts]),
                        np.concatenate([self.stops, other.stops]))

    def complement(self, length: int) -> "Spans":
        """Set by set, ``[0, length)`` minus the set (merged)."""
        opens = np.ones(len(self.ids), dtype=bool)
        opens[1:] = self.ids[1:] != self.ids[:-1]  # the first interval of its set
        closes = np.ones(len(self.ids), dtype=bool)
        closes[:-1] = opens[1:]  # the last interval of its set
        previous_stop = np.where(opens, 0, np.concatenate([[0], self.stops[:-1]]))
        absent = np.setdiff1d(np.arange(self.groups, dtype=np.int64), self.ids)
        ids = np.concatenate([self.ids, self.ids[closes], absent])
        starts = np.concatenate([previous_stop, self.stops[closes], np.zeros(len(absent), np.int64)])
        stops = np.concatenate([self.starts, np.full(int(closes.sum()) + len(absent), length)])
        return Spans.of(self.groups, ids, starts, np.minimum(stops, length))

    def intersect(self, other: "Spans") -> "Spans":
        """Set by set intersection."""
        length = int(max(self.stops.max(initial=0), other.stops.max(initial=0)))
        return self.difference(other.complement(length))

    def difference(self, other: "Spans") -> "Spans":
        """Set by set, ``self - other``: the pieces of ``self``'s intervals that no
        interval of ``other`` in the same set covers."""
        if not len(other.ids) or not len(self.ids):
            return self
        width = int(max(self.stops.max(), other.stops.max())) + 1  # set g on [g * width, ...)
        a_lo, a_hi = self.starts + self.ids * width, self.stops + self.ids * width
        b_lo, b_hi = other.starts + other.ids * width, other.stops + other.ids * width
        cuts = np.unique(np.concatenate([a_lo, a_hi, b_lo, b_hi]))
        lo, hi = cuts[:-1], cuts[1:]
        keep = _covered(a_lo, a_hi, lo) & ~_covered(b_lo, b_hi, lo)
        lo, hi = lo[keep], hi[keep]
        ids = lo // width
        return Spans.of(self.groups, ids, lo - ids * width, hi - ids * width)

    def coarsened(self, unit: int, length: int) -> "Spans":
        """Every interval widened to whole ``unit``-position tiles (tiles from 0), then cut
        at ``length``: the positions of the tiles each set touches."""
        starts = self.starts // unit * unit
        stops = np.minimum(-(-self.stops // unit) * unit, length)
        return Spans.of(self.groups, self.ids, starts, stops)

    def clipped(self, length: int) -> "Spans":
        """Each set cut to ``[0, length)``."""
        return Spans.of(self.groups, self.ids, np.maximum(self.starts, 0), np.minimum(self.stops, length))

    def sizes(self) -> np.ndarray:
        """Positions in each set, int64 ``[groups]``."""
        sizes = np.zeros(self.groups, dtype=np.int64)
        np.add.at(sizes, self.ids, self.stops - self.starts)
        return sizes

    def group(self, g: int) -> "Spans":
        """Set ``g`` alone, as a one-set :class:`Spans` (a slice: entries are sorted by set)."""
        first, stop = np.searchsorted(self.ids, [g, g + 1])
        return Spans(1, np.zeros(stop - first, dtype=np.int64), self.starts[first:stop], self.stops[first:stop])

    def covered_below(self, points: np.ndarray) -> np.ndarray:
        """For a one-set :class:`Spans`: positions of the set below each of ``points``."""
        if not len(self.starts):  # an empty set: none below any point
            return np.zeros(np.shape(points), dtype=np.int64)
        lengths = self.stops - self.starts
        before = np.concatenate([[0], np.cumsum(lengths)])
        i = np.searchsorted(self.starts, points, side="right")  # intervals starting below
        last = np.maximum(i - 1, 0)
        inside = np.where(i > 0, np.clip(points - self.starts[last], 0, lengths[last]), 0)
        return before[np.maximum(i - 1, 0)] * (i > 0) + inside

    def positions(self) -> np.ndarray:
        """Every position of a one-set :class:`Spans`, ascending (as long as the set)."""
        lengths = self.stops - self.starts
        if not len(lengths):
            return np.zeros(0, dtype=np.int64)
        offsets = np.repeat(self.starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return offsets + np.arange(int(lengths.sum()), dtype=np.int64)

    def contiguous(self) -> tuple[int, int] | None:
        """``(start, stop)`` when a one-set :class:`Spans` is one interval, else None."""
        return (int(self.starts[0]), int(self.stops[0])) if len(self.starts) == 1 else None


def _covered(lo: np.ndarray, hi: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each point lies in one of the sorted disjoint intervals ``[lo, hi)``."""
    i = np.searchsorted(lo, points, side="right") - 1
    return (i >= 0) & (points < hi[np.maximum(i, 0)])

