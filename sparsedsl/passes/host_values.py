"""Small host values (head maps, rule parameters) as device tensors, without synchronising."""

from __future__ import annotations

import torch


def on_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``. On CUDA the values go through
    pinned host memory and a non-blocking copy: a copy from pageable memory makes the host
    wait for every kernel queued before it, so a block-mask build of a few dozen small
    kernels would run them and its host work one after the other instead of overlapped."""
    host = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
