"""Attention of lattice *terms* merged by their log-sum-exps, with exact gradients: the
branches plan's multisets (``a + b``, ``longnet(...)``: a term per part of the sum or
branch; ``longnet`` of one segment length is one term).

A multiset's attention is one softmax over the keys of each row counted with multiplicity
``m`` (``log m`` added to the score). Written as terms, set patterns whose multiplicities
add up to ``m``, that softmax's normaliser is the sum of the terms': ``sum_k m exp(s_k) =
sum_t sum_{k in t} exp(s_k)``. So each term runs alone, as dense attention on strided views
of its lattices (:func:`~sparsedsl.plans.lattice_views.chunk_folds`), one fused kernel call
with its log-sum-exp per chunk run (:func:`~sparsedsl.plans.fused_attention.attend`),
giving ``(O_t, lse_t)`` per row (``lse_t = -inf`` where the term leaves the row without
keys). The terms are then merged in one pass (:func:`~sparsedsl.plans.terms_merge.merge`):

    L = logsumexp_t(lse_t),    O = sum_t exp(lse_t - L) O_t

which is exactly the multiset's softmax. A row no term covers outputs 0 with ``L = -inf``.
Log-sum-exps and the merge are computed in float32 (float64 for float64 inputs). One term
needs no merge: its output and log-sum-exp are the attention's.

Gradients need no second softmax: each chunk run's fused backward, given the *merged*
statistics (``dO``, ``O`` and ``L`` on the run's rows), computes exactly that run's share of
the multiset softmax's gradient (:func:`~sparsedsl.plans.fused_attention.attend_backward`);
the shares add up over runs and terms. The first term's runs write their positions (they
are disjoint), the later terms' runs add theirs, in the inputs' dtype (as autograd sums the
gradients of a tensor several operations read). The log-sum-exp carries no gradient.

On CUDA the chunk runs overlap on side streams
(:func:`~sparsedsl.plans.cuda_streams.concurrently`): a term of long chunks on few heads
(LongNet's widest segments, one head per rate class) is too few thread blocks to fill the
GPU alone. In the backward every run's kernel may overlap any other's; only the writes of
one term wait for those of the term before (:func:`~sparsedsl.plans.cuda_streams.in_turns`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.autograd.function import once_differentiable

from ..passes.lattice import zeroed_heads
from .branches_program import BranchesProgram, Terms
from .cuda_streams import concurrently, in_turns
from .fused_attention import attend, attend_backward, compute_dtype, same_head_dim
from .kernels import per_query_head, zero_heads
from .lattice_views import chunk_folds, fold, folded_view, write_folded, zeroed_output
from .layout_programs import LayoutPrograms
from .terms_merge import merge

def _runs(q, k, v, terms: Terms, *per_term) -> list[tuple]:
    """Every chunk run of every term as ``(*per_term[t], chunk_folds(...) entry)``, the most
    pairs first (the first runs on the caller's stream, the others beside it)."""
    runs = [(*extra, fold_args) for term, *extra in zip(terms, *per_term) for fold_args in chunk_folds(q, k, v, term)]
    runs.sort(key=lambda run: -run[-1][-1][0].shape[0] * run[-1][-1][0].shape[2] ** 2)
    return runs


def _forward_run(out: torch.Tensor, lse: torch.Tensor, fold_args: tuple, scale: float) -> None:
    """One chunk run's attention, written into its term's ``out`` and ``lse``."""
    rng, _, part, start, count, chunk, folded = fold_args
    run_out, run_lse = attend(*folded, scale)
    write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, run_out)
    write_folded(lse[:, rng.start:rng.stop], part, start, count, chunk, run_lse)


