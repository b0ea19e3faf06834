"""A sparsedsl pattern as a Hugging Face ``transformers`` attention implementation.

``register(pattern)`` adds the pattern to transformers' attention registry under a name;
a model built or switched to that name (``attn_implementation=name``,
``model.set_attn_implementation(name)``) computes every attention layer with
``sparsedsl.compile(pattern)``: one softmax over each query's allowed keys, grouped-query
attention included. transformers is imported by :func:`register`, not by this module or by
``import sparsedsl``.

Positions. Key ``j`` is slot ``j`` of the layer's keys: position ``j`` of the (padded)
input, or slot ``j`` of the KV cache. The queries of a call fill the slots right after the
ones filled before it, so query ``i`` is position ``q_offset + i`` with ``q_offset`` the
number of slots filled by earlier calls (0 for a forward without cache, the cache length
when decoding). transformers' cache reports that number to the mask function registered
here; a static cache's slots past the filled ones are left out of the attention. Without a
mask from that function (``attention_mask=None``), the queries are aligned to the end of the
keys (``q_offset = K - Q``), which is right for every cache that holds only filled slots.

The pattern replaces the model's own mask structure: causal, and also a configured sliding
window, which the pattern must state itself (transformers' ``sliding_window=w`` is
``causal() & window(w - 1, 0)``). Only the padding mask is taken from the model, combined by
intersection with ``documents``: with ids 1 on real tokens and 0 on padding, real queries see
the real keys the pattern allows and padding queries see padding keys only (their outputs
are meaningless but never NaN). Padding shifts positions: with left padding a row's first
real token is at its padding length, which changes the meaning of patterns that depend on
absolute positions (``global_tokens``, ``prefix``, ``chunks``, ``blocks``, ``dilated``) but
not of those that depend on ``q - k`` only (``causal``, ``window``, ``dilated_window``,
``strided``).

Refused with an error that says why: attention dropout in training, patterns that bind
tensors at call time (the model cannot pass them), a cache that dropped early keys (sliding
window cache layers), a model mask that forbids a query its previous position (packed
sequences given by ``position_ids`` alone, chunked attention), a prepared 4-D mask or
``BlockMask`` given as ``attention_mask``, variable-length inputs (``cu_seq_lens_q``: packed
sequences for flash attention, continuous batching), and the ``softcap``, attention sink and
position bias arguments of some models.

How the mask information reaches the layers. transformers builds one mask per forward with
the mask function registered under the same name and hands it to every layer as
``attention_mask``. Ours is a ``[B, 1, R, P]`` ``torch.int8`` tensor: ``P`` is the number of
slots filled after this call (``q_offset + Q``), and ``R = 1`` with ``mask[b, 0, 0, j]`` 1 if
slot ``j`` holds a real token and 0 if padding, or ``R = 0`` when no filled slot is padding.
Every value read from the device (is there padding, the static cache's length) is read once
per forward in the mask function; the layers read only the shape. A 4-D tensor is also what
``generate`` passes through unchanged when it builds masks ahead for static caches.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ..catalog import pattern_from_text
from ..compiler.module import CompiledPattern
from ..lang import nodes as n
from ..lang.queries import restrict

__all__ = ["MINIMUM_TRANSFORMERS", "PADDING_IDS", "SLOT_DTYPE", "PatternAttention",
           "read_slot_mask", "register", "slot_mask"]

#: The oldest transformers release whose attention and mask interfaces this module uses.
MINIMUM_TRANSFORMERS = (5, 17)
#: The ``documents`` tensor that carries the padding (patterns given to ``register`` bind no
#: tensors of their own, so no name can clash with it).
PADDING_IDS = "hf_padding_ids"
#: dtype of the slot tensor the mask function hands to the layers (see the module docstring).
SLOT_DTYPE = torch.int8
#: Names that may be registered: no ``/`` (transformers reads those as Hub kernels) and no
#: ``|`` (its ``paged|`` prefix).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")
#: Names registered by this module, and what each computes.
_REGISTERED: dict[str, "PatternAttention"] = {}


def register(pattern, name: str = "sparsedsl", *, block_size=128, kernel: str = "auto") -> str:
    """Register ``pattern`` as the transformers attention implementation ``name`` and
    return ``name``.

    ``pattern``: a :class:`sparsedsl.Pattern` or its text (read by
    :func:`sparsedsl.catalog.pattern_from_text`: the language, or catalog names); it must
    bind no tensors at call time (no ``documents``, ``.layout`` or ``bias``), as the model
    cannot pass them. ``block_size`` and ``kernel`` are :func:`sparsedsl.compile`'s.
    ``name`` is a new name or one registered here before (registering it again replaces its
    pattern; models already built with it use the new one from their next forward), never
    one of transformers' own implementations. Afterwards
    ``AutoModelForCausalLM.from_config(config, attn_implementation=name)`` or
    ``model.set_attn_implementation(name)`` runs the model with the pattern; the module
    docstring states the semantics (positions, padding, decoding, what is refused).
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
    if isinstance(pattern, str):
        pattern = pattern_from_text(pattern)
    elif not isinstance(pattern, n.Pattern):
        raise TypeError(
            f"register(): argument 'pattern' must be a sparsedsl Pattern or pattern text, got "
            f"{type(pattern).__name__}"
        )
    if pattern.buffer_names():
        raise ValueError(
            f"register(): argument 'pattern' is {pattern}, which binds tensor(s) "
            f"{sorted(pattern.buffer_names())} at call time; a transformers model cannot pass "
            f"them to its attention layers (its padding mask is applied without them)"
        )
    attention = PatternAttention(name, pattern, block_size=block_size, kernel=kernel)
    attention_interface.register(name, attention)
    mask_interface.register(name, slot_mask)
    _REGISTERED[name] = attention
    return name


