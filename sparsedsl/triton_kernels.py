"""Where sparsedsl's own Triton kernels run (the block-mask build's, the branches plan's
merge): on CUDA tensors, outside ``torch.compile``'s tracing (which compiles the tensor
operations they replace with the rest of the graph), where Triton can be imported. CUDA
builds of PyTorch ship it on Linux, not everywhere (Windows); without it the same tensor
operations as on the CPU run."""

from __future__ import annotations

import functools
import importlib.util

import torch


def runs_triton(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel of sparsedsl runs on ``tensor``."""
    return tensor.is_cuda and not torch.compiler.is_compiling() and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None
