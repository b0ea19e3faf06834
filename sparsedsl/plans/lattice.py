"""The *lattice* plan: token-level dilation as dense attention on strided sub-sequences.

The decomposition into lattices is analysis of the pattern
(:mod:`sparsedsl.passes.lattice`); this module runs it. ``chunks`` parts (LongNet's dilated
segments) are folded into SDPA's batch as views (:mod:`sparsedsl.plans.lattice_views`), by
a resolved program without gradients (:mod:`sparsedsl.plans.lattice_program`) or an
autograd function with gradients (:mod:`sparsedsl.plans.lattice_autograd`); every other part
is a sub-problem that goes back through the planner.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..lang import nodes as n
from ..lang.queries import score_mods
from ..passes.lattice import HeadGroupLattice, lattice_decomposition, lattice_reasons
from .base import Call, Plan, Runner
from .kernels import sdpa_with_lse
from .lattice_autograd import ChunkLattice
from .lattice_program import LatticeProgram
from .layout_programs import LayoutPrograms
from .lattice_views import chunk_folds, fold_chunks, group_inputs, put, take, write_folded, zeroed_output

#: The lattice plan's throughput per computed pair of its folded chunks relative to the
#: device's tile kernel. CUDA: where the tiles already fit the lattice (``.within`` rules
#: whose segments are a tile long), the single fused FlexAttention kernel ran faster than
#: the lattice's several SDPA calls and copies (H100, bf16, torch 2.11): the lattice pays
#: where it computes at most 2/3 of flex's pairs. CPU (``benchmarks/plan_efficiency.py``, 2
#: cores, torch 2.13, fp32, 4,096 tokens, CPU time): lattices of ``chunks`` only (LongNet's
#: ``segments``) computed 129k pairs per CPU-ms against the gather plan's 22k.
EFFICIENCY = {"cuda": 1 / 1.5, "cpu": 6.0}

#: What a sub-problem costs the lattice relative to the cost the planner gives its call
#: alone (gathering its positions and writing its output back). CUDA: the guide's
#: ``blocks(256).local(1).within(segments([128, 128], [1, 2]))`` (tile-long sub-segments)
#: on the lattice computed 0.75 of flex's pairs and took 1.9x (65,536 tokens) to 3.1x
#: (16,384) flex's forward time, 3.5x-5.2x its forward+backward: 2.6 = 1.9 / 0.75, the
#: case most favourable to the lattice, so that it is never chosen where flex measured
#: faster (H100, bf16, 16 heads, head dim 128, torch 2.11, 2026-12-05,
#: ``benchmarks/lattice_vs_flex.py``; the same run measured lattices of ``chunks``, LongNet's
#: ``segments`` at 65,536 tokens, at 2.9x flex's rate per computed pair forward, 2.1x
#: forward+backward, above the 1 / 1.5 of :data:`EFFICIENCY`). CPU: ``blocks(256).local(1).within(segments([128,
#: 128], [1, 2]))`` at 4,096 tokens, 8 heads, head dim 64 ran in 45 ms on the lattice
#: (its four block sub-problems on tile_sdpa, costing 1.12M) against 72 ms for tile_sdpa
#: alone (cost 1.72M): 1.0 (``benchmarks/cpu.py --threads 1 --clock cpu``, 2026-12-05).
SUB_PROBLEM_OVERHEAD = {"cuda": 2.6, "cpu": 1.0}


def chunks_only(plan: tuple[HeadGroupLattice, ...]) -> bool:
    """Whether every part of ``plan`` is ``chunks`` (dense attention on folded chunks)."""
    return all(isinstance(part.pattern, n.Chunks) for head_plan in plan for part in head_plan.parts)


def lattice_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      plan: tuple[HeadGroupLattice, ...], scale: float, return_lse: bool,
                      run_part: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention by the lattice ``plan``: ``(out, lse or None)``. ``run_part(part, q, k, v)
    -> (out, lse or None)`` computes a sub-problem whose pattern is not ``chunks`` (through
    the plan the planner chose for it).

    Without gradients, chunk parts are folded as views and written into the output once.
    With gradients and only chunk parts (LongNet's ``segments``),
    :class:`~sparsedsl.plans.lattice_autograd.ChunkLattice` writes each part's gradients
    straight into the positions it read; otherwise autograd runs through copies."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if grad and not return_lse and chunks_only(plan):
        return ChunkLattice.apply(q, k, v, plan, scale), None
    out = zeroed_output(q, v, plan)
    lse_dtype = torch.promote_types(q.dtype, torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=lse_dtype) if return_lse else None
    if not grad:  # chunk parts written in place, once
        for rng, _, part, start, count, chunk, folded in chunk_folds(q, k, v, plan):
            part_out, part_lse = sdpa_with_lse(*folded, scale, return_lse)
            write_folded(out[:, rng.start:rng.stop], part, start, count, chunk, part_out)
            if return_lse:
                write_folded(lse[:, rng.start:rng.stop], part, start, count, chunk, part_lse)
    for head_plan in plan:
        # Parts left: those whose positions occur at this length, and not written above.
        parts = [part for part in head_plan.parts
                 if part.length != 0 and (grad or not isinstance(part.pattern, n.Chunks))]
        if not parts:
            continue
        rng = head_plan.heads
        qg, kg, vg, _ = group_inputs(q, k, v, rng)
        for part in parts:
            sq, sk, sv = take(part, qg), take(part, kg), take(part, vg)
            if isinstance(part.pattern, n.Chunks):
                part_out, part_lse = fold_chunks(sq, sk, sv, part.pattern.size, scale, return_lse)
            else:
                part_out, part_lse = run_part(part, sq, sk, sv)
            put(part, out[:, rng.start:rng.stop], part_out.to(out.dtype))
            if return_lse:
                put(part, lse[:, rng.start:rng.stop, :, None], part_lse.to(lse_dtype)[..., None])
    if not out.requires_grad and grad:
        # No lattice position occurs at this length: the output is all zeros, kept in the
        # autograd graph so that gradients (zeros) reach the inputs.
        out = out + 0.0 * (q.sum() + k.sum() + v.sum())
    return out, lse


class LatticeAttention:
    """:func:`lattice_attention` of one ``plan``, with calls without gradients or
    log-sum-exp run by a :class:`LatticeProgram` per input layout where one holds it
    (:class:`~sparsedsl.plans.layout_programs.LayoutPrograms`)."""

    def __init__(self, plan: tuple[HeadGroupLattice, ...], scale: float, return_lse: bool,
                 run_part: Callable[..., tuple]):
        self.plan, self.scale, self.return_lse, self.run_part = plan, scale, return_lse, run_part
        self._programs = LayoutPrograms(lambda q, k, v: LatticeProgram.build(q, k, v, plan))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.return_lse and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                    or v.requires_grad)):
            program = self._programs.get(q, k, v)
            if program is not None:
                return program(q, k, v, self.scale), None
        return lattice_attention(q, k, v, plan=self.plan, scale=self.scale, return_lse=self.return_lse,
                                 run_part=self.run_part)


def _part_call(call: Call, part, heads: range, kv_heads: int) -> Call:
    """The call of a sub-problem: ``part``'s positions of the group's ``heads``."""
    length = call.q_len if part.length is None else part.length
    return Call(length, length, 0, len(heads), kv_heads, call.head_dim, call.batch, call.dtype,
                call.device, call.scale, call.q_block, call.kv_block, call.needs_grad, call.return_lse)


def _chunk_pairs(plan: tuple[HeadGroupLattice, ...], call: Call) -> int:
    """The pairs of the folded chunks: whole chunks, the last one cut short."""
    total = 0
    for head_plan in plan:
        for part in head_plan.parts:
            if isinstance(part.pattern, n.Chunks):
                length = call.q_len if part.length is None else part.length
                whole, rest = divmod(length, part.pattern.size)
                total += (whole * part.pattern.size ** 2 + rest * rest) * len(head_plan.heads)
    return total


def _sub_problems(plan: tuple[HeadGroupLattice, ...], call: Call):
    """Every part that is not ``chunks`` and occurs at this length, with its call."""
    for head_plan in plan:
        rng = head_plan.heads
        if rng.start % call.group == 0 and rng.stop % call.group == 0:
            kv_heads = len(rng) // call.group
        else:  # the group's key/value heads are gathered, one per query head
            kv_heads = len(rng)
        for part in head_plan.parts:
            if part.length != 0 and not isinstance(part.pattern, n.Chunks):
                yield part, _part_call(call, part, rng, kv_heads)


class LatticePlan(Plan):
    """Dense attention on the lattices of token dilation (see the module docstring)."""

    name = "lattice"

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        reasons = []
        if not call.self_attention:
            reasons.append("needs self-attention (q_len == kv_len, q_offset 0)")
        if score_mods(pattern):
            reasons.append("score modifications read absolute positions")
        if pattern.buffer_names():
            reasons.append("bound tensors are indexed by absolute position")
        if not reasons:
            reasons += lattice_reasons(pattern, call.q_len, call.heads)
        return reasons

    def prepare(self, pattern: n.Pattern, call: Call) -> tuple[HeadGroupLattice, ...]:
        return lattice_decomposition(pattern, call.q_len, call.kv_len, call.heads, call.work_device)

    def efficiency(self, call: Call) -> float | None:
        """:data:`EFFICIENCY` for lattices of chunks (see :meth:`cost` for the others)."""
        return EFFICIENCY.get(call.device.type)

    def cost(self, prepared, call: Call, planner) -> float | None:
        """The folded chunks' pairs over :data:`EFFICIENCY`, and each sub-problem's cost as
        the planner gives its call, times :data:`SUB_PROBLEM_OVERHEAD` (None where either
        is not costed)."""
        efficiency = EFFICIENCY.get(call.device.type)
        if efficiency is None:
            return None
        parts = planner.for_parts()
        sub_costs = [parts.cost(part.pattern, sub_call) for part, sub_call in _sub_problems(prepared, call)]
        if None in sub_costs:
            return None
        return _chunk_pairs(prepared, call) / efficiency + SUB_PROBLEM_OVERHEAD[call.device.type] * sum(sub_costs)

    def computed_pairs(self, prepared, call: Call, planner) -> int:
        """Whole chunks for folded chunks, and each sub-problem's own plan otherwise."""
        total = _chunk_pairs(prepared, call)
        parts = planner.for_parts()
        for part, sub_call in _sub_problems(prepared, call):
            total += parts.computed_pairs(part.pattern, sub_call)
        return total

    def build(self, prepared, call: Call, planner) -> Runner:
        parts = planner.for_parts()
        runners = {id(part): parts.runner(part.pattern, sub_call) for part, sub_call in _sub_problems(prepared, call)}

        def run_part(part, q, k, v):
            return runners[id(part)](q, k, v, 0)

        attention = LatticeAttention(prepared, call.scale, call.return_lse, run_part)
        return lambda q, k, v, _: attention(q, k, v)

    def describe(self, prepared, call: Call) -> str:
        return ("token dilation: dense attention on the dilated lattices, segments folded into "
                "the batch (a mask would compute whole tiles)")
