"""``sequence_parallel_attention``: a compiled pattern over a sequence sharded across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..compiler.module import CompiledPattern
from .checks import WHERE, agree_across_ranks, call_signature, check_types, local_problem
from .compact import attend_piece
from .exchange import assemble_key_values
from .plan import ExchangePlan, exchange_plan
from .sharding import check_zigzag


@dataclass(frozen=True)
class ExchangeStats:
    """The key/value traffic of one rank in one forward call, counted on the tensors the
    collective sent and received.

    ``received_positions``: key/value positions this rank received from other ranks;
    ``held_kv_positions``: the positions of its compact key/value buffers (its own needed
    positions and the received ones: what it allocated, besides its own shard). Both are
    averaged over the key/value heads, which need different positions under
    ``dilated_heads`` branches (``longnet``): a float where that average is not whole;
    ``received_bytes`` / ``sent_bytes``: bytes of keys and values it received / sent
    (the backward pass moves as many gradient bytes the other way);
    ``all_gather_bytes``: what it would receive by all-gathering the keys and values of
    the whole sequence. ``plan``: the group's :class:`ExchangePlan`.
    """

    rank: int
    world_size: int
    received_positions: float | int
    held_kv_positions: float | int
    received_bytes: int
    sent_bytes: int
    all_gather_bytes: int
    plan: ExchangePlan

    @property
    def fraction_of_all_gather(self) -> float:
        """``received_bytes / all_gather_bytes`` (0 for one rank)."""
        return self.received_bytes / self.all_gather_bytes if self.all_gather_bytes else 0.0


def sequence_parallel_attention(compiled: CompiledPattern, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, *, group=None, zigzag: bool = False,
                                scale: float | None = None, return_stats: bool = False, **buffers):
    """Attention of ``compiled``'s pattern over a sequence sharded across the ranks of
    ``group`` (default: the whole world); every rank of the group must call it with its
    own shards, the same pattern and the same options.

    ``q``, ``k``, ``v``: this rank's shards ``[batch, heads, N/P, head_dim]`` of the
    sequence of ``N = P * shard length`` positions (``P`` ranks), laid out by
    :func:`shard` (contiguous pieces, or with ``zigzag=True`` chunks ``rank`` and
    ``2P - 1 - rank`` of ``2P``); ``k``/``v`` may have fewer heads than ``q`` (GQA).
    ``buffers``: the pattern's call-time tensors (``documents``, ``layout``, ``bias``) for
    the whole sequence, the same on every rank.

    Returns this rank's output shard, equal to the rows it holds of ``compiled(Q, K, V)``
    on the full tensors (and with ``return_stats=True`` also an :class:`ExchangeStats`).
    A rank receives only the key/value tiles its rows can attend to (see
    :func:`exchange_plan`), in one ``all_to_all_single``, and holds keys and values for
    those tiles only (see :mod:`sparsedsl.distributed.compact`), never for the whole
    sequence; gradients flow back through the
    same collective, so the gradients of each rank's ``q``, ``k``, ``v`` are the slices of
    the single-process gradients. Every rank must then run backward through its output.

    Raises ``ValueError`` on every rank of the group when any rank's shards are malformed
    or the ranks disagree on shapes, dtype, pattern, tiles, ``zigzag`` or whether keys and
    values need gradients.
    """
    check_types(compiled, q, k, v, group)
    check_zigzag(WHERE, zigzag)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    kv_needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    problem = local_problem(compiled, q, k, v, zigzag, buffers)
    signature = call_signature(compiled, q, k, v, zigzag, kv_needs_grad, problem, buffers)
    agree_across_ranks(signature, problem, group, q.device)

    seq_len = q.shape[2] * world_size
    plan = exchange_plan(compiled, seq_len, world_size, zigzag=zigzag, heads=q.shape[1], kv_heads=k.shape[1],
                         device=q.device, **buffers)
    out, stats = attend_with_plan(compiled, q, k, v, plan, rank, group, scale, buffers)
    return (out, stats) if return_stats else out


def attend_with_plan(compiled: CompiledPattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     plan: ExchangePlan, rank: int, group, scale: float | None,
                     buffers: dict) -> tuple[torch.Tensor, ExchangeStats]:
    """This rank's output shard and traffic, moving the keys and values ``plan`` says.
    Inputs are not checked (:func:`sequence_parallel_attention` checks them; a benchmark
    passes :meth:`ExchangePlan.all_gather` here to compare with moving every key and
    value through the same code)."""
    if plan.splits_heads and plan.kv_heads != k.shape[1]:
        raise ValueError(f"{WHERE}: the plan is for {plan.kv_heads} key/value heads, but k has {k.shape[1]}")
    kv_classes = tuple(c.kv_heads for c in plan.classes)
    assembled = assemble_key_values(k, v, plan.rank_transfers(rank, q.device), kv_classes, group,
                                    plan.moves_anything)
    held = tuple(needed.group(rank) for needed in plan.class_needed)
    outputs, start = [], 0
    for rows, needed in zip(plan.ranges(rank), plan.piece_needed(rank)):
        outputs.append(attend_piece(compiled, q.narrow(2, start, len(rows)), assembled.k, assembled.v, held,
                                    kv_classes, rows, needed, plan.seq_len, scale, buffers))
        start += len(rows)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    tied = (*assembled.k, *assembled.v, k, v)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tied):
        # Every rank runs the exchange's backward (a collective) and returns gradients for
        # its k and v, even one whose rows see no key: empty slices tie the output to the
        # received buffers and the inputs, with zero gradients and no value read.
        out = out + sum(t[..., :0].sum() for t in tied)
    position_bytes = k.shape[0] * k.shape[1] * (k.shape[3] + v.shape[3]) * k.element_size()
    received = assembled.received_entries / k.shape[1]
    stats = ExchangeStats(
        rank=rank, world_size=plan.world_size,
        received_positions=int(received) if received.is_integer() else received,
        held_kv_positions=plan.held_positions(rank),
        received_bytes=assembled.received_bytes,
        sent_bytes=assembled.sent_bytes,
        all_gather_bytes=plan.all_gather_positions() * position_bytes,
        plan=plan,
    )
    return out, stats
