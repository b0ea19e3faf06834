"""The planner: which plan runs a call, and the runner that runs it.

For a pattern and a :class:`~sparsedsl.plans.base.Call`, every plan of
:data:`~sparsedsl.plans.registry.PLANS` first says whether it can compute the call exactly
(``not_supported``: reasons, from structure and sizes alone). Among those that can, the
planner takes the lowest ``cost`` (pairs computed over the plan's measured efficiency);
where none has a measured cost, the first that can run in registry order. A module
compiled with ``kernel="<name>"`` runs that plan, or raises :class:`PlanNotSupported` with
its reasons: never another plan quietly.

Preparations (lowerings, decompositions) and runners are cached per (pattern, call), so a
call shape is planned once, and sub-problems (the lattice plan's parts) go back through
the planner and share its caches. Runners of plans whose backward has no derivative get
exact second-order gradients through :mod:`sparsedsl.plans.double_backward`, and a
log-sum-exp a plan computed without autograd gets its gradient by recomputation
(:mod:`sparsedsl.plans.lse_gradient`). Runners run inside
``torch.profiler.record_function("sparsedsl::<plan>")`` while a profiler records.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import profiler

from ..lang import nodes as n
from ..passes import lowering
from ..plans import decode
from ..plans.base import Call, Candidate, Plan, Runner
from ..plans.double_backward import twice_differentiable
from ..plans.lse_gradient import recomputed_lse_gradient
from ..plans.registry import KERNELS, PLANS
from .cache import BuildCache

_BY_NAME = {plan.name: plan for plan in PLANS}
#: Preparations per (plan, pattern, call) of calls without bound tensors.
_PREPARED = BuildCache(maxsize=256)
#: Runners per (kernel, pattern, call) of calls without bound tensors.
_RUNNERS = BuildCache(maxsize=256)
#: Runners per (module configuration, input shapes, dtype, device, grad, lse, scale, query
#: offset or "rows" for decoding steps), the key a compiled module computes per call
#: without building a ``Call``: a cached call costs one dictionary lookup.
CALL_RUNNERS = BuildCache(maxsize=256)
UNCOSTED = "no measured efficiency for this kind of call: not picked by itself (kernel= runs it)"


class PlanNotSupported(ValueError):
    """``kernel="<name>"`` names a plan that cannot compute the call; the message lists why."""


class Planner:
    """Plans for modules compiled with ``kernel`` (``"auto"`` or a plan name)."""

    def __init__(self, kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel

    @staticmethod
    def kernels() -> list[str]:
        """Every plan's name, in registry order."""
        return [plan.name for plan in PLANS]

    @staticmethod
    def for_parts() -> "Planner":
        """The planner of sub-problems: every plan is a candidate."""
        return _AUTO

    def prepared(self, plan: Plan, pattern: n.Pattern, call: Call) -> Any:
        """``plan.prepare(pattern, call)``, cached unless the call binds tensors (their
        lowerings have caches of their own, keyed by the tensors' memory and version)."""
        if call.bound:
            return plan.prepare(pattern, call)
        return _PREPARED.get((plan.name, pattern, call), lambda: plan.prepare(pattern, call))

    def candidates(self, pattern: n.Pattern, call: Call) -> dict[str, Candidate]:
        """Every plan's cost for ``call``, or the reasons it has none."""
        table = {}
        for plan in PLANS:
            reasons = plan.not_supported(pattern, call)
            if reasons:
                table[plan.name] = Candidate(None, tuple(reasons))
                continue
            if plan.efficiency(call) is None:  # not costed: nothing to prepare
                table[plan.name] = Candidate(None, (UNCOSTED,))
                continue
            cost = plan.cost(self.prepared(plan, pattern, call), call, self)
            table[plan.name] = Candidate(cost, () if cost is not None else (UNCOSTED,))
        return table

    def choose(self, pattern: n.Pattern, call: Call, candidates: dict[str, Candidate] | None = None) -> Plan:
        """The plan that runs ``call`` (see the module docstring)."""
        if self.kernel != "auto":
            plan = _BY_NAME[self.kernel]
            reasons = plan.not_supported(pattern, call)
            if reasons:
                raise PlanNotSupported(
                    f"kernel={self.kernel!r} cannot run {pattern} for this call (q_len={call.q_len}, "
                    f"kv_len={call.kv_len}, q_offset={call.q_offset}, heads={call.heads}, "
                    f"head_dim={call.head_dim}, {call.dtype}, {call.device.type}"
                    f"{', gradients' if call.needs_grad else ''}{', return_lse' if call.return_lse else ''}"
                    f"): " + "; ".join(reasons))
            return plan
        candidates = candidates or self.candidates(pattern, call)
        costed = [(candidate.cost, index) for index, plan in enumerate(PLANS)
                  if (candidate := candidates[plan.name]).cost is not None]
        if costed:
            return PLANS[min(costed)[1]]
        for plan in PLANS:
            if candidates[plan.name].reasons == (UNCOSTED,):
                return plan
        raise PlanNotSupported(f"no plan can run {pattern} for {call}: " + "; ".join(
            f"{name}: {'; '.join(c.reasons)}" for name, c in candidates.items()))

    def cost(self, pattern: n.Pattern, call: Call) -> float | None:
        """The chosen plan's cost for ``call`` (None where it is not costed)."""
        plan = self.choose(pattern, call)
        return plan.cost(self.prepared(plan, pattern, call), call, self)

    def computed_pairs(self, pattern: n.Pattern, call: Call) -> int:
        """Pairs the chosen plan's kernels compute for ``call``."""
        plan = self.choose(pattern, call)
        return plan.computed_pairs(self.prepared(plan, pattern, call), call, self)

    def runner(self, pattern: n.Pattern, call: Call) -> Runner:
        """The runner of ``call`` (cached unless the call binds tensors)."""
        if call.bound:
            return self._build(pattern, call)
        return _RUNNERS.get((self.kernel, pattern, call), lambda: self._build(pattern, call))

    def _build(self, pattern: n.Pattern, call: Call) -> Runner:
        plan = self.choose(pattern, call)
        runner = plan.build(self.prepared(plan, pattern, call), call, self)
        if call.needs_grad and not plan.double_backward:
            runner = twice_differentiable(runner, lambda: _GATHER.runner(pattern, call))
        if call.differentiates_lse and not plan.lse_gradient:
            runner = recomputed_lse_gradient(runner, lambda: _GATHER.runner(pattern, call))
        return _labelled(plan.name, runner)


_AUTO = Planner("auto")
#: Runs second-order gradients of plans without them (differentiable operations only).
_GATHER = Planner("gather")


def _labelled(name: str, runner: Runner) -> Runner:
    """``runner`` inside ``record_function("sparsedsl::<name>")`` while a profiler records
    (outside one, the check is one attribute read); ``.plan`` names the plan."""
    label = f"sparsedsl::{name}"

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int):
        if profiler._is_profiler_enabled:
            with torch.profiler.record_function(label):
                return runner(q, k, v, q_offset)
        return runner(q, k, v, q_offset)

    run.plan = name
    return run


def clear_caches() -> None:
    """Drop every cached lowering, preparation and runner (the next call of each shape
    plans and builds anew)."""
    for cache in (_PREPARED, _RUNNERS, CALL_RUNNERS):
        cache.clear()
    lowering.clear_caches()
    decode.clear_caches()
