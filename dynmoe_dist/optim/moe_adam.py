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
from torch.optim.adam import adam
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import check
from .adamw import fused_runs_on

STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


class _Batch:
    """The tensors of one parameter group's update, handed to torch's fused AdamW kernel in one call: one pass over
    each parameter instead of one per elementwise op (about a tenth of the time on CPU). A parameter whose rows are at
    different steps goes in row by row, each row with its own step count and so its own bias correction."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []  # float32 copies of the counts before this step (the kernel adds one)

    def add(self, p: torch.Tensor, state: dict[str, torch.Tensor], per_row: bool) -> None:
        step = state["step"].to(torch.float32)
        if per_row:
            self.params += p.unbind(0)
            self.grads += p.grad.unbind(0)
            self.exp_avgs += state["exp_avg"].unbind(0)
            self.exp_avg_sqs += state["exp_avg_sq"].unbind(0)
            self.steps += step.unbind(0)
        else:
            self.params.append(p)
            self.grads.append(p.grad)
            self.exp_avgs.append(state["exp_avg"])
            self.exp_avg_sqs.append(state["exp_avg_sq"])
            self.steps.append(step.reshape(-1)[0])

    def run(self, group: dict) -> None:
        if not self.params:
            return
        beta1, beta2 = group["betas"]
        adam(
            self.params,
            self.grads,
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            fused=fused_runs_on(self.params),
            foreach=False,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


class MoEAdam(torch.optim.Optimizer):
    def __init__(
        self,
        row_params: Iterable[nn.Parameter],
        other_params: Iterable[nn.Parameter] = (),
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        scaled_rows: Iterable[nn.Parameter] = (),
        row_lr_scale: float = 1.0,
    ) -> None:
        """``scaled_rows``: row-wise parameters trained at ``lr * row_lr_scale`` (Top-Any's thresholds under
        ``optim.threshold_lr_scale``); every group keeps its ``lr_scale``, which a caller setting the rate applies."""
        check(lr >= 0, "lr", lr, "a learning rate >= 0")
        check(0 <= betas[0] < 1 and 0 <= betas[1] < 1, "betas", betas, "two numbers in [0, 1)")
        check(row_lr_scale >= 0, "row_lr_scale", row_lr_scale, "a factor >= 0")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rowwise": False}
        defaults["lr_scale"] = 1.0
        groups = [{"params": list(row_params), "rowwise": True}]
        scaled = list(scaled_rows)
        if scaled:
            groups.append({"params": scaled, "rowwise": True, "lr_scale": row_lr_scale, "lr": lr * row_lr_scale})
        other = list(other_params)
        if other:
            groups.append({"params": other, "rowwise": False})
        super().__init__(groups, defaults)
        self._same_step: WeakIdKeyDictionary = WeakIdKeyDictionary()

    @classmethod
    def for_moe(cls, model: nn.Module, threshold_lr_scale: float = 1.0, **kwargs) -> MoEAdam:
        """An optimizer over every MoE layer's gate and expert parameters of ``model``; the gates' thresholds (Top-Any)
        at ``threshold_lr_scale`` times the rate of the rest."""
        from ..layer import MoELayer

        rows, thresholds, other = [], [], []
        for m in model.modules():
            if isinstance(m, MoELayer):
                layer_rows = m.row_parameters()
                row_ids = {id(p) for p in layer_rows}
                scaled = set()
                if threshold_lr_scale != 1.0:  # one group of rows, as before the option, at the default
                    scaled = {id(p) for name, p in m.router.row_parameters().items() if name == "threshold"}
                for p in layer_rows:
                    (thresholds if id(p) in scaled else rows).append(p)
                other += [p for p in m.router.parameters() if id(p) not in row_ids]
        return cls(rows, other, scaled_rows=thresholds, row_lr_scale=threshold_lr_scale, **kwargs)

    def set_lr(self, lr: float) -> None:
        """Every group's rate: ``lr`` times the group's ``lr_scale``."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

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
            batch = _Batch()
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state_for(p, group["rowwise"])
                if p.numel():
                    batch.add(p, state, per_row=group["rowwise"] and not self.same_step(state["step"]))
                state["step"] += 1
            batch.run(group)
        return loss

    def same_step(self, step: torch.Tensor) -> bool:
        """Whether every row of a parameter is at the same step (true until adaptation adds a row): then the whole
        tensor is one update. Remembered per step tensor, which every change of rows replaces, so the check reads the
        device once per parameter, not once per step."""
        known = self._same_step.get(step)
        if known is None:
            known = self._same_step[step] = bool((step == step.reshape(-1)[0]).all()) if step.numel() else True
        return known

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
