"""``sparsedsl.compile(pattern)``: a pattern as an ``nn.Module`` that computes attention."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask

from ..analysis.count import count
from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_int
from ..lang.queries import (block_band, depends_on_heads, diagonal_period, head_group_count, mask_part,
                             score_mods)
from ..passes.blockmask import block_mask_from_states, tile_states
from ..passes.context import Context
from ..passes.maskmod import MaskFn, ScoreFn, lower_mask, lower_score, rows_from, score_rows_from
from ..passes.refine import tile_pair_counts
from ..passes.tiles import EMPTY, FULL, PARTIAL, TileGrid
from ..plans.band import Band, band_attention, edge_states
from ..plans.decode import MAX_DECODE_ROWS, DecodeRows, decodes_by_rows
from ..plans.flex import bucket_length, flex_kernel_options, flex_plan_attention, flex_tiles, padded_block_mask
from ..plans.gather import gather_attention, row_chunks
from ..plans.lattice import HeadGroupPlan, LatticeAttention, lattice_decomposition
from .cache import BuildCache
from .inputs import check_attention_inputs
from .opaque import handle_for, traced_attention
from .plan import FLEX_MIN_HEAD_DIM, KERNELS, Plan, choose_plan, dense_sdpa_case

#: The lattice plan runs when the tile plan would compute more than this many times its pairs.
LATTICE_ADVANTAGE = 1.5
#: Tile sizes FlexAttention's kernels take.
BLOCK_SIZES = (16, 32, 64, 128, 256, 512, 1024)


class Lowering:
    """A pattern lowered for one set of sizes: its context (``ctx.q_len`` counts every
    position up to the last query), the tile grid of the query rows computed (rows
    ``[grid.q_start, ctx.q_len)``), exact tile states, and, built on first use, its
    FlexAttention ``BlockMask``.

    ``position_mask`` takes absolute positions; ``mask_mod`` takes row indices (query
    ``i`` is position ``grid.q_start + i``), as kernels index their query tensor."""

    def __init__(self, pattern: n.Pattern, ctx: Context, grid: TileGrid):
        self.ctx, self.grid = ctx, grid
        self.position_mask: MaskFn = lower_mask(pattern, ctx)
        self.mask_mod: MaskFn = rows_from(self.position_mask, grid.q_start, ctx.device)
        self.states = tile_states(pattern, ctx, grid, self.position_mask)
        self._block_masks: dict[tuple[int, int], BlockMask] = {}
        self._lock = threading.Lock()

    def pairs(self, heads: int) -> int:
        """Allowed pairs of the rows computed, over ``heads`` heads and the batch entries
        of bound tensors (full tiles by area, partial tiles by evaluating them)."""
        per_grid = heads // self.states.shape[1]
        area = self.grid.q_block * self.grid.kv_block
        full = int((self.states == FULL).sum()) * area
        partial = (self.states == PARTIAL).nonzero()
        inside = int(tile_pair_counts(self.position_mask, self.grid, partial).sum()) if partial.numel() else 0
        return (full + inside) * per_grid

    @property
    def block_mask(self) -> BlockMask:
        """The ``BlockMask`` for the true lengths (equal to ``create_block_mask``'s)."""
        with self._lock:
            key = (self.grid.rows, self.grid.kv_len)
            if key not in self._block_masks:
                self._block_masks[key] = block_mask_from_states(self.states, self.grid, self.mask_mod)
            return self._block_masks[key]

    def padded_block_mask(self, q_padded: int, kv_padded: int) -> BlockMask:
        """The ``BlockMask`` for inputs padded to ``q_padded x kv_padded`` (the flex plan's
        length buckets); see :func:`sparsedsl.plans.flex.padded_block_mask`."""
        with self._lock:
            key = (q_padded, kv_padded)
            if key not in self._block_masks:
                self._block_masks[key] = padded_block_mask(self.states, self.grid, self.mask_mod,
                                                           q_padded, kv_padded)
            return self._block_masks[key]


#: Lowerings of patterns without call-time tensors, shared by every compiled module.
_LOWERINGS = BuildCache(maxsize=64)
#: Lowerings of patterns whose mask binds tensors (document ids, layouts), per tensor memory
#: and version: the layers of a model called with one ids tensor share one lowering.
_BOUND_LOWERINGS = BuildCache(maxsize=16)
#: Lattice decompositions, likewise.
_LATTICES = BuildCache(maxsize=64)
#: Resolved runners per (pattern, tiles, kernel, call shape, dtype, device, grad, lse, scale,
#: query offset or "rows" for decoding steps).
_RUNNERS = BuildCache(maxsize=256)
#: Cached aligned tile rows for decoding, per (pattern, heads, tiles, device, key capacity).
_DECODE_ROWS = BuildCache(maxsize=64)

def _block_sizes(block_size) -> tuple[int, int]:
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


class CompiledPattern(nn.Module):
    """Exact attention restricted to a pattern: for each query row, one softmax over its
    allowed keys (``softmax(q k^T * scale + score_mod, masked) @ v``); a row with no
    allowed key outputs zeros.

    Lowerings (``mask_mod``, tile states, ``BlockMask``) are cached per (pattern, lengths,
    heads when the pattern has head groups, tile sizes, device) and shared by every module
    with the same pattern; patterns whose mask binds call-time tensors are cached per
    tensor memory and version (the same, unchanged tensor or a view of it reuses its
    lowering), and with a bound ``bias`` lowered per call.
    """

    def __init__(self, pattern: n.Pattern, *, block_size=128, kernel: str = "auto"):
        super().__init__()
        if not isinstance(pattern, n.Pattern):
            raise PatternArgumentError(
                f"compile(): argument 'pattern' must be a sparsedsl pattern, got {pattern!r}"
            )
        if kernel not in KERNELS:
            raise PatternArgumentError(
                f"compile(): argument 'kernel' must be one of {KERNELS}, got {kernel!r}"
            )
        self.pattern = pattern
        self.q_block, self.kv_block = _block_sizes(block_size)
        self.kernel = kernel
        self._decodes_by_rows = decodes_by_rows(pattern)
        self._diagonal_period = None if score_mods(pattern) or pattern.buffer_names() else diagonal_period(pattern)
        self._handle = handle_for(self, self._configuration())

    def _configuration(self) -> tuple:
        return (self.pattern, self.q_block, self.kv_block, self.kernel)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._handle = handle_for(self, self._configuration())  # handles are per process

    def extra_repr(self) -> str:
        return f"{self.pattern}, block_size=({self.q_block}, {self.kv_block}), kernel={self.kernel!r}"

    # -- lowering -------------------------------------------------------------------------
    def _context(self, q_len, kv_len, heads, device, buffers, where, q_offset=0) -> Context:
        """The context of a call whose ``q_len`` queries start at position ``q_offset``
        (``q_offset`` resolved by :func:`resolve_q_offset`): the pattern is evaluated on
        the ``(q_offset + q_len) x kv_len`` matrix."""
        heads = head_group_count(self.pattern) if heads is None else heads
        return Context.make(self.pattern, q_offset + q_len, kv_len, heads, device, buffers, where=where)

    def lowering(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                 device=None, tiles: tuple[int, int] | None = None, q_offset=0,
                 where: str = "CompiledPattern", **buffers) -> Lowering:
        """The (cached) lowering of query rows ``[q_offset, q_offset + q_len)`` over
        ``kv_len`` keys (default ``q_offset + q_len``), on ``tiles`` (default: the module's
        ``block_size``); see :class:`Lowering` and :func:`resolve_q_offset`."""
        q_len, kv_len, q_offset = resolve_q_offset(where, q_len, kv_len, q_offset)
        ctx = self._context(q_len, kv_len, heads, device, buffers, where, q_offset)
        q_block, kv_block = tiles or (self.q_block, self.kv_block)
        grid = TileGrid(ctx.q_len, ctx.kv_len, q_block, kv_block, q_offset)
        core = mask_part(self.pattern)
        if buffers:
            if core.buffer_names() != buffers.keys():  # a bias is bound: not kept alive here
                return Lowering(core, ctx, grid)
            # Keyed by the memory a tensor views and its version counter: the cached lowering
            # holds its tensors (ctx.buffers), so while it is cached that memory is not
            # reused, a tensor with the same address, shape and strides views the same
            # values (another view of one tensor, as each layer of a model takes), and an
            # in-place change bumps the version counter that views share.
            bound = tuple(sorted((name, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype,
                                  str(t.device), t._version) for name, t in buffers.items()))
            key = (core, grid, ctx.heads, str(ctx.device), bound)
            return _BOUND_LOWERINGS.get(key, lambda: Lowering(core, ctx, grid))
        if not depends_on_heads(core):
            ctx = Context(ctx.q_len, ctx.kv_len, 1, ctx.device)
        key = (core, grid, ctx.heads, str(ctx.device))
        return _LOWERINGS.get(key, lambda: Lowering(core, ctx, grid))

    def lattice_plan(self, q_len: int, kv_len: int, heads: int, device) -> tuple[HeadGroupPlan, ...] | None:
        """The (cached) lattice decomposition for these sizes, or None where it does not apply."""
        if self.kernel not in ("auto", "lattice"):
            return None
        key = (self.pattern, q_len, kv_len, heads, str(torch.device(device)))
        return _LATTICES.get(key, lambda: lattice_decomposition(self.pattern, q_len, kv_len, heads, device))

    def _sub_module(self, pattern: n.Pattern) -> "CompiledPattern":
        return CompiledPattern(pattern, block_size=(self.q_block, self.kv_block))

    def mask_mod(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                 device=None, q_offset=0, **buffers) -> MaskFn:
        """FlexAttention ``mask_mod(b, h, q, k)`` of the pattern for these sizes; query
        index ``q`` is position ``q_offset + q``."""
        return self.lowering(q_len, kv_len, heads=heads, device=device, q_offset=q_offset,
                             where="mask_mod()", **buffers).mask_mod

    def score_mod(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                  device=None, q_offset=0, **buffers) -> ScoreFn | None:
        """FlexAttention ``score_mod(score, b, h, q, k)``, or None without score mods;
        query index ``q`` is position ``q_offset + q``."""
        q_len, kv_len, q_offset = resolve_q_offset("score_mod()", q_len, kv_len, q_offset)
        ctx = self._context(q_len, kv_len, heads, device, buffers, "score_mod()", q_offset)
        return score_rows_from(lower_score(self.pattern, ctx), q_offset, ctx.device)

    def block_mask(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                   batch: int | None = None, device=None, q_offset=0, **buffers) -> BlockMask:
        """The structural FlexAttention ``BlockMask`` of query rows ``[q_offset, q_offset +
        q_len)`` (``[B, H, ...]`` with ``B``/``H`` of 1 when the pattern does not vary over
        them; FlexAttention broadcasts those)."""
        lowering = self.lowering(q_len, kv_len, heads=heads, device=device, q_offset=q_offset,
                                 where="block_mask()", **buffers)
        if batch is not None:
            _check_batch(check_int("block_mask()", "batch", batch, minimum=1), lowering)
        return lowering.block_mask

    def explain(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                head_dim: int = 128, device=None, dtype: torch.dtype | None = None,
                requires_grad: bool = False, q_offset=0, batch: int = 1, **buffers) -> Plan:
        """The plan ``forward`` would run for these sizes on ``device`` (default: CUDA when
        present) and what it computes (over ``heads`` heads; ``batch`` only informs the
        choice: the band plan needs enough total work). Works for ``device="cuda"`` on a machine without
        CUDA too. Rows past position 0 that are whole diagonal blocks of a block-periodic
        pattern (``dilated``, ``chunks``, ``segments``) are explained as the self-attention
        they run as (``kv_len = q_len``, ``q_offset = 0``)."""
        head_dim = check_int("explain()", "head_dim", head_dim, minimum=1)
        batch = check_int("explain()", "batch", batch, minimum=1)
        q_len, kv_len, q_offset = resolve_q_offset("explain()", q_len, kv_len, q_offset)
        if self._block_local(q_len, kv_len, q_offset):  # as forward() runs it
            kv_len, q_offset = q_len, 0
        device = torch.device(device if device is not None else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        heads = head_group_count(self.pattern) if heads is None else heads
        lattice = self._lattice_if_cheaper(q_len, kv_len, q_offset, heads, device, dtype)
        band = self._band(q_len, kv_len, q_offset, device, dtype, head_dim, buffers, batch * heads)
        kind, reason = choose_plan(self.pattern, self.kernel, device, dtype, requires_grad,
                                   lattice=lattice is not None, head_dim=head_dim,
                                   q_offset=q_offset, lower_right=q_offset == kv_len - q_len, band=band)
        tiles = (flex_tiles(self.q_block, self.kv_block, device) if kind == "flex"
                 else self._edge_tiles(device, dtype, head_dim) if kind == "band" else None)
        lowering = self.lowering(q_len, kv_len, heads=heads, device=_work_device(device), tiles=tiles,
                                 q_offset=q_offset, where="explain()", **buffers)
        states = lowering.states
        full, partial, empty = (int((states == state).sum()) for state in (FULL, PARTIAL, EMPTY))
        if q_offset == 0:
            pairs = count(self.pattern, q_len, kv_len, heads=heads, tile=lowering.grid.q_block,
                          **buffers).pairs
        else:
            pairs = lowering.pairs(heads)
        per_grid = heads // states.shape[1]
        q_block, kv_block = lowering.grid.q_block, lowering.grid.kv_block
        if kind == "sdpa" and dense_sdpa_case(self.pattern) == "full":
            computed = heads * q_len * kv_len
        elif kind == "lattice":
            computed = self._lattice_computed_pairs(lattice, q_len, device, dtype)
        else:  # a band's tiles are whole blocks: its edges and interior compute what they hold
            computed = _tile_computed_pairs("flex" if kind == "band" else kind, lowering, heads)
        return Plan(kind, reason, q_len, kv_len, heads, head_dim, q_block, kv_block,
                    full * per_grid, partial * per_grid, empty * per_grid, pairs, computed, q_offset)

    def _lattice_if_cheaper(self, q_len: int, kv_len: int, q_offset: int, heads: int, device, dtype):
        """The lattice plan when it applies and computes at most ``1 / LATTICE_ADVANTAGE``
        of the pairs the tile plan of this device would (or when it is requested), else
        None. (Where the tiles already fit the lattice, as for ``.within`` rules whose
        segments are a tile long, the single fused tile kernel is faster.) It applies to
        self-attention only: ``q_offset == 0`` and ``q_len == kv_len``."""
        if q_offset:
            return None
        device = torch.device(device)
        lattice = self.lattice_plan(q_len, kv_len, heads, _work_device(device))
        if lattice is None or self.kernel == "lattice":
            return lattice
        tile_kind = "flex" if device.type == "cuda" and dtype != torch.float64 else "gather"
        tiles = flex_tiles(self.q_block, self.kv_block, device) if tile_kind == "flex" else None
        lowering = self.lowering(q_len, kv_len, heads=heads, device=_work_device(device), tiles=tiles)
        tile_pairs = _tile_computed_pairs(tile_kind, lowering, heads)
        lattice_pairs = self._lattice_computed_pairs(lattice, q_len, device, dtype)
        return lattice if tile_pairs > LATTICE_ADVANTAGE * lattice_pairs else None

    def _edge_tiles(self, device, dtype, head_dim: int) -> tuple[int, int]:
        """The tiles of the band plan's edge rows: FlexAttention's (at least 128 on CUDA)
        where flex runs them, else the module's ``block_size`` (the gather plan)."""
        if _flex_edges(device, dtype, head_dim):
            return flex_tiles(self.q_block, self.kv_block, device)
        return self.q_block, self.kv_block

    def _band(self, q_len: int, kv_len: int, q_offset: int, device, dtype, head_dim: int,
              buffers: dict, batch_heads: int) -> Band | None:
        """The band plan's decomposition (:mod:`sparsedsl.plans.band`) where it applies:
        self-attention from position 0 of a band of whole blocks whose size is a multiple of
        the tile plan's query tile (the edge rows run through that plan), else None."""
        band = block_band(self.pattern)
        if band is None or buffers or q_offset or q_len != kv_len or self.kernel not in ("auto", "band"):
            return None
        size, before, after = band
        if size % self._edge_tiles(device, dtype, head_dim)[0]:
            return None
        return Band(size, before, after, q_len, batch_heads)

    def _lattice_computed_pairs(self, plan, seq_len, device, dtype) -> int:
        """Pairs the lattice plan's kernels compute: whole chunks for folded chunks, and
        each block sub-problem's own plan otherwise."""
        total = 0
        for head_plan in plan:
            for part in head_plan.parts:
                length = seq_len if part.length is None else part.length
                if isinstance(part.pattern, n.Chunks):
                    size = part.pattern.size
                    whole, rest = divmod(length, size)
                    total += (whole * size * size + rest * rest) * len(head_plan.heads)
                else:
                    sub = self._sub_module(part.pattern).explain(
                        length, heads=len(head_plan.heads), device=device, dtype=dtype)
                    total += sub.computed_pairs
        return total

    # -- attention --------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                scale: float | None = None, layout: str = "bhnd", return_lse: bool = False,
                q_offset=0, **buffers):
        """Attention of ``q`` over ``k``/``v``.

        ``layout="bhnd"``: ``[batch, heads, length, head_dim]``; ``"bnhd"``: ``[batch,
        length, heads, head_dim]`` (the seed library's). ``k`` and ``v`` may have fewer
        heads than ``q`` (grouped-query attention) when that number divides ``q``'s.
        ``scale`` defaults to ``1 / sqrt(head_dim)``. ``q_offset``: the position of the
        first query (an int >= 0, or ``"end"`` for ``kv_len - q_len``: queries aligned to
        the end of the keys, as when decoding with a KV cache); query ``i`` is position
        ``q_offset + i`` and key ``j`` position ``j``. Tensors the pattern names
        (``documents``, ``layout``, ``bias``) are passed by keyword and cover positions
        ``0 .. q_offset + q_len - 1``. Returns the output in ``q``'s layout, and with
        ``return_lse=True`` also the log-sum-exp ``[batch, heads, q_len]`` (``-inf`` on
        rows with no allowed key).

        Under ``torch.compile`` the call is one opaque operator (see
        :mod:`sparsedsl.compiler.opaque`): no graph break, and no new graph per length once
        the length is dynamic.
        """
        q, k, v, scale = check_attention_inputs(q, k, v, scale, layout)
        if torch.compiler.is_compiling():
            # Traced by torch.compile: one opaque operator (lengths may be symbolic here).
            offset = k.shape[2] - q.shape[2] if q_offset == "end" else _static_offset(q_offset)
            result = traced_attention(self._handle, q, k, v, scale, offset, return_lse, buffers)
            return (_to_layout(result[0], layout), result[1]) if return_lse else _to_layout(result, layout)
        if not (type(q_offset) is int and q_offset == 0):  # 0, the common case, needs no checks
            _, _, q_offset = resolve_q_offset("forward()", q.shape[2], k.shape[2], q_offset)
        if self._block_local(q.shape[2], k.shape[2], q_offset) and not buffers:
            # Rows that are whole diagonal blocks see only their own keys, as at position 0.
            k, v = k[:, :, q_offset:q_offset + q.shape[2]], v[:, :, q_offset:q_offset + q.shape[2]]
            q_offset = 0
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if buffers:
            runner = self._runner(q, k, v, scale, needs_grad, return_lse, q_offset, buffers)
        else:
            decoding = not needs_grad and self._decoding(q.shape[2], q_offset)
            # The handle stands for (pattern, tiles, kernel): an int, hashed at no cost.
            key = (self._handle, q.shape, k.shape, v.shape, q.dtype, q.device, needs_grad, return_lse, scale,
                   "rows" if decoding else q_offset)
            runner = _RUNNERS.get(key, lambda: self._runner(q, k, v, scale, needs_grad, return_lse,
                                                            q_offset, {}, decoding))
        out, lse = runner(q, k, v, q_offset)
        out = _to_layout(out, layout)
        return (out, lse) if return_lse else out

    def _block_local(self, q_len: int, kv_len: int, q_offset: int) -> bool:
        """Whether rows ``[q_offset, q_offset + q_len)`` are whole diagonal blocks of a
        pattern that is the same in every block (:func:`diagonal_period`) within the keys:
        then they attend exactly as the first ``q_len`` rows over the first ``q_len`` keys
        would, so the call runs as self-attention on the keys of those positions (the
        lattice plan applies to a LongNet shard of a sequence-parallel run)."""
        period = self._diagonal_period
        return (period is not None and q_offset > 0 and q_offset % period == 0
                and q_len % period == 0 and q_offset + q_len <= kv_len)

    def _decoding(self, q_len: int, q_offset: int) -> bool:
        """Whether a call without gradients runs as a decoding step
        (:mod:`sparsedsl.plans.decode`): a few query rows past position 0, for a pattern
        whose states do not depend on lengths."""
        return self._decodes_by_rows and q_offset > 0 and q_len <= min(MAX_DECODE_ROWS, self.q_block)

    def _runner(self, q, k, v, scale: float, needs_grad: bool, return_lse: bool, q_offset: int,
                buffers: dict, decoding: bool = False):
        """A function ``(q, k, v, q_offset) -> (out, lse or None)`` for inputs of these
        shapes, with every lowering, block mask and score function resolved (cached per
        call shape when the pattern binds no tensors, so a training step pays one
        dictionary lookup). Only decoding runners read ``q_offset``; the others are built
        for the ``q_offset`` given here."""
        batch, heads, q_len, _ = q.shape
        kv_len = k.shape[2]
        lattice = self._lattice_if_cheaper(q_len, kv_len, q_offset, heads, q.device, q.dtype)
        band = self._band(q_len, kv_len, q_offset, q.device, q.dtype, q.shape[-1], buffers, batch * heads)
        kind, _ = choose_plan(self.pattern, self.kernel, q.device, q.dtype, needs_grad, return_lse,
                              lattice=lattice is not None, head_dim=q.shape[-1], q_offset=q_offset,
                              lower_right=q_offset == kv_len - q_len, band=band)
        if kind == "lattice":
            sub_modules: dict = {}

            def run_part(pattern, sq, sk, sv):
                sub = sub_modules.setdefault(pattern, self._sub_module(pattern))
                result = sub(sq, sk, sv, scale=scale, return_lse=return_lse)
                return result if return_lse else (result, None)

            attention = LatticeAttention(lattice, scale, return_lse, run_part)
            return lambda q, k, v, _: attention(q, k, v)
        if kind == "sdpa":
            return _sdpa_runner(self.pattern, q_len, kv_len, q_offset, scale, gqa=k.shape[1] != heads)
        if kind == "band":
            return self._band_runner(band, q, scale, return_lse)
        tiles = flex_tiles(self.q_block, self.kv_block, q.device) if kind == "flex" else None
        if decoding:
            return self._decode_runner(kind, q, k, scale, return_lse, tiles)
        lowering = self.lowering(q_len, kv_len, heads=heads, device=q.device, tiles=tiles,
                                 q_offset=q_offset, where="forward()", **buffers)
        _check_batch(batch, lowering)
        score_ctx = self._context(q_len, kv_len, heads, q.device, buffers, "forward()", q_offset)
        score_mod = score_rows_from(lower_score(self.pattern, score_ctx), q_offset, q.device)
        if kind == "flex":
            block_mask = lowering.padded_block_mask(bucket_length(q_len, tiles[0]),
                                                    bucket_length(kv_len, tiles[1]))
            options = flex_kernel_options(self.pattern, q.shape[-1], q.device, q.dtype)
            return lambda q, k, v, _: flex_plan_attention(
                q, k, v, block_mask=block_mask, score_mod=score_mod, scale=scale,
                return_lse=return_lse, kernel_options=options)
        return lambda q, k, v, _: gather_attention(
            q, k, v, states=lowering.states, grid=lowering.grid, mask_mod=lowering.mask_mod,
            score_mod=score_mod, scale=scale)

    def _band_runner(self, band: Band, q, scale: float, return_lse: bool):
        """The band plan's runner: the interior by :func:`~sparsedsl.plans.band.band_attention`,
        the edge rows through flex (CUDA) or the gather plan with the interior tiles emptied."""
        heads, q_len, device = q.shape[1], q.shape[2], q.device
        tiles = self._edge_tiles(device, q.dtype, q.shape[-1])
        lowering = self.lowering(q_len, q_len, heads=heads, device=device, tiles=tiles, where="forward()")
        states = edge_states(lowering.states, band, tiles[0])
        if _flex_edges(device, q.dtype, q.shape[-1]):
            padded = bucket_length(q_len, tiles[0])
            block_mask = padded_block_mask(states, lowering.grid, lowering.mask_mod, padded, padded)

            def edges(q, k, v):
                return flex_plan_attention(q, k, v, block_mask=block_mask, score_mod=None, scale=scale,
                                           return_lse=return_lse)
        else:
            def edges(q, k, v):
                return gather_attention(q, k, v, states=states, grid=lowering.grid,
                                        mask_mod=lowering.mask_mod, score_mod=None, scale=scale)
        return lambda q, k, v, _: band_attention(q, k, v, band=band, scale=scale, need_lse=return_lse,
                                                 edges=edges)

    def _decode_runner(self, kind: str, q, k, scale: float, return_lse: bool, tiles):
        """The runner of decoding steps (any ``q_offset``) for these shapes: block masks
        from cached aligned tile rows (:class:`~sparsedsl.plans.decode.DecodeRows`)."""
        heads, q_len, kv_len, device = q.shape[1], q.shape[2], k.shape[2], q.device
        q_block, kv_block = tiles or (self.q_block, self.kv_block)
        capacity = bucket_length(kv_len, kv_block)
        core = mask_part(self.pattern)
        state_heads = heads if depends_on_heads(core) else 1

        def row_states(row: int) -> torch.Tensor:
            ctx = self._context(q_block, capacity, state_heads, device, {}, "forward()", row * q_block)
            grid = TileGrid(ctx.q_len, capacity, q_block, kv_block, row * q_block)
            return tile_states(core, ctx, grid, lower_mask(core, ctx))

        key = (core, state_heads, q_block, kv_block, str(device), capacity)
        rows = _DECODE_ROWS.get(key, lambda: DecodeRows(
            row_states, q_block, kv_block, capacity,
            lower_mask(core, self._context(1, capacity, state_heads, device, {}, "forward()")), device))
        score_ctx = self._context(q_len, kv_len, heads, device, {}, "forward()")
        score_mod = lower_score(self.pattern, score_ctx)
        if kind == "flex":
            return lambda q, k, v, q_offset: flex_plan_attention(
                q, k, v, block_mask=rows.block_mask(q_offset, q_len, kv_len),
                score_mod=score_rows_from(score_mod, rows.position(q_offset), device), scale=scale,
                return_lse=return_lse)
        return lambda q, k, v, q_offset: gather_attention(
            q, k, v, states=rows.states(q_offset, q_len, kv_len), grid=rows.grid(q_offset, q_len),
            mask_mod=rows_from(rows.position_mask, rows.position(q_offset), device),
            score_mod=score_rows_from(score_mod, rows.position(q_offset), device), scale=scale)


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


def _static_offset(q_offset) -> int:
    """A ``q_offset`` other than ``"end"``, checked without the (possibly symbolic) lengths."""
    if isinstance(q_offset, str):
        raise PatternArgumentError(f"forward(): argument 'q_offset' must be an int >= 0 or 'end', got {q_offset!r}")
    return check_int("forward()", "q_offset", q_offset, minimum=0)


def _sdpa_runner(pattern: n.Pattern, q_len: int, kv_len: int, q_offset: int, scale: float, gqa: bool):
    """Dense SDPA for ``full()``, and for ``causal()`` with queries at the start
    (``is_causal``) or aligned to the end of the keys (a lower-right causal bias)."""
    case = dense_sdpa_case(pattern)
    mask = causal_lower_right(q_len, kv_len) if case == "causal" and q_offset else None
    causal = case == "causal" and not q_offset
    return lambda q, k, v, _: (F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa), None)



