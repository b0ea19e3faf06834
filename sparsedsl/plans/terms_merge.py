"""The merge of terms' softmaxes by their log-sum-exps (:mod:`~sparsedsl.plans.terms_attention`):

    L = logsumexp_t(lse_t),    O = sum_t exp(lse_t - L) O_t

On CUDA one Triton kernel (:func:`_merge_kernel`) computes both in one pass over the rows,
reading a term's output row only where the term's weight there is positive: a term covers
only some rows (LongNet's rate-``r`` branch ``1/r`` of each head's), so the merge reads the
rows the terms hold rather than every term's whole output. Elsewhere (the CPU, traced by
``torch.compile``, which compiles it with the rest of the graph, or without Triton: see
:func:`~sparsedsl.triton_kernels.runs_triton`) it runs as tensor operations
(:func:`weighted_sum`).
"""

from __future__ import annotations

import functools

import torch

from ..triton_kernels import runs_triton


def merge(outs: list[torch.Tensor], lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from the softmaxes of terms: ``outs[t] [B, H, N, D]`` weighted by
    ``exp(lses[t] - L)`` with ``L = logsumexp_t(lses[t])`` (``lses [T, B, H, N]``);
    ``(out, L)``, ``out`` in the outputs' dtype, accumulated and ``L`` in ``lses``' dtype.
    Rows with ``L = -inf`` (no term has a key there) output 0. A row's output of a term whose
    weight is 0 there is never read: it may hold anything (the program leaves a term's rows
    without keys unwritten on CUDA). One term is its own merge (its rows without keys must
    hold 0)."""
    if len(outs) == 1:
        return outs[0], lses[0]
    if runs_triton(outs[0]):
        return _merged_on_cuda(outs, lses)
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - total.masked_fill(total == float("-inf"), 0.0))
    return weighted_sum(outs, weights), total


def weighted_sum(outs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_t weights[t, ..., None] * outs[t]`` accumulated in the weights' dtype, in the
    outputs' dtype; a term's rows where its weight is 0 add 0, whatever they hold."""
    terms = [torch.where(weight > 0, weight * term_out, 0.0)
             for weight, term_out in zip(weights[..., None], outs)]
    return sum(terms[1:], terms[0]).to(outs[0].dtype)


#: Elements of one term's output a program of the merge kernel reads at most (its rows ×
#: the head dim rounded up to a power of two).
_TILE_ELEMENTS = 4096


def _merged_on_cuda(outs: list[torch.Tensor], lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge` by :func:`_merge_kernel`, a program per ``rows`` consecutive rows."""
    import triton

    outs = [term_out.contiguous() for term_out in outs]
    lses = lses.contiguous()
    shape, dim = outs[0].shape, outs[0].shape[-1]
    rows = shape[:-1].numel()
    merged = torch.empty(shape, dtype=outs[0].dtype, device=outs[0].device)
    total = torch.empty(shape[:-1], dtype=lses.dtype, device=lses.device)
    block_dim = triton.next_power_of_2(dim)
    block_rows = max(1, min(64, _TILE_ELEMENTS // block_dim))
    with torch.cuda.device(merged.device):  # Triton launches on the current device
        _merge_kernel()[(triton.cdiv(rows, block_rows),)](
            tuple(outs), lses, merged, total, rows, dim,
            TERMS=len(outs), BLOCK_ROWS=block_rows, BLOCK_DIM=block_dim)
    return merged, total


@functools.cache
def _merge_kernel():
    """The Triton kernel of :func:`_merged_on_cuda`, defined on first use (Triton is there
    wherever CUDA tensors are merged, not on CPU-only installs). Each program takes
    ``BLOCK_ROWS`` rows: their log-sum-exps over the ``TERMS`` terms (``lses [TERMS, rows]``),
    ``L`` (``-inf`` where every term's is), each term's weight ``exp(lse - L)`` (0 where
    ``L = -inf``), and the weighted sum of the terms' rows (``outs``: a tuple of ``[rows,
    dim]`` tensors), loading a term's row only where its weight is positive."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(outs, lses, merged, total, rows, dim,
               TERMS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_DIM: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.arange(0, BLOCK_DIM)
        in_rows = row < rows
        peak = tl.load(lses + row, mask=in_rows, other=float("-inf"))
        for term in tl.static_range(1, TERMS):
            peak = tl.maximum(peak, tl.load(lses + term * rows + row, mask=in_rows, other=float("-inf")))
        shift = tl.where(peak == float("-inf"), 0.0, peak)
        norm = tl.zeros_like(peak)
        for term in tl.static_range(TERMS):
            norm += tl.exp(tl.load(lses + term * rows + row, mask=in_rows, other=float("-inf")) - shift)
        log_total = shift + tl.log(norm)
        base = tl.where(norm == 0, 0.0, log_total)
        acc = tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=peak.dtype)
        offsets = row[:, None] * dim + col[None, :]
        in_cols = (col < dim)[None, :]
        for term in tl.static_range(TERMS):
            weight = tl.exp(tl.load(lses + term * rows + row, mask=in_rows, other=float("-inf")) - base)
            held = tl.load(outs[term] + offsets, mask=(weight > 0)[:, None] & in_cols, other=0.0)
            acc += weight[:, None] * held.to(acc.dtype)
        tl.store(merged + offsets, acc.to(merged.dtype.element_ty), mask=in_rows[:, None] & in_cols)
        tl.store(total + row, log_total, mask=in_rows)

    return kernel
