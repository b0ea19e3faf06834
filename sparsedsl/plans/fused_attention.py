"""Dense attention by the device's fused kernel with its log-sum-exp, and the backward that
takes the statistics (``out``, ``lse``) it is given: the kernels of the runs of lattice
terms (:mod:`~sparsedsl.plans.terms_attention`).

Given *merged* statistics (the output and log-sum-exp of a softmax over more keys than the
call holds), a fused backward computes ``P = exp(s - L)`` on the call's pairs and ``D =
rowsum(dO * O)``: exactly the call's share of the larger softmax's gradient. Kernels:
PyTorch's fused CPU attention; on CUDA in half precision cuDNN's attention (compute
capability 9.0 and later, forward and backward) or else the flash kernel's, in float32 the
memory-efficient kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of log-sum-exps and merges: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def fused_reasons(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    """Why the fused kernels cannot run inputs of ``dtype`` and ``head_dim`` on ``device``
    (empty when they can)."""
    reasons = []
    if device.type == "cuda" and dtype == torch.float64:
        reasons.append("float64 on CUDA: the fused kernel with a log-sum-exp takes 16- and 32-bit floats")
    if device.type == "cuda" and head_dim % 8:
        reasons.append(f"head_dim={head_dim} on CUDA: the fused kernel's views need a multiple of 8")
    return reasons


def same_head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q``, ``k``, ``v`` with one head dim, as the fused kernels take them: zero columns
    appended to the queries and keys, or to the values, leave every score and every output
    column (the first ``v.shape[-1]``) exact; gradients flow through the padding."""
    dim, value_dim = q.shape[-1], v.shape[-1]
    if dim < value_dim:
        return F.pad(q, (0, value_dim - dim)), F.pad(k, (0, value_dim - dim)), v
    if dim > value_dim:
        return q, k, F.pad(v, (0, dim - value_dim))
    return q, k, v


def _flash(q: torch.Tensor) -> bool:
    """Whether CUDA's flash kernel runs ``q``: half precision, head dim a multiple of 8 up
    to 256."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _cudnn(q: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs ``q``: half precision on a GPU of compute capability
    9.0 or later (where it is dense SDPA's kernel too), head dim a multiple of 8 up to 128.
    On an H100 its forward ran folded lattice views at 1.0x dense SDPA's rate per pair where
    the flash kernel ran them at 0.48-0.53x (2026-12-05, bf16, head dim 128)."""
    return (_flash(q) and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``[n, h, m, d]`` inputs by the device's fused kernel: ``(out,
    lse [n, h, m])``, the log-sum-exp in :func:`compute_dtype`. The statistics are those
    :func:`attend_backward` takes, whichever kernel ran."""
    if _cudnn(q):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=scale)[:2]
        return out, lse[..., 0]
    if _flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    if q.is_cuda:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)
        return out, lse[:, :, :q.shape[2]]  # rows padded to a multiple of 32
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None,
                                                                     scale=scale)


def attend_backward(grad_out, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of :func:`attend` from the statistics ``out`` and ``lse`` given (see
    the module docstring), in the inputs' dtype."""
    if _cudnn(q):  # the statistics as the forward returns them: contiguous, lse [n, h, m, 1]
        grad_out, out = grad_out.contiguous(), out.contiguous()
        no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # seeds: unread without dropout
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out, q, k, v, out, lse.contiguous()[..., None], no_dropout, no_dropout, None, None, None,
            q.shape[2], k.shape[2], 0.0, False, scale=scale)
    if _flash(q):  # the kernel reads the statistics as contiguous tensors
        no_dropout = torch.zeros(2, dtype=torch.uint64, device=q.device)  # seeds: unread without dropout
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), None, None, q.shape[2], k.shape[2],
            0.0, False, no_dropout, no_dropout[0], scale=scale)
    if q.is_cuda:
        lse = F.pad(lse, (0, -lse.shape[-1] % 32)).contiguous()  # the kernel's padded rows
        no_dropout = torch.zeros((), dtype=torch.long, device=q.device)  # seeds: unread without dropout
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, lse, no_dropout, no_dropout, 0.0, [True, True, True, False], False,
            scale=scale)
        return dq, dk, dv
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=None, scale=scale)
