"""A pattern lowered for one set of sizes: ``mask_mod``, exact tile states and block masks,
cached and shared by every compiled module, plan and pass that asks for the same sizes."""

from __future__ import annotations

import functools
import threading
import zlib

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..compiler.cache import BuildCache
from ..lang import nodes as n
from ..lang.checks import INDEX_LIMIT, PatternArgumentError
from ..lang.queries import depends_on_heads, head_group_count, mask_part
from .blockmask import block_mask_from_states, first_heads, layer_states, tiles_of_heads
from .context import BufferBindingError, Context
from .host_values import on_device
from .maskmod import MaskFn, lower_mask, rows_from
from .refine import tile_pair_counts
from .squares import uniform_square
from .tiles import FULL, PARTIAL, TileGrid, layer_counts


class Lowering:
    """A pattern lowered for one set of sizes: its context (``ctx.q_len`` counts every
    position up to the last query), the tile grid of the query rows computed (rows
    ``[grid.q_start, ctx.q_len)``), exact tile states, and, built on first use, its
    FlexAttention ``BlockMask``.

    The states are classified once per group of heads allowed the same pairs
    (``layer_states``, ``[B or 1, layers, R, C]``, with ``head_layers[h]`` the layer of
    head ``h``, or ``None`` where the layers are the heads, see
    :func:`~sparsedsl.passes.blockmask.layer_states`); ``states`` gives them per head.

    ``position_mask`` takes absolute positions; ``mask_mod`` takes row indices (query
    ``i`` is position ``grid.q_start + i``), as kernels index their query tensor."""

    def __init__(self, pattern: n.Pattern, ctx: Context, grid: TileGrid):
        self.ctx, self.grid = ctx, grid
        self.position_mask: MaskFn = lower_mask(pattern, ctx)
        self.mask_mod: MaskFn = rows_from(self.position_mask, grid.q_start, ctx.device)
        self.layer_states, self.head_layers = layer_states(pattern, ctx, grid, self.position_mask)
        self._square = uniform_square(pattern)
        self._block_masks: dict[tuple[int, int], BlockMask] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def states(self) -> torch.Tensor:
        """Exact states of every tile, int8 contiguous ``[B or 1, H or 1, R, C]`` (see
        :func:`~sparsedsl.passes.blockmask.tile_states`): ``layer_states``, or, where heads
        share layers, a copy that gives each head its layer's, made on first use."""
        if self.head_layers is None:
            return self.layer_states
        return self.layer_states.index_select(1, on_device(self.head_layers, self.layer_states.device))

    def _grids_per_layer(self) -> list[int]:
        """How many grids of ``states`` each layer of ``layer_states`` is: the heads that
        share it."""
        layers = self.layer_states.shape[1]
        return [1] * layers if self.head_layers is None else [self.head_layers.count(i) for i in range(layers)]

    @functools.cached_property
    def tile_counts(self) -> tuple[int, int]:
        """``(full, partial)``: the full and the partial tiles of every grid of ``states``
        (each batch entry and head the states hold)."""
        weights = self._grids_per_layer()

        def tiles(state: int) -> int:
            per_layer = layer_counts(self.layer_states == state).sum(0).tolist()
            return sum(count * weight for count, weight in zip(per_layer, weights))

        return tiles(FULL), tiles(PARTIAL)

    def pairs(self, heads: int) -> int:
        """Allowed pairs of the rows computed, over ``heads`` heads and the batch entries
        of bound tensors (full tiles by area, partial tiles by evaluating them, once per
        layer of heads that share them)."""
        per_grid = heads // sum(self._grids_per_layer())  # heads per grid of states
        full, partial = self.tile_counts
        inside = 0
        if partial:
            tiles = (self.layer_states == PARTIAL).nonzero()
            layers = None if self.head_layers is None else first_heads(self.head_layers)
            counts = tile_pair_counts(self.position_mask, self.grid, tiles_of_heads(tiles, layers),
                                      square=self._square)
            weights = on_device(self._grids_per_layer(), tiles.device)[tiles[:, 1]]
            inside = int((counts * weights).sum())
        return (full * self.grid.q_block * self.grid.kv_block + inside) * per_grid

    def block_mask_for(self, q_padded: int, kv_padded: int, build) -> BlockMask:
        """The block mask built by ``build(layer_states, grid, mask_mod, head_layers)`` for
        inputs of ``q_padded x kv_padded``, built once per such size."""
        with self._lock:
            key = (q_padded, kv_padded)
            if key not in self._block_masks:
                self._block_masks[key] = build(self.layer_states, self.grid, self.mask_mod, self.head_layers)
            return self._block_masks[key]

    @property
    def block_mask(self) -> BlockMask:
        """The ``BlockMask`` for the true lengths (equal to ``create_block_mask``'s)."""
        return self.block_mask_for(self.grid.rows, self.grid.kv_len, block_mask_from_states)


