"""The *flex* plan: FlexAttention compiled by Inductor, with the structural block mask.

Shapes and recompilation. FlexAttention is compiled with ``dynamic=False``: Inductor's
flex lowering (torch 2.11) rejects the symbolic integers and floats that automatic dynamic
shapes lift out of a ``mask_mod``/``score_mod`` closure. Instead the plan pads the sequences
to a *bucket* length (:func:`bucket_length`: a multiple of the tile and of
``2**(bit_length - 3)``, so at most 1/4 extra length and four buckets per doubling) whose
padded tiles are empty (the kernel skips them); the true lengths are masked with limits
held in 0-d tensors, whose values are not compiled in. So changing only the sequence length
compiles at most one kernel per bucket, and none inside a bucket.

Tiles. On CUDA, FlexAttention's default backward configurations (e.g. 64x128 / 128x64 on
H100) need block-mask tiles that are multiples of 128, so the plan uses tiles of at least
128 there; smaller ``block_size``\\ s still drive the gather plan and the counts. The one
exception is a forward pass without gradients on a pattern made of whole 64-token blocks
(BigBird's), which 128-token tiles would cover at up to twice its pairs: where 64-token
tiles compute enough fewer pairs (:data:`SMALL_TILE_EFFICIENCY`), the plan takes them,
with forward kernel tiles of 64 (:data:`SMALL_TILE_OPTIONS`). With gradients it cannot:
Inductor's flex backward (torch 2.11) keeps only the default backward configurations
whose own tiles divide the block mask's, and passes no 64-token one.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..lang import nodes as n
from ..lang.queries import block_band, is_diagonal_band, score_mods
from ..passes.blockmask import block_mask_from_states
from ..passes.maskmod import ScoreFunctionError
from ..passes.tiles import EMPTY, TileGrid
from .base import Call, Plan, Runner
from .tiled import Tiled, block_tile, call_score_mod, check_batch, tiled

#: FlexAttention's kernels refuse smaller head dims ("embedding dimension ... at least 16").
FLEX_MIN_HEAD_DIM = 16
#: Smallest tile FlexAttention's CUDA kernels take in both passes.
CUDA_MIN_TILE = 128
#: Dynamo's per-function recompilation limit is raised to this when the plan first runs:
#: each pattern lowers to its own ``mask_mod``, and the default (8) would send the ninth
#: pattern of a process to FlexAttention's unfused eager path.
RECOMPILE_LIMIT = 64

_compiled = None
_compiled_lock = threading.Lock()


def compiled_flex_attention() -> Callable:
    """``torch.compile(flex_attention)``, created once per process."""
    global _compiled
    with _compiled_lock:
        if _compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            _compiled = torch.compile(flex_attention, dynamic=False)
        return _compiled


#: The block-mask tile of whole-64-token-block patterns in forward passes on CUDA, and
#: forward kernel options whose tiles divide it. On an H100 (bf16, head dim 128, torch 2.11,
#: ``benchmarks/flex_options.py``, 2026-11-25) these kernel tiles ran ``blocks(128).local(6)``
#: at 16K tokens 7% faster forward than the defaults.
SMALL_TILE = 64
SMALL_TILE_OPTIONS = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
#: Throughput per computed pair on :data:`SMALL_TILE` tiles relative to the default tiles;
#: the small tile is taken where it computes fewer pairs than this share of the default
#: tile's. BigBird (``blocks(64).local(1).global_(2).random(3, 0)``, 16,384 tokens, 16
#: heads, head dim 128, bf16, H100, torch 2.11, ``benchmarks/attention.py --quick``,
#: 2026-12-05, commit c4a8642) ran forward in 0.651 ms on 64-token tiles (its useful pairs)
#: against 1.135 ms for FlexAttention on 128-token tiles (2.13x the pairs): 0.82 of the
#: rate per pair.
SMALL_TILE_EFFICIENCY = 0.82


def flex_tiles(q_block: int, kv_block: int, device: torch.device) -> tuple[int, int]:
    """The block-mask tile the flex plan uses on ``device`` for a requested tile."""
    if torch.device(device).type == "cuda":
        return max(q_block, CUDA_MIN_TILE), max(kv_block, CUDA_MIN_TILE)
    return q_block, kv_block


def bucket_length(length: int, tile: int) -> int:
    """``length`` rounded up to a multiple of ``max(tile, 2**(bit_length(length) - 3))``."""
    unit = max(tile, 1 << max(0, length.bit_length() - 3))
    return -(-length // unit) * unit


def padded_block_mask(states: torch.Tensor, grid: TileGrid, mask_mod: Callable,
                      head_layers: Sequence[int] | None, q_padded: int, kv_padded: int) -> BlockMask:
    """The block mask of ``states`` (tiles of ``grid``, layers given to heads by
    ``head_layers``; ``mask_mod`` on row indices, see :func:`block_mask_from_states`) on
    sequences padded to ``q_padded x kv_padded``: padded tiles are empty, and the
    ``mask_mod`` also refuses positions past the true lengths (held as tensors, so no
    length is compiled in)."""
    if (q_padded, kv_padded) == (grid.rows, grid.kv_len):
        return block_mask_from_states(states, grid, mask_mod, head_layers)
    nq, nk = -(-q_padded // grid.q_block), -(-kv_padded // grid.kv_block)
    padded = F.pad(states, (0, nk - states.shape[-1], 0, nq - states.shape[-2]), value=EMPTY)
    device = states.device
    q_limit = torch.tensor(grid.rows, device=device)
    kv_limit = torch.tensor(grid.kv_len, device=device)

    def bounded_mask(b, h, q, k):
        return mask_mod(b, h, q, k) & (q < q_limit) & (k < kv_limit)

    return block_mask_from_states(padded, TileGrid(q_padded, kv_padded, grid.q_block, grid.kv_block),
                                  bounded_mask, head_layers)


#: Forward-kernel options for diagonal bands (:func:`~sparsedsl.lang.queries.is_diagonal_band`)
#: at head dim 128 in bf16/fp16 on an H100 (compute capability 9.0). Measured there with
#: torch 2.11 (``benchmarks/flex_options.py`` and the same options on every benchmark
#: case, back to back): forward 8-12% faster on ``window(800)`` and ``blocks(128).local(6)``
#: at 16K tokens and on ``window(3200)`` and ``blocks(128).local(25)`` at 64K, forward+
#: backward 2-4% faster; the same options ran 5-49% slower on window + global tokens,
#: BigBird (its mask reads a block layout) and head dim 64, which keep the defaults.
BAND_FORWARD_OPTIONS = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 2}
#: What a window of whole blocks (:func:`~sparsedsl.lang.queries.block_band`) whose block
#: size is a multiple of the tile promises both kernels on sequences of whole tiles (no
#: padding) in self-attention. Every tile is then full or empty, and the full tiles of each
#: tile row and of each tile column are consecutive (``BLOCKS_ARE_CONTIGUOUS``: the kernels
#: step to the next tile without reading its index), and each row's first tile holds its
#: own block, which it may see (``ROWS_GUARANTEED_SAFE``: no check for rows without keys).
#: Measured with the default kernel tiles (H100, torch 2.11, bf16, 2026-12-05, timed as
#: ``benchmarks/flex_options.py`` times its configurations, these among them): at head dim 128,
#: ``blocks(128).local(25)`` at 65,536 tokens forward+backward 30.19 -> 28.83 ms (0.72 ->
#: 0.75 x density), forward 8.09 -> 7.31 ms, and ``blocks(128).local(6)`` at 16,384 tokens
#: 2.13 -> 2.03 ms; at head dim 64 (``blocks(256).local(3)``, 16,384 tokens) 1.43 -> 1.47
#: ms, which keeps the defaults. In the plan, with :data:`BAND_FORWARD_OPTIONS`
#: (:data:`ALIGNED_BAND_OPTIONS`): training steps 1.05x hand-written FlexAttention's at
#: both lengths (``benchmarks/results/h100-attention-2026-12-05g.json``).
ALIGNED_BAND_PROMISES = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
ALIGNED_BAND_OPTIONS = {**BAND_FORWARD_OPTIONS, **ALIGNED_BAND_PROMISES}


def flex_kernel_options(pattern, head_dim: int, device: torch.device, dtype: torch.dtype,
                        tile: int = CUDA_MIN_TILE, whole_tiles: bool = False) -> dict | None:
    """FlexAttention kernel options for ``pattern`` on ``device`` with square block-mask
    tiles of ``tile`` (None: the defaults); ``whole_tiles``: the call is self-attention on
    sequences of whole tiles, unpadded.

    :data:`SMALL_TILE` tiles take :data:`SMALL_TILE_OPTIONS`. A ``score_mod`` that loads a
    ``[.., Q, K]`` tensor (``bias``) has its tile pipelined beside K and V, so two pipeline
    stages are used instead of the default three, which overflow an H100's shared memory
    with 128x128 tiles. Diagonal bands at head dim 128 in half precision on an H100 take
    :data:`BAND_FORWARD_OPTIONS`, and :data:`ALIGNED_BAND_OPTIONS` where they are windows
    of whole blocks that are whole tiles, on ``whole_tiles``."""
    if torch.device(device).type != "cuda":
        return None
    bias = any(isinstance(mod, n.Bias) for mod in score_mods(pattern))
    if tile == SMALL_TILE:
        return {**SMALL_TILE_OPTIONS, "fwd_num_stages": 2} if bias else SMALL_TILE_OPTIONS
    if bias:
        return {"num_stages": 2}
    if head_dim == 128 and dtype in (torch.bfloat16, torch.float16) and is_diagonal_band(pattern) \
            and torch.cuda.get_device_capability(device) == (9, 0):
        band = block_band(pattern)
        aligned = whole_tiles and band is not None and band[0] % tile == 0
        return ALIGNED_BAND_OPTIONS if aligned else BAND_FORWARD_OPTIONS
    return None


def flex_plan_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_mask: BlockMask,
                        score_mod: Callable | None, scale: float, return_lse: bool,
                        kernel_options: dict | None = None):
    """Compiled FlexAttention on inputs padded to ``block_mask``'s lengths, with
    ``kernel_options`` (:func:`flex_kernel_options`); returns ``(out, lse or None)`` cut
    back to the true lengths."""
    q_len, kv_len = q.shape[2], k.shape[2]
    q_padded, kv_padded = block_mask.seq_lengths
    if q_padded != q_len:
        q = F.pad(q, (0, 0, 0, q_padded - q_len))
    if kv_padded != kv_len:
        k = F.pad(k, (0, 0, 0, kv_padded - kv_len))
        v = F.pad(v, (0, 0, 0, kv_padded - kv_len))
    result = (_compiled or compiled_flex_attention())(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1], return_lse=return_lse, kernel_options=kernel_options)
    out, lse = result if return_lse else (result, None)
    if q_padded == q_len:
        return out, lse
    return out[:, :, :q_len], (lse[:, :, :q_len] if lse is not None else None)


def _naming_score_functions(run, functions):
    """``run`` whose kernel compile failures name the plain score functions: Inductor
    cannot lower every function FlexAttention's eager semantics allow (a reduction over a
    gathered vector, for one), and its own error names neither the function nor a way out."""
    names = ", ".join(getattr(fn, "__qualname__", None) or repr(fn) for fn in functions)

    def checked(q, k, v, q_offset):
        try:
            return run(q, k, v, q_offset)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as err:
            raise ScoreFunctionError(
                f"score function {names}: compiled FlexAttention cannot lower it (a reduction over "
                f"gathered values, for one, has no per-element kernel); compile with kernel='gather' or "
                f"kernel='auto' on the CPU, or write it with elementwise operations ({type(err).__name__})"
            ) from err

    return checked


def flex_reasons(call: Call) -> list[str]:
    """Why FlexAttention's kernels cannot run ``call`` (empty when they can)."""
    reasons = []
    if call.dtype == torch.float64:
        reasons.append("float64 inputs: FlexAttention kernels take 16- and 32-bit floats")
    if call.head_dim < FLEX_MIN_HEAD_DIM:
        reasons.append(f"head_dim={call.head_dim}: FlexAttention kernels need a head dim of at least "
                       f"{FLEX_MIN_HEAD_DIM}")
    if call.device.type == "cpu" and call.needs_grad:
        reasons.append("FlexAttention has no backward pass on the CPU")
    if call.device.type == "cpu" and call.return_lse:
        reasons.append("FlexAttention has no log-sum-exp output (return_lse) on the CPU")
    return reasons


