"""Moving key/value rows between the ranks of a group, with autograd.

One ``all_to_all_single`` with per-rank split sizes moves every row a rank sends and
receives (the rows of every class of key/value heads, flattened into one buffer per rank). Uneven splits, zeros included, work on NCCL and on gloo (checked in torch 2.13,
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
    """The rank's compact keys and values, one pair per class of key/value heads:
    ``k[c]``/``v[c]`` ``[B, heads of class c, held, D]`` (the positions class ``c`` needs,
    ascending: its own and the received ones, nothing else), and the bytes that moved to
    build them (counted on the tensors the collective sent and received)."""

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    sent_bytes: int
    received_bytes: int
    received_entries: int


def assemble_key_values(k: torch.Tensor, v: torch.Tensor, transfers: tuple[RankTransfers, ...],
                        kv_heads: tuple, group, communicate: bool) -> AssembledKeyValues:
    """Compact keys and values for this rank, per class: its own needed rows and the rows
    ``transfers[c]`` receives, each at its place in the class's compact buffer.

    ``k`` and ``v`` (this rank's shards, ``[B, Hkv, L, Dk]`` and ``[B, Hkv, L, Dv]``) travel
    as one tensor, and every class's rows in one flat buffer per destination, so a call
    runs one collective forward and one backward; with ``communicate=False`` (no rank of
    the group receives anything) none runs. ``kv_heads[c]``: the key/value heads of class
    ``c`` (None: all). Nothing of the sequence's length is allocated.
    """
    key_dim = k.shape[-1]
    rows = torch.cat([k, v], dim=-1)
    per_class = [rows if heads is None else rows.index_select(1, torch.tensor(heads, device=rows.device))
                 for heads in kv_heads]
    received = [None] * len(per_class)
    sent_bytes = received_bytes = received_entries = 0
    if communicate:
        sends = [r.index_select(2, t.send_index).permute(2, 0, 1, 3) for r, t in zip(per_class, transfers)]
        row_sizes = [r.shape[0] * r.shape[1] * r.shape[3] for r in per_class]  # elements of one position
        # destination-major, class-minor pieces of one flat buffer
        pieces = [s.reshape(-1).split([n * size for n in t.send_counts])
                  for s, t, size in zip(sends, transfers, row_sizes)]
        send = torch.cat([pieces[c][d] for d in range(len(transfers[0].send_counts)) for c in range(len(sends))])
        send_counts = [sum(t.send_counts[d] * size for t, size in zip(transfers, row_sizes))
                       for d in range(len(transfers[0].send_counts))]
        recv_counts = [sum(t.recv_counts[s] * size for t, size in zip(transfers, row_sizes))
                       for s in range(len(transfers[0].recv_counts))]
        flat = AllToAllRows.apply(send, send_counts, recv_counts, group)
        sizes = [t.recv_counts[s] * size for s in range(len(transfers[0].recv_counts))
                 for t, size in zip(transfers, row_sizes)]
        chunks = flat.split(sizes)
        for c, r in enumerate(per_class):
            mine = torch.cat(chunks[c::len(per_class)])
            received[c] = mine.view(-1, r.shape[0], r.shape[1], r.shape[3]).permute(1, 2, 0, 3)
        sent_bytes = send.numel() * send.element_size()
        received_bytes = flat.numel() * flat.element_size()
        received_entries = sum(int(t.recv_index.numel()) * r.shape[1] for r, t in zip(per_class, transfers))
    held_k, held_v = [], []
    for r, t, got in zip(per_class, transfers, received):
        parts, places = [r.index_select(2, t.own_index)], [t.own_place]
        if got is not None:
            parts.append(got)
            places.append(t.recv_index)
        held = torch.cat(parts, dim=2).index_select(2, torch.argsort(torch.cat(places)))
        held_k.append(held[..., :key_dim])
        held_v.append(held[..., key_dim:])
    return AssembledKeyValues(tuple(held_k), tuple(held_v), sent_bytes, received_bytes, received_entries)
