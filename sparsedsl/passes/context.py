"""What a pass needs besides the pattern: sizes, head count, device and bound tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..budget import check_memory
from ..lang.checks import check_int
from ..lang.nodes import Pattern


class BufferBindingError(ValueError):
    """A tensor the pattern names was missing, unexpected, or of the wrong shape."""


def check_bound_tensors(where: str, pattern: Pattern, buffers: dict) -> None:
    """Raise :class:`BufferBindingError` unless ``buffers`` binds exactly the tensors
    ``pattern`` names, each a ``torch.Tensor``."""
    needed = pattern.buffer_names()
    missing = sorted(needed - buffers.keys())
    if missing:
        raise BufferBindingError(
            f"{where}: pattern {pattern} needs tensor(s) {missing} bound by keyword "
            f"(e.g. {missing[0]}=...), got {sorted(buffers) or 'none'}"
        )
    extra = sorted(buffers.keys() - needed)
    if extra:
        raise BufferBindingError(
            f"{where}: unexpected keyword tensor(s) {extra}: pattern {pattern} uses "
            f"{sorted(needed) or 'none'}"
        )
    for name, value in buffers.items():
        if not isinstance(value, torch.Tensor):
            raise BufferBindingError(
                f"{where}: buffer {name!r} must be a torch.Tensor, got {type(value).__name__}"
            )


#: Bytes held per head by what a context's passes return (a head's pair count, tile classes
#: and head pattern, as Python objects), checked before any of it is built.
PER_HEAD_BYTES = 256


@dataclass(frozen=True)
class Context:
    """Sizes and call-time tensors for evaluating a pattern.

    ``buffers`` maps the names used by ``documents(name)``, ``.layout(name)`` and
    ``bias(name)`` to tensors.
    """

    q_len: int
    kv_len: int
    heads: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    buffers: dict = field(default_factory=dict, compare=False, hash=False)
    #: The head each layer of tile states stands for, when tile classification gives one
    #: layer per group of heads that are allowed the same pairs
    #: (:func:`~sparsedsl.lang.queries.head_layers`); ``None``: a layer per head, in order.
    layers: tuple[int, ...] | None = None
    #: Derived tensors (random layouts, range tables) shared by the passes of one build.
    memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @staticmethod
    def make(pattern: Pattern, q_len, kv_len=None, heads=1, device=None, buffers=None,
             where: str = "sparsedsl") -> "Context":
        """Validate sizes and buffers against ``pattern`` and build a context."""
        q_len = check_int(where, "q_len", q_len, minimum=1)
        kv_len = q_len if kv_len is None else check_int(where, "kv_len", kv_len, minimum=1)
        heads = check_int(where, "heads", 1 if heads is None else heads, minimum=1)
        check_memory(where, f"the per-head results of heads={heads:,}", heads * PER_HEAD_BYTES)
        buffers = dict(buffers or {})
        check_bound_tensors(where, pattern, buffers)
        device = torch.device("cpu") if device is None else torch.device(device)
        return Context(q_len, kv_len, heads, device, buffers)

    def relative(self, size: int) -> "Context":
        """The context of a ``blocks(size).within(rule)`` rule: block-relative positions
        ``0 <= q, k < size``, same heads, layers and device, no tensors."""
        return Context(size, size, self.heads, self.device, layers=self.layers)

    def layer_heads(self) -> Sequence[int]:
        """The head each layer of tile states stands for: :attr:`layers`, or every head."""
        return range(self.heads) if self.layers is None else self.layers

    def memoized(self, key, make):
        """``make()`` computed once per context and ``key``."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def buffer(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def document_ids(self, name: str) -> torch.Tensor:
        """The ``[B, L]`` int64 ids of ``documents(name)`` on this context's device,
        checked to cover every query and key position (``L == max(q_len, kv_len)``)."""
        ids = self.buffers[name]
        length = max(self.q_len, self.kv_len)
        if ids.dim() not in (1, 2) or ids.shape[-1] != length or ids.is_floating_point() \
                or ids.is_complex() or ids.dtype == torch.bool:
            raise BufferBindingError(
                f"documents({name!r}): {name} must be an integer tensor of shape [{length}] or "
                f"[batch, {length}] (one id per position), got dtype={ids.dtype}, "
                f"shape={list(ids.shape)}"
            )
        return ids.reshape(-1, length).to(device=self.device, dtype=torch.int64)

    def block_layout(self, name: str, num_q_blocks: int, num_k_blocks: int) -> torch.Tensor:
        """The bool layout bound as ``name``, cropped or padded with False to the block grid
        of this context: ``[1 or H, nqb, nkb]``, or ``[B, 1 or H, nqb, nkb]`` for a layout
        with a batch axis."""
        layout = self.buffers[name]
        heads_axis = layout.dim() - 3
        if layout.dim() not in (2, 3, 4) or (layout.dim() >= 3 and layout.shape[heads_axis] not in (1, self.heads)):
            raise BufferBindingError(
                f"layout({name!r}): {name} must be a bool tensor of shape [nqb, nkb], "
                f"[{self.heads}, nqb, nkb] or [batch, {self.heads} or 1, nqb, nkb], got shape={list(layout.shape)}"
            )
        if layout.dtype != torch.bool:
            raise BufferBindingError(f"layout({name!r}): {name} must have dtype torch.bool, got {layout.dtype}")
        layout = (layout if layout.dim() >= 3 else layout[None]).to(self.device)
        lead = layout.shape[:-2]
        check_memory(f"layout({name!r})", f"a block layout of {' x '.join(map(str, lead))} x {num_q_blocks:,} x "
                     f"{num_k_blocks:,} blocks", lead.numel() * num_q_blocks * num_k_blocks)
        out = torch.zeros(*lead, num_q_blocks, num_k_blocks, dtype=torch.bool, device=self.device)
        rows, cols = min(num_q_blocks, layout.shape[-2]), min(num_k_blocks, layout.shape[-1])
        out[..., :rows, :cols] = layout[..., :rows, :cols]
        return out

    def document_positions(self, name: str) -> torch.Tensor:
        """``[B, L]`` int64: each position of ``documents(name)`` counted from the first
        position of its document (the first with the same id, in the same batch row), on
        this context's device, computed once per context."""
        def positions() -> torch.Tensor:
            ids = self.document_ids(name)
            order = torch.argsort(ids, dim=1)
            ordered = ids.gather(1, order)
            starts = torch.ones_like(ordered, dtype=torch.bool)
            starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
            group = starts.cumsum(1) - 1  # the document of each ordered position
            first = torch.zeros_like(order).scatter_reduce_(1, group, order, reduce="amin", include_self=False)
            first_of = torch.empty_like(order).scatter_(1, order, first.gather(1, group))
            return torch.arange(ids.shape[1], device=ids.device) - first_of
        return self.memoized(("document positions", name), positions)
