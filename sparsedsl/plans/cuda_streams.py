"""CUDA side streams for plans that run independent kernels concurrently (the lattice
program's runs): per device and thread, with the events that fork work onto them and
join it back."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

#: Side streams per CUDA device and thread, at most this many (runs beyond share them in turn).
MAX_SIDE_STREAMS = 8


@dataclass
class SideStreams:
    """CUDA streams of one device and thread with the events that fork work onto them
    (``fork``, recorded on the caller's stream), order it after the caller's zero fills
    (``filled``) and join it back (``joins``, one per stream). Events are re-recorded by
    every call: a wait enqueued before the next record keeps the point it waited for."""

    streams: list
    fork: torch.cuda.Event
    filled: torch.cuda.Event
    joins: list


_side = threading.local()


def side_streams(device: torch.device, count: int) -> SideStreams:
    """The first ``min(count, MAX_SIDE_STREAMS)`` side streams of ``device`` for this
    thread, created on first use. They are the thread's own (as are their events), so
    calls from several threads never re-record an event another thread is waiting on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = min(count, MAX_SIDE_STREAMS)
    per_device = getattr(_side, "per_device", None)
    if per_device is None:
        per_device = _side.per_device = {}
    side = per_device.get(index)
    if side is None:
        side = per_device[index] = SideStreams([], torch.cuda.Event(), torch.cuda.Event(), [])
    while len(side.streams) < count:
        side.streams.append(torch.cuda.Stream(index))
        side.joins.append(torch.cuda.Event())
    if len(side.streams) == count:
        return side
    return SideStreams(side.streams[:count], side.fork, side.filled, side.joins[:count])
