"""Sparsedsl patterns as a Hugging Face ``transformers`` attention implementation.

``register(patterns)`` adds an implementation to transformers' attention registry under a
name; a model built or switched to that name (``attn_implementation=name``,
``model.set_attn_implementation(name)``) computes its attention layers with
``sparsedsl.compile``: one softmax over each query's allowed keys, grouped-query attention
included (a model whose layers compute their own attention without transformers'
interface, such as Bloom, never calls it). transformers is imported by :func:`register`,
not by this module or by ``import sparsedsl``.

Patterns per layer (:mod:`sparsedsl.integrations.layer_patterns`). Each layer runs the
pattern registered for it (one for every layer, or by layer type or index), and a layer
not named runs what the model's configuration says: ``causal()`` for full attention,
``causal() & window(w - 1, 0)`` for transformers' ``sliding_window=w`` (the one the model
passes, else its configuration's), with ``.score(softcap(c))`` for
``attn_logit_softcapping=c``; a window the model's own mask contradicts is refused. A registered pattern may narrow a
layer's attention, never widen it; a configuration that contradicts it (a window the
pattern would exceed, a softcap it does not state) is refused with an error that names
the layer and says why.

Positions, padding, caches (:mod:`sparsedsl.integrations.layer_attention`). Key ``j`` is
slot ``j`` of the layer's keys; a call's queries are the last filled slots; a static
cache's empty slots are left out. With left padding, patterns that depend on ``q - k``
only run on slots with padding masked out, as transformers' masks do, and patterns that
depend on absolute positions (``global_tokens``, ``prefix``, ``chunks``, ...) count
positions from each row's first real token, so a padded row attends as the same tokens
alone would.

``torch.compile``. Nothing in a layer's traced code reads a value from the device: the
mask function registered with the patterns builds a slot tensor with tensor operations
(:mod:`sparsedsl.integrations.slots`), whose shape follows the cache's size, and under
tracing a layer is one call of the opaque operator ``sparsedsl::attention``
(:mod:`sparsedsl.compiler.opaque`), which reads the slots and resolves the layer's
pattern when it runs. ``torch.compile(model, fullgraph=True)`` therefore traces without
a graph break and needs no new graph per length once lengths are dynamic, and
``generate(cache_implementation="static")`` with transformers' compile runs its decoding
steps in one graph.

``output_attentions=True`` returns each layer's ``[B, H, Q, K]`` attention weights (zeros
where the pattern or padding forbids a key) when they take at most
:data:`ATTENTION_WEIGHTS_LIMIT` bytes, and raises otherwise.

Refused with an error that says why: attention dropout in training, patterns that bind
tensors at call time (the model cannot pass them), a model mask that is not causal next to
the diagonal (packed sequences given by ``position_ids`` alone, chunked or bidirectional
attention, image-token blocks), a prepared 4-D mask or ``BlockMask`` given as
``attention_mask``, variable-length inputs (``cu_seq_lens_q``), attention sinks and
position biases, bidirectional layers, and a cache that dropped early keys (sliding-window
cache layers) under a pattern that depends on absolute positions.
"""

from __future__ import annotations

import re

import torch

from ..catalog import pattern_from_text
from ..compiler.module import CompiledPattern
from ..compiler.opaque import handle_for, traced_attention
from ..lang import nodes as n
from .layer_attention import PADDING_IDS, ModelAttention
from .layer_patterns import FULL, SLIDING, LayerPatterns, layer_context
from .slots import SLOT_DTYPE, build_slots

__all__ = ["ATTENTION_WEIGHTS_LIMIT", "MINIMUM_TRANSFORMERS", "PADDING_IDS", "SLOT_DTYPE",
           "PatternAttention", "register", "slot_mask"]

#: The oldest transformers release whose attention and mask interfaces this module uses.
MINIMUM_TRANSFORMERS = (5, 17)
#: The most bytes of attention weights one layer returns for ``output_attentions=True``.
ATTENTION_WEIGHTS_LIMIT = 1 << 30
#: Names that may be registered: no ``/`` (transformers reads those as Hub kernels) and no
#: ``|`` (its ``paged|`` prefix).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
#: The keywords under which a layer's slot tensor reaches :class:`ModelAttention`, called
#: directly and from a compiled graph.
_SLOTS, _TRACED_SLOTS = "slots", "traced_slots"
#: Names registered by this module, and what each computes.
_REGISTERED: dict[str, "PatternAttention"] = {}


