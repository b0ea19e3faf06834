"""Checking and resolving the arguments of a compiled pattern: tile sizes, query offsets,
layouts, and the :class:`~sparsedsl.plans.base.Call` a call or an explanation stands for."""

from __future__ import annotations

import torch

from ..lang.checks import PatternArgumentError, check_int
from ..passes.lowering import bound_key
from ..plans.base import Call

#: Tile sizes FlexAttention's kernels take.
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)


def block_sizes(block_size) -> tuple[int, int]:
    """``(q_block, kv_block)`` from an int or a pair, each one of :data:`BLOCK_SIZES`."""
    sizes = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    if len(sizes) != 2:
        raise PatternArgumentError(
            f"compile(): argument 'block_size' must be an int or a (q_block, kv_block) pair, "
            f"got {block_size!r}"
        )
    for size in sizes:
        check_int("compile()", "block_size", size, minimum=1)
        if size not in BLOCK_SIZES:
            raise PatternArgumentError(
                f"compile(): argument 'block_size' must be one of {BLOCK_SIZES} (the tile "
                f"sizes FlexAttention kernels take), got {block_size!r}"
            )
    return sizes


def resolve_q_offset(where: str, q_len, kv_len, q_offset) -> tuple[int, int, int]:
    """``(q_len, kv_len, q_offset)`` checked. ``q_offset`` is an int >= 0 (query ``i`` is
    position ``q_offset + i``; ``kv_len`` None means ``q_offset + q_len``) or ``"end"``:
    ``kv_len - q_len``, queries aligned to the end of the keys (``kv_len`` None means
    ``q_len``)."""
    q_len = check_int(where, "q_len", q_len, minimum=1)
    if kv_len is not None:
        kv_len = check_int(where, "kv_len", kv_len, minimum=1)
    if q_offset == "end":
        kv_len = q_len if kv_len is None else kv_len
        if kv_len < q_len:
            raise PatternArgumentError(
                f"{where}: argument 'q_offset' is 'end' (queries aligned to the end of the keys), "
                f"which needs q_len <= kv_len, got q_len={q_len} and kv_len={kv_len}"
            )
        return q_len, kv_len, kv_len - q_len
    if isinstance(q_offset, str):
        raise PatternArgumentError(f"{where}: argument 'q_offset' must be an int >= 0 or 'end', got {q_offset!r}")
    q_offset = check_int(where, "q_offset", q_offset, minimum=0)
    return q_len, q_offset + q_len if kv_len is None else kv_len, q_offset


def static_offset(q_offset) -> int:
    """A ``q_offset`` other than ``"end"``, checked without the (possibly symbolic) lengths."""
    if isinstance(q_offset, str):
        raise PatternArgumentError(f"forward(): argument 'q_offset' must be an int >= 0 or 'end', got {q_offset!r}")
    return check_int("forward()", "q_offset", q_offset, minimum=0)


def to_layout(out: torch.Tensor, layout: str) -> torch.Tensor:
    """``[B, H, N, D]`` output in the caller's layout."""
    return out.transpose(1, 2) if layout == "bnhd" else out


def checked_device(where: str, device) -> torch.device:
    """``device`` (None: CUDA when present, else the CPU), or a ``ValueError`` that names it
    when torch reads no device from it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if not isinstance(device, bool):
            return torch.device(device)
    except (RuntimeError, TypeError):
        pass
    raise ValueError(f"{where}: argument 'device' must be a torch.device or a device name such as "
                     f"'cpu' or 'cuda', got {device!r}")


def make_call(q_len: int, kv_len: int, q_offset: int, heads: int, kv_heads: int, head_dim: int, batch: int,
              dtype: torch.dtype, device: torch.device, scale: float, tiles: tuple[int, int], needs_grad: bool,
              return_lse: bool, decoding: bool, buffers: dict) -> Call:
    """The :class:`Call` of these sizes (``bound`` identifies ``buffers``)."""
    return Call(q_len, kv_len, q_offset, heads, kv_heads, head_dim, batch, dtype, device, scale, tiles[0],
                tiles[1], needs_grad, return_lse, decoding, bound_key(buffers) if buffers else (), buffers)
