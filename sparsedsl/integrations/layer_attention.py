"""What one attention layer of a transformers model computes at run time, from its
queries, keys, values and the slot tensor of :mod:`sparsedsl.integrations.slots`.

Keys. The call attends to the filled key slots ``0 .. P - 1`` (a static cache's empty
slots are left out); its ``Q`` queries are the last ``Q`` of them.

Positions. Without padding, slot ``j`` is position ``j``, and query ``i`` position
``P - Q + i``. With padding, a real query sees the real keys its pattern allows:

* a pattern that depends on ``q - k`` only (``causal``, ``window``, ``dilated_window``,
  ``strided``, their combinations, ``alibi`` and ``softcap`` scores) runs on slots as
  above, the padding slots masked out (as transformers' own masks do);
* a pattern that depends on absolute positions (``global_tokens``, ``prefix``,
  ``chunks``, ``dilated``, ``segments``, ``blocks``) counts positions from each row's
  first real token: a left-padded row attends exactly as the same tokens would alone.
  Padding after a row's first real token keeps its slots and is masked out. The outputs
  of padding queries before a row's first real token are zeros.

Under ``torch.compile`` this runs inside the opaque operator ``sparsedsl::attention``
(:mod:`sparsedsl.compiler.opaque`), which passes the layer's description as its context:
every value read from the device is read here, outside the graph.
"""

from __future__ import annotations

import threading

import torch

from ..compiler.module import CompiledPattern
from ..lang import nodes as n
from ..lang.queries import restrict
from .layer_patterns import Layer, LayerPatterns, WithinCheck, shift_invariant
from .slots import SlotReading, read_slots

#: The ``documents`` tensor that carries padding (registered patterns bind no tensors of
#: their own, so no name can clash with it).
PADDING_IDS = "hf_padding_ids"


class ModelAttention:
    """The run-time attention of one registration, for every layer of every model that
    uses it; called as the opaque operator calls a module:
    ``(q, k, v, *, scale, q_offset, return_lse, context, slots=None) -> out``, with
    ``[B, H, Q, D]`` queries, ``[B, H_kv, K, D]`` keys and values, ``context`` a layer's
    description (:func:`~sparsedsl.integrations.layer_patterns.layer_context`) and
    ``slots`` its ``[B, 1, 1, K]`` slot tensor (None: every key slot filled, no padding),
    given as ``traced_slots`` from a compiled graph.
    ``q_offset`` is not read (the slots say where the queries are) and ``return_lse``
    must be False."""

    def __init__(self, name: str, patterns: LayerPatterns, *, block_size, kernel: str):
        self.name, self.patterns = name, patterns
        self.block_size, self.kernel = block_size, kernel
        #: How errors name the implementation.
        self.where = f"attention implementation {name!r} ({patterns})"
        self._layers: dict[str, LayerAttention] = {}
        self._by_pattern: dict[tuple, LayerAttention] = {}
        self._lock = threading.Lock()

    def __call__(self, q, k, v, *, scale: float, q_offset=0, return_lse: bool = False,
                 context: str, slots: torch.Tensor | None = None,
                 traced_slots: torch.Tensor | None = None) -> torch.Tensor:
        if return_lse:
            raise ValueError(f"{self.where}: return_lse is not supported, got return_lse=True")
        if traced_slots is not None:  # from a compiled graph: read afresh (see read_slots)
            return self.layer(context)(q, k, v, traced_slots, scale, cached=False)
        return self.layer(context)(q, k, v, slots, scale)

    def layer(self, context: str) -> "LayerAttention":
        """The attention of the layer ``context`` describes (one per pattern and model
        pattern: layers with the same ones share it)."""
        attention = self._layers.get(context)
        if attention is not None:
            return attention
        layer = Layer.from_context(context)
        pattern = self.patterns.pattern_for(layer, self.where)
        key = (pattern, layer.model_pattern())
        with self._lock:
            if key not in self._by_pattern:
                self._by_pattern[key] = LayerAttention(layer, pattern, self.where,
                                                       block_size=self.block_size, kernel=self.kernel)
            self._layers[context] = self._by_pattern[key]
            return self._by_pattern[key]


class LayerAttention:
    """One layer's pattern, compiled plain and restricted to real tokens (see the module
    docstring for what a call computes)."""

    def __init__(self, layer: Layer, pattern: n.Pattern, where: str, *, block_size, kernel: str):
        self.layer, self.pattern, self.where = layer, pattern, where
        self.plain = CompiledPattern(pattern, block_size=block_size, kernel=kernel)
        self.padded = CompiledPattern(restrict(pattern, n.documents(PADDING_IDS)), block_size=block_size,
                                      kernel=kernel)
        self.shift_invariant = shift_invariant(pattern)
        self.within = WithinCheck(layer, pattern)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None,
                 scale: float, cached: bool = True) -> torch.Tensor:
        """``[B, H, Q, Dv]`` attention outputs of ``[B, H, Q, D]`` queries over
        ``[B, H_kv, K, D]`` keys and ``[B, H_kv, K, Dv]`` values (``cached``: see
        :func:`~sparsedsl.integrations.slots.read_slots`)."""
        q_len, kv_len = q.shape[2], k.shape[2]
        reading = None if slots is None else read_slots(slots, self.where, cached)
        if reading is not None and reading.window_differs(self.layer.window):
            cut = ("cuts some query's row with a sliding window" if self.layer.window is None else
                   f"does not cut the rows that sliding_window={self.layer.window} cuts")
            raise NotImplementedError(
                f"{self.where}: {self.layer.describe()} runs under a mask of the model's own that "
                f"{cut}: neither the model's call nor its configuration says so of this layer, "
                f"and a pattern would override that mask, so it is refused"
            )
        filled = kv_len if reading is None else reading.filled
        if filled < q_len:
            raise ValueError(
                f"{self.where}: {q_len} queries but only {filled} filled key slots; queries "
                f"must not outnumber the keys they are aligned to the end of"
            )
        self.within.check(filled, self.where)
        if filled < kv_len:
            k, v = k[:, :, :filled], v[:, :, :filled]
        q_offset = filled - q_len
        if reading is None or reading.ids is None:
            return self.plain(q, k, v, scale=scale, q_offset=q_offset)
        if self.shift_invariant:
            return self.padded(q, k, v, scale=scale, q_offset=q_offset, **{PADDING_IDS: reading.ids})
        return self._from_first_real(q, k, v, scale, q_offset, reading)

    def _from_first_real(self, q, k, v, scale: float, q_offset: int, reading: SlotReading) -> torch.Tensor:
        """Rows grouped by their first real slot, each group run with positions counted
        from it; queries before it get zeros."""
        batch, heads, q_len, _ = q.shape
        out = q.new_zeros(batch, heads, q_len, v.shape[-1])
        for (first, dense), rows in reading.groups().items():
            if first >= reading.filled:  # a row of padding only
                continue
            start = max(first - q_offset, 0)  # the first query at or after the first real slot
            index = torch.tensor(rows, device=q.device)
            q_rows = q.index_select(0, index)[:, :, start:]
            k_rows, v_rows = (t.index_select(0, index)[:, :, first:] for t in (k, v))
            offset = q_offset + start - first
            if dense:
                result = self.plain(q_rows, k_rows, v_rows, scale=scale, q_offset=offset)
            else:
                ids = reading.ids.index_select(0, index)[:, first:]
                result = self.padded(q_rows, k_rows, v_rows, scale=scale, q_offset=offset, **{PADDING_IDS: ids})
            out[index, :, start:] = result
        return out
