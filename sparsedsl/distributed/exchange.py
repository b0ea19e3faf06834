"""Moving key/value rows between the ranks of a group, with autograd.

One ``all_to_all_single`` with per-rank split sizes moves every row a rank sends and
receives. Uneven splits, zeros included, work on NCCL and on gloo (checked in torch 2.13,
where gloo's list form ``all_to_all`` takes only equal sizes). Its backward is the same
collective with the splits swapped: each row's gradient goes back to the rank that sent
the row, where the backward of the ``index_select`` that packed it adds it into the
gradient of the owner's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .plan import RankTransfers


def all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                    group) -> torch.Tensor:
    """Rows ``send[...]`` (split along dim 0 by ``send_counts``, one piece per rank in rank
    order) go to their ranks; returns the rows received, grouped by source rank in rank
    order (``recv_counts[s]`` from rank ``s``). Every rank of ``group`` must call it."""
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return recv


class AllToAllRows(torch.autograd.Function):
    """:func:`all_to_all_rows` with autograd: the gradient of each received row is sent
    back to the rank that sent it (the same collective, splits swapped)."""

    @staticmethod
    def forward(ctx, send, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return all_to_all_rows(send, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad_recv):
        grad_send = all_to_all_rows(grad_recv, ctx.recv_counts, ctx.send_counts, ctx.group)
        return grad_send, None, None, None


@dataclass(frozen=True)
class AssembledKeyValues:
    """The rank's compact keys and values ``[B, Hkv, held, D]`` (the positions of the key
    tiles its rows need, ascending: its own and the received ones, nothing else) and the
    bytes that moved to build them (counted on the tensors the collective sent and
    received)."""

    k: torch.Tensor
    v: torch.Tensor
    sent_bytes: int
    received_bytes: int
    received_positions: int


def assemble_key_values(k: torch.Tensor, v: torch.Tensor, transfers: RankTransfers,
                        group, communicate: bool) -> AssembledKeyValues:
    """Compact keys and values for this rank: its own needed rows and the rows
    ``transfers`` receives, each at its place in the compact buffer.

    ``k`` and ``v`` (this rank's shards, ``[B, Hkv, L, Dk]`` and ``[B, Hkv, L, Dv]``) travel
    as one tensor, so a call runs one collective forward and one backward; with
    ``communicate=False`` (no rank of the group receives anything) none runs. Nothing of
    the sequence's length is allocated: the buffer has ``transfers.held`` positions.
    """
    key_dim = k.shape[-1]
    rows = torch.cat([k, v], dim=-1)
    parts, places = [rows.index_select(2, transfers.own_index)], [transfers.own_place]
    sent_bytes = received_bytes = received_positions = 0
    if communicate:
        send = rows.index_select(2, transfers.send_index).permute(2, 0, 1, 3)
        received = AllToAllRows.apply(send, transfers.send_counts, transfers.recv_counts, group)
        parts.append(received.permute(1, 2, 0, 3))
        places.append(transfers.recv_index)
        sent_bytes = send.numel() * send.element_size()
        received_bytes = received.numel() * received.element_size()
        received_positions = received.shape[0]
    order = torch.argsort(torch.cat(places))
    held = torch.cat(parts, dim=2).index_select(2, order)
    return AssembledKeyValues(held[..., :key_dim], held[..., key_dim:], sent_bytes, received_bytes,
                              received_positions)
