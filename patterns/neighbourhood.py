"""Neighbourhood attention (NATTEN): a window of keys clamped at the sequence ends, in 1-D
and on a 2-D grid of tokens.

Source: Hassani, Walton, Li, Li and Shi 2023, "Neighborhood Attention Transformer",
CVPR 2023, arXiv:2204.07143, §3.1: every query attends to exactly ``kernel_size`` nearest
keys; near an edge the window is shifted inwards instead of cut off.

With ``w = kernel_size // 2``, the 1-D pattern is written with ranges counted from both
ends, so it is exact at every length of at least ``kernel_size`` tokens::

    window(w)                                  interior rows
    | queries(0, w) & keys(0, kernel_size)     the first w rows see the first keys
    | queries(-w) & keys(-kernel_size)         the last w rows see the last keys

On a ``height x width`` grid (tokens in row-major order) the same clamped window applies
to the grid rows (blocks of ``width`` tokens) and, inside each grid row, to the columns
(``blocks(width).within(...)``); a pair is allowed when both allow it.
"""

from __future__ import annotations

from sparsedsl.lang import nodes as n
from sparsedsl.lang.checks import PatternArgumentError, check_int


def clamped_window(size: int, before: int, after: int, count: int | None = None) -> n.Pattern:
    """Blocks of ``size`` tokens: block row ``qb`` sees the ``before + after + 1`` key blocks
    ``[c - before, c + after]``, ``c`` the row clamped to ``[before, count - 1 - after]``:
    the window shifted inwards at both ends of ``count`` blocks (``None``: every block to
    the end of the sequence, whatever its length). ``after`` is ``before`` or ``before -
    1`` (an even window reaches one block further back)."""
    kernel = before + after + 1
    if size == 1:
        band = n.window(before, after)
    elif before == after:
        band = n.blocks(size).local(before)
    else:  # after == before - 1: the band without the blocks ``before`` ahead
        band = n.blocks(size).local(before) - (~n.blocks(size).local(before - 1) & ~n.blocks(size).causal())
    parts = [band]
    if before:
        parts.append(n.queries(0, before * size) & n.keys(0, kernel * size))
    if after:
        if count is None:
            parts.append(n.queries(-after * size) & n.keys(-kernel * size))
        else:
            parts.append(n.queries((count - after) * size, count * size) & n.keys((count - kernel) * size, count * size))
    out = parts[0]
    for part in parts[1:]:
        out = out | part
    return out


def _odd_kernel(where: str, name: str, value) -> int:
    value = check_int(where, name, value, minimum=1)
    if value % 2 == 0:
        raise PatternArgumentError(f"{where}: argument {name!r} must be odd, got {value}")
    return value


def neighbourhood_1d(kernel_size: int = 7) -> n.Pattern:
    """Every query sees exactly ``kernel_size`` keys (odd, default 7, NAT's kernel): ``[q -
    w, q + w]`` shifted to stay inside the sequence, ``w = kernel_size // 2``. Exact at
    every length of at least ``kernel_size`` tokens (ranges counted from the end; see the
    module docstring).

    Source: Hassani et al. 2023, "Neighborhood Attention Transformer", arXiv:2204.07143.
    """
    w = _odd_kernel("neighbourhood_1d()", "kernel_size", kernel_size) // 2
    return clamped_window(1, w, w)


def neighbourhood_2d(height: int = 16, width: int = 16, kernel_height: int = 7,
                     kernel_width: int = 7) -> n.Pattern:
    """Neighbourhood attention on a ``height x width`` grid of tokens in row-major order
    (``height * width`` tokens): a query at ``(y, x)`` sees the ``kernel_height x
    kernel_width`` keys around it, the window shifted inwards at the grid's edges on each
    axis. Both kernels are odd and at most the grid's sides.

    Source: Hassani et al. 2023, "Neighborhood Attention Transformer", arXiv:2204.07143.
    """
    where = "neighbourhood_2d()"
    height, width = check_int(where, "height", height, minimum=1), check_int(where, "width", width, minimum=1)
    kh, kw = _odd_kernel(where, "kernel_height", kernel_height), _odd_kernel(where, "kernel_width", kernel_width)
    if kh > height or kw > width:
        raise PatternArgumentError(f"{where}: the kernel ({kh} x {kw}) must fit the grid ({height} x {width})")
    rows = clamped_window(width, kh // 2, kh // 2, height)
    columns = clamped_window(1, kw // 2, kw // 2, width)
    return rows & n.blocks(width).within(columns)
