"""Validation of the tensors given to a compiled pattern: every error names the argument
and the value, before any kernel sees the tensors."""

from __future__ import annotations

import math
import numbers

import torch

LAYOUTS = ("bhnd", "bnhd")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_4d(where: str, q, k, v, dims: str) -> None:
    """``q``, ``k`` and ``v`` must be 4-D tensors laid out as ``dims`` (for the message)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: argument {name!r} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: argument {name!r} must be 4-D {dims}, got shape {list(t.shape)}")


def check_attention_inputs(q, k, v, scale, layout: str, where: str = "forward()"):
    """``(q, k, v, scale)`` in ``[batch, heads, length, dim]`` layout with ``scale`` a
    float (``1 / sqrt(head_dim)`` when None), or a ``ValueError``/``TypeError`` that says
    what is wrong (its message starts with ``where``)."""
    if _well_formed(q, k, v, layout) and (scale is None or type(scale) is float and math.isfinite(scale)):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        return q, k, v, 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    q, k, v, scale = checked_one_by_one(q, k, v, scale, layout, where)
    return unit_stride(q), unit_stride(k), unit_stride(v), scale


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied to a contiguous tensor when its last dimension (head_dim) is not
    contiguous: the fused kernels that plans call directly read a row of ``head_dim``
    elements as one contiguous run."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def checked_one_by_one(q, k, v, scale, layout: str, where: str):
    """:func:`check_attention_inputs` with every check made and named in turn."""
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: argument 'layout' must be one of {LAYOUTS}, got {layout!r}")
    dims = "[batch, heads, length, head_dim]" if layout == "bhnd" else "[batch, length, heads, head_dim]"
    check_4d(where, q, k, v, f"{dims} (layout={layout!r})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.is_meta:
            raise ValueError(
                f"{where}: argument {name!r} is on the meta device, which holds no values to "
                f"attend over; give tensors on the CPU or a GPU"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{where}: argument {name!r} must be a floating tensor "
                f"(float16, bfloat16, float32 or float64), got dtype={t.dtype}"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{where}: q, k and v must share one dtype, got q={q.dtype} and {name}={t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: q, k and v must be on one device, got q on {q.device} and {name} on {t.device}")
    if layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    (batch, heads, q_len, dim), (kb, kv_heads, kv_len, kdim) = q.shape, k.shape

    def shape_names() -> str:  # built only for a message: a call's host time counts
        return (f"(layout={layout!r}; q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                f"as [batch, heads, length, head_dim])")

    if 0 in (batch, heads, q_len, dim, kv_heads, kv_len):
        raise ValueError(f"{where}: empty inputs are not attention {shape_names()}")
    if kb != batch or v.shape[0] != batch:
        raise ValueError(f"{where}: q, k and v must have the same batch size {shape_names()}")
    if tuple(v.shape[1:3]) != (kv_heads, kv_len):
        raise ValueError(f"{where}: k and v must have the same heads and length {shape_names()}")
    if kdim != dim:
        raise ValueError(f"{where}: q and k must have the same head_dim, got {dim} and {kdim} {shape_names()}")
    if heads % kv_heads:
        raise ValueError(
            f"{where}: q's heads ({heads}) must be a multiple of k/v's heads ({kv_heads}) "
            f"for grouped-query attention {shape_names()}"
        )
    return q, k, v, checked_scale(where, scale, dim)


def checked_scale(where: str, scale, head_dim: int, name: str = "scale") -> float:
    """``scale`` as a float (``1 / sqrt(head_dim)`` when None), or a ``ValueError`` that
    names it (as ``name``): a finite real number (NumPy's included), not a bool."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{where}: argument {name!r} must be a finite number, got {scale!r}")
    return float(scale)


def _well_formed(q, k, v, layout: str) -> bool:
    """Whether ``q``, ``k``, ``v`` pass every check of :func:`check_attention_inputs` in the
    ``"bhnd"`` layout, decided with a few comparisons (a call's host time counts); when not,
    the checks run one by one and raise the error that names the problem."""
    if layout != "bhnd" or type(q) is not torch.Tensor or type(k) is not torch.Tensor \
            or type(v) is not torch.Tensor or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    (batch, heads, q_len, dim), (kb, kv_heads, kv_len, kdim) = q.shape, k.shape
    return (q.dtype in FLOAT_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and k.device == q.device and v.device == q.device and not q.is_meta
            and 0 not in (batch, heads, q_len, dim, kv_heads, kv_len) and kb == batch
            and v.shape[0] == batch and v.shape[1] == kv_heads and v.shape[2] == kv_len
            and kdim == dim and heads % kv_heads == 0)
