"""The lattice program: a lattice plan without gradients or log-sum-exp, resolved once per
input layout into ``as_strided`` geometry, so a call makes one view per tensor per run, one
SDPA call and one copy per run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from ..lang import nodes as n
from ..passes.lattice import HeadGroupLattice, zeroed_heads
from .cuda_streams import concurrently, side_streams
from .kernels import zero_heads
from .lattice_views import chunk_folds, folded_view

Geometry = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, offset from the tensor's own


def view_geometry(view: torch.Tensor, base: torch.Tensor) -> Geometry:
    """``view`` of ``base`` as ``as_strided`` arguments, its offset relative to ``base``'s."""
    return tuple(view.shape), view.stride(), view.storage_offset() - base.storage_offset()


def strided_view(t: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The view of ``t`` that ``geometry`` (from :func:`view_geometry`) describes."""
    size, stride, offset = geometry
    return t.as_strided(size, stride, t.storage_offset() + offset)


@dataclass(frozen=True)
class LatticeProgram:
    """A lattice plan without gradients or log-sum-exp, resolved for inputs of one layout
    (shapes and strides): each chunk run's folded ``q``, ``k``, ``v`` and output positions
    as ``as_strided`` geometry, and the heads zeroed (:func:`zeroed_heads`). A call then
    makes one view per tensor per run, one SDPA call and one copy per run, and one fill per
    run of zeroed heads: the same operations as :func:`lattice_attention`, without
    re-deriving every view on the host at each call.

    On CUDA the runs but the first go to side streams (:func:`concurrently`), forked from
    the caller's stream and joined back before the call returns, so their kernels overlap:
    a run of long chunks on few heads (LongNet's widest segments) is too few thread blocks
    to fill the GPU alone. Runs are ordered longest chunks first; the first runs on the
    caller's stream, after the zero fills, which thus overlap the side streams' attention
    (memory-bound fills beside compute-bound attention); a side run waits for the fills
    only before its copy into the output."""

    out_shape: tuple[int, ...]
    zeroed_heads: tuple[range, ...]  # the runs of zeroed heads
    runs: tuple[tuple[Geometry, Geometry, Geometry, Geometry], ...]  # q, k, v, out

    @staticmethod
    def build(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              plan: tuple[HeadGroupLattice, ...]) -> LatticeProgram | None:
        """The program of ``plan`` for inputs laid out as ``q``, ``k``, ``v``, or None when
        some part is not ``chunks`` or some run is not a view (then
        :func:`lattice_attention` runs it)."""
        if any(part.length != 0 and not isinstance(part.pattern, n.Chunks) for head_plan in plan
               for part in head_plan.parts):
            return None
        meta = tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (q, k, v))
        out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device="meta")
        zeroed = tuple(zeroed_heads(plan, q.shape[2]))
        runs = []
        for rng, kv, part, start, count, chunk, folded in chunk_folds(*meta, plan):
            dest = folded_view(part, out[:, rng.start:rng.stop], start, count, chunk)
            # Views of the inputs themselves (not of gathered copies) and of the output.
            if dest is None or not isinstance(kv, slice) or any(f._base is not m for f, m in zip(folded, meta)):
                return None
            runs.append(tuple(view_geometry(view, base) for view, base in zip((*folded, dest), (*meta, out))))
        runs.sort(key=lambda run: -run[0][0][2])  # longest chunks (q's size [count, B*H, chunk, D]) first
        return LatticeProgram(tuple(out.shape), zeroed, tuple(runs))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        out = q.new_empty(self.out_shape)
        gqa = q.shape[1] != k.shape[1]
        # On CUDA a side run's copy into the output waits for the zero fills (``filled``).
        concurrent = q.is_cuda and len(self.runs) > 1 and self.zeroed_heads
        filled = side_streams(q.device, len(self.runs) - 1).filled if concurrent else None

        def first() -> None:  # the fills, then the longest run, on the caller's stream
            zero_heads(out, self.zeroed_heads)
            if filled is not None:
                filled.record()
            for run in self.runs[:1]:
                _attend_run(run, q, k, v, out, scale, gqa)

        side_runs = [partial(_attend_run, run, q, k, v, out, scale, gqa, filled) for run in self.runs[1:]]
        concurrently(q.device, [first, *side_runs])
        return out


def _attend_run(run: tuple[Geometry, Geometry, Geometry, Geometry], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, out: torch.Tensor, scale: float, gqa: bool,
                written_after: torch.cuda.Event | None = None) -> None:
    """One run of a :class:`LatticeProgram`: SDPA on its folded views, written into ``out``
    (on the current stream, after ``written_after`` when given)."""
    q_run, k_run, v_run, out_run = run
    result = F.scaled_dot_product_attention(strided_view(q, q_run), strided_view(k, k_run), strided_view(v, v_run),
                                            scale=scale, enable_gqa=gqa)
    if written_after is not None:
        torch.cuda.current_stream().wait_event(written_after)
    strided_view(out, out_run).copy_(result)
