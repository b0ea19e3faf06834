"""Which pattern each attention layer of a transformers model runs, and whether the
model's configuration allows it.

A layer's *model pattern* is what the model's configuration says it attends to, in the
semantics of transformers' masks (``masking_utils``): a full-attention layer is
``causal()``; a sliding-window layer with ``sliding_window=w`` lets query ``q`` see keys
``q - w < k <= q``, which is ``causal() & window(w - 1, 0)``; a configured
``attn_logit_softcapping`` ``c`` adds ``.score(softcap(c))``.

A registration gives one pattern for every layer, or patterns by layer type
(``"sliding_attention"``, ``"full_attention"``, the names of ``config.layer_types``) and
by layer index (an index wins over a type); layers it does not name run their model
pattern. A registered pattern may narrow what a layer attends to, never widen it: it must
allow no pair that the layer's model pattern forbids (checked on every length a layer
runs, and ahead of the first call on twice the layer's window and the pattern's own
sizes), and a model that softcaps its scores needs the same ``softcap(c)`` in the
pattern. A model whose configuration contradicts a pattern is refused with an error that
names the layer and says why.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

from ..analysis.count import count
from ..lang import nodes as n
from ..lang.queries import mask_part, score_mods, translation_period, walk

#: Layer types of models that name none (transformers' names).
FULL, SLIDING = "full_attention", "sliding_attention"
#: The first check of a pattern against a layer covers at most this many positions; longer
#: calls are checked at their own length.
FIRST_CHECK_LIMIT = 1 << 16
_SEPARATOR = "|"


def layer_context(index, layer_type: str, window, softcap, causal: bool, count_: int,
                  types: str) -> str:
    """The text that describes a layer to :meth:`Layer.from_context` (built where
    ``torch.compile`` traces the model, from configuration values only)."""
    return f"{index}|{layer_type}|{window}|{softcap!r}|{causal}|{count_}|{types}"


@dataclass(frozen=True)
class Layer:
    """What a model's configuration says about one attention layer: its ``index`` (None
    when the model does not number its layers), ``type``, sliding ``window`` (None for full
    attention), attention-score ``softcap`` (None: none), whether it is ``causal``, and the
    model's number of layers (``count``) and layer types (``types``)."""

    index: int | None
    type: str
    window: int | None
    softcap: float | None
    causal: bool
    count: int
    types: tuple[str, ...]

    @classmethod
    def from_context(cls, text: str) -> "Layer":
        index, layer_type, window, softcap, causal, count_, types = text.split(_SEPARATOR)
        return cls(None if index == "None" else int(index), layer_type,
                   None if window == "None" else int(window),
                   None if softcap == "None" else float(softcap), causal == "True", int(count_),
                   tuple(types.split(",")))

    def model_pattern(self) -> n.Pattern:
        """What the configuration says this layer attends to (see the module docstring)."""
        pattern = n.causal() if self.window is None else n.causal() & n.window(self.window - 1, 0)
        return pattern if self.softcap is None else pattern.score(n.softcap(self.softcap))

    @property
    def name(self) -> str:
        return "the layer" if self.index is None else f"layer {self.index}"

    def describe(self) -> str:
        window = "" if self.window is None else f", sliding_window={self.window}"
        return f"{self.name} ({self.type}{window}: {self.model_pattern()})"


class LayerPatterns:
    """The patterns of one registration (see the module docstring): ``every`` for every
    layer not named, ``by_type`` and ``by_index`` for the named ones."""

    def __init__(self, every: n.Pattern | None, by_type: dict[str, n.Pattern],
                 by_index: dict[int, n.Pattern]):
        self.every, self.by_type, self.by_index = every, dict(by_type), dict(by_index)

    def shift_invariant_on(self, layer_type: str, layer_types) -> bool:
        """Whether every pattern that can run on the layers of ``layer_type`` depends on ``q
        - k`` only (model patterns do). ``layer_types``: the model's type of every layer
        (``config.layer_types``), or None when every layer has that type."""
        indices = None if not layer_types else {i for i, t in enumerate(layer_types) if t == layer_type}
        patterns = [self.every, self.by_type.get(layer_type),
                    *(p for i, p in self.by_index.items() if indices is None or i in indices)]
        return all(shift_invariant(p) for p in patterns if p is not None)

    def key(self) -> tuple:
        """A hashable description of what the registration computes."""
        return (self.every, tuple(sorted(self.by_type.items())), tuple(sorted(self.by_index.items())))

    def __str__(self) -> str:
        parts = [] if self.every is None else [str(self.every)]
        parts += [f"{key!r}: {p}" for key, p in (*self.by_type.items(), *self.by_index.items())]
        return ", ".join(parts) or "the model's own patterns"

    def pattern_for(self, layer: Layer, where: str) -> n.Pattern:
        """The pattern ``layer`` runs; raises if the model's configuration contradicts the
        registration in a way that does not depend on lengths (see :func:`check_within`)."""
        self._check_names(layer, where)
        if not layer.causal:
            raise NotImplementedError(
                f"{where}: {layer.name} is bidirectional (the model is "
                f"configured with is_causal=False or bidirectional attention); registered "
                f"patterns run causal decoder layers only"
            )
        pattern = self.by_index.get(layer.index, self.by_type.get(layer.type, self.every))
        if pattern is None:
            return layer.model_pattern()
        caps = [mod.cap for mod in score_mods(pattern) if isinstance(mod, n.Softcap)]
        if layer.softcap is not None and caps != [layer.softcap]:
            stated = f"states softcap {caps}" if caps else "states no softcap"
            raise ValueError(
                f"{where}: {layer.describe()} softcaps its attention scores at {layer.softcap} "
                f"(attn_logit_softcapping), but the pattern registered for it, {pattern}, "
                f"{stated}; state the model's: {mask_part(pattern).score(n.softcap(layer.softcap))}"
            )
        return pattern

    def _check_names(self, layer: Layer, where: str) -> None:
        unknown = sorted(set(self.by_type) - set(layer.types))
        if unknown:
            raise ValueError(
                f"{where}: the registration names layer type(s) {unknown}, which this model "
                f"does not have (its layer types: {', '.join(layer.types)})"
            )
        beyond = sorted(i for i in self.by_index if i >= layer.count)
        if beyond:
            raise ValueError(
                f"{where}: the registration names layer index(es) {beyond}, but this model has "
                f"{layer.count} layers (0 to {layer.count - 1})"
            )


