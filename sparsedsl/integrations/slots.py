"""The slot tensor: what a registered pattern's mask function hands to every layer of a
transformers model, and how a layer reads it at run time.

A slot tensor is ``[B, 1, 1, S]`` ``torch.int8`` with one code per batch row and key slot
``j`` (the layer's key ``j``):

* ``REAL`` (1): the slot holds a token;
* ``PADDING`` (0): the slot holds padding (0 in the model's 2-D attention mask, or past its
  end);
* ``EMPTY`` (-1): the slot is not filled yet (a static cache's slots past the filled ones);
  empty slots come after every filled one;
* ``MODEL_MASK_DIFFERS`` (-2): the slot holds a query of this call whose row of the
  model's own mask is not causal next to the diagonal: it forbids the query its previous
  position (packed sequences, chunked attention) or allows it the next one (bidirectional
  blocks). Reading such a tensor raises: a pattern would override that mask;
* ``REAL_NARROWER`` (2): a real query slot whose row of the model's mask forbids the first
  key slot before it (a sliding window cuts the row);
* ``REAL_WIDER`` (3): a real query slot whose row of the model's mask allows the key the
  configured ``sliding_window`` would cut (``q - w``; no window cuts the row).

The last two let a layer check, when it runs, that the window it was told of (by the
model's call or its configuration) is the one the model's mask applies
(:meth:`SlotReading.window_differs`).

The queries of a call are the last ``Q`` filled slots. The tensor is built with tensor
operations only, never reading a value from the device, so a model traced by
``torch.compile`` keeps it inside its graph; its shape follows the cache's size, not how
full the cache is, so a static cache's decoding steps share one graph. The values are read
when a layer runs (:func:`read_slots`), once per tensor: the layers of a forward share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: dtype of slot tensors.
SLOT_DTYPE = torch.int8
REAL, PADDING, EMPTY, MODEL_MASK_DIFFERS, REAL_NARROWER, REAL_WIDER = 1, 0, -1, -2, 2, 3
#: Readings kept, by tensor: a forward hands its layers one or two slot tensors.
_READINGS_KEPT = 8
_READINGS: OrderedDict[int, tuple[torch.Tensor, int, "SlotReading"]] = OrderedDict()
_LOCK = threading.Lock()


def build_slots(batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset: int,
                mask_function, attention_mask: torch.Tensor | None, device,
                window: int | None = None) -> torch.Tensor:
    """The slot tensor of a call with ``q_length`` queries at positions ``q_offset ..``
    (an int, or a 0-d tensor for a static cache) over ``kv_length`` key slots holding
    positions ``kv_offset ..``, from the ``[B, L]`` bool padding mask ``attention_mask``
    over positions ``0 .. L - 1`` (None: no padding) and the model's own
    ``mask_function(b, h, q, k)`` over absolute positions (None: not checked), probed at
    the configured sliding ``window`` (None: none configured)."""
    positions = torch.arange(kv_length, device=device) + kv_offset
    filled = positions < q_offset + q_length
    codes = torch.where(filled, REAL, EMPTY).expand(batch_size, kv_length)
    if attention_mask is not None:
        real = attention_mask[:, kv_offset:kv_offset + kv_length].to(device=device, dtype=torch.bool)
        real = F.pad(real, (0, kv_length - real.shape[-1]))
        codes = torch.where(filled & ~real, PADDING, codes)
    if mask_function is not None:
        codes = _mark_model_mask(codes, mask_function, q_length, q_offset, kv_offset, device, window)
    return codes.to(SLOT_DTYPE)[:, None, None, :]


def _mark_model_mask(codes: torch.Tensor, mask_function, q_length: int, q_offset, kv_offset: int,
                     device, window: int | None) -> torch.Tensor:
    """``codes`` with ``MODEL_MASK_DIFFERS`` on the query slots whose row of the model's
    mask forbids the previous position or allows the next one, and ``REAL_NARROWER`` or
    ``REAL_WIDER`` on the real ones whose row a window cuts or ``window`` would cut and
    does not (see the module docstring)."""
    batch_size, kv_length = codes.shape
    queries = (torch.arange(q_length, device=device) + q_offset)[None, :]
    rows = torch.arange(batch_size, device=device)[:, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    last = kv_offset + kv_length - 1

    def allowed(keys: torch.Tensor) -> torch.Tensor:
        result = mask_function(rows, head, queries, keys)
        return torch.as_tensor(result, device=device).expand(batch_size, q_length)

    previous = allowed((queries - 1).clamp(min=0)) | (queries == 0)
    following = allowed((queries + 1).clamp(max=last)) & (queries < last)
    narrower = ~allowed(torch.full_like(queries, kv_offset))
    wider = torch.zeros_like(narrower)
    if window is not None:
        cut = queries - window
        wider = allowed(cut.clamp(min=kv_offset)) & (cut >= kv_offset)
    slots = (queries - kv_offset).expand(batch_size, q_length)
    marked = codes.gather(1, slots)
    marked = torch.where((marked == REAL) & narrower, REAL_NARROWER,
                         torch.where((marked == REAL) & wider, REAL_WIDER, marked))
    marked = torch.where(~previous | following, MODEL_MASK_DIFFERS, marked)
    return codes.scatter(1, slots, marked)


@dataclass(frozen=True)
class SlotReading:
    """What a slot tensor says, read at run time.

    ``filled``: the number of filled slots (the keys a call attends to are ``0 ..
    filled - 1``). ``ids``: ``[B, filled]`` int8 on the tensor's device, 1 on real slots
    and 0 on padding, or None when no filled slot is padding. ``first_real[b]``: row
    ``b``'s first real slot (``filled`` when it has none); ``dense[b]``: whether every
    slot of row ``b`` from its first real one on is real. ``narrower``, ``wider``: whether
    some real query's row of the model's mask is cut by a window, or not cut where the
    configured window would cut it."""

    filled: int
    ids: torch.Tensor | None
    first_real: tuple[int, ...]
    dense: tuple[bool, ...]
    narrower: bool = False
    wider: bool = False

    def window_differs(self, window: int | None) -> bool:
        """Whether the model's mask contradicts a layer that attends within ``window``
        (None: causally, no window): a window cuts rows that the layer sees whole, or
        rows that the layer's window cuts are whole."""
        return self.narrower if window is None else self.wider

    def groups(self) -> dict[tuple[int, bool], list[int]]:
        """Rows by ``(first real slot, dense)``."""
        groups: dict[tuple[int, bool], list[int]] = {}
        for row, key in enumerate(zip(self.first_real, self.dense)):
            groups.setdefault(key, []).append(row)
        return groups


