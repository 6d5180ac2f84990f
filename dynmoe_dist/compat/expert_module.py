"""Read a torch expert module (what DeepSpeed-MoE copies per expert) as one row of our expert bank.

Accepted: ``nn.Sequential(Linear(d, f), <activation>, Linear(f, d))`` (dropout with p=0 allowed between), and gated
MLPs with three Linear children named ``w1, w2, w3`` (LLaMA/Mixtral: ``w2(act(w1 x) * w3 x)``) or ``gate_proj,
up_proj, down_proj`` (Hugging Face). The mapping is then checked on a probe input against the module's own forward,
so a module whose forward does something else is refused rather than silently converted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..experts.grouped import expert_ffn

SUPPORTED = (
    "nn.Sequential(nn.Linear(d, f), nn.GELU() | nn.GELU(approximate='tanh') | nn.ReLU() | nn.SiLU(), nn.Linear(f, d)), "
    "or a gated MLP with Linear children (w1, w2, w3) or (gate_proj, up_proj, down_proj) and a SiLU or GELU gate"
)
GATED_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down)


@dataclass
class ExpertSpec:
    """One expert in our layout: rows named as ExpertBank.weights() (w_in [d, f], w_out [f, d], ...)."""

    d_model: int
    d_ff: int
    activation: str
    bias: bool
    rows: dict[str, torch.Tensor]


def refuse(module: nn.Module, why: str) -> ConfigError:
    return ConfigError("expert", type(module).__name__, f"{SUPPORTED} ({why})")


def plain_activation(m: nn.Module) -> str | None:
    if isinstance(m, nn.GELU):
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    return {nn.ReLU: "relu", nn.SiLU: "silu"}.get(type(m))


def bias_rows(named: dict[str, nn.Linear], out_dims: dict[str, int]) -> dict[str, torch.Tensor]:
    """Biases of the Linear layers; where only some have one, the others get zeros (same function)."""
    if not any(lin.bias is not None for lin in named.values()):
        return {}
    return {
        name: (lin.bias.detach().clone() if lin.bias is not None else torch.zeros(out_dims[name]))
        for name, lin in named.items()
    }


def read_sequential(module: nn.Sequential, hidden_size: int) -> ExpertSpec:
    parts = [m for m in module if not (isinstance(m, nn.Dropout) and m.p == 0) and not isinstance(m, nn.Identity)]
    if any(isinstance(m, nn.Dropout) for m in parts):
        raise refuse(module, "dropout inside an expert is not supported; apply it after the MoE layer")
    if len(parts) != 3 or not isinstance(parts[0], nn.Linear) or not isinstance(parts[2], nn.Linear):
        raise refuse(module, f"got a Sequential of {[type(m).__name__ for m in module]}")
    act = plain_activation(parts[1])
    if act is None:
        raise refuse(module, f"activation {type(parts[1]).__name__} is not one of GELU, ReLU, SiLU")
    fc1, fc2 = parts[0], parts[2]
    rows = {"w_in": fc1.weight.detach().t().contiguous(), "w_out": fc2.weight.detach().t().contiguous()}
    biases = bias_rows({"b_in": fc1, "b_out": fc2}, {"b_in": fc1.out_features, "b_out": fc2.out_features})
    return ExpertSpec(hidden_size, fc1.out_features, act, bool(biases), {**rows, **biases})


def read_gated(module: nn.Module, hidden_size: int) -> ExpertSpec | None:
    children = dict(module.named_children())
    for gate, up, down in GATED_NAMES:
        if all(isinstance(children.get(n), nn.Linear) for n in (gate, up, down)):
            break
    else:
        return None
    act_module = next((m for m in children.values() if plain_activation(m) is not None), None)
    act = "geglu" if act_module is not None and plain_activation(act_module) == "gelu" else "swiglu"
    g, u, d = children[gate], children[up], children[down]
    rows = {
        "w_gate": g.weight.detach().t().contiguous(),
        "w_in": u.weight.detach().t().contiguous(),
        "w_out": d.weight.detach().t().contiguous(),
    }
    dims = {"b_gate": g.out_features, "b_in": u.out_features, "b_out": d.out_features}
    biases = bias_rows({"b_gate": g, "b_in": u, "b_out": d}, dims)
    return ExpertSpec(hidden_size, u.out_features, act, bool(biases), {**rows, **biases})


def read_expert(module: nn.Module, hidden_size: int) -> ExpertSpec:
    """The module as one expert row of our bank, verified on a probe input."""
    if isinstance(module, nn.Sequential):
        spec = read_sequential(module, hidden_size)
    else:
        spec = read_gated(module, hidden_size)
        if spec is None:
            raise refuse(module, f"its children are {[type(m).__name__ for m in module.children()]}")
    if spec.rows["w_in"].shape[0] != hidden_size or spec.rows["w_out"].shape[1] != hidden_size:
        raise refuse(module, f"it maps {spec.rows['w_in'].shape[0]} -> {spec.rows['w_out'].shape[1]}, not hidden_size")
    check_probe(module, spec)
    return spec


@torch.no_grad()
def check_probe(module: nn.Module, spec: ExpertSpec) -> None:
    p = next(module.parameters())
    x = torch.randn(8, spec.d_model, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    want = module(x)
    want = want[0] if isinstance(want, tuple) else want
    got = expert_ffn(x, {k: v.to(p.device, p.dtype) for k, v in spec.rows.items()}, spec.activation)
    tol = 1e-4 if p.dtype == torch.float32 else 2e-2
    err = float((want - got).abs().max() / want.abs().max().clamp(min=1e-6))
    if not err <= tol:
        raise refuse(module, f"its forward differs from the mapped {spec.activation} FFN by {err:.2e} (relative)")
