"""Compiled attention as one opaque operator, for models compiled with ``torch.compile``.

When a model that calls a :class:`~sparsedsl.compiler.module.CompiledPattern` is traced by
``torch.compile`` (``fullgraph=True`` included), the structural work of a call — tile
classification, block masks, choosing a plan — must not be traced: it reads tensor values
(``nonzero``), holds locks and caches, and depends on the sequence length. So under tracing
the call becomes the custom operator ``sparsedsl::attention``: Dynamo sees one node whose
output shapes follow from the input shapes (so a new sequence length needs no new graph
once the length is dynamic), and at run time the operator runs the module's ordinary
forward, with its caches: layers with the same pattern share lowerings, block masks and
compiled kernels.

Gradients: the backward operator ``sparsedsl::attention_backward`` recomputes the forward
with autograd and differentiates it, with respect to ``q``, ``k``, ``v`` and every bound
floating-point tensor that requires grad (a learned ``bias``), so a compiled training step
costs one extra forward per attention call (the plans' own backward kernels still run).

A module is named inside the graph by an integer handle into a registry with one module per
configuration (pattern, tiles, kernel), so patterns with Python score functions work too,
and copies of a module (``copy.deepcopy``, pickling) name the same configuration. A caller
that is not a :class:`~sparsedsl.compiler.module.CompiledPattern` (a model integration) may
register any callable that takes the same arguments, and pass it a ``context`` string: a
description of the call that is fixed when the graph is traced (which model layer calls),
so that what it implies is decided at run time, outside the graph.
"""

from __future__ import annotations

import threading

import torch

#: One module per configuration (pattern, tiles, kernel), by handle; held for the process.
_MODULES: list[torch.nn.Module] = []
_HANDLES: dict[tuple, int] = {}
_LOCK = threading.Lock()
_NAME_SEPARATOR = ","
#: The operators read tensor values when they run (tile states for a new length, a model's
#: slot tensor), which a CUDA graph capture cannot hold: Inductor leaves them out of CUDA
#: graphs (``mode="reduce-overhead"``).
_TAGS = (torch.Tag.cudagraph_unsafe,)


def handle_for(module: torch.nn.Module, configuration: tuple) -> int:
    """The handle of ``configuration`` (a hashable description of what ``module``
    computes), registering ``module`` to run it when the configuration is new."""
    with _LOCK:
        if configuration not in _HANDLES:
            _HANDLES[configuration] = len(_MODULES)
            _MODULES.append(module)
        return _HANDLES[configuration]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _run(handle: int, q, k, v, scale: float, q_offset: int, return_lse: bool, names: str, tensors,
         context: str):
    module = _MODULES[handle]
    buffers = dict(zip(names.split(_NAME_SEPARATOR), tensors)) if names else {}
    if context:
        buffers["context"] = context
    return module(q, k, v, scale=scale, q_offset=q_offset, return_lse=return_lse, **buffers)


