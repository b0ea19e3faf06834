"""Argument validation shared by every constructor of the language.

Each check names the constructor, the argument and the offending value, so that
``window(-1)`` fails with ``window(): argument 'before' must be ... got -1``.
"""

from __future__ import annotations

import keyword
import numbers
import unicodedata
import sys
from typing import Any

#: Positions, sizes and counts must fit the int32 indices the kernels use.
INDEX_LIMIT = 2**31 - 1


class PatternArgumentError(ValueError):
    """A pattern constructor was given an argument of the wrong type or range."""


class PatternOperandError(PatternArgumentError, TypeError):
    """An operator (``| & - ~``) was given an operand that is not a pattern, or a pattern it
    cannot combine; a ``TypeError`` as Python's operators raise, and a
    :class:`PatternArgumentError` as every other check of the language."""


def check_int(where: str, name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an int if it is an integer in ``[minimum, INDEX_LIMIT]``.

    Under ``torch.compile`` (and for a ``torch.SymInt``) the value is returned as it is:
    it may be a length traced symbolically, whose bounds become guards of the compiled
    graph; it is never converted or printed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be an integer, got {value!r} "
            f"({type(value).__name__})"
        )
    if _traced(value):
        if value < minimum or value > INDEX_LIMIT:
            raise PatternArgumentError(
                f"{where}: argument {name!r} must be in [{minimum}, {INDEX_LIMIT}], got a "
                f"traced integer outside that range"
            )
        return value
    value = int(value)
    shown = repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if value < minimum:
        bound = "positive" if minimum == 1 else f">= {minimum}"
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be {bound}, got {shown}"
        )
    if value > INDEX_LIMIT:
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be at most 2**31 - 1 = {INDEX_LIMIT} "
            f"(32-bit kernel indices), got {shown}"
        )
    return value


def _traced(value: Any) -> bool:
    """Whether ``value`` may be a symbolic integer: a ``torch.SymInt``, or any integer
    while ``torch.compile`` traces (Dynamo shows symbolic lengths as ints). torch is not
    imported for the question."""
    torch = sys.modules.get("torch")
    return torch is not None and (isinstance(value, torch.SymInt) or torch.compiler.is_compiling())


def check_int_list(where: str, name: str, values: Any, *, minimum: int = 0) -> tuple[int, ...]:
    """Return a non-empty list/tuple of integers as a tuple, each checked by `check_int`."""
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be a non-empty list of integers, got {values!r}"
        )
    return tuple(
        check_int(where, f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values)
    )


def check_number(where: str, name: str, value: Any, *, positive: bool = True) -> float:
    """Return ``value`` as a float if it is a finite real number (> 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be a number, got {value!r} ({type(value).__name__})"
        )
    try:
        value = float(value)
    except OverflowError:
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be finite, got an integer too large for a float"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise PatternArgumentError(f"{where}: argument {name!r} must be finite, got {value!r}")
    if positive and value <= 0:
        raise PatternArgumentError(f"{where}: argument {name!r} must be positive, got {value!r}")
    return value


#: Keyword names the call-time functions take themselves; a tensor cannot be bound by them.
RESERVED_NAMES = frozenset({
    "pattern", "q_len", "kv_len", "heads", "batch", "device", "dtype", "tile", "head_dim",
    "q", "k", "v", "scale", "layout", "return_lse", "requires_grad", "width", "file",
    "q_offset", "group", "zigzag", "return_stats",
})


def check_name(where: str, name: str, value: Any) -> str:
    """Return ``value`` if it is a Python identifier as Python reads it back (it is bound
    by keyword at call time, and Python folds look-alike letters of the identifiers it
    reads, such as full-width ones, to their NFKC form) and not one of
    :data:`RESERVED_NAMES`."""
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value) \
            or unicodedata.normalize("NFKC", value) != value:
        raise PatternArgumentError(
            f"{where}: argument {name!r} must be a Python identifier in its normal (NFKC) form "
            f"(it is passed by keyword at call time), got {value!r}"
        )
    if value in RESERVED_NAMES:
        raise PatternArgumentError(
            f"{where}: argument {name!r} cannot be {value!r}: that keyword is taken by the "
            f"call-time functions ({', '.join(sorted(RESERVED_NAMES))})"
        )
    return value


def check_bool(where: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (NumPy's included); a ``TypeError`` that names it
    otherwise (a string such as ``"no"`` would read as true)."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{where}: argument {name!r} must be True or False, got {value!r}")
