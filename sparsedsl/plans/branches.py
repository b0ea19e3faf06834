"""The *branches* plan: multiset patterns (``a + b``, ``longnet(...)``) as dense attention on
the folded lattices of each term, merged by their log-sum-exps.

A multiset's attention is one softmax over the keys of each row counted with multiplicity
``m`` (``log m`` added to the score). Written as its terms, set patterns whose
multiplicities add up to ``m`` (:func:`~sparsedsl.lang.multiset.multiset_terms`: the
parts of a sum, LongNet's branches), that softmax's normaliser is the sum of the terms':
``sum_k m exp(s_k) = sum_t sum_{k in t} exp(s_k)``. So each term runs alone, here as dense
attention on strided views of its lattices (every head group of every term must be
``dilated(...)`` or ``chunks(...)``; :func:`~sparsedsl.passes.lattice.chunks_reasons`),
one fused kernel call with its log-sum-exp per chunk run, giving ``(O_t, lse_t)`` per row
(``lse_t = -inf`` where the term leaves the row without keys). The terms are then merged
in one pass:

    L = logsumexp_t(lse_t),    O = sum_t exp(lse_t - L) O_t

which is exactly the multiset's softmax. A row no term covers outputs 0 with ``L = -inf``.
Log-sum-exps and the merge are computed in float32 (float64 for float64 inputs).

Gradients are exact and need no second softmax: each chunk run's fused attention backward,
given the *merged* statistics (``dO``, ``O`` and ``L`` on the run's rows), computes ``P =
exp(s - L)`` on the run's pairs and ``D = rowsum(dO * O)``, which is exactly that run's
share of the multiset softmax's gradient; the shares add up over runs and terms (keys of
overlapping runs receive each run's share). The log-sum-exp carries no gradient. Kernels:
PyTorch's fused CPU attention; on CUDA in half precision cuDNN's attention forward (compute
capability 9.0 and later) or the flash kernel's, and the flash kernel's backward, in
float32 the memory-efficient kernel (each with its log-sum-exp and a backward that takes
it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..lang import nodes as n
from ..lang.multiset import NOTHING, is_multiset, multiset_terms
from ..lang.queries import score_mods
from ..passes.lattice import HeadGroupLattice, chunks_reasons, lattice_decomposition
from .base import Call, Plan, Runner
from .branches_program import BranchesProgram
from .layout_programs import LayoutPrograms
from .cuda_streams import concurrently
from .lattice import LatticePlan
from .lattice_autograd import zeroed_output
from .kernels import per_query_head
from .lattice_views import chunk_folds, fold, folded_view, write_folded

#: One lattice plan per term, every part ``chunks``.
Terms = tuple[tuple[HeadGroupLattice, ...], ...]

#: Throughput per computed pair relative to the device's tile kernel. CPU: 96k-136k pairs per
#: CPU-ms on ``longnet([512, 1024, 2048], [1, 2, 4])`` in two runs, 0.7 of the lattice plan's
#: rate on ``segments`` of the same lengths in the same run, so 0.7 of its 6; the gather plan
#: ran 12k-13k on this multiset and 21k on set patterns (``benchmarks/plan_efficiency.py``,
#: 2026-12-05, forward, fp32, 4,096 tokens, 8 heads, head dim 64, 2 shared cores, torch
#: 2.13, CPU time). CUDA: not measured.
EFFICIENCY = {"cpu": 4.5}

_LATTICE = LatticePlan()


def _flash(q: torch.Tensor) -> bool:
    """Whether CUDA's flash kernel runs ``q``: half precision, head dim a multiple of 8 up
    to 256."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


