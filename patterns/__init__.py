"""The catalog of named sparse attention patterns, written in the sparsedsl language.

Each entry is a function with documented defaults that returns a
:class:`sparsedsl.Pattern`, and names the paper it comes from. Load one by name with
``sparsedsl.load(name, **params)`` (or ``sparsedsl.catalog.load``), or use a name in pattern
text, where the CLI accepts it too: ``sparsedsl count bigbird --seq-len 4096``,
``sparsedsl show "longnet(segment_lengths=[2048, 4096], dilation_rates=[1, 2]) & causal()"``.

==============================  ===========================================================
entry                           source
==============================  ===========================================================
``local_window``                ``dilated_attention_pytorch``
``dilated_sparse``              ``dilated_attention_pytorch``
``global_local``                ``dilated_attention_pytorch``
``block_sparse_dilated``        ``dilated_attention_pytorch``'s ``BlockSparseDilatedAttention``
``sliding_window``              Mistral 7B, arXiv:2310.06825
``longformer``                  Longformer, arXiv:2004.05150
``bigbird``                     BigBird, arXiv:2007.14062
``sparse_transformer_strided``  Sparse Transformer, arXiv:1904.10509
``sparse_transformer_fixed``    Sparse Transformer, arXiv:1904.10509
``longnet``                     LongNet, arXiv:2307.02486
``longnet_head_grouped``        ``dilated_attention_pytorch``'s ``DilatedAttention`` (LongNet)
``prefix_lm``                   T5, arXiv:1910.10683
``document_mask``               Llama 3, arXiv:2407.21783
``block_causal``                Block Diffusion, arXiv:2503.09573
``neighbourhood_1d``            Neighborhood Attention Transformer, arXiv:2204.07143
``neighbourhood_2d``            Neighborhood Attention Transformer, arXiv:2204.07143
``dilated_sliding_window``      Longformer, arXiv:2004.05150
``attention_sink``              StreamingLLM, arXiv:2309.17453
``document_prefix_lm``          T5, arXiv:1910.10683, packed
``sliding_tile``                Sliding Tile Attention, arXiv:2502.04507
``svg_spatial``                 Sparse VideoGen, arXiv:2502.01776
``svg_temporal``                Sparse VideoGen, arXiv:2502.01776
``video_sparse_attention``      VSA, arXiv:2505.13389
``deepspeed_fixed``             DeepSpeed ``FixedSparsityConfig``, arXiv:1904.10509
``deepspeed_variable``          DeepSpeed ``VariableSparsityConfig``, arXiv:1904.10509
``deepspeed_bslongformer``      DeepSpeed ``BSLongformerSparsityConfig``, arXiv:2004.05150
``deepspeed_bigbird``           DeepSpeed ``BigBirdSparsityConfig``, arXiv:2007.14062
==============================  ===========================================================
"""

from __future__ import annotations

from typing import Callable

from sparsedsl.lang.nodes import Pattern

from .attention_sink import attention_sink
from .bigbird import bigbird
from .block_causal import block_causal
from .deepspeed import deepspeed_bigbird, deepspeed_bslongformer, deepspeed_fixed, deepspeed_variable
from .dilated_sliding_window import dilated_sliding_window
from .document_mask import document_mask, document_prefix_lm
from .longformer import longformer
from .longnet import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS, longnet, longnet_head_grouped
from .neighbourhood import neighbourhood_1d, neighbourhood_2d
from .prefix_lm import prefix_lm
from .seed import block_sparse_dilated, dilated_sparse, global_local, local_window
from .sliding_tile import sliding_tile
from .sliding_window import sliding_window
from .sparse_transformer import sparse_transformer_fixed, sparse_transformer_strided
from .sparse_videogen import svg_spatial, svg_temporal
from .video_sparse import video_sparse_attention

#: Every catalog entry by name.
CATALOG: dict[str, Callable[..., Pattern]] = {
    f.__name__: f
    for f in (
        local_window, dilated_sparse, global_local, block_sparse_dilated, sliding_window,
        longformer, bigbird, sparse_transformer_strided, sparse_transformer_fixed, longnet,
        longnet_head_grouped, prefix_lm, document_mask, block_causal, neighbourhood_1d,
        neighbourhood_2d, dilated_sliding_window, attention_sink, document_prefix_lm, sliding_tile,
        svg_spatial, svg_temporal, video_sparse_attention, deepspeed_fixed, deepspeed_variable,
        deepspeed_bslongformer, deepspeed_bigbird,
    )
}


def names() -> list[str]:
    """The catalog's entry names, sorted."""
    return sorted(CATALOG)


__all__ = ["CATALOG", "PAPER_DILATION_RATES", "PAPER_SEGMENT_LENGTHS", "names", *CATALOG]
