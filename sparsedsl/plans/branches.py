"""The *branches* plan: multiset patterns (``a + b``, ``longnet(...)``) as dense attention on
the folded lattices of each term, merged by their log-sum-exps.

A multiset's attention is one softmax over the keys of each row counted with multiplicity
``m``. Its terms (:func:`~sparsedsl.lang.multiset.multiset_terms`: the parts of a sum,
LongNet's branches) are set patterns whose multiplicities add up to ``m``; each runs alone
as dense attention on strided views of its lattices (every head group of every term must be
``dilated(...)`` or ``chunks(...)``; :func:`~sparsedsl.passes.lattice.chunks_reasons`), and
the terms' outputs are merged by their log-sum-exps into exactly the multiset's softmax,
with exact gradients (:mod:`~sparsedsl.plans.terms_attention`).
"""

from __future__ import annotations

from ..lang import nodes as n
from ..lang.multiset import NOTHING, is_multiset, multiset_terms
from ..lang.queries import score_mods
from ..passes.lattice import HeadGroupLattice, chunks_reasons, lattice_decomposition
from .base import Call, Plan, Runner
from .fused_attention import fused_reasons
from .lattice import LatticePlan
from .terms_attention import Terms, TermsAttention

#: Throughput per computed pair relative to the device's tile kernel. CPU: 96k-136k pairs per
#: CPU-ms on ``longnet([512, 1024, 2048], [1, 2, 4])`` in two runs, 0.7 of the lattice plan's
#: rate on ``segments`` of the same lengths in the same run, so 0.7 of its 6; the gather plan
#: ran 12k-13k on this multiset and 21k on set patterns (``benchmarks/plan_efficiency.py``,
#: 2026-12-05, forward, fp32, 4,096 tokens, 8 heads, head dim 64, 2 shared cores, torch
#: 2.13, CPU time). CUDA: LongNet's paper configuration at 65,536 tokens (12 heads, head dim
#: 128, bf16, H100, torch 2.11, ``benchmarks/attention.py --quick``, 2026-12-05, commit
#: 047c307) computed 3.4G pairs in 3.55 ms forward and 15.1 ms forward+backward, where
#: FlexAttention on its 128-token tiles (25.8G pairs) took 120 ms and 326 ms: 4.4x flex's
#: rate per pair forward, 2.8x forward+backward; the lower is taken.
EFFICIENCY = {"cpu": 4.5, "cuda": 2.8}

_LATTICE = LatticePlan()


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
        reasons += fused_reasons(call.device, call.dtype, call.head_dim)
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
        attention, return_lse = TermsAttention(prepared, call.scale), call.return_lse

        def run(q, k, v, _q_offset):
            out, lse = attention(q, k, v)
            return out, (lse if return_lse else None)

        return run

    def describe(self, prepared: Terms, call: Call) -> str:
        compiled = ("; the merge's Triton kernel is compiled by the first call (about a second, once per process, "
                    "number of terms and dtype)"
                    if call.device.type == "cuda" else "")
        return (f"multiset of {len(prepared)} terms: each as dense attention on its folded lattices, "
                f"merged by log-sum-exp into one softmax{compiled}")