def _cudnn(q: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs ``q``'s forward: half precision on a GPU of compute
    capability 9.0 or later (where it is dense SDPA's kernel too), head dim a multiple of
    8 up to 128. On an H100 it ran this plan's folded views at 1.0x dense SDPA's rate per
    pair where the flash kernel ran them at 0.48-0.53x (2026-12-05, bf16, head dim 128)."""
    return (_flash(q) and q.shape[-1] <= 128 and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device) >= (9, 0))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of ``[n, h, m, d]`` inputs by the device's fused kernel: ``(out,
    lse [n, h, m])``, the log-sum-exp in float32 (float64 for float64 inputs). The
    statistics are those :func:`attend_backward` takes, whichever kernel ran."""
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
    """``(dq, dk, dv)`` of :func:`attend` from the statistics ``out`` and ``lse`` given."""
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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _runs(q, k, v, terms: Terms, *per_term) -> list[tuple]:
    """Every chunk run of every term as ``(*per_term[t], chunk_folds(...) entry)``, the most
    pairs first (the first runs on the caller's stream, the others beside it:
    :func:`~sparsedsl.plans.cuda_streams.concurrently`)."""
    runs = [(*extra, fold_args) for term, *extra in zip(terms, *per_term) for fold_args in chunk_folds(q, k, v, term)]
    runs.sort(key=lambda run: -run[-1][-1][0].shape[0] * run[-1][-1][0].shape[2] ** 2)
    return runs


def _forward_run(out: torch.Tensor, lse: torch.Tensor, fold_args: tuple, scale: float) -> None:
    """One chunk run's attention, written into its term's ``out`` and ``lse``."""
    rng, _, part, start, count, chunk, folded = fold_args
    run_out, run_lse = attend(*folded, scale)
    write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, run_out)
    write_folded(lse[:, rng.start:rng.stop], part, start, count, chunk, run_lse)


def branches_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the multiset whose terms' lattices are ``terms`` (see the module
    docstring); ``lse`` in float32 (float64 for float64 inputs). On CUDA the chunk runs of
    all terms overlap on side streams: a term of long chunks on few heads (LongNet's widest
    segments, one head per rate class) is too few thread blocks to fill the GPU alone."""
    group = q.shape[1] // k.shape[1]
    k, v = per_query_head(k, group), per_query_head(v, group)
    lses = torch.full((len(terms), *q.shape[:3]), float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)
    outs = [zeroed_output(q, v, term) for term in terms]
    runs = _runs(q, k, v, terms, outs, lses)
    concurrently(q.device, [partial(_forward_run, out, lse, fold_args, scale) for out, lse, fold_args in runs])
    return merge(outs, lses)


class Branches:
    """The attention of one multiset's ``terms``: :func:`branches_forward`, run by a
    :class:`~sparsedsl.plans.branches_program.BranchesProgram` per input layout where one
    holds it (:class:`~sparsedsl.plans.layout_programs.LayoutPrograms`)."""

    def __init__(self, terms: Terms, scale: float):
        self.terms, self.scale = terms, scale
        self._programs = LayoutPrograms(lambda q, k, v: BranchesProgram.build(q, k, v, terms))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        program = self._programs.get(q, k, v)
        if program is None:
            return branches_forward(q, k, v, self.terms, self.scale)
        return merge(*program(q, k, v, self.scale, attend, _compute_dtype(q.dtype)))


def merge(outs: list[torch.Tensor], lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from the softmaxes of terms: ``outs[t] [B, H, N, D]`` weighted by
    ``exp(lses[t] - L)`` with ``L = logsumexp_t(lses[t])``; ``(out, L)``. Rows with ``L =
    -inf`` (no term has a key there) output 0. On CUDA the merge runs compiled
    (:func:`compiled_merge`: one pass over the terms' outputs)."""
    if outs[0].is_cuda and not torch.compiler.is_compiling():
        return compiled_merge()(outs, lses)
    return _merge(outs, lses)


