"""sparsedsl: a small language for sparse attention patterns, compiled to FlexAttention.

Describe a pattern with the vocabulary below (``window(256) | global_tokens(16)``), then
``sparsedsl.compile(pattern)`` it into an ``nn.Module`` that runs exact masked-softmax
attention, ``sparsedsl.dense(pattern, n)`` to materialise it, ``sparsedsl.parse(text)`` to
read its text form back.

``sparsedsl.distributed.sequence_parallel_attention`` runs a compiled pattern on a sequence
sharded over ``torch.distributed`` ranks; ``sparsedsl.integrations.transformers.register(
pattern)`` makes a pattern a Hugging Face transformers attention implementation
(transformers is imported only there).
"""

from ._source_tree import register_source_patterns

register_source_patterns()

from .analysis.count import Counts, TileCounts, count
from .analysis.formula import NoClosedFormError, formula
from .catalog import load
from .compiler.module import BLOCK_SIZES, CompiledPattern, compile
from .compiler.plan import Plan
from .lang.checks import PatternArgumentError
from .lang.nodes import (
    Pattern,
    alibi,
    bias,
    blocks,
    causal,
    chunks,
    dilated,
    dilated_window,
    documents,
    full,
    global_tokens,
    heads,
    prefix,
    segments,
    softcap,
    strided,
    window,
)
from .lang.parse import PatternSyntaxError, parse
from .modules import (
    BlockSparseAttention,
    BlockSparseDilatedAttention,
    DilatedAttention,
    MultiheadSparseAttention,
    SparsePatternConfig,
)
from .passes.context import BufferBindingError
from .draw.diagram import diagram
from .draw.render import render
from .draw.terminal import show
from .passes.dense import dense
from . import distributed
from .distributed import sequence_parallel_attention

__all__ = [
    "NoClosedFormError",
    "diagram",
    "formula",
    "render",
    "BlockSparseAttention",
    "BlockSparseDilatedAttention",
    "DilatedAttention",
    "MultiheadSparseAttention",
    "SparsePatternConfig",
    "load",
    "BLOCK_SIZES",
    "CompiledPattern",
    "Counts",
    "TileCounts",
    "Plan",
    "compile",
    "count",
    "distributed",
    "sequence_parallel_attention",
    "BufferBindingError",
    "Pattern",
    "PatternArgumentError",
    "PatternSyntaxError",
    "alibi",
    "bias",
    "blocks",
    "causal",
    "chunks",
    "dense",
    "dilated",
    "dilated_window",
    "documents",
    "full",
    "global_tokens",
    "heads",
    "parse",
    "prefix",
    "segments",
    "show",
    "softcap",
    "strided",
    "window",
]
