"""DeepSpeed's block-sparse layouts (``deepspeed.ops.sparse_attention``), written structurally.

Each entry is the layout DeepSpeed's ``make_layout(seq_len)`` describes for a sequence of
``seq_len`` tokens cut into ``block``-token blocks, at every length (DeepSpeed takes
lengths that are multiples of ``block``; at other lengths the last block is cut short).
The parameters keep DeepSpeed's names. ``attention="unidirectional"`` is DeepSpeed's layout
for autoregressive models, a property of the blocks: the kernels mask the tokens inside a
block as the caller asks, so ``& causal()`` gives token-level causal attention.

Random blocks are chosen by a seeded hash (``blocks().random`` and
``blocks().random_causal``), the same on every device; DeepSpeed draws them with Python's
``random`` module. Sources: Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", arXiv:1904.10509 (Fixed, Variable); Beltagy et al. 2020, "Longformer",
arXiv:2004.05150 (BSLongformer); Zaheer et al. 2020, "Big Bird", arXiv:2007.14062.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int, check_int_list

_ATTENTION = ("bidirectional", "unidirectional")


def _attention(where: str, attention) -> bool:
    """Whether ``attention`` is ``"unidirectional"`` (refusing anything but the two)."""
    if attention not in _ATTENTION:
        raise PatternArgumentError(
            f"{where}: argument 'attention' must be 'bidirectional' or 'unidirectional', got {attention!r}")
    return attention == "unidirectional"


def _horizontal(where: str, horizontal, unidirectional: bool) -> bool:
    if not isinstance(horizontal, bool):
        raise PatternArgumentError(f"{where}: argument 'horizontal_global_attention' must be True or False, "
                                   f"got {horizontal!r}")
    if horizontal and unidirectional:
        raise PatternArgumentError(f"{where}: horizontal_global_attention needs attention='bidirectional'")
    return horizontal


def _union(parts: list[n.Pattern]) -> n.Pattern:
    out = parts[0]
    for part in parts[1:]:
        out = out | part
    return out


def _causal_blocks(block: int) -> n.Pattern:
    """``kb <= qb`` on ``block``-token blocks."""
    return n.blocks(block).causal()


def _up_to(block: int, ahead: int) -> n.Pattern:
    """``kb <= qb + ahead`` on ``block``-token blocks."""
    return _causal_blocks(block) if ahead == 0 else _causal_blocks(block) | n.blocks(block).local(ahead)


def _line(axis, start: int, stop: int | None) -> n.Pattern:
    """Query rows (``axis = n.queries``) or key columns (``n.keys``) ``start:stop``."""
    return axis(start, stop)


def _cyclic_offsets(axis, window: int, block: int, first: int, count: int) -> n.Pattern:
    """Rows or columns whose block offset in their ``window``-block window lies in the
    cyclic range ``first, first + 1, ..., first + count - 1`` (mod ``window``)."""
    size = window * block
    end = first + count
    if end <= window:
        rule = _line(axis, first * block, end * block)
    else:
        rule = _line(axis, first * block, size) | _line(axis, 0, (end - window) * block)
    return n.blocks(size).within(rule)


def _fixed_globals(axis, block: int, window: int, first: int, count: int, uni: bool) -> n.Pattern:
    """The global rows (``axis = n.queries``) or columns (``n.keys``) of one Fixed pattern:
    the ``count`` blocks from offset ``first`` of every window, and for a short last window
    (``r = blocks % window`` blocks, ``0 < r < first + count``) the last ``count`` blocks
    instead. Block ``kb`` at distance ``e`` from the end is such a block exactly when ``(kb +
    e + 1) % window`` (which is ``r``) lies in ``1 .. first + count - 1``. Unidirectional
    columns are seen by the rows from their group's first block on."""
    parts = []
    for j in range(count):
        line = n.blocks(window * block).within(_line(axis, (first + j) * block, (first + j + 1) * block))
        parts.append(line & _up_to(block, j) if uni else line)
    short = first + count - 1  # window lengths r = 1 .. short leave no room for the group
    for e in range(count if short else 0):
        last = _line(axis, -(e + 1) * block, -e * block if e else None)
        part = last & _cyclic_offsets(axis, window, block, (-e) % window, short)
        parts.append(part & n.queries(-count * block) if uni else part)
    return _union(parts)