#: Lowerings of patterns without call-time tensors.
_LOWERINGS = BuildCache(maxsize=64)
#: Lowerings of patterns whose mask binds tensors (document ids, layouts), per tensor memory
#: and version: the layers of a model called with one ids tensor share one lowering.
_BOUND_LOWERINGS = BuildCache(maxsize=16)


def context(pattern: n.Pattern, q_len: int, kv_len: int, q_offset: int, heads: int | None, device,
            buffers: dict, where: str) -> Context:
    """The context of a call whose ``q_len`` queries start at position ``q_offset``: the
    pattern is evaluated on the ``(q_offset + q_len) x kv_len`` matrix."""
    heads = head_group_count(pattern) if heads is None else heads
    if q_offset and q_offset + q_len > INDEX_LIMIT:
        raise PatternArgumentError(
            f"{where}: argument 'q_offset' is {q_offset}, which puts the last of {q_len} queries at "
            f"position {q_offset + q_len - 1}, past the 32-bit kernel index limit 2**31 - 1 = {INDEX_LIMIT}")
    return Context.make(pattern, q_offset + q_len, kv_len, heads, device, buffers, where=where)


def bound_key(buffers: dict) -> tuple:
    """What identifies call-time tensors for caching: the memory each views, its version
    counter and, for integer and bool tensors on the CPU (document ids, block layouts), a
    checksum of their values. While a lowering is cached it holds its tensors, so that
    memory is not reused; a tensor with the same address, shape and strides views the same
    values (another view of one tensor, as each layer of a model takes), and an in-place
    change bumps the version counter that views share. A write that bypasses the counter
    (through ``.data`` or ``.numpy()``) changes the checksum; on other devices such a write
    is not seen (reading the values back would synchronise every call). A value that is not
    a tensor raises :class:`~sparsedsl.passes.context.BufferBindingError` naming it."""
    for name, t in buffers.items():
        if not isinstance(t, torch.Tensor):
            raise BufferBindingError(
                f"keyword argument {name!r} must be a torch.Tensor (a tensor the pattern binds by "
                f"name), got {type(t).__name__}"
            )
    return tuple(sorted((name, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device), t._version,
                         _checksum(t)) for name, t in buffers.items()))


def _checksum(tensor: torch.Tensor) -> int | None:
    """CRC-32 of the bytes of an integer or bool CPU tensor; ``None`` for others (floating
    tensors such as biases are read by the kernels at every call, not cached from)."""
    if tensor.device.type != "cpu" or tensor.is_floating_point() or tensor.is_complex() \
            or torch.compiler.is_compiling():
        return None
    values = tensor.detach().contiguous().reshape(-1)
    return zlib.crc32(values.view(torch.uint8).numpy()) if values.numel() else 0


def lowering(pattern: n.Pattern, q_len: int, kv_len: int, q_offset: int, tiles: tuple[int, int], *,
             heads: int | None, device, buffers: dict, where: str) -> Lowering:
    """The cached lowering of ``pattern``'s mask (score modifications dropped) for query
    rows ``[q_offset, q_offset + q_len)`` over ``kv_len`` keys on ``tiles``; sizes checked
    and named after ``where`` in errors."""
    ctx = context(pattern, q_len, kv_len, q_offset, heads, device, buffers, where)
    grid = TileGrid(ctx.q_len, ctx.kv_len, tiles[0], tiles[1], q_offset)
    core = mask_part(pattern)
    if buffers:
        if core.buffer_names() != buffers.keys():  # a bias is bound: not kept alive here
            return Lowering(core, ctx, grid)
        key = (core, grid, ctx.heads, str(ctx.device), bound_key(buffers))
        return _BOUND_LOWERINGS.get(key, lambda: Lowering(core, ctx, grid))
    if not depends_on_heads(core):
        ctx = Context(ctx.q_len, ctx.kv_len, 1, ctx.device)
    key = (core, grid, ctx.heads, str(ctx.device))
    return _LOWERINGS.get(key, lambda: Lowering(core, ctx, grid))


def clear_caches() -> None:
    """Drop every cached lowering."""
    _LOWERINGS.clear()
    _BOUND_LOWERINGS.clear()


def work_device(device: torch.device) -> torch.device:
    """Where structural work for a plan on ``device`` runs: the device itself, or the CPU
    when asked about CUDA on a machine without it (plans depend on the device's kind, not
    on having one)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device