def _flex_edges(device, dtype, head_dim: int) -> bool:
    """Whether the band plan's edge rows run through FlexAttention (else the gather plan)."""
    return torch.device(device).type == "cuda" and dtype != torch.float64 and head_dim >= FLEX_MIN_HEAD_DIM


def _work_device(device: torch.device) -> torch.device:
    """Where ``explain`` does its structural work for a plan on ``device``: the device
    itself, or the CPU when asked about CUDA on a machine without it (plans depend on the
    device's kind, not on having one)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


def _tile_computed_pairs(kind: str, lowering: Lowering, heads: int) -> int:
    """Pairs a tile plan computes over ``heads`` heads: every non-empty tile for flex, and
    for gather each chunk of rows at the width of its widest row."""
    per_grid = heads // lowering.states.shape[1]
    tile_area = lowering.grid.q_block * lowering.grid.kv_block
    live = (lowering.states != EMPTY).sum(-1)
    if kind == "gather":
        batch = lowering.states.shape[0]
        tiles = sum(len(rows) * width for rows, width in row_chunks(live, tile_area * heads))
        return tiles * tile_area * heads * batch
    return int(live.sum()) * tile_area * per_grid


def _check_batch(batch: int, lowering: Lowering) -> None:
    grid_batch = lowering.states.shape[0]
    if grid_batch not in (1, batch):
        raise ValueError(
            f"the pattern's bound tensors have batch size {grid_batch} but the inputs have "
            f"batch={batch}"
        )


def _to_layout(out: torch.Tensor, layout: str) -> torch.Tensor:
    return out.transpose(1, 2) if layout == "bnhd" else out


def compile(pattern: n.Pattern, *, block_size=128, kernel: str = "auto") -> CompiledPattern:
    """Compile ``pattern`` into a :class:`CompiledPattern` attention module.

    ``block_size``: the FlexAttention tile (an int, or ``(q_block, kv_block)``), one of
    ``BLOCK_SIZES``. ``kernel``: ``"auto"`` picks the plan per call (see
    :mod:`sparsedsl.compiler.plan`), ``"flex"`` forces Inductor-compiled FlexAttention
    (also on the CPU, forward only), ``"gather"`` the PyTorch block-sparse plan,
    ``"lattice"`` and ``"band"`` those plans where they apply (an error elsewhere).
    """
    return CompiledPattern(pattern, block_size=block_size, kernel=kernel)