def _fixed_pattern(block, window, count, pattern, uni, horizontal) -> n.Pattern:
    first = window - (1 + pattern) * count  # DeepSpeed: the last blocks of a window first
    local = n.chunks(window * block)
    if uni:
        local = local & _causal_blocks(block)
    parts = [local, _fixed_globals(n.keys, block, window, first, count, uni)]
    if horizontal:
        parts.append(_fixed_globals(n.queries, block, window, first, count, False))
    return _union(parts)


def deepspeed_fixed(block: int = 16, num_local_blocks: int = 4, num_global_blocks: int = 1,
                    attention: str = "bidirectional", horizontal_global_attention: bool = False,
                    num_different_global_patterns: int = 1) -> n.Pattern:
    """DeepSpeed's ``FixedSparsityConfig``: local windows of ``num_local_blocks`` blocks
    (all of it, or its lower block triangle when unidirectional), and in every window
    ``num_global_blocks`` representative blocks seen by every row (unidirectional: by the
    rows from the group's first block on) and, with ``horizontal_global_attention``, seeing
    every column. Pattern ``p`` uses the blocks from offset ``num_local_blocks - (1 + p) *
    num_global_blocks``; head ``h`` uses pattern ``h % num_different_global_patterns``
    (``cycle_heads``). A short last window keeps the group at its offset when it fits, and
    takes its last ``num_global_blocks`` blocks otherwise, as DeepSpeed does: exact at every
    length.

    Source: DeepSpeed's Fixed pattern after Child et al. 2019, arXiv:1904.10509."""
    where = "deepspeed_fixed()"
    block = check_int(where, "block", block, minimum=1)
    window = check_int(where, "num_local_blocks", num_local_blocks, minimum=1)
    count = check_int(where, "num_global_blocks", num_global_blocks, minimum=1)
    patterns = check_int(where, "num_different_global_patterns", num_different_global_patterns, minimum=1)
    uni = _attention(where, attention)
    horizontal = _horizontal(where, horizontal_global_attention, uni)
    if window % count:
        raise PatternArgumentError(f"{where}: num_local_blocks ({window}) must be a multiple of "
                                   f"num_global_blocks, got {count}")
    if patterns > window // count:
        raise PatternArgumentError(f"{where}: num_different_global_patterns must be at most "
                                   f"num_local_blocks / num_global_blocks = {window // count}, got {patterns}")
    parts = [_fixed_pattern(block, window, count, p, uni, horizontal) for p in range(patterns)]
    return parts[0] if patterns == 1 else n.cycle_heads(*parts)