class PatternAttention:
    """The attention function registered for one pattern: transformers calls it as
    ``(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
    ``query`` ``[B, H, Q, D]`` and ``key``/``value`` ``[B, H_kv, K, D]`` (``H_kv`` dividing
    ``H``), and it returns ``(output [B, Q, H, D], None)``: attention weights are never
    materialised."""

    def __init__(self, name: str, pattern: n.Pattern, *, block_size, kernel: str):
        self.name = name
        self.pattern = pattern
        self.attend = CompiledPattern(pattern, block_size=block_size, kernel=kernel)
        self.attend_padded = CompiledPattern(restrict(pattern, n.documents(PADDING_IDS)),
                                             block_size=block_size, kernel=kernel)

    def __repr__(self) -> str:
        return f"PatternAttention({self.name!r}, {self.pattern})"

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask, dropout: float = 0.0,
                 scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        where = f"attention implementation {self.name!r} ({self.pattern})"
        if dropout:
            raise ValueError(
                f"{where}: attention dropout is not supported (the kernels have none), got "
                f"dropout={dropout}; set the config's attention_dropout to 0.0 or call model.eval()"
            )
        for argument in ("softcap", "s_aux", "position_bias"):
            if kwargs.get(argument) is not None:
                raise NotImplementedError(
                    f"{where}: the model passes {argument!r}, which this integration does not "
                    f"apply (state score modifications in the pattern, e.g. .score(softcap(c)))"
                )
        if kwargs.get("cu_seq_lens_q") is not None:
            raise NotImplementedError(
                f"{where}: variable-length inputs (cu_seq_lens_q: packed sequences or "
                f"continuous batching) are not supported; give one sequence per row"
            )
        q_len, kv_len = query.shape[2], key.shape[2]
        filled, padding_ids = read_slot_mask(where, attention_mask, query.shape[0], q_len, kv_len)
        if filled < kv_len:  # a static cache: slots past the filled ones hold no token yet
            key, value = key[:, :, :filled], value[:, :, :filled]
        if padding_ids is None:
            out = self.attend(query, key, value, scale=scaling, q_offset=filled - q_len)
        else:
            out = self.attend_padded(query, key, value, scale=scaling, q_offset=filled - q_len,
                                     **{PADDING_IDS: padding_ids})
        return out.transpose(1, 2).contiguous(), None


