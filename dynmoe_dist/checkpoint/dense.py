"""The dense side's state as one world-independent form: per parameter, its fp32 value and AdamW state.

    dense/<name>            fp32 value (the master copy where training runs in bf16)
    dense/<name>@exp_avg    AdamW moments, fp32
    dense/<name>@exp_avg_sq
    dense/<name>@step       AdamW's step count (float32 scalar, as torch keeps it)

Whoever holds it: a torch optimizer over the parameters themselves (the torch engine, DeepSpeed at ZeRO 0 in fp32),
DeepSpeed's bf16 wrapper (fp32 masters beside bf16 parameters), or ZeRO 1/2 (flat fp32 partitions, one slice per
rank, gathered and scattered through DeepSpeed's tensor-fragment API). So a checkpoint written under one engine and
ZeRO stage on one world size loads under another.
"""

from __future__ import annotations

import torch
from torch import nn

from ..optim.adamw import step_on_device

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def step_tensor(step: float, param: torch.Tensor, on_device: bool) -> torch.Tensor:
    """AdamW's step count as torch keeps it: a float32 scalar, on the CPU, or on the parameter's device for a fused
    optimizer (``on_device``)."""
    return torch.tensor(float(step), device=param.device if on_device else "cpu")


def adam_state(param: torch.Tensor, step: float = 0.0, on_device: bool = False) -> dict[str, torch.Tensor]:
    """A fresh AdamW state in torch's own layout."""
    return {
        "step": step_tensor(step, param, on_device),
        "exp_avg": torch.zeros_like(param, dtype=torch.float32),
        "exp_avg_sq": torch.zeros_like(param, dtype=torch.float32),
    }


class DenseState:
    """Read and write the dense state of ``named`` parameters held by ``optimizer`` (torch AdamW semantics)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
        self.named, self.opt = named, optimizer
        self.on_device = step_on_device(optimizer)

    def master(self, param: nn.Parameter) -> torch.Tensor:
        return param

    def read(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.named:
            master = self.master(p)
            state = self.opt.state.get(master) or adam_state(master, on_device=self.on_device)
            out[f"dense/{name}"] = master.detach().float().cpu()
            for key in STATE_KEYS:
                out[f"dense/{name}@{key}"] = state[key].detach().float().cpu()
            out[f"dense/{name}@step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(()).cpu()
        return out

    @torch.no_grad()
    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, p in self.named:
            master = self.master(p)
            value = tensors[f"dense/{name}"]
            master.copy_(value.to(master.device, master.dtype))
            if master is not p:
                p.copy_(value.to(p.device, p.dtype))
            state = adam_state(master, float(tensors[f"dense/{name}@step"]), self.on_device)
            for key in STATE_KEYS:
                state[key] = tensors[f"dense/{name}@{key}"].to(master.device, master.dtype).clone()
            self.opt.state[master] = state


class UnfusedMasters(DenseState):
    """DeepSpeed's bf16 wrapper at ZeRO 0: an fp32 master per bf16 parameter, the client optimizer over the masters."""

    def __init__(self, named, wrapper) -> None:
        super().__init__(named, wrapper.optimizer)
        self.masters = {
            id(p): m for ps, ms in zip(wrapper.fp16_groups, wrapper.fp32_groups) for p, m in zip(ps, ms, strict=True)
        }

    def master(self, param: nn.Parameter) -> torch.Tensor:
        return self.masters[id(param)]


class ZeroPartitions(DenseState):
    """ZeRO 1/2: each rank holds a slice of flat fp32 partitions and their AdamW state. Reading gathers (collective,
    every rank in the same order); writing sets this rank's fragments from the full tensors every rank loads."""

    def __init__(self, named, wrapper) -> None:
        super().__init__(named, wrapper.optimizer)
        self.wrapper = wrapper

    def ensure_state(self) -> None:
        """Make every partition's Adam state exist (zeros before the first step) and link DeepSpeed's fragments to it.

        Always relinked: DeepSpeed links once, right after stepping the first parameter group, when the later groups'
        state does not exist yet, so their fragments would otherwise stay empty.
        """
        for group in self.opt.param_groups:
            for flat in group["params"]:
                if not self.opt.state.get(flat):
                    self.opt.state[flat] = adam_state(flat, on_device=self.on_device)
        self.wrapper._hp_optimizer_states_linked = False
        self.wrapper._lazy_init_hp_params_optimizer_state()

    def step_count(self) -> float:
        steps = {float(self.opt.state[f]["step"]) for g in self.opt.param_groups for f in g["params"]}
        return max(steps, default=0.0)

    def read(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self.ensure_state()
        step = torch.tensor(self.step_count())
        out = {}
        for name, p in self.named:
            out[f"dense/{name}"] = safe_get_full_fp32_param(p).float().cpu()
            for key in STATE_KEYS:
                out[f"dense/{name}@{key}"] = safe_get_full_optimizer_state(p, key).float().cpu()
            out[f"dense/{name}@step"] = step.clone()
        return out

    @torch.no_grad()
    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.ensure_state()
        steps = set()
        for name, p in self.named:
            value = tensors[f"dense/{name}"].to(p.device, torch.float32)
            safe_set_full_fp32_param(p, value)
            p.copy_(value.to(p.dtype))  # every rank holds the whole low-precision parameter
            for key in STATE_KEYS:
                safe_set_full_optimizer_state(p, tensors[f"dense/{name}@{key}"].to(p.device, torch.float32), key)
            steps.add(float(tensors[f"dense/{name}@step"]))
        for group in self.opt.param_groups:
            for flat in group["params"]:
                self.opt.state[flat]["step"] = step_tensor(max(steps, default=0.0), flat, self.on_device)