class FlexPlan(Plan):
    """Block-sparse FlexAttention, compiled by Inductor, with the structural block mask
    (see the module docstring)."""

    name = "flex"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        reasons = flex_reasons(call)
        if call.decoding:
            reasons.append("a decoding step: the decode plan runs the kernel from cached tile rows")
        return reasons

    def tiles(self, pattern: n.Pattern, call: Call) -> tuple[int, int]:
        """:func:`flex_tiles`, or on CUDA without gradients :data:`SMALL_TILE` tiles for a
        pattern made of whole 64-token blocks when they compute fewer pairs than
        :data:`SMALL_TILE_EFFICIENCY` times the default tiles' (requested tiles of 128 or
        less)."""
        tiles = flex_tiles(call.q_block, call.kv_block, call.device)
        if (call.device.type != "cuda" or call.needs_grad or max(call.q_block, call.kv_block) > CUDA_MIN_TILE
                or block_tile(pattern) != SMALL_TILE):
            return tiles
        small = (SMALL_TILE, SMALL_TILE)
        computed = {t: tiled(pattern, call, t).pairs(call.heads) for t in (tiles, small)}
        return small if computed[small] < SMALL_TILE_EFFICIENCY * computed[tiles] else tiles

    def prepare(self, pattern: n.Pattern, call: Call) -> Tiled:
        return tiled(pattern, call, self.tiles(pattern, call))

    def efficiency(self, call: Call) -> float | None:
        """1 on CUDA: the reference tile kernel (see :meth:`cost` for small tiles). On the
        CPU not measured against the gather plan (and the first call of each length bucket
        compiles for seconds)."""
        return 1.0 if call.device.type == "cuda" else None

    def cost(self, prepared: Tiled, call: Call, planner) -> float | None:
        """Computed pairs over the efficiency, and over :data:`SMALL_TILE_EFFICIENCY` too
        on :data:`SMALL_TILE` tiles."""
        cost = super().cost(prepared, call, planner)
        if cost is not None and call.device.type == "cuda" and prepared.lowering.grid.q_block == SMALL_TILE:
            cost /= SMALL_TILE_EFFICIENCY
        return cost

    def computed_pairs(self, prepared: Tiled, call: Call, planner) -> int:
        return prepared.pairs(call.heads)

    def build(self, prepared: Tiled, call: Call, planner) -> Runner:
        lowered = prepared.lowering
        check_batch(call, lowered.layer_states)
        q_padded, kv_padded = bucket_length(call.q_len, lowered.grid.q_block), bucket_length(call.kv_len,
                                                                                          lowered.grid.kv_block)
        block_mask = lowered.block_mask_for(q_padded, kv_padded, lambda states, grid, mask_mod, layers:
                                            padded_block_mask(states, grid, mask_mod, layers, q_padded, kv_padded))
        score_mod = call_score_mod(prepared.pattern, call)
        grid = lowered.grid
        whole_tiles = (call.self_attention and grid.q_block == grid.kv_block
                       and (q_padded, kv_padded) == (call.q_len, call.kv_len))
        options = flex_kernel_options(prepared.pattern, call.head_dim, call.device, call.dtype, grid.q_block,
                                      whole_tiles)
        return_lse = call.return_lse

        def run(q, k, v, _):
            return flex_plan_attention(q, k, v, block_mask=block_mask, score_mod=score_mod, scale=call.scale,
                                       return_lse=return_lse, kernel_options=options)

        functions = [mod.fn for mod in score_mods(prepared.pattern) if isinstance(mod, n.FunctionMod)]
        return _naming_score_functions(run, functions) if functions else run

    def describe(self, prepared: Tiled, call: Call) -> str:
        return "block-sparse FlexAttention with the structural block mask"
