"""sparsedsl: a small language for sparse attention patterns, compiled to FlexAttention.

Describe a pattern with the vocabulary below (``window(256) | global_tokens(16)``), then
``sparsedsl.compile(pattern)`` it into an ``nn.Module`` that runs exact masked-softmax
attention, ``sparsedsl.dense(pattern, n)`` to materialise it, ``sparsedsl.parse(text)`` to
read its text form back.

``sparsedsl.distributed.sequence_parallel_attention`` runs a compiled pattern on a sequence
sharded over ``torch.distributed`` ranks; ``sparsedsl.integrations.transformers.register(
pattern)`` makes a pattern a Hugging Face transformers attention implementation
(transformers is imported only there).

Names are imported on first use, so that ``import sparsedsl`` (and the command line's
``--help``) does not import torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
import importlib.util

from ._source_tree import register_source_patterns

register_source_patterns()

#: Public name -> the module that defines it.
_EXPORTS = {
    "Counts": ".analysis.count",
    "TileCounts": ".analysis.count",
    "count": ".analysis.count",
    "NoClosedFormError": ".analysis.formula",
    "formula": ".analysis.formula",
    "load": ".catalog",
    "BLOCK_SIZES": ".compiler.module",
    "CompiledPattern": ".compiler.module",
    "compile": ".compiler.module",
    "Explanation": ".compiler.explanation",
    "PlanNotSupported": ".compiler.planner",
    "clear_caches": ".compiler.planner",
    "Call": ".plans.base",
    "Candidate": ".plans.base",
    "Plan": ".plans.base",
    "PatternArgumentError": ".lang.checks",
    "PatternOperandError": ".lang.checks",
    "MemoryBudgetError": ".budget",
    "memory_budget": ".budget",
    "set_memory_budget": ".budget",
    "using_memory_budget": ".budget",
    "ScoreFunctionError": ".passes.maskmod",
    **{name: ".lang.nodes" for name in (
        "Pattern", "alibi", "bias", "blocks", "causal", "chunks", "dilated", "dilated_window",
        "documents", "full", "global_tokens", "heads", "prefix", "segments", "softcap",
        "strided", "window", "dilated_heads", "longnet", "queries", "keys", "cycle_heads")},
    "PatternSyntaxError": ".lang.parse",
    "parse": ".lang.parse",
    **{name: ".modules" for name in (
        "BlockSparseAttention", "BlockSparseDilatedAttention", "DilatedAttention",
        "LongNetAttention", "MultiheadSparseAttention", "SparsePatternConfig")},
    "BufferBindingError": ".passes.context",
    "diagram": ".draw.diagram",
    "render": ".draw.render",
    "render_scores": ".draw.scores",
    "show": ".draw.terminal",
    "dense": ".passes.dense",
    "sequence_parallel_attention": ".distributed",
}

__all__ = sorted([*_EXPORTS, "distributed"])


def __getattr__(name: str):
    """Import a public name, or a subpackage (``sparsedsl.analysis``), on first use."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
