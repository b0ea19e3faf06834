"""CUDA side streams for plans that run independent kernels concurrently (the lattice
program's runs, the runs of lattice terms): per device and thread, with the events that
fork work onto them and join it back (:func:`concurrently`), and jobs whose writes go in
turns (:func:`in_turns`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

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


def concurrently(device: torch.device, jobs: Sequence[Callable[[], None]]) -> None:
    """Run ``jobs`` (each enqueues kernels on the current stream) so that their kernels
    may overlap: on CUDA the first on the caller's stream, the others on side streams
    forked from it (they see everything enqueued before the call), all joined back before
    this returns (everything enqueued after the call, frees included, is ordered after
    them). Elsewhere, or with one job, in order on the current stream.

    Jobs must write disjoint memory. The first job is enqueued first, so events it records
    are recorded before the side jobs wait on them."""
    if device.type != "cuda" or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    caller = torch.cuda.current_stream(device)
    side = side_streams(device, len(jobs) - 1)
    side.fork.record(caller)
    jobs[0]()
    current_device = torch.cuda.current_device()
    try:
        for i, job in enumerate(jobs[1:]):
            stream = side.streams[i % len(side.streams)]
            stream.wait_event(side.fork)
            torch.cuda.set_stream(stream)  # also makes the stream's device current
            job()
    finally:
        torch.cuda.set_stream(caller)
        if current_device != caller.device_index:
            torch.cuda.set_device(current_device)
    for stream, joined in zip(side.streams, side.joins):
        joined.record(stream)
        caller.wait_event(joined)


def in_turns(device: torch.device, turns: Sequence[Sequence[Callable[[Callable[[], None]], None]]]) -> None:
    """Run the jobs of every turn :func:`concurrently`, in order, each given a callable to
    call before its writes: on CUDA it makes the job's stream wait until every job of the
    previous turn has finished (its kernels before that point still overlap anything);
    elsewhere it does nothing (jobs run one after another). Jobs of one turn must write
    disjoint memory; jobs of different turns may write the same memory, in turn order."""
    if device.type != "cuda":
        for turn in turns:
            for job in turn:
                job(_nothing)
        return
    jobs, finished = [], []  # finished[t]: events recorded as turn t's jobs finish
    for index, turn in enumerate(turns):
        finished.append([])
        previous = finished[index - 1] if index else []
        jobs += [partial(_job_in_turn, job, previous, finished[index]) for job in turn]
    concurrently(device, jobs)


def _nothing() -> None:
    pass


def _job_in_turn(job: Callable[[Callable[[], None]], None], previous: list, finished: list) -> None:
    """``job`` on the current stream, its writes after the events ``previous`` (recorded by
    jobs enqueued before it); an event recorded after it is appended to ``finished``."""
    stream = torch.cuda.current_stream()

    def before_writing() -> None:
        for event in previous:
            stream.wait_event(event)

    job(before_writing)
    event = torch.cuda.Event()
    event.record(stream)
    finished.append(event)
