"""``sparsedsl.compile(pattern)``: a pattern as an ``nn.Module`` that computes attention."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from ..lang import nodes as n
from ..lang.checks import PatternArgumentError, check_bool, check_int
from ..lang.queries import diagonal_period, head_group_count, score_mods
from ..passes.lowering import Lowering, context, lowering
from ..passes.maskmod import MaskFn, ScoreFn, lower_score, score_rows_from
from ..plans.decode import decodes_by_rows, is_decoding_step
from ..plans.registry import KERNELS
from .arguments import (BLOCK_SIZES, block_sizes, checked_device, make_call, resolve_q_offset, static_offset,
                        to_layout)
from .explanation import Explanation, explain_call
from .inputs import FLOAT_DTYPES, check_attention_inputs, checked_scale
from .opaque import handle_for, traced_attention
from .planner import CALL_RUNNERS, Planner, PlanNotSupported

__all__ = ["BLOCK_SIZES", "CompiledPattern", "compile"]


class CompiledPattern(nn.Module):
    """Exact attention restricted to a pattern: for each query row, one softmax over its
    allowed keys (``softmax(q k^T * scale + score_mod, masked) @ v``); a row with no
    allowed key outputs zeros.

    Each call runs the plan the planner (:mod:`sparsedsl.compiler.planner`) picks for its
    shape, or the one named by ``kernel``. Lowerings, plans and runners are cached per
    pattern, sizes, dtype and device, and shared by every module with the same pattern;
    patterns whose mask binds call-time tensors are cached per tensor memory and version.
    """

    def __init__(self, pattern: n.Pattern, *, block_size=128, kernel: str = "auto"):
        super().__init__()
        if not isinstance(pattern, n.Pattern):
            raise PatternArgumentError(f"compile(): argument 'pattern' must be a sparsedsl pattern, got {pattern!r}")
        if kernel not in KERNELS:
            raise PatternArgumentError(f"compile(): argument 'kernel' must be one of {KERNELS}, got {kernel!r}")
        self.pattern, self.kernel = pattern, kernel
        self.q_block, self.kv_block = block_sizes(block_size)
        self.planner = Planner(kernel)
        self._decodes = kernel in ("auto", "decode") and decodes_by_rows(pattern)
        self._diagonal_period = None if score_mods(pattern) or pattern.buffer_names() else diagonal_period(pattern)
        self._handle = handle_for(self, self._configuration())

    def _configuration(self) -> tuple:
        return (self.pattern, self.q_block, self.kv_block, self.kernel)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._handle = handle_for(self, self._configuration())  # handles are per process

    def extra_repr(self) -> str:
        return f"{self.pattern}, block_size=({self.q_block}, {self.kv_block}), kernel={self.kernel!r}"

    def lowering(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None, device=None,
                 tiles: tuple[int, int] | None = None, q_offset=0, where: str = "CompiledPattern",
                 **buffers) -> Lowering:
        """The cached lowering (:class:`~sparsedsl.passes.lowering.Lowering`) of query rows
        ``[q_offset, q_offset + q_len)`` over ``kv_len`` keys (default ``q_offset + q_len``;
        ``q_offset="end"`` aligns the queries to the end of the keys), on ``tiles`` (default:
        the module's ``block_size``)."""
        q_len, kv_len, q_offset = resolve_q_offset(where, q_len, kv_len, q_offset)
        return lowering(self.pattern, q_len, kv_len, q_offset, tiles or (self.q_block, self.kv_block),
                        heads=heads, device=device, buffers=buffers, where=where)

    def mask_mod(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None, device=None,
                 q_offset=0, **buffers) -> MaskFn:
        """FlexAttention ``mask_mod(b, h, q, k)`` for these sizes; query ``q`` is position ``q_offset + q``."""
        return self.lowering(q_len, kv_len, heads=heads, device=device, q_offset=q_offset, where="mask_mod()",
                             **buffers).mask_mod

    def score_mod(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None, device=None,
                  q_offset=0, **buffers) -> ScoreFn | None:
        """FlexAttention ``score_mod(score, b, h, q, k)``, or None without score mods;
        query ``q`` is position ``q_offset + q``."""
        q_len, kv_len, q_offset = resolve_q_offset("score_mod()", q_len, kv_len, q_offset)
        ctx = context(self.pattern, q_len, kv_len, q_offset, heads, device, buffers, "score_mod()")
        return score_rows_from(lower_score(self.pattern, ctx), q_offset, ctx.device)

    def block_mask(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None,
                   batch: int | None = None, device=None, q_offset=0, **buffers) -> BlockMask:
        """The structural FlexAttention ``BlockMask`` of query rows ``[q_offset, q_offset +
        q_len)`` (``[B, H, ...]`` with ``B``/``H`` of 1 when the pattern does not vary over
        them; FlexAttention broadcasts those)."""
        lowered = self.lowering(q_len, kv_len, heads=heads, device=device, q_offset=q_offset,
                                where="block_mask()", **buffers)
        bound_batch = lowered.layer_states.shape[0]
        if batch is not None and bound_batch not in (1, check_int("block_mask()", "batch", batch, minimum=1)):
            raise ValueError(f"the pattern's bound tensors have batch size {bound_batch} but batch={batch}")
        return lowered.block_mask

    def explain(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None, kv_heads: int | None = None,
                head_dim: int = 128, batch: int = 1, device=None, dtype: torch.dtype | None = None,
                requires_grad: bool = False, return_lse: bool = False, q_offset=0, scale: float | None = None,
                **buffers) -> Explanation:
        """The plan ``forward`` runs for a call of these sizes on ``device`` (default: CUDA
        when present; ``"cuda"`` works on a machine without it), with every candidate's
        cost or reasons, and what it computes over ``heads`` heads. Takes every argument
        that changes the choice: gradients, ``return_lse``, ``q_offset`` (a decoding step
        is explained as the decode plan runs it). Rows past position 0 that are whole
        diagonal blocks of a block-periodic pattern are explained as the self-attention
        they run as."""
        where = "explain()"
        head_dim, batch = check_int(where, "head_dim", head_dim, minimum=1), check_int(where, "batch", batch, minimum=1)
        q_len, kv_len, q_offset = resolve_q_offset(where, q_len, kv_len, q_offset)
        if self._block_local(q_len, kv_len, q_offset) and not buffers:
            kv_len, q_offset = q_len, 0
        device = checked_device(where, device)
        heads = check_int(where, "heads", head_group_count(self.pattern) if heads is None else heads, minimum=1)
        kv_heads = heads if kv_heads is None else check_int(where, "kv_heads", kv_heads, minimum=1)
        if heads % kv_heads:
            raise PatternArgumentError(
                f"{where}: argument 'kv_heads' ({kv_heads}) must divide heads ({heads}) for "
                f"grouped-query attention")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: argument 'dtype' must be one of {FLOAT_DTYPES}, got {dtype!r}")
        call = make_call(q_len, kv_len, q_offset, heads, kv_heads, head_dim, batch, dtype, device,
                         checked_scale(where, scale, head_dim), (self.q_block, self.kv_block),
                         check_bool(where, "requires_grad", requires_grad), check_bool(where, "return_lse", return_lse),
                         self._decoding(q_len, kv_len, q_offset, bool(requires_grad)) and not buffers, buffers)
        return explain_call(self.planner, self.pattern, call)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                layout: str = "bhnd", return_lse: bool = False, q_offset=0, **buffers):
        """Attention of ``q`` over ``k``/``v``.

        ``layout="bhnd"``: ``[batch, heads, length, head_dim]``; ``"bnhd"``: ``[batch,
        length, heads, head_dim]`` (the layout of ``dilated_attention_pytorch``). ``k`` and
        ``v`` may have fewer heads than ``q`` (grouped-query attention) when that number
        divides ``q``'s. ``scale`` defaults to ``1 / sqrt(head_dim)``. ``q_offset``: the
        position of the first query (an int >= 0, or ``"end"`` for ``kv_len - q_len``:
        queries aligned to the end of the keys, as when decoding with a KV cache); query
        ``i`` is position ``q_offset + i`` and key ``j`` position ``j``. Tensors the pattern
        names (``documents``, ``layout``, ``bias``) are passed by keyword and cover
        positions ``0 .. q_offset + q_len - 1``. Returns the output in ``q``'s layout, and
        with ``return_lse=True`` also the log-sum-exp ``[batch, heads, q_len]`` (``-inf``
        on rows with no allowed key).

        Under ``torch.compile`` the call is one opaque operator (see
        :mod:`sparsedsl.compiler.opaque`): no graph break, and no new graph per length once
        the length is dynamic.
        """
        if self.kernel != "gather" and _inside_functorch_transform():
            return self._under_transforms()(q, k, v, scale=scale, layout=layout, return_lse=return_lse,
                                            q_offset=q_offset, **buffers)
        q, k, v, scale = check_attention_inputs(q, k, v, scale, layout)
        if return_lse is not False and return_lse is not True:
            return_lse = check_bool("forward()", "return_lse", return_lse)
        if torch.compiler.is_compiling():
            offset = k.shape[2] - q.shape[2] if q_offset == "end" else static_offset(q_offset)
            result = traced_attention(self._handle, q, k, v, scale, offset, return_lse, buffers)
            return (to_layout(result[0], layout), result[1]) if return_lse else to_layout(result, layout)
        if not (type(q_offset) is int and q_offset == 0):  # 0, the common case, needs no checks
            _, _, q_offset = resolve_q_offset("forward()", q.shape[2], k.shape[2], q_offset)
        if self._block_local(q.shape[2], k.shape[2], q_offset) and not buffers:
            k, v = k[:, :, q_offset:q_offset + q.shape[2]], v[:, :, q_offset:q_offset + q.shape[2]]
            q_offset = 0
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # Checked in the order that costs least when the answer is no (offset 0 is the common case).
        decoding = q_offset > 0 and self._decodes and not buffers and \
            self._decoding(q.shape[2], k.shape[2], q_offset, needs_grad)
        if buffers:
            runner = self.planner.runner(self.pattern, self._call(q, k, scale, q_offset, needs_grad, return_lse,
                                                                  decoding, buffers))
        else:  # the handle stands for (pattern, tiles, kernel): an int, hashed at no cost
            # A decoding step's runner reads q_offset when it runs, except one planned for a
            # step aligned to the end of the keys, which may align causal() to the end (dense
            # SDPA's lower-right bias): exact for every end-aligned step of these shapes only.
            step = ("end" if q_offset + q.shape[2] == k.shape[2] else "rows") if decoding else q_offset
            key = (self._handle, q.shape, k.shape, v.shape, q.dtype, q.device, needs_grad, return_lse, scale, step)
            runner = CALL_RUNNERS.get(key, lambda: self.planner.runner(self.pattern, self._call(
                q, k, scale, q_offset, needs_grad, return_lse, decoding, buffers)))
        out, lse = runner(q, k, v, q_offset)
        return (to_layout(out, layout), lse) if return_lse else to_layout(out, layout)

    def _under_transforms(self) -> "CompiledPattern":
        """The module that runs calls inside ``torch.func`` transforms (``grad``, ``vmap``,
        ``jacrev``, ...): the gather plan, written in differentiable PyTorch operations that
        every transform takes (the other plans' autograd functions have no functorch rules)."""
        if self.kernel != "auto":
            raise PlanNotSupported(
                f"kernel={self.kernel!r} cannot run inside torch.func transforms (grad, vmap, "
                f"jacrev, ...): its kernels have no functorch rules; compile with kernel='auto' "
                f"(which runs the gather plan there) or kernel='gather'")
        return _gather_module(self.pattern, self.q_block, self.kv_block)

    def _call(self, q, k, scale: float, q_offset: int, needs_grad: bool, return_lse: bool, decoding: bool,
              buffers: dict):
        return make_call(q.shape[2], k.shape[2], q_offset, q.shape[1], k.shape[1], q.shape[3], q.shape[0],
                         q.dtype, q.device, scale, (self.q_block, self.kv_block), needs_grad, return_lse,
                         decoding, buffers)

    def _decoding(self, q_len: int, kv_len: int, q_offset: int, needs_grad: bool) -> bool:
        return is_decoding_step(self._decodes, q_len, kv_len, q_offset, self.q_block, needs_grad)

    def _block_local(self, q_len: int, kv_len: int, q_offset: int) -> bool:
        """Whether rows ``[q_offset, q_offset + q_len)`` are whole diagonal blocks of a
        pattern that is the same in every block (:func:`diagonal_period`) within the keys:
        they then attend exactly as the first ``q_len`` rows over the first ``q_len`` keys
        (so a LongNet shard of a sequence-parallel run gets the lattice plan)."""
        period = self._diagonal_period
        return (period is not None and q_offset > 0 and q_offset % period == 0
                and q_len % period == 0 and q_offset + q_len <= kv_len)


