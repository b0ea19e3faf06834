"""Attention modules built on the compiler.

* :class:`SparsePatternConfig`, :class:`BlockSparseAttention`,
  :class:`BlockSparseDilatedAttention`: ``dilated_attention_pytorch``'s
  block-sparse API with exact softmax semantics (:mod:`sparsedsl.modules.seed`).
* :class:`LongNetAttention`: LongNet's dilated attention, every head running every branch;
  :class:`DilatedAttention`: its head-grouped form (:mod:`sparsedsl.modules.longnet`).
* :class:`MultiheadSparseAttention`: ``nn.MultiheadAttention``'s interface over any pattern
  (:mod:`sparsedsl.modules.multihead`).
"""

from .longnet import DilatedAttention, LongNetAttention
from .multihead import MultiheadSparseAttention
from .seed import BlockSparseAttention, BlockSparseDilatedAttention, SparsePatternConfig

__all__ = [
    "BlockSparseAttention",
    "BlockSparseDilatedAttention",
    "DilatedAttention",
    "LongNetAttention",
    "MultiheadSparseAttention",
    "SparsePatternConfig",
]
