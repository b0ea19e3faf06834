"""Sequence-parallel sparse attention on ``torch.distributed``.

Each rank holds a shard of the sequence (:func:`shard`, :func:`unshard`);
:func:`sequence_parallel_attention` fetches from the other ranks only the key/value tiles
its query rows can attend to (:func:`exchange_plan` says which, from the pattern's
structure alone) and runs the compiled pattern on its rows. See ``docs/distributed.md``.
"""

from .attention import ExchangeStats, sequence_parallel_attention
from .plan import ExchangePlan, exchange_plan
from .sharding import owned_ranges, shard, unshard

__all__ = [
    "ExchangePlan",
    "ExchangeStats",
    "exchange_plan",
    "owned_ranges",
    "sequence_parallel_attention",
    "shard",
    "unshard",
]