def slot_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
              mask_function=None, attention_mask: torch.Tensor | None = None,
              device="cpu", **kwargs) -> torch.Tensor:
    """The mask function registered with every pattern (transformers'
    ``AttentionMaskInterface`` signature): the ``[B, 1, R, P]`` slot tensor described in the
    module docstring, for ``q_length`` queries after ``q_offset`` filled slots, from the
    ``[B, S]`` bool padding mask ``attention_mask`` (slots ``>= S`` count as padding, as in
    transformers; None: no padding).

    Refuses a cache whose keys do not start at slot 0 (``kv_offset > 0``: a sliding-window
    cache dropped them) and a model mask function that forbids some query its previous
    position, which the pattern would silently override."""
    if kv_offset:
        raise NotImplementedError(
            f"sparsedsl attention: the model's cache holds keys from position {kv_offset} on "
            f"(a sliding-window cache layer dropped the earlier ones), but patterns address "
            f"keys from position 0; build the model with sliding_window=None (and "
            f"use_sliding_window=False) and state the window in the pattern"
        )
    q_offset = int(q_offset)  # a static cache reports a tensor
    filled = q_offset + q_length
    if mask_function is not None:
        _check_previous_position_allowed(mask_function, batch_size, q_offset, filled, device)
    rows = torch.empty(batch_size, 1, 0, filled, dtype=SLOT_DTYPE, device=device)
    if attention_mask is None:
        return rows
    real = attention_mask[:, :filled].to(device=device, dtype=torch.bool)
    real = F.pad(real, (0, filled - real.shape[-1])).expand(batch_size, filled)
    if bool(real.all()):
        return rows
    return real.to(SLOT_DTYPE)[:, None, None, :]


def read_slot_mask(where: str, attention_mask, batch: int, q_len: int,
                   kv_len: int) -> tuple[int, torch.Tensor | None]:
    """``(filled slots P, [B, P] padding ids or None)`` from the ``attention_mask`` a layer
    received for ``q_len`` queries over ``kv_len`` key slots (see the module docstring);
    without a mask, every key slot is filled and nothing is padding."""
    if attention_mask is None:
        if kv_len < q_len:
            raise ValueError(
                f"{where}: {q_len} queries but only {kv_len} keys, and no mask says where the "
                f"queries are; queries must not outnumber the keys they are aligned to the end of"
            )
        return kv_len, None
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == SLOT_DTYPE
            and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
            and attention_mask.shape[2] in (0, 1)):
        shown = (f"a {attention_mask.dtype} tensor of shape {list(attention_mask.shape)}"
                 if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__)
        raise ValueError(
            f"{where}: attention_mask must be built by the mask function registered with the "
            f"pattern (give the model the 2-D padding mask), got {shown}"
        )
    filled = attention_mask.shape[-1]
    if attention_mask.shape[0] != batch or not q_len <= filled <= kv_len:
        raise ValueError(
            f"{where}: the mask covers {filled} positions of a batch of "
            f"{attention_mask.shape[0]}, but the layer has a batch of {batch} with {q_len} "
            f"queries over {kv_len} key slots"
        )
    return filled, (attention_mask[:, 0, 0, :] if attention_mask.shape[2] else None)


def _check_previous_position_allowed(mask_function, batch_size: int, q_offset: int, filled: int,
                                     device) -> None:
    """Raise unless the model's ``mask_function(b, h, q, k)`` allows every query ``q >= 1``
    of this call its previous position ``q - 1``: the model's causal and sliding-window
    masks do; packed sequences (``position_ids`` restarting, without a padding mask) and
    chunked attention forbid it at sequence and chunk starts, restrictions the pattern would
    override."""
    positions = torch.arange(max(q_offset, 1), filled, device=device)[None, :]
    if positions.numel() == 0:
        return
    batch = torch.arange(batch_size, device=device)[:, None]
    allowed = mask_function(batch, torch.zeros((), dtype=torch.long, device=device), positions,
                            positions - 1)
    if not bool(torch.as_tensor(allowed).all()):
        raise NotImplementedError(
            "sparsedsl attention: the model's own mask forbids some query its previous "
            "position (packed sequences given by position_ids without an attention_mask, or "
            "chunked attention); the pattern would override that, so it is refused. Pass an "
            "attention_mask, or one sequence per row"
        )


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