class WithinCheck:
    """Whether ``pattern`` allows no pair that ``layer``'s model pattern forbids, on the
    positions checked so far (see :meth:`check`)."""

    def __init__(self, layer: Layer, pattern: n.Pattern):
        self.layer, self.pattern = layer, pattern
        self.model_mask = mask_part(layer.model_pattern())
        self.excess = None if _inside(mask_part(pattern), self.model_mask) else mask_part(pattern) - self.model_mask
        window = layer.window or 0
        self._first = min(FIRST_CHECK_LIMIT, 2 * (window + _extent(pattern)) + 2)
        self._checked = 0
        self._lock = threading.Lock()

    def check(self, positions: int, where: str) -> None:
        """Raise unless the pattern stays inside the layer's model pattern on the first
        ``positions`` positions (queries and keys), checking ahead as the module docstring
        says; each length is checked once, and the checked length at least doubles."""
        if self.excess is None or positions <= self._checked:
            return
        with self._lock:
            if positions <= self._checked:
                return
            size = max(positions, self._first, 2 * self._checked)
            outside = count(self.excess, size, size).pairs
            if outside:
                inside = _intersection(mask_part(self.pattern), self.model_mask)
                cache = ("; with a cache its sliding layers drop early keys, which a pattern "
                         "that depends on absolute positions addresses, so generating needs the "
                         "latter" if not shift_invariant(inside) else "")
                remedy = (f"register a pattern inside it (such as {inside}), or build the model "
                          f"with sliding_window=None (Qwen: use_sliding_window=False) for its "
                          f"layers to see further{cache}" if self.layer.window is not None else
                          f"a causal layer sees no later key: register a pattern inside it "
                          f"(such as {inside})")
                raise ValueError(
                    f"{where}: {self.layer.describe()} attends within {self.model_mask}, but "
                    f"the pattern registered for it, {self.pattern}, allows {outside} pairs "
                    f"outside that on the first {size} positions; a pattern may narrow a "
                    f"layer's attention, not widen it: {remedy}"
                )
            self._checked = size


def _intersection(pattern: n.Pattern, mask: n.Pattern) -> n.Pattern:
    """``pattern & mask`` without repeating the parts of ``mask`` that ``pattern``
    already intersects with."""
    parts = pattern.parts if isinstance(pattern, n.Intersection) else (pattern,)
    wanted = mask.parts if isinstance(mask, n.Intersection) else (mask,)
    result = pattern
    for part in wanted:
        if part not in parts:
            result = result & part
    return result


def _inside(pattern: n.Pattern, mask: n.Pattern) -> bool:
    """Whether ``pattern`` is ``mask`` or an intersection that includes every part of it:
    inside it by its structure alone."""
    if pattern == mask:
        return True
    wanted = mask.parts if isinstance(mask, n.Intersection) else (mask,)
    parts = pattern.parts if isinstance(pattern, n.Intersection) else (pattern,)
    return all(part in parts for part in wanted)


def _extent(pattern: n.Pattern) -> int:
    """The largest size a pattern states (widths, counts, segment and block sizes; a
    block pattern's block size times its widest block rule): beyond a few times this, the
    pattern's structure repeats or stays the same."""
    largest = 0
    for node in walk(mask_part(pattern)):
        sizes = _integers(node)
        if isinstance(node, n.Blocks):
            sizes.append(node.size * (2 + max((v for rule in node.rules for v in _integers(rule)), default=0)))
        largest = max([largest, *sizes])
    return largest


def _integers(node) -> list[int]:
    if not dataclasses.is_dataclass(node):
        return []
    values = []
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, int) and not isinstance(v, bool):
                values.append(v)
    return values


def shift_invariant(pattern) -> bool:
    """Whether ``allowed(q, k)`` (and the scores) depend on ``q - k`` only, so that moving
    every position by the same amount changes nothing (a translation period of 1)."""
    return translation_period(pattern) == 1
