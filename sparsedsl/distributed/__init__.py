"""Sequence-parallel sparse attention on ``torch.distributed``.

Each rank holds a shard of the sequence (:func:`shard`, :func:`unshard`);
:func:`sequence_parallel_attention` fetches from the other ranks only the key/value tiles
its query rows can attend to (:func:`exchange_plan` says which, from the pattern's
structure alone), holds keys and values for those tiles only, and runs the compiled
pattern on its rows. :func:`estimate` tells each rank's traffic, memory and work for any
size from the structure alone (a billion tokens over thousands of ranks included). See
``docs/distributed.md``.
"""

from __future__ import annotations

import importlib

#: Public name -> the module that defines it (imported on first use, so that the command
#: line can register ``estimate`` without importing torch).
_EXPORTS = {
    "ExchangeStats": ".attention",
    "sequence_parallel_attention": ".attention",
    "Estimate": ".costs",
    "RankEstimate": ".costs",
    "estimate": ".costs",
    "ExchangePlan": ".plan",
    "exchange_plan": ".plan",
    "owned_ranges": ".sharding",
    "shard": ".sharding",
    "unshard": ".sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