def register(patterns=None, name: str = "sparsedsl", *, block_size=128, kernel: str = "auto") -> str:
    """Register ``patterns`` as the transformers attention implementation ``name`` and
    return ``name``.

    ``patterns``: what the layers run (see the module docstring):

    * None: every layer runs its model pattern (what its configuration says);
    * a :class:`sparsedsl.Pattern` or its text (read by
      :func:`sparsedsl.catalog.pattern_from_text`: the language, or catalog names): every
      layer runs it;
    * a dict from layer types (``"full_attention"``, ``"sliding_attention"``: the names of
      ``config.layer_types``, or of every layer for a model with one sliding window or
      none) and layer indices (ints) to patterns or texts: the layers named run those, an
      index before a type, and the others their model pattern.

    A pattern must bind no tensors at call time (no ``documents``, ``.layout`` or
    ``bias``), as the model cannot pass them. ``block_size`` and ``kernel`` are
    :func:`sparsedsl.compile`'s. ``name`` is a new name or one registered here before
    (registering it again replaces its patterns; models already built with it use the new
    ones from their next forward), never one of transformers' own implementations. Names
    of layer types and indices are checked against a model when it first runs.
    """
    attention_interface, mask_interface = _transformers_interfaces()
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"register(): argument 'name' must be a name of letters, digits, '_', '.' or '-' "
            f"that starts with a letter or '_', got {name!r}"
        )
    if name not in _REGISTERED and (name == "eager" or name in attention_interface._global_mapping
                                    or name in mask_interface._global_mapping):
        raise ValueError(
            f"register(): argument 'name' is {name!r}, an attention implementation transformers "
            f"already has; choose another name"
        )
    layer_patterns = _layer_patterns(patterns)
    block_size = tuple(block_size) if isinstance(block_size, list) else block_size
    CompiledPattern(n.causal(), block_size=block_size, kernel=kernel)  # checks both options
    attention = PatternAttention(name, layer_patterns, block_size=block_size, kernel=kernel)
    attention_interface.register(name, attention)
    mask_interface.register(name, slot_mask)
    _REGISTERED[name] = attention
    return name


def _layer_patterns(patterns) -> LayerPatterns:
    if patterns is None:
        return LayerPatterns(None, {}, {})
    if not isinstance(patterns, dict):
        return LayerPatterns(_pattern(patterns, "patterns"), {}, {})
    by_type, by_index = {}, {}
    for key, value in patterns.items():
        argument = f"patterns[{key!r}]"
        if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
            by_index[key] = _pattern(value, argument)
        elif isinstance(key, str) and key:
            by_type[key] = _pattern(value, argument)
        else:
            raise TypeError(
                f"register(): the keys of argument 'patterns' must be layer types (names such as "
                f"{FULL!r} or {SLIDING!r}) or layer indices (ints >= 0), got {key!r}"
            )
    return LayerPatterns(None, by_type, by_index)


def _pattern(value, argument: str) -> n.Pattern:
    if isinstance(value, str):
        value = pattern_from_text(value)
    elif not isinstance(value, n.Pattern):
        raise TypeError(
            f"register(): argument {argument!r} must be a sparsedsl Pattern or pattern text, got "
            f"{type(value).__name__}"
        )
    if value.buffer_names():
        raise ValueError(
            f"register(): argument {argument!r} is {value}, which binds tensor(s) "
            f"{sorted(value.buffer_names())} at call time; a transformers model cannot pass "
            f"them to its attention layers (its padding mask is applied without them)"
        )
    return value