def _merge(outs: list[torch.Tensor], lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge`. On CUDA a term's rows with ``lse = -inf`` are never read (they may
    hold anything: the program leaves them unwritten; compiled, the select costs no pass);
    elsewhere they must be finite (zeroed)."""
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - total.masked_fill(total == float("-inf"), 0.0))[..., None]
    if outs[0].is_cuda:
        covered = (lses > float("-inf"))[..., None]
        outs = [term_out.where(rows, 0.0) for term_out, rows in zip(outs, covered)]
    out = weights[0] * outs[0]
    for weight, term_out in zip(weights[1:], outs[1:]):
        out.addcmul_(weight, term_out)
    return out.to(outs[0].dtype), total


_compiled_merge = None
_compiled_merge_lock = threading.Lock()


def compiled_merge() -> Callable:
    """:func:`merge`'s eager form compiled by Inductor (``dynamic=True``: one kernel for
    every length, recompiled per number of terms), created once per process. Eagerly the
    merge is one pass per term over a float32 accumulator (about 4x the memory traffic of
    the terms' outputs); compiled, it reads each output once and writes the merged one."""
    global _compiled_merge
    with _compiled_merge_lock:
        if _compiled_merge is None:
            _compiled_merge = torch.compile(_merge, dynamic=True, fullgraph=True)
        return _compiled_merge


def branches_backward(grad_out, q, k, v, out, lse, terms: Terms, scale: float) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of :func:`branches_forward` that gave ``out`` and ``lse``: each chunk
    run's fused backward with the merged statistics, added up (in float32 for half
    precision)."""
    group = q.shape[1] // k.shape[1]
    k, v = per_query_head(k, group), per_query_head(v, group)
    compute = _compute_dtype(q.dtype)
    grads = tuple(torch.zeros(t.shape, dtype=compute, device=t.device) for t in (q, k, v))
    lse = lse[..., None]  # [B, H, N, 1], as the lattice folds take rows

    def backward_run(fold_args) -> None:
        rng, _, part, start, count, chunk, folded = fold_args
        heads = slice(rng.start, rng.stop)
        run_grad, run_out, run_lse = (fold(part, t[:, heads], start, count, chunk) for t in (grad_out, out, lse))
        run_grads = attend_backward(run_grad, *folded, run_out, run_lse[..., 0], scale)
        for total, run_total in zip(grads, run_grads):
            add_folded(total[:, heads], part, start, count, chunk, run_total)

    for term in terms:  # a term's runs add into disjoint positions, so they may overlap
        concurrently(q.device, [partial(backward_run, fold_args) for (fold_args,) in _runs(q, k, v, (term,))])
    dq, dk, dv = grads
    if group > 1:  # the query heads' shares of each key/value head
        dk, dv = (t.unflatten(1, (-1, group)).sum(2) for t in (dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


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


class BranchesAttention(torch.autograd.Function):
    """:meth:`Branches.forward` with exact gradients (:func:`branches_backward`); the
    log-sum-exp output carries none. Its backward is not itself differentiable: the planner
    wraps the plan for second-order gradients (:mod:`sparsedsl.plans.double_backward`)."""

    @staticmethod
    def forward(ctx, q, k, v, branches: Branches):
        out, lse = branches.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.branches = branches
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        branches = ctx.branches
        return (*branches_backward(grad_out, q, k, v, out, lse, branches.terms, branches.scale), None)


def _term_lattices(term: n.Pattern, call: Call) -> tuple[HeadGroupLattice, ...]:
    """The lattices of one term, parts that allow nothing dropped (a term that allows
    nothing has none)."""
    plan = lattice_decomposition(term, call.q_len, call.kv_len, call.heads, call.work_device) or ()
    return tuple(HeadGroupLattice(head_plan.heads, tuple(p for p in head_plan.parts if p.pattern != NOTHING))
                 for head_plan in plan)


class BranchesPlan(Plan):
    """Multisets of dense lattice terms, merged by log-sum-exp (see the module docstring)."""

    name = "branches"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        if not is_multiset(pattern):
            return ["not a multiset pattern (a + b, longnet(...)): a set pattern runs one softmax of its own"]
        reasons = []
        if not call.self_attention:
            reasons.append("needs self-attention (q_len == kv_len, q_offset 0)")
        if [mod for mod in score_mods(pattern) if not isinstance(mod, n.LogMultiplicity)]:
            reasons.append("score modifications read absolute positions")
        if pattern.buffer_names():
            reasons.append("bound tensors are indexed by absolute position")
        if call.device.type == "cuda" and call.dtype == torch.float64:
            reasons.append("float64 on CUDA: the fused kernel with a log-sum-exp takes 16- and 32-bit floats")
        if call.device.type == "cuda" and call.head_dim % 8:
            reasons.append(f"head_dim={call.head_dim} on CUDA: the fused kernel's views need a multiple of 8")
        if not reasons:
            for i, term in enumerate(multiset_terms(pattern)):
                reasons += [f"term {i + 1} ({term}): {reason}" for reason in chunks_reasons(term, call.heads)]
        return reasons

    def prepare(self, pattern: n.Pattern, call: Call) -> Terms:
        return tuple(_term_lattices(term, call) for term in multiset_terms(pattern))

    def efficiency(self, call: Call) -> float | None:
        return EFFICIENCY.get(call.device.type)

    def computed_pairs(self, prepared: Terms, call: Call, planner) -> int:
        """Whole chunks of every term: a pair counts once per term that holds it."""
        return sum(_LATTICE.computed_pairs(term, call, planner) for term in prepared)

    def build(self, prepared: Terms, call: Call, planner) -> Runner:
        branches, return_lse = Branches(prepared, call.scale), call.return_lse

        def run(q, k, v, _q_offset):
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                out, lse = BranchesAttention.apply(q, k, v, branches)
            else:
                out, lse = branches.forward(q, k, v)
            return out, (lse if return_lse else None)

        return run

    def describe(self, prepared: Terms, call: Call) -> str:
        compiled = ("; the merge is compiled by the first call (seconds, once per process and number of terms)"
                    if call.device.type == "cuda" else "")
        return (f"multiset of {len(prepared)} terms: each as dense attention on its folded lattices, "
                f"merged by log-sum-exp into one softmax{compiled}")
