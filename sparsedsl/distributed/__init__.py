"""Sequence-parallel sparse attention on ``torch.distributed``.

Each rank holds a shard of the sequence (:func:`shard`, :func:`unshard`);
:func:`sequence_parallel_attention` fetches from the other ranks only the key/value tiles
its query rows can attend to (:func:`exchange_plan` says which, from the pattern's
structure alone), holds keys and values for those tiles only, and runs the compiled
pattern on its rows. :func:`estimate` tells each rank's traffic, memory and work for any
size from the structure alone (a billion tokens over thousands of ranks included). See
``docs/distributed.md``.
"""

from .attention import ExchangeStats, sequence_parallel_attention
from .estimate import Estimate, RankEstimate, estimate
from .plan import ExchangePlan, exchange_plan
from .sharding import owned_ranges, shard, unshard

__all__ = [
    "Estimate",
    "ExchangePlan",
    "ExchangeStats",
    "RankEstimate",
    "estimate",
    "exchange_plan",
    "owned_ranges",
    "sequence_parallel_attention",
    "shard",
    "unshard",
]
