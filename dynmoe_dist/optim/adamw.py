"""torch's AdamW for the dense parameters, on its fused kernel wherever that kernel runs.

The fused kernel makes one pass over each parameter instead of one per elementwise op (about a tenth of the
per-tensor loop's time on CPU, where torch does not choose it by itself); transformers' Trainer uses it by default
since torch 2.8. A torch AdamW otherwise: its state layout, and so checkpoints, are unchanged, except that the step
count lives on the parameter's device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused Adam kernels run; elsewhere torch's per-tensor loop


def fused_runs_on(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel takes these tensors (floating point, on a device it has a kernel for)."""
    tensors = list(tensors)
    return bool(tensors) and all(t.device.type in FUSED_DEVICES and t.is_floating_point() for t in tensors)


def dense_adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused where every parameter allows it. ``params``: parameters or
    parameter groups, as torch takes them."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return torch.optim.AdamW(params, fused=fused_runs_on(tensors) or None, **kwargs)


def step_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps its step counts on the parameters' device (fused or capturable, as torch does)."""
    return any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