class PatternAttention:
    """The attention function registered for one set of patterns: transformers calls it
    as ``(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
    ``query`` ``[B, H, Q, D]`` and ``key``/``value`` ``[B, H_kv, K, D]`` (``H_kv``
    dividing ``H``), and it returns ``(output [B, Q, H, D], weights)``: the ``[B, H, Q, K]``
    attention weights for ``output_attentions=True``, else None. The layer is told apart by
    its configuration (``module.layer_idx``, ``config.layer_types``, and the
    ``sliding_window`` and ``softcap`` the model passes)."""

    def __init__(self, name: str, patterns: LayerPatterns, *, block_size, kernel: str):
        self.name, self.patterns = name, patterns
        self.runtime = ModelAttention(name, patterns, block_size=block_size, kernel=kernel)
        self.handle = handle_for(self.runtime, ("transformers", name, patterns.key(), block_size, kernel))

    def __repr__(self) -> str:
        return f"PatternAttention({self.name!r}, {self.patterns})"

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs):
        where = self.runtime.where
        if dropout:
            raise ValueError(
                f"{where}: attention dropout is not supported (the kernels have none), got "
                f"dropout={dropout}; set the config's attention_dropout to 0.0 or call model.eval()"
            )
        for argument in ("s_aux", "position_bias"):
            if kwargs.get(argument) is not None:
                raise NotImplementedError(
                    f"{where}: the model passes {argument!r}, which this integration does not "
                    f"apply (state score modifications in the pattern)"
                )
        if kwargs.get("cu_seq_lens_q") is not None:
            raise NotImplementedError(
                f"{where}: variable-length inputs (cu_seq_lens_q: packed sequences or "
                f"continuous batching) are not supported; give one sequence per row"
            )
        slots = _slots_of(where, attention_mask, query.shape[0], key.shape[2])
        context = _layer_context(module, kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = self._attend(query, key, value, slots, scale, context)
        weights = self._weights(where, query, key, slots, scale, context) if kwargs.get("output_attentions") else None
        return out.transpose(1, 2).contiguous(), weights

    def _attend(self, query, key, value, slots, scale: float, context: str) -> torch.Tensor:
        if torch.compiler.is_compiling():
            buffers = {} if slots is None else {_TRACED_SLOTS: slots}
            return traced_attention(self.handle, query, key, value, scale, 0, False, buffers, context)
        buffers = {} if slots is None else {_SLOTS: slots}
        return self.runtime(query, key, value, scale=scale, context=context, **buffers)

    def _weights(self, where: str, query, key, slots, scale: float, context: str) -> torch.Tensor:
        """``[B, H, Q, K]`` attention weights: the attention of identity values, so they are
        exactly those the outputs are made of."""
        batch, heads, q_len, _ = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        size = batch * heads * q_len * kv_len * query.element_size()
        if size > ATTENTION_WEIGHTS_LIMIT:
            raise ValueError(
                f"{where}: output_attentions=True asks for [{batch}, {heads}, {q_len}, {kv_len}] "
                f"attention weights per layer, {size} bytes, over the limit of "
                f"{ATTENTION_WEIGHTS_LIMIT} (sparsedsl.integrations.transformers."
                f"ATTENTION_WEIGHTS_LIMIT); ask for fewer tokens, or raise the limit"
            )
        identity = torch.eye(kv_len, dtype=query.dtype, device=query.device).expand(batch, kv_heads, kv_len, kv_len)
        return self._attend(query, key, identity, slots, scale, context)


def _layer_context(module, kwargs: dict) -> str:
    """The description of the calling layer (see :class:`PatternAttention`), from
    configuration values only. The layer's window is the ``sliding_window`` the model
    passes, else the configuration's (:func:`_configured_window`): some models apply
    their window through the mask alone."""
    config = getattr(module, "config", None)
    index = getattr(module, "layer_idx", None)
    types = getattr(config, "layer_types", None)
    typed = types[index] if types and index is not None else None
    window = kwargs.get("sliding_window") or _configured_window(config, typed)
    layer_type = typed or (SLIDING if window else FULL)
    causal = getattr(module, "is_causal", True) and getattr(config, "is_causal", True)
    return layer_context(index, layer_type, window, kwargs.get("softcap"), bool(causal),
                         getattr(config, "num_hidden_layers", 1),
                         ",".join(sorted(set(types))) if types else layer_type)


def _configured_window(config, layer_type: str | None) -> int | None:
    """The sliding window the configuration gives a layer of ``layer_type`` (None: the
    model names no layer types): ``config.sliding_window`` for sliding layers, and for
    every layer of a model that names no types unless ``use_sliding_window`` is False."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if layer_type is not None:
        return window if layer_type == SLIDING else None
    return window if getattr(config, "use_sliding_window", True) is not False else None


def _slots_of(where: str, attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """The layer's slot tensor, checked by shape only, or None without a mask."""
    if attention_mask is None:
        return None
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == SLOT_DTYPE
            and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
            and attention_mask.shape[2] == 1):
        shown = (f"a {attention_mask.dtype} tensor of shape {list(attention_mask.shape)}"
                 if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__)
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point()
                and attention_mask.dim() == 4 and attention_mask.shape[1] > 1):
            raise NotImplementedError(
                f"{where}: the model passes attention_mask as {shown}, scores per head: a "
                f"position bias folded into the mask (Falcon's ALiBi, for one), which this "
                f"integration does not apply; such models are not supported"
            )
        raise ValueError(
            f"{where}: attention_mask must be built by the mask function registered with the "
            f"patterns (give the model the 2-D padding mask), got {shown}"
        )
    if attention_mask.shape[0] != batch or attention_mask.shape[3] != kv_len:
        raise ValueError(
            f"{where}: the mask covers {attention_mask.shape[3]} key slots of a batch of "
            f"{attention_mask.shape[0]}, but the layer has {kv_len} key slots and a batch of {batch}"
        )
    return attention_mask


