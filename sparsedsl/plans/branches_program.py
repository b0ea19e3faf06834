"""The terms program: the forward of lattice terms (:mod:`~sparsedsl.plans.terms_attention`)
resolved once per input layout into ``as_strided`` geometry (as
:mod:`~sparsedsl.plans.lattice_program` resolves the lattice plan's), so a call makes one
view per tensor per chunk run, one kernel call and two copies per run, instead of
re-deriving every term's folded views on the host at each call: a configuration of high
dilation rates is dozens of small runs whose host time would otherwise exceed their
kernels'."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from ..passes.lattice import HeadGroupLattice, zeroed_heads
from .cuda_streams import concurrently
from .kernels import zero_heads
from .lattice_program import Geometry, strided_view, view_geometry
from .lattice_views import chunk_folds, folded_view

#: One lattice plan per term, every part ``chunks`` (as :mod:`~sparsedsl.plans.terms_attention` takes them).
Terms = tuple[tuple[HeadGroupLattice, ...], ...]

#: A run: its term, and the geometry of its folded ``q``, ``k``, ``v`` in the inputs and of
#: its rows in the term's output ``[B, H, N, Dv]`` and log-sum-exp ``[B, H, N]``.
Run = tuple[int, Geometry, Geometry, Geometry, Geometry, Geometry]


@dataclass(frozen=True)
class BranchesProgram:
    """Every chunk run of every term of a multiset for inputs laid out as the ones it was
    built for, most pairs first, and the heads each term zeroes (:func:`zeroed_heads`)."""

    out_shape: tuple[int, ...]
    zeroed: tuple[tuple[range, ...], ...]
    runs: tuple[Run, ...]
    #: Per term, whether one run writes its every output element (its output may then be
    #: the term's, see :func:`_run`).
    whole: tuple[bool, ...]

    @staticmethod
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, terms: Terms) -> BranchesProgram | None:
        """The program of ``terms`` for inputs laid out as ``q``, ``k``, ``v`` (one
        key/value head per query head), or None where some run is not a view of the
        inputs and of the outputs."""
        if q.shape[1] != k.shape[1]:
            return None
        meta = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (q, k, v))
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device="meta")
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device="meta")
        runs = []
        for index, term in enumerate(terms):
            for rng, _, part, start, count, chunk, folded in chunk_folds(*meta, term):
                heads = slice(rng.start, rng.stop)
                out_rows = folded_view(part, out[:, heads], start, count, chunk)
                lse_rows = folded_view(part, lse[:, heads, :, None], start, count, chunk)
                if out_rows is None or lse_rows is None or any(f._base is not m for f, m in zip(folded, meta)):
                    return None
                runs.append((index, *(view_geometry(view, base) for view, base in zip(folded, meta)),
                             view_geometry(out_rows, out), view_geometry(lse_rows[..., 0], lse)))
        runs = joined(runs)
        runs.sort(key=lambda run: -run[1][0][0] * run[1][0][1] * run[1][0][2] ** 2)  # q's [count, B*H, chunk, D]
        zeroed = tuple(tuple(zeroed_heads(term, q.shape[2])) for term in terms)
        whole = tuple(_whole_term(runs, index, out.numel()) for index in range(len(terms)))
        return BranchesProgram(tuple(out.shape), zeroed, tuple(runs), whole)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend,
                 lse_dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each term's output and the log-sum-exps ``[T, B, H, N]`` (``-inf`` where a term
        has no key: rows the merge never reads, left unwritten on CUDA where there are
        several terms, else zero), by ``attend(q, k,
        v, scale) -> (out, lse)``; the runs overlap on CUDA side streams
        (:func:`~sparsedsl.plans.cuda_streams.concurrently`)."""
        outs = [None if whole else q.new_empty(self.out_shape) for whole in self.whole]
        if not q.is_cuda or len(outs) == 1:  # the CPU's merge reads every row; one term is the output
            for out, heads in zip(outs, self.zeroed):
                if out is not None:
                    zero_heads(out, heads)
        lses = torch.full((len(outs), *q.shape[:3]), float("-inf"), dtype=lse_dtype, device=q.device)
        caller = torch.cuda.current_stream(q.device) if q.is_cuda else None
        concurrently(q.device, [partial(_run, run, q, k, v, outs, lses, scale, attend, self.out_shape, caller)
                                for run in self.runs])
        return outs, lses