def _inside_functorch_transform() -> bool:
    """Whether the call runs inside a ``torch.func`` transform (its interpreter stack is
    not empty); never while ``torch.compile`` traces (the call is then an operator)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


@functools.lru_cache(maxsize=None)
def _gather_module(pattern: n.Pattern, q_block: int, kv_block: int) -> "CompiledPattern":
    """The gather-plan module of ``pattern`` on these tiles, shared by the modules that
    run it inside ``torch.func`` transforms."""
    return CompiledPattern(pattern, block_size=(q_block, kv_block), kernel="gather")


def compile(pattern: n.Pattern, *, block_size=128, kernel: str = "auto") -> CompiledPattern:
    """Compile ``pattern`` into a :class:`CompiledPattern` attention module.

    ``block_size``: the tile (an int, or ``(q_block, kv_block)``), one of ``BLOCK_SIZES``.
    ``kernel``: ``"auto"`` lets the planner pick the plan per call
    (:mod:`sparsedsl.compiler.planner`); a plan name (``"sdpa"``, ``"lattice"``,
    ``"band"``, ``"decode"``, ``"flex"``, ``"tile_sdpa"``, ``"gather"``) runs that plan, and
    a call it cannot compute raises an error that lists why.
    """
    return CompiledPattern(pattern, block_size=block_size, kernel=kernel)