def read_slots(slots: torch.Tensor, where: str, cached: bool = True) -> SlotReading:
    """The reading of ``slots`` (``[B, 1, 1, S]``), made once per tensor and version: the
    layers of one forward read the same tensor. ``cached=False`` reads it afresh: a
    compiled graph may write a later slot tensor into the buffer of an earlier one (Inductor
    reuses buffers), which keeps the tensor's identity and version."""
    if not cached:
        return _read(slots, where)
    key = id(slots)
    with _LOCK:
        kept = _READINGS.get(key)
        if kept is not None and kept[0] is slots and kept[1] == slots._version:
            return kept[2]
    reading = _read(slots, where)
    with _LOCK:
        _READINGS[key] = (slots, slots._version, reading)  # holding the tensor keeps its id unique
        while len(_READINGS) > _READINGS_KEPT:
            _READINGS.popitem(last=False)
    return reading


def _read(slots: torch.Tensor, where: str) -> SlotReading:
    codes = slots[:, 0, 0, :]
    host = codes.cpu()
    if bool((host == MODEL_MASK_DIFFERS).any()):
        raise NotImplementedError(
            f"{where}: the model's own mask forbids some query its previous position or allows "
            f"it the next one (packed sequences given by position_ids without an "
            f"attention_mask, chunked or bidirectional attention); the pattern would override "
            f"that, so it is refused. Pass an attention_mask, or one causal sequence per row"
        )
    narrower, wider = bool((host == REAL_NARROWER).any()), bool((host == REAL_WIDER).any())
    filled = int((host[0] != EMPTY).sum())
    real = host[:, :filled] >= REAL
    if bool(real.all()):
        return SlotReading(filled, None, (0,) * len(host), (True,) * len(host), narrower, wider)
    first_real = [int(row.int().argmax()) if bool(row.any()) else filled for row in real]
    dense = [bool(row[first:].all()) for row, first in zip(real, first_real)]
    ids = (codes[:, :filled] >= REAL).to(SLOT_DTYPE)
    return SlotReading(filled, ids, tuple(first_real), tuple(dense), narrower, wider)
