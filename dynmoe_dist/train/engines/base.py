"""What both engines share: the MoE side (gradient sync, MoEAdam, its half of the global norm) and the step contract.

A step is skipped on every rank (``engine.skipped``: no parameter, no optimizer state changes, gradients dropped) when
the caller says a rank saw a non-finite loss, or when the global norm is NaN or Inf: that norm is the same number on
every rank (reduced gradients), so every rank decides alike without another collective.

One step, on every rank:

    for each micro-batch of the step:                 # gradient accumulation: micro_batches of them
        loss, info = engine.forward(tokens, targets)  # the whole model
        engine.backward(loss, micro_batches, last)    # gradients scaled by 1/micro_batches, reduced after the last
    norm = engine.step(lr, moe_lr, step)              # one global norm over both sides, clip, both optimizers

Each rank's loss is the mean over its own tokens and every rank holds the same number, so gradients are averaged over
the world (DeepSpeed's convention) on both sides.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from ...layer import MoELayer
from ...optim import MoEAdam
from ...optim.clip import clip_coefficient, moe_squared_norm, scale_gradients
from ...parallel.grads import moe_parameter_kinds
from ...parallel.groups import ParallelGroups


def dense_param_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (and the tied embedding) decay, norms and biases do not."""
    decay, plain = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


class Engine:
    name = "base"

    def __init__(
        self, model: nn.Module, groups: ParallelGroups, moe_opt: MoEAdam, grad_clip: float, device: torch.device
    ) -> None:
        self.model, self.groups, self.moe_opt = model, groups, moe_opt
        self.grad_clip, self.device = grad_clip, device
        self.moe_sq = 0.0  # this step's MoE half of the squared norm
        self.last_norm = 0.0
        self.skipped = False  # the last step changed nothing: a non-finite loss or gradient norm

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        raise NotImplementedError

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of a forward outside ``forward`` (validation)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, micro_batches: int = 1, last: bool = True) -> None:
        """Accumulate ``loss / micro_batches``'s gradients; reduce them over the world on the ``last`` micro-batch."""
        raise NotImplementedError

    def step(self, lr: float, moe_lr: float, step: int, skip: bool = False) -> float:
        """Update both sides, or neither (``skip``, or a non-finite norm: ``self.skipped``); returns the global gradient
        norm before clipping."""
        raise NotImplementedError

    def measure_moe(self, step: int) -> None:
        self.moe_sq = float(moe_squared_norm(self.model, self.groups, self.device))

    def combine(self, dense_sq: float, step: int) -> float:
        """The global norm from both halves; returns the clip coefficient for both sides (1 for a non-finite norm,
        whose step is skipped)."""
        self.last_norm = math.sqrt(dense_sq + self.moe_sq) if dense_sq >= 0 else math.nan
        return clip_coefficient(self.last_norm, self.grad_clip) if math.isfinite(self.last_norm) else 1.0

    def skip_moe(self) -> None:
        """Drop this step's MoE gradients: no MoEAdam step, no per-step router update."""
        self.moe_opt.zero_grad(set_to_none=True)

    def step_moe(self, coef: float, moe_lr: float) -> None:
        kinds = moe_parameter_kinds(self.model)
        scale_gradients(kinds["gate"] + kinds["expert"], coef)
        self.moe_opt.set_lr(moe_lr)
        self.moe_opt.step()
        self.moe_opt.zero_grad(set_to_none=True)
        for layer in self.model.modules():
            if isinstance(layer, MoELayer):
                layer.on_optimizer_step()
