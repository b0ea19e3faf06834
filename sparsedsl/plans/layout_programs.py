"""Programs built once per input layout: plans that resolve their views into ``as_strided``
geometry (:mod:`~sparsedsl.plans.lattice_program`, :mod:`~sparsedsl.plans.branches_program`)
keep one per layout of their inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

_NOT_BUILT = object()


class LayoutPrograms:
    """``build(q, k, v)``'s program for each layout of ``q``, ``k``, ``v`` (shapes, strides,
    dtype, device), built on the first call of that layout (None where no program holds
    it, remembered too); at most :attr:`MAX_PROGRAMS` layouts are kept (all dropped when a
    new one would pass it)."""

    MAX_PROGRAMS = 8

    def __init__(self, build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object | None]):
        self._build = build
        self._programs: dict = {}

    def get(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The program for the layout of ``q``, ``k``, ``v``, or None."""
        layout = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device)
        program = self._programs.get(layout, _NOT_BUILT)
        if program is _NOT_BUILT:  # concurrent calls may build it twice, with the same result
            if len(self._programs) >= self.MAX_PROGRAMS:
                self._programs.clear()
            program = self._programs[layout] = self._build(q, k, v)
        return program
