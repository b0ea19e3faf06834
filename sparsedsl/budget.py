"""The memory budget: the most bytes one structure of a pattern may take.

Counting, block masks, plans' explanations, the dense reference and drawings hold tensors
whose size follows the sequence lengths (a tile grid, a block layout, a ``[H, Q, K]``
mask). Each of them is checked against the budget *before* it is allocated: a request
over the budget raises :class:`MemoryBudgetError`, which names the structure, the size it
needs and the budget, instead of asking the allocator for terabytes.

The budget, from the first of these that is set:

* :func:`using_memory_budget` (a context manager, for the current thread or task);
* :func:`set_memory_budget` (for the process);
* the environment variable ``SPARSEDSL_MEMORY_BUDGET``: bytes, or a number with a binary
  suffix ``K``, ``M``, ``G`` or ``T`` (``SPARSEDSL_MEMORY_BUDGET=16G``);
* the default: half of the machine's physical memory (8 GiB where it cannot be read).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from typing import Iterator

from .lang.checks import PatternArgumentError

__all__ = ["MemoryBudgetError", "check_memory", "memory_budget", "set_memory_budget",
           "using_memory_budget"]

#: The environment variable read when no budget is set in code.
ENVIRONMENT_VARIABLE = "SPARSEDSL_MEMORY_BUDGET"
#: The budget where physical memory cannot be read.
FALLBACK_BUDGET = 8 << 30

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_ENVIRONMENT_VALUE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)

_process_budget: int | None = None
_scoped_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "sparsedsl_memory_budget", default=None)


class MemoryBudgetError(PatternArgumentError):
    """A structure would take more memory than the budget (see :mod:`sparsedsl.budget`).
    A ``ValueError``: the sizes asked for are too large for the budget."""


def _checked_bytes(where: str, nbytes) -> int:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise PatternArgumentError(
            f"{where}: argument 'nbytes' must be a positive integer number of bytes, got {nbytes!r}")
    return nbytes


def _default_budget() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, OSError, ValueError):
        return FALLBACK_BUDGET


def _environment_budget() -> int | None:
    value = os.environ.get(ENVIRONMENT_VARIABLE)
    if value is None or not value.strip():
        return None
    match = _ENVIRONMENT_VALUE.fullmatch(value)
    if match is None or float(match.group(1)) * _SUFFIXES[match.group(2).upper()] < 1:
        raise PatternArgumentError(
            f"environment variable {ENVIRONMENT_VARIABLE} must be a positive number of bytes, "
            f"optionally with a suffix K, M, G or T (e.g. 16G), got {value!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2).upper()])


def memory_budget() -> int:
    """The budget in bytes now in force (see the module docstring for where it comes from)."""
    for budget in (_scoped_budget.get(), _process_budget):
        if budget is not None:
            return budget
    from_environment = _environment_budget()
    return _default_budget() if from_environment is None else from_environment


def set_memory_budget(nbytes: int | None) -> int | None:
    """Set the process's budget to ``nbytes`` (``None``: back to the environment variable or
    the default). Returns the previous setting (``None`` if there was none)."""
    global _process_budget
    previous = _process_budget
    _process_budget = None if nbytes is None else _checked_bytes("set_memory_budget()", nbytes)
    return previous


@contextlib.contextmanager
def using_memory_budget(nbytes: int) -> Iterator[int]:
    """``with using_memory_budget(2 << 30): ...``: the budget inside the block, for the
    current thread (or asyncio task) only."""
    token = _scoped_budget.set(_checked_bytes("using_memory_budget()", nbytes))
    try:
        yield nbytes
    finally:
        _scoped_budget.reset(token)


def format_bytes(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit that keeps it at least 1 (``1.5 GiB``)."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes} bytes"


def check_memory(where: str, what: str, nbytes: int) -> None:
    """Raise :class:`MemoryBudgetError` when ``what`` (a structure named for the message,
    with its shape) would take more than the budget: ``nbytes``, computed from its shape
    before it is allocated."""
    budget = memory_budget()
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{where}: {what} needs {format_bytes(nbytes)} ({nbytes:,} bytes), more than the "
            f"memory budget of {format_bytes(budget)} ({budget:,} bytes); use smaller sizes "
            f"(or larger tiles), or raise the budget with sparsedsl.set_memory_budget(nbytes) "
            f"or {ENVIRONMENT_VARIABLE}")
