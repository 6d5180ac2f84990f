"""Single-process layer overhead: MoE layer forward+backward / the same expert matmuls alone on the same rows.

The floor is 1.0: everything above it is routing, permutation and combine. DESIGN.md section 8.
"""

from __future__ import annotations

import argparse
import platform

import torch

from ..layer import MoELayer
from .report import emit
from .timing import interleaved_medians

GATES = {"top2": {"kind": "top_k", "k": 2}, "top_any": {"kind": "top_any"}}


def measure(gate: str, tokens: int, d: int, d_ff: int, experts: int, activation: str, repeats: int) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(d, d_ff, experts, router=GATES[gate], activation=activation)
    x = torch.randn(tokens, d, requires_grad=True)
    grad_out = torch.randn(tokens, d)

    # the rows the layer really computes, frozen, for the matmul-only baseline
    with torch.no_grad():
        plan = layer.router(x)
        rows, segments, _ = layer.dispatcher.segments(x, plan)
    rows = rows.detach().requires_grad_(True)
    grad_rows = torch.randn_like(rows)

    def layer_step() -> None:
        y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [grad_out, torch.ones(())])

    def experts_only() -> None:
        layer.experts(rows, segments).backward(grad_rows)

    times = interleaved_medians({"layer": layer_step, "experts": experts_only}, repeats)
    layer.zero_grad(set_to_none=True)
    return {
        "gate": gate,
        "activation": activation,
        "tokens": tokens,
        "assignments": rows.shape[0],
        "avg_k": rows.shape[0] / tokens,
        "layer_ms": times["layer"] * 1e3,
        "experts_ms": times["experts"] * 1e3,
        "overhead_ratio": times["layer"] / times["experts"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dynmoe_dist.bench layer", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--gates", default="top2,top_any")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    rows = [measure(g, a.tokens, a.d_model, a.d_ff, a.experts, a.activation, a.repeats) for g in a.gates.split(",")]
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "experts": a.experts,
        "target": "overhead_ratio <= 1.15 for top2",
    }
    cols = ["gate", "activation", "tokens", "assignments", "avg_k", "layer_ms", "experts_ms", "overhead_ratio"]
    emit("layer", rows, cols, meta, a.json)