def slot_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function=None, attention_mask: torch.Tensor | None = None,
              device="cpu", config=None, **kwargs) -> torch.Tensor:
    """The mask function registered with every set of patterns (transformers'
    ``AttentionMaskInterface`` signature): the ``[B, 1, 1, kv_length]`` slot tensor of
    :mod:`sparsedsl.integrations.slots` for ``q_length`` queries at positions ``q_offset
    ..`` (an int, or a tensor for a static cache) over ``kv_length`` key slots from
    position ``kv_offset`` on, from the ``[B, S]`` bool padding mask ``attention_mask``
    (slots past it count as padding, as in transformers; None: no padding) and the model's
    ``mask_function``, probed at the configured sliding window (so that each layer checks
    the window it runs against the model's mask). Reads no value from the device.

    Refuses a cache that dropped early keys (``kv_offset > 0``: the model's sliding-window
    cache layers) when a pattern registered for ``config``'s sliding layers depends on
    absolute positions."""
    registered = _REGISTERED.get(getattr(config, "_attn_implementation", None))
    if kv_offset and registered is not None and not registered.patterns.shift_invariant_on(
            SLIDING, getattr(config, "layer_types", None)):
        raise NotImplementedError(
            f"{registered.runtime.where}: the model's cache holds keys from position "
            f"{kv_offset} on for its sliding layers (a sliding-window cache layer dropped the "
            f"earlier ones), but a pattern registered for them depends on absolute positions, "
            f"which address keys from position 0; register a pattern of q - k only (such as "
            f"windows) for the sliding layers, or build the model with sliding_window=None (and "
            f"use_sliding_window=False) and state the window in the pattern"
        )
    return build_slots(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                       attention_mask, device, _configured_window(config, SLIDING))


def _transformers_interfaces():
    """transformers' ``(AttentionInterface, AttentionMaskInterface)``, or an ImportError
    that says which version to install."""
    wanted = ".".join(map(str, MINIMUM_TRANSFORMERS))
    try:
        import transformers
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            f"sparsedsl.integrations.transformers needs the transformers package, version "
            f"{wanted} or later: pip install 'transformers>={wanted}'"
        ) from error
    version = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    if version < MINIMUM_TRANSFORMERS:
        raise ImportError(
            f"sparsedsl.integrations.transformers needs transformers {wanted} or later, found "
            f"{transformers.__version__}: pip install -U 'transformers>={wanted}'"
        )
    return AttentionInterface, AttentionMaskInterface
