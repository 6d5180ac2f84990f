"""MoEAdam: AdamW for the parameters that change shape when experts come and go.

Row-wise parameters (gate rows W and G, stacked expert weights) have the expert as their leading dimension; their
optimizer state has the same leading dimension, and the step count is kept per row, so a new expert starts at step 0
(with bias correction of its own) while the others go on. That makes state sliceable, appendable and movable by
expert: ``rows_of`` / ``install_rows`` are what the adaptation protocol uses. Other MoE parameters (a temperature, null
expert logits) are ordinary AdamW parameters. Dense parameters stay with their own optimizer (DeepSpeed or torch).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import check

STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


class MoEAdam(torch.optim.Optimizer):
    def __init__(
        self,
        row_params: Iterable[nn.Parameter],
        other_params: Iterable[nn.Parameter] = (),
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check(lr >= 0, "lr", lr, "a learning rate >= 0")
        check(0 <= betas[0] < 1 and 0 <= betas[1] < 1, "betas", betas, "two numbers in [0, 1)")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rowwise": False}
        groups = [{"params": list(row_params), "rowwise": True}]
        other = list(other_params)
        if other:
            groups.append({"params": other, "rowwise": False})
        super().__init__(groups, defaults)

    @classmethod
    def for_moe(cls, model: nn.Module, **kwargs) -> MoEAdam:
        """An optimizer over every MoE layer's gate and expert parameters of ``model``."""
        from ..layer import MoELayer

        rows, other = [], []
        for m in model.modules():
            if isinstance(m, MoELayer):
                row_ids = {id(p) for p in m.row_parameters()}
                rows += m.row_parameters()
                other += [p for p in m.router.parameters() if id(p) not in row_ids]
        return cls(rows, other, **kwargs)

    def state_for(self, p: nn.Parameter, rowwise: bool) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            shape = (p.shape[0],) if rowwise else ()
            state["step"] = torch.zeros(shape, dtype=torch.int64, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state_for(p, group["rowwise"])
                state["step"] += 1
                step = state["step"].to(p.dtype).reshape(state["step"].shape + (1,) * (p.dim() - state["step"].dim()))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                bias1 = 1 - beta1**step
                bias2 = 1 - beta2**step
                denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                p.addcdiv_(state["exp_avg"] / bias1, denom, value=-group["lr"])
        return loss

    def rows_of(self, p: nn.Parameter, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Optimizer state of the given rows of a row-wise parameter (zeros and step 0 if it never stepped)."""
        state = self.state_for(p, True)
        return {k: state[k].index_select(0, rows) for k in STATE_KEYS}

    def install_rows(self, module: nn.Module, name: str, data: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Replace the row-wise parameter ``module.<name>`` by a new one holding ``data``, with its new state.

        A new Parameter, not new ``.data``: autograd caches a leaf's shape in its gradient accumulator, which
        outlives the step whenever the last loss is still referenced, and a reshaped ``.data`` would then fail the
        next backward.
        """
        old = getattr(module, name)
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        setattr(module, name, new)
        for group in self.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        self.state.pop(old, None)
        self.state[new] = {k: state[k] for k in STATE_KEYS}
