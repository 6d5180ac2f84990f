"""Plain PyTorch engine: every gradient reduced by ``sync_gradients`` (one flat all-reduce per kind), AdamW for the
dense parameters, bf16 through autocast (the parameters stay fp32)."""

from __future__ import annotations

import math

import torch

from ...optim import dense_adamw
from ...optim.clip import scale_gradients, squared_norm
from ...parallel.grads import moe_parameter_kinds, sync_gradients
from .base import Engine, dense_param_groups


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model, groups, moe_opt, optim_cfg, precision: str, device: torch.device) -> None:
        super().__init__(model, groups, moe_opt, optim_cfg.grad_clip, device)
        self.dense_opt = dense_adamw(
            dense_param_groups(moe_parameter_kinds(model)["dense"], optim_cfg.weight_decay),
            lr=optim_cfg.lr,
            betas=(optim_cfg.beta1, optim_cfg.beta2),
            eps=optim_cfg.eps,
        )
        self.bf16 = precision == "bf16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, tokens, targets):
        with self.autocast():
            return self.model(tokens, targets)

    def backward(self, loss, micro_batches=1, last=True):
        (loss / micro_batches if micro_batches > 1 else loss).backward()
        if last:
            sync_gradients(self.model, self.groups, average=True)

    def step(self, lr, moe_lr, step, skip=False):
        self.measure_moe(step)
        dense = moe_parameter_kinds(self.model)["dense"]
        coef = self.combine(float(squared_norm(dense, self.device)), step)  # replicated after the sync: counted once
        self.skipped = skip or not math.isfinite(self.last_norm)
        if self.skipped:
            self.dense_opt.zero_grad(set_to_none=True)
            self.skip_moe()
            return self.last_norm
        scale_gradients(dense, coef)
        for group in self.dense_opt.param_groups:
            group["lr"] = lr
        self.dense_opt.step()
        self.dense_opt.zero_grad(set_to_none=True)
        self.step_moe(coef, moe_lr)
        return self.last_norm