def terms_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the terms' lattices ``terms`` merged (see the module docstring);
    ``lse`` in float32 (float64 for float64 inputs)."""
    group = q.shape[1] // k.shape[1]
    k, v = per_query_head(k, group), per_query_head(v, group)
    lses = torch.full((len(terms), *q.shape[:3]), float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    outs = [zeroed_output(q, v, term) for term in terms]
    runs = _runs(q, k, v, terms, outs, lses)
    concurrently(q.device, [partial(_forward_run, out, lse, fold_args, scale) for out, lse, fold_args in runs])
    return merge(outs, lses)


class TermsAttention:
    """The attention of ``terms``: :func:`terms_forward`, run by a
    :class:`~sparsedsl.plans.branches_program.BranchesProgram` per input layout where one
    holds it (:class:`~sparsedsl.plans.layout_programs.LayoutPrograms`)."""

    def __init__(self, terms: Terms, scale: float):
        self.terms, self.scale = terms, scale
        self._programs = LayoutPrograms(lambda q, k, v: BranchesProgram.build(q, k, v, terms))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``, without gradients."""
        program = self._programs.get(q, k, v)
        if program is None:
            return terms_forward(q, k, v, self.terms, self.scale)
        return merge(*program(q, k, v, self.scale, attend, compute_dtype(q.dtype)))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)``, with gradients (:func:`terms_backward`) when an input requires
        them; the log-sum-exp carries none. Values of another head dim than the queries'
        are padded to one (:func:`~sparsedsl.plans.fused_attention.same_head_dim`)."""
        value_dim = v.shape[-1]
        q, k, v = same_head_dim(q, k, v)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = _TermsFunction.apply(q, k, v, self)
        else:
            out, lse = self.forward(q, k, v)
        return (out, lse) if out.shape[-1] == value_dim else (out[..., :value_dim], lse)


def terms_backward(grad_out, q, k, v, out, lse, terms: Terms, scale: float) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of the attention of ``terms`` that gave ``out`` and ``lse`` (see the
    module docstring), in the inputs' dtypes."""
    group = q.shape[1] // k.shape[1]
    k, v = per_query_head(k, group), per_query_head(v, group)
    # Every position the first term's runs do not write starts at zero.
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    unwritten = zeroed_heads(terms[0], q.shape[2])
    for grad in grads:
        zero_heads(grad, unwritten)
    lse = lse[..., None]  # [B, H, N, 1], as the lattice folds take rows

    def backward_run(first_term: bool, fold_args, before_writing: Callable[[], None]) -> None:
        rng, _, part, start, count, chunk, folded = fold_args
        heads = slice(rng.start, rng.stop)
        run_grad, run_out, run_lse = (fold(part, t[:, heads], start, count, chunk) for t in (grad_out, out, lse))
        run_grads = attend_backward(run_grad, *folded, run_out, run_lse[..., 0], scale)
        before_writing()
        for total, run_total in zip(grads, run_grads):
            (write_folded if first_term else add_folded)(total[:, heads], part, start, count, chunk, run_total)

    in_turns(q.device, [[partial(backward_run, index == 0, fold_args) for (fold_args,) in _runs(q, k, v, (term,))]
                        for index, term in enumerate(terms)])
    dq, dk, dv = grads
    if group > 1:  # the query heads' shares of each key/value head
        dk, dv = (t.unflatten(1, (-1, group)).sum(2) for t in (dk, dv))
    return dq, dk, dv


def add_folded(target: torch.Tensor, part, start: int, count: int, chunk: int, folded: torch.Tensor) -> None:
    """Add ``folded`` (``[count, B * H, chunk, D]``, lattice positions ``start ..`` of
    ``part`` as the lattice folds lay them out) into those positions of ``target [B, H, N,
    D]``, in place."""
    dest = folded_view(part, target, start, count, chunk)
    if dest is not None:
        dest.add_(folded)
        return
    batch, heads = target.shape[:2]
    values = folded.unflatten(1, (batch, heads)).movedim(0, 2).flatten(2, 3).to(target.dtype)
    stop = start + count * chunk
    positions = (torch.arange(start, stop, device=target.device) if part.positions is None
                 else part.positions[start:stop])
    target.index_add_(2, positions, values)


class _TermsFunction(torch.autograd.Function):
    """:meth:`TermsAttention.forward` with exact gradients (:func:`terms_backward`); the
    log-sum-exp output carries none. Its backward is not itself differentiable: the planner
    wraps the plan for second-order gradients (:mod:`sparsedsl.plans.double_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, attention: TermsAttention):
        out, lse = attention.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attention = attention
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        attention = ctx.attention
        return (*terms_backward(grad_out, q, k, v, out, lse, attention.terms, attention.scale), None)
