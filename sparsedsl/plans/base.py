"""The plan protocol: what every way of running a compiled pattern says about itself.

A *plan* is one exact way to compute a pattern's attention (dense SDPA, FlexAttention with
the structural block mask, dense attention on dilated lattices, ...). Each is one class
with a ``name`` and five methods, and the planner (:mod:`sparsedsl.compiler.planner`)
chooses among them for each :class:`Call`:

* ``not_supported(pattern, call) -> list[str]``: why the plan cannot compute this call
  exactly (empty when it can). Cheap: structure and sizes only, no tensors.
* ``prepare(pattern, call)``: the plan's lowering or decomposition for this call (tile
  states, lattices, ...); cached by the planner, shared by ``cost``, ``build`` and
  ``describe``.
* ``cost(prepared, call, planner) -> float | None``: ``computed_pairs`` (the query/key
  pairs the plan's kernels compute, whole tiles for tile kernels) divided by
  ``efficiency(call)``: its throughput per computed pair relative to the device's
  block-sparse tile kernel, a constant the plan documents with the measurement behind
  it. None where no efficiency was measured for this kind of call: the planner then
  never picks the plan by itself, and ``kernel="<name>"`` still runs it.
* ``build(prepared, call, planner) -> Runner``: the function that runs calls of this
  shape. Every runner has the same shape, ``runner(q, k, v, q_offset) -> (out, lse or
  None)`` on ``[B, H, N, D]`` tensors; only decoding runners read ``q_offset``.
* ``describe(prepared, call) -> str``: one line, why this plan fits this call.

Adding a plan is one file with one such class and one line in
:mod:`sparsedsl.plans.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..lang import nodes as n

if TYPE_CHECKING:  # the planner hands itself to plans that solve sub-problems
    from ..compiler.planner import Planner

#: ``runner(q, k, v, q_offset) -> (out, lse or None)``.
Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], tuple]


@dataclass(frozen=True)
class Call:
    """Everything about one attention call that decides how it runs.

    Query rows ``[q_offset, q_offset + q_len)`` attend over keys ``[0, kv_len)``;
    ``heads`` query heads read ``kv_heads`` key/value heads (grouped-query attention when
    fewer) of ``head_dim``; ``needs_grad``: autograd records the call; ``return_lse``: the
    caller wants the log-sum-exp; ``decoding``: a step of a few rows past position 0 of a
    pattern whose tile states do not depend on the lengths (see
    :mod:`sparsedsl.plans.decode`). ``bound`` identifies the call-time tensors the pattern
    names (memory, shape, version), and ``buffers`` holds them (not compared: ``bound``
    stands for them). ``q_block``/``kv_block`` are the compiled module's tiles."""

    q_len: int
    kv_len: int
    q_offset: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    q_block: int
    kv_block: int
    needs_grad: bool = False
    return_lse: bool = False
    decoding: bool = False
    bound: tuple = ()
    buffers: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False)

    @property
    def self_attention(self) -> bool:
        """Queries and keys are the same positions from 0."""
        return self.q_offset == 0 and self.q_len == self.kv_len

    @property
    def work_device(self) -> torch.device:
        """Where structural work for this call runs: its device, or the CPU when a call on
        CUDA is explained on a machine without it (plans depend on the device's kind)."""
        if self.device.type == "cuda" and not torch.cuda.is_available():
            return torch.device("cpu")
        return self.device

    @property
    def half_precision(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    @property
    def differentiates_lse(self) -> bool:
        """Whether autograd may flow through the log-sum-exp the call returns."""
        return self.needs_grad and self.return_lse

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class Candidate:
    """One plan as the planner saw it for a call: ``cost`` (None when the plan was not
    costed) and ``reasons`` (why it cannot run, or why it is not picked by itself)."""

    cost: float | None
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.cost is not None:
            return f"cost {self.cost:,.0f}"
        return "; ".join(self.reasons)


class Plan:
    """Base class of plans (see the module docstring). Subclasses set ``name`` and
    implement ``not_supported``, ``prepare``, ``efficiency``, ``computed_pairs``,
    ``build`` and ``describe``."""

    name: str = ""
    #: Whether the runner's backward is itself differentiable (second-order gradients);
    #: where not, the planner wraps it (:mod:`sparsedsl.plans.double_backward`).
    double_backward: bool = False
    #: Whether the log-sum-exp it returns carries a gradient; where not, the planner gives
    #: it one by recomputation (:mod:`sparsedsl.plans.lse_gradient`).
    lse_gradient: bool = False

    def not_supported(self, pattern: n.Pattern, call: Call) -> list[str]:
        raise NotImplementedError

    def prepare(self, pattern: n.Pattern, call: Call) -> Any:
        raise NotImplementedError

    def cost(self, prepared: Any, call: Call, planner: "Planner") -> float | None:
        efficiency = self.efficiency(call)
        if efficiency is None:
            return None
        return self.computed_pairs(prepared, call, planner) / efficiency

    def efficiency(self, call: Call) -> float | None:
        """Throughput per computed pair relative to the device's tile kernel (None: not
        measured for this kind of call)."""
        raise NotImplementedError

    def computed_pairs(self, prepared: Any, call: Call, planner: "Planner") -> int:
        """The query/key pairs the plan's kernels compute for ``call`` (over all heads)."""
        raise NotImplementedError

    def build(self, prepared: Any, call: Call, planner: "Planner") -> Runner:
        raise NotImplementedError

    def describe(self, prepared: Any, call: Call) -> str:
        raise NotImplementedError

    def tiles(self, pattern: n.Pattern, call: Call) -> tuple[int, int]:
        """The tile grid the plan's kernel works on (for tile counts in ``explain``)."""
        return call.q_block, call.kv_block

    def __repr__(self) -> str:
        return f"<plan {self.name}>"