def _run(run: Run, q, k, v, outs: list, lses: torch.Tensor, scale: float, attend, out_shape: tuple[int, ...],
         caller) -> None:
    """One run of a :class:`BranchesProgram`, written into its term's output and
    log-sum-exp. A run that writes its term's every element (``outs[index]`` None) whose
    kernel output is laid out as the term's output (cuDNN allocates it in the stride order
    of the queries: the folded chunks of a rate-1 term are the sequence in order) becomes
    that output, uncopied; otherwise it is copied into a new one. Either is made safe for
    the ``caller`` stream (CUDA) to read after the join."""
    index, q_run, k_run, v_run, out_rows, lse_rows = run
    out, lse = attend(strided_view(q, q_run), strided_view(k, k_run), strided_view(v, v_run), scale)
    if outs[index] is None:
        _, stride, offset = out_rows
        if out.stride() == stride and offset == 0:
            outs[index] = out.as_strided(out_shape, contiguous_strides(out_shape), out.storage_offset())
        else:
            outs[index] = out.new_empty(out_shape)
            strided_view(outs[index], out_rows).copy_(out)
        if caller is not None:
            outs[index].record_stream(caller)
    else:
        strided_view(outs[index], out_rows).copy_(out)
    strided_view(lses[index], lse_rows).copy_(lse)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _whole_term(runs: list[Run], index: int, numel: int) -> bool:
    """Whether term ``index`` has one run and it writes all ``numel`` elements of the
    term's output."""
    own = [run for run in runs if run[0] == index]
    return len(own) == 1 and math.prod(own[0][4][0]) == numel


def joined(runs: list[Run]) -> list[Run]:
    """``runs`` (in :func:`~sparsedsl.plans.lattice_views.chunk_folds` order) with the runs
    of one term that are each one (batch, head) pair wide (dimension 1 of size 1: LongNet's
    rate classes of one head each) and differ only by a constant offset per tensor from one
    to the next of their shape joined into one run whose dimension 1 steps by that offset:
    one kernel call of several head groups instead of one each."""
    result: list[Run] = []
    extendable: dict = {}  # (term, geometries without dimension 1) -> index in result
    for run in runs:
        key = (run[0], tuple((size[:1] + size[2:], stride[:1] + stride[2:]) for size, stride, _ in run[1:]))
        at = extendable.get(key)
        if at is not None and _joins(result[at], run):
            result[at] = (run[0], *(_widened(a, b) for a, b in zip(result[at][1:], run[1:])))
        else:
            extendable[key] = len(result)
            result.append(run)
    return result


def _joins(last: Run, run: Run) -> bool:
    """Whether ``run`` (of the same term and shape but dimension 1) extends ``last`` (a run
    or a joined sequence) as :func:`joined` joins them."""
    for (size, stride, offset), (run_size, _, run_offset) in zip(last[1:], run[1:]):
        step = stride[1] if size[1] > 1 else run_offset - offset
        if run_size[1] != 1 or step <= 0 or run_offset != offset + size[1] * step:
            return False
    return True


def _widened(geometry: Geometry, run: Geometry) -> Geometry:
    """``geometry`` with dimension 1 one wider, to hold ``run`` (:func:`_joins`)."""
    size, stride, offset = geometry
    step = stride[1] if size[1] > 1 else run[2] - offset
    return (size[0], size[1] + 1, *size[2:]), (stride[0], step, *stride[2:]), offset