@torch.library.custom_op("sparsedsl::attention", mutates_args=(), tags=_TAGS)
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, handle: int, scale: float,
                 q_offset: int, return_lse: bool, names: str, tensors: list[torch.Tensor],
                 context: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the registered module ``handle`` on ``[B, H, N, D]`` inputs;
    ``lse`` is empty unless ``return_lse``. ``names`` lists the bound tensors' keywords,
    comma-separated, in the order of ``tensors``; a non-empty ``context`` is passed to the
    module as the keyword ``context``."""
    with _eager_inside_operator():
        result = _run(handle, q, k, v, scale, q_offset, return_lse, names, tensors, context)
    if return_lse:
        out, lse = result
        return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()
    return result.contiguous(), q.new_empty(0)


@attention_op.register_fake
def _(q, k, v, handle, scale, q_offset, return_lse, names, tensors, context):
    batch, heads, q_len, _ = q.shape
    out = q.new_empty(batch, heads, q_len, v.shape[-1])
    lse = q.new_empty((batch, heads, q_len) if return_lse else (0,), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("sparsedsl::attention_backward", mutates_args=(), tags=_TAGS)
def attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor, q: torch.Tensor,
                          k: torch.Tensor, v: torch.Tensor, handle: int, scale: float,
                          q_offset: int, return_lse: bool, names: str, tensors: list[torch.Tensor],
                          context: str, differentiated: list[bool]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Gradients of ``q``, ``k``, ``v`` and of the bound tensors marked ``differentiated``
    (in their order) for :func:`attention_op`, by recomputing its forward with autograd
    (``grad_lse`` is used when ``return_lse``)."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    bound = [t.detach().requires_grad_() if wanted else t for t, wanted in zip(tensors, differentiated)]
    leaves = inputs + [t for t, wanted in zip(bound, differentiated) if wanted]
    with _eager_inside_operator(), torch.enable_grad():
        result = _run(handle, *inputs, scale, q_offset, return_lse, names, bound, context)
        outputs, grads = ([result[0], result[1]], [grad_out, grad_lse]) if return_lse else ([result], [grad_out])
        if return_lse:  # rows without keys have lse = -inf and no gradient through it
            finite = torch.isfinite(outputs[1])
            outputs[1] = torch.where(finite, outputs[1], 0.0)
            grads[1] = torch.where(finite, grads[1].to(outputs[1].dtype), 0.0)
        found = torch.autograd.grad(outputs, leaves, grads, allow_unused=True)
    dq, dk, dv, *bound_grads = (torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(found, leaves))
    return dq, dk, dv, bound_grads


#: The dispatch keys :func:`_eager_inside_operator` lifts the exclusion of.
_LIFTED_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView",
                "FuncTorchDynamicLayerFrontMode", "FuncTorchDynamicLayerBackMode", "FuncTorchBatched",
                "FuncTorchVmapMode", "FuncTorchGradWrapper")


def _eager_inside_operator():
    """The dispatch state of eager code inside an operator's implementation. The
    custom-operator machinery runs implementations with the autograd and functorch dispatch
    keys excluded (below autograd), where ``torch.autograd.grad`` of a recomputed forward
    would find no graph and ``torch.vmap`` (which runs a plain score function one element
    at a time) would fail; this guard lifts those exclusions (and keeps every other one,
    autocast's included) for its block."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for name in _LIFTED_KEYS:
        excluded = excluded.remove(getattr(torch._C.DispatchKey, name))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)


@attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, handle, scale, q_offset, return_lse, names, tensors, context, differentiated):
    bound_grads = [t.new_empty(t.shape) for t, wanted in zip(tensors, differentiated) if wanted]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bound_grads  # contiguous, as the real ones


def _setup_context(ctx, inputs, output):
    q, k, v, handle, scale, q_offset, return_lse, names, tensors, context = inputs
    ctx.save_for_backward(q, k, v, *tensors)
    ctx.arguments = (handle, scale, q_offset, return_lse, names, context)
    # A bound tensor that requires grad (a learned bias) gets its gradient too.
    ctx.differentiated = [t.requires_grad and t.is_floating_point() for t in tensors]


def _backward(ctx, grad_out, grad_lse):
    q, k, v, *tensors = ctx.saved_tensors
    handle, scale, q_offset, return_lse, names, context = ctx.arguments
    if grad_lse is None or not return_lse:
        grad_lse = q.new_zeros(0)
    dq, dk, dv, found = attention_backward_op(grad_out, grad_lse, q, k, v, handle, scale, q_offset,
                                              return_lse, names, tensors, context, ctx.differentiated)
    found = iter(found)
    bound_grads = [next(found) if wanted else None for wanted in ctx.differentiated]
    return dq, dk, dv, None, None, None, None, None, bound_grads, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def traced_attention(handle: int, q, k, v, scale: float, q_offset, return_lse: bool, buffers: dict,
                     context: str = ""):
    """The attention of module ``handle`` as :func:`attention_op` (inputs ``[B, H, N, D]``;
    ``q_offset`` may be a symbolic length)."""
    names = _NAME_SEPARATOR.join(buffers)
    out, lse = attention_op(q, k, v, handle, scale, q_offset, return_lse, names, list(buffers.values()),
                            context)
    return (out, lse) if return_lse else out