def _global_ranges(where: str, indices, end_indices) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` block ranges of DeepSpeed's global indices (single blocks
    without ``end_indices``)."""
    starts = check_int_list(where, "global_block_indices", list(indices))
    if end_indices is None:
        return [(s, s + 1) for s in starts]
    ends = check_int_list(where, "global_block_end_indices", list(end_indices))
    if len(ends) != len(starts):
        raise PatternArgumentError(f"{where}: global_block_end_indices must have one entry per "
                                   f"global_block_indices entry ({len(starts)}), got {len(ends)}")
    for s, e in zip(starts, ends):
        if e <= s:
            raise PatternArgumentError(f"{where}: a global block end index must exceed its start, got {s} and {e}")
    return list(zip(starts, ends))


def deepspeed_variable(block: int = 16, num_random_blocks: int = 0, local_window_blocks=(4,),
                       global_block_indices=(0,), global_block_end_indices=None,
                       attention: str = "bidirectional", horizontal_global_attention: bool = False,
                       seed: int = 0) -> n.Pattern:
    """DeepSpeed's ``VariableSparsityConfig``: local windows of the listed numbers of blocks
    from the start, then windows of the last number to the end (all of each window, or its
    lower block triangle when unidirectional); global blocks at the listed indices (or the
    ranges ``[global_block_indices[i], global_block_end_indices[i])``) seen by every row
    (unidirectional: by the rows from the block on) and, with
    ``horizontal_global_attention``, seeing every column; ``num_random_blocks`` seeded
    random key blocks per row, drawn among every block in both directions, as DeepSpeed
    draws them.

    Source: DeepSpeed's Variable pattern after Child et al. 2019, arXiv:1904.10509."""
    where = "deepspeed_variable()"
    block = check_int(where, "block", block, minimum=1)
    sizes = check_int_list(where, "local_window_blocks", list(local_window_blocks), minimum=1)
    random_blocks = check_int(where, "num_random_blocks", num_random_blocks)
    uni = _attention(where, attention)
    horizontal = _horizontal(where, horizontal_global_attention, uni)
    windows, start = [], 0
    for size in sizes:
        windows.append(n.queries(start * block, (start + size) * block) & n.keys(start * block, (start + size) * block))
        start += size
    windows.append(n.chunks(sizes[-1] * block).starting_at(start * block))  # the last size repeats
    local = _union(windows)
    if uni:
        local = local & _causal_blocks(block)
    parts = [local]
    for s, e in _global_ranges(where, global_block_indices, global_block_end_indices):
        columns = n.keys(s * block, e * block)
        parts.append(columns & n.queries(s * block) if uni else columns)
        if horizontal:
            parts.append(n.queries(s * block, e * block))
    if random_blocks:
        parts.append(n.blocks(block).random(random_blocks, check_int(where, "seed", seed)))
    return _union(parts)


def deepspeed_bslongformer(block: int = 16, num_sliding_window_blocks: int = 3, global_block_indices=(0,),
                           global_block_end_indices=None, attention: str = "bidirectional") -> n.Pattern:
    """DeepSpeed's ``BSLongformerSparsityConfig``: a sliding band of
    ``num_sliding_window_blocks`` blocks (``// 2`` on each side) and global blocks at the
    listed indices (or ranges) that see and are seen by every block; unidirectional keeps
    the blocks at or before the diagonal.

    Source: DeepSpeed's block-sparse Longformer after Beltagy et al. 2020, arXiv:2004.05150."""
    where = "deepspeed_bslongformer()"
    block = check_int(where, "block", block, minimum=1)
    band = check_int(where, "num_sliding_window_blocks", num_sliding_window_blocks, minimum=1)
    uni = _attention(where, attention)
    parts = [n.blocks(block).local(band // 2)]
    for s, e in _global_ranges(where, global_block_indices, global_block_end_indices):
        parts += [n.queries(s * block, e * block), n.keys(s * block, e * block)]
    pattern = _union(parts)
    return pattern & _causal_blocks(block) if uni else pattern


def deepspeed_bigbird(block: int = 16, num_random_blocks: int = 1, num_sliding_window_blocks: int = 3,
                      num_global_blocks: int = 1, attention: str = "bidirectional", seed: int = 0) -> n.Pattern:
    """DeepSpeed's ``BigBirdSparsityConfig``: ``num_random_blocks`` seeded random key blocks
    per row (unidirectional: drawn among the blocks at or before the diagonal,
    ``.random_causal``), a sliding band of ``num_sliding_window_blocks`` blocks (``// 2`` on
    each side) and the first ``num_global_blocks`` blocks global; unidirectional keeps the
    blocks at or before the diagonal.

    Source: DeepSpeed's BigBird after Zaheer et al. 2020, arXiv:2007.14062."""
    where = "deepspeed_bigbird()"
    pattern = n.blocks(check_int(where, "block", block, minimum=1))
    pattern = pattern.local(check_int(where, "num_sliding_window_blocks", num_sliding_window_blocks, minimum=1) // 2)
    pattern = pattern.global_(check_int(where, "num_global_blocks", num_global_blocks, minimum=1))
    uni = _attention(where, attention)
    random_blocks = check_int(where, "num_random_blocks", num_random_blocks)
    if random_blocks:
        seed = check_int(where, "seed", seed)
        pattern = pattern.random_causal(random_blocks, seed) if uni else pattern.random(random_blocks, seed)
    return pattern.causal() if uni else pattern
