"""``MultiheadSparseAttention``: ``nn.MultiheadAttention``'s interface over a sparse pattern.

Parameters, their names, shapes and initialisation are ``nn.MultiheadAttention``'s
(``in_proj_weight`` / ``q_proj_weight``…, ``in_proj_bias``, ``out_proj``), so a state dict
moves between the two in both directions, and with ``pattern="full()"`` both compute the
same thing. Attention runs through :func:`sparsedsl.compile` with exact masked-softmax
semantics.

Decisions:

* **Dropout** applies to the attention *output* (the concatenated per-head context, before
  ``out_proj``) in training mode, not to the attention weights: the fused kernels
  (FlexAttention, the block-sparse gather) compute ``softmax(scores) @ V`` in one pass and
  never hold the weights to drop. Both forms are unbiased (their expectation is the
  un-dropped output) but they regularise differently; ``dropout=0.0`` (the default) is
  the same as ``nn.MultiheadAttention``.
* ``key_padding_mask`` and ``attn_mask`` are refused: express masks in the pattern
  (``documents("ids")`` for packed sequences, ``blocks(b).layout("name")`` for block
  layouts, ``.score(bias("name"))`` for additive biases) and pass their tensors as
  keyword arguments of ``forward``.
* ``need_weights=True`` returns the dense attention weights (averaged over heads unless
  ``average_attn_weights=False``) when they have at most 2**24 elements and the pattern
  has no score modifications and counts no pair more than once (the weights come from the
  mask), and raises otherwise; the default ``need_weights=False`` returns ``(attn_output, None)``.
* ``add_bias_kv`` and ``add_zero_attn`` are not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..lang.checks import check_bool, check_int
from ..lang.queries import head_group_count, score_mods
from ._common import MAX_DENSE_WEIGHTS, compiled, dense_weights, resolve_pattern, with_causal

__all__ = ["MultiheadSparseAttention"]


class MultiheadSparseAttention(nn.Module):
    """Multi-head attention restricted to a sparse pattern, with ``nn.MultiheadAttention``'s
    conventions.

    Args:
        embed_dim: model dimension (divisible by ``num_heads``).
        num_heads: number of heads (at least the pattern's number of head groups).
        pattern: a :class:`sparsedsl.Pattern`, pattern text (``"window(63, 0)"``) or a
            catalog name or call (``"sliding_window(window=64)"``, ``"bigbird"``).
        batch_first: inputs ``[batch, seq, feature]`` if True, else ``[seq, batch,
            feature]`` (default False, as ``nn.MultiheadAttention``).
        dropout: dropout probability on the attention output (see the module docstring).
        bias: add biases to the input and output projections.
        kdim, vdim: feature sizes of ``key`` and ``value`` (default ``embed_dim``).
        device, dtype: factory arguments of the parameters.
        block_size: kernel tile (see :func:`sparsedsl.compile`; default 128).
        kernel: ``"auto"``, ``"flex"`` or ``"gather"``.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False, **buffers)`` returns ``(attn_output,
    weights or None)``; ``is_causal=True`` intersects the pattern with ``causal()``;
    ``buffers`` are the tensors the pattern names (``documents``, ``layout``, ``bias``).
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern, *, batch_first: bool = False,
                 dropout: float = 0.0, bias: bool = True, kdim: int | None = None,
                 vdim: int | None = None, device=None, dtype=None, block_size: int = 128,
                 kernel: str = "auto"):
        where = "MultiheadSparseAttention()"
        embed_dim = check_int(where, "embed_dim", embed_dim, minimum=1)
        num_heads = check_int(where, "num_heads", num_heads, minimum=1)
        for name, value in (("kdim", kdim), ("vdim", vdim)):
            if value is not None:
                check_int(where, name, value, minimum=1)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.pattern = resolve_pattern(pattern, "MultiheadSparseAttention")
        groups = head_group_count(self.pattern)
        if groups > num_heads:
            raise ValueError(
                f"MultiheadSparseAttention: the pattern {self.pattern} has {groups} head groups "
                f"but num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.block_size = block_size
        self.kernel = kernel
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(
            embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()
        # The compiled modules (without and with ``is_causal``), resolved here so that
        # ``forward`` does no lookup under ``torch.compile`` (held in a tuple: they have no
        # state, and the module tree stays nn.MultiheadAttention's).
        self._attention = (compiled(self.pattern, block_size, kernel),
                           compiled(with_causal(self.pattern), block_size, kernel))

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _projections(self):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(e)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.split(e)
        return (wq, bq), (wk, bk), (wv, bv)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, **buffers) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(attn_output, weights)``: ``attn_output`` in the input layout (``[L, N, E]``,
        ``[N, L, E]`` with ``batch_first``, or ``[L, E]`` unbatched); ``weights`` is None
        unless ``need_weights`` (see the class docstring)."""
        if key_padding_mask is not None or attn_mask is not None:
            raise NotImplementedError(
                "MultiheadSparseAttention: key_padding_mask and attn_mask are not supported; "
                "express the mask in the pattern (documents('ids'), blocks(b).layout('name'), "
                ".score(bias('name'))) and pass its tensor by keyword to forward()")
        where = "MultiheadSparseAttention.forward()"
        is_causal = check_bool(where, "is_causal", is_causal)
        need_weights = check_bool(where, "need_weights", need_weights)
        average_attn_weights = check_bool(where, "average_attn_weights", average_attn_weights)
        self._check_inputs(where, query, key, value)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if self.batch_first and not unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now [L, N, E]
        (wq, bq), (wk, bk), (wv, bv) = self._projections()
        tgt_len, batch, _ = query.shape
        src_len = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, wq, bq).view(tgt_len, batch, h, d).transpose(0, 1)  # [N, L, H, D]
        k = F.linear(key, wk, bk).view(src_len, batch, h, d).transpose(0, 1)
        v = F.linear(value, wv, bv).view(src_len, batch, h, d).transpose(0, 1)
        attention = self._attention[1 if is_causal else 0]
        if need_weights and score_mods(attention.pattern):
            raise ValueError(
                f"{where}: need_weights=True computes the weights from the pattern's mask alone, "
                f"so it takes no pattern with score modifications or pairs counted more than once "
                f"(a multiset such as longnet(...)); got {attention.pattern}")
        out = attention(q, k, v, layout="bnhd", **buffers)
        out = out.reshape(batch, tgt_len, self.embed_dim)
        if self.dropout > 0.0 and self.training:
            out = F.dropout(out, self.dropout, training=True)
        out = self.out_proj(out)  # [N, L, E]
        weights = None
        if need_weights:
            weights = dense_weights(attention.pattern, q.transpose(1, 2), k.transpose(1, 2), d ** -0.5,
                                    MAX_DENSE_WEIGHTS, **buffers)
            if weights is None:
                raise ValueError(
                    f"{where}: need_weights=True materialises the weights, which is limited "
                    f"to {MAX_DENSE_WEIGHTS} elements (got batch={batch}, heads={h}, "
                    f"{tgt_len}x{src_len})")
            weights = weights.to(out.dtype)
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        if unbatched:
            return out.squeeze(0), weights
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_inputs(self, where: str, query, key, value) -> None:
        """``query``, ``key``, ``value``: tensors, all 2-D (unbatched ``[L, E]``) or all 3-D,
        of one batch size, ``key`` and ``value`` of one length, their last dims ``embed_dim``,
        ``kdim`` and ``vdim``; a ``ValueError`` naming the argument and its shape otherwise."""
        tensors = {"query": query, "key": key, "value": value}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: argument {name!r} must be a tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"{where}: query must be 2-D (unbatched) or 3-D, got shape {list(query.shape)}")

        def shapes() -> str:  # built only for a message: a string join is not traced
            return ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items())

        if not key.dim() == value.dim() == query.dim():
            raise ValueError(f"{where}: query, key and value must have the same number of dims, got {shapes()}")
        length_dim = 0
        if query.dim() == 3:
            batch_dim, length_dim = (0, 1) if self.batch_first else (1, 0)
            if not query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]:
                raise ValueError(f"{where}: query, key and value must have one batch size "
                                 f"(dim {batch_dim}), got {shapes()}")
        if key.shape[length_dim] != value.shape[length_dim]:
            raise ValueError(f"{where}: key and value must have one length (dim {length_dim}), got {shapes()}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{where}: {name}'s last dim must be {dim}, got shape {list(t.shape)}")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={self.pattern}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")
