"""The branches program: the branches plan's forward resolved once per input layout into
``as_strided`` geometry (as :mod:`~sparsedsl.plans.lattice_program` resolves the lattice
plan's), so a call makes one view per tensor per chunk run, one kernel call and two copies
per run, instead of re-deriving every term's folded views on the host at each call: a
configuration of high dilation rates is dozens of small runs whose host time would
otherwise exceed their kernels'."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..passes.lattice import HeadGroupLattice, zeroed_heads
from .cuda_streams import concurrently
from .kernels import zero_heads
from .lattice_program import Geometry, strided_view, view_geometry
from .lattice_views import chunk_folds, folded_view

#: One lattice plan per term, every part ``chunks`` (as :mod:`~sparsedsl.plans.branches` takes them).
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
        runs.sort(key=lambda run: -run[1][0][0] * run[1][0][2] ** 2)  # q's [count, B*H, chunk, D]: most pairs
        zeroed = tuple(tuple(zeroed_heads(term, q.shape[2])) for term in terms)
        return BranchesProgram(tuple(out.shape), zeroed, tuple(runs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attend,
                 lse_dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each term's output and the log-sum-exps ``[T, B, H, N]`` (``-inf`` where a term
        has no key: rows the merge never reads, left unwritten on CUDA), by ``attend(q, k,
        v, scale) -> (out, lse)``; the runs overlap on CUDA side streams
        (:func:`~sparsedsl.plans.cuda_streams.concurrently`)."""
        outs = [q.new_empty(self.out_shape) for _ in self.zeroed]
        if not q.is_cuda:  # the CPU's merge reads every row (see branches._merge)
            for out, heads in zip(outs, self.zeroed):
                zero_heads(out, heads)
        lses = torch.full((len(outs), *q.shape[:3]), float("-inf"), dtype=lse_dtype, device=q.device)
        concurrently(q.device, [partial(_run, run, q, k, v, outs, lses, scale, attend) for run in self.runs])
        return outs, lses


def _run(run: Run, q, k, v, outs: list[torch.Tensor], lses: torch.Tensor, scale: float, attend) -> None:
    """One run of a :class:`BranchesProgram`, written into its term's output and
    log-sum-exp."""
    index, q_run, k_run, v_run, out_rows, lse_rows = run
    out, lse = attend(strided_view(q, q_run), strided_view(k, k_run), strided_view(v, v_run), scale)
    strided_view(outs[index], out_rows).copy_(out)
    strided_view(lses[index], lse_rows).copy_(lse)
