"""Single-process layer cost against two floors, forward+backward on the same rows:

* the experts' floor: the same expert matmuls alone (``layer / experts``: everything above 1.0 is routing,
  permutation and combine; docs/ARCHITECTURE.md);
* the dense floor: one dense FFN of the same sizes over the same number of rows, one matmul chain on the experts'
  own kernels (``--gemm``; ``experts / dense``: what splitting the rows among many small experts costs; the GEMM
  floor fine-grained experts aim at);
* a padded batched matmul (``padded_bmm / dense``): the experts as one bmm over [experts, largest count, d], what
  capacity-based layers compute, on aten's kernels as they run it; its rows per assignment (``bmm_padding``) is the
  largest expert's count over the mean.

``--sweep`` runs the granularity sweep (8, 32, 64 and 128 experts; d 256 and 512; top-2), one row per shape.

``--ops`` counts instead of timing: the aten ops one layer forward+backward dispatches (top-2 and Top-Any, 8 and 64
experts, every expert kernel this build has), as dispatched here and as the same code dispatches on a GPU (where the
combine takes each piece in one go instead of cache-sized chunks), and the ops among them that would make the host
wait for a GPU (``op_count.py``). Each op is at least one kernel launch on a GPU.

``--memory`` measures instead of timing: the activation bytes one training forward saves for backward (caught by
``torch.autograd.graph.saved_tensors_hooks``; parameters and the layer's input left out), per routed row, against
the floor: the rows the expert GEMMs' backward needs (each row's input and pre-activation(s); the activation output
too on the grouped-GEMM path, which keeps it where the segment path recomputes it). The
router's own saved tensors ([tokens, experts] scores) are reported apart, per token.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dynmoe_dist.dispatch import LocalDispatcher, combine
from dynmoe_dist.experts import ExpertBank
from dynmoe_dist.experts.activations import GATED, PLAIN
from dynmoe_dist.experts.cpu_gemm import onednn_usable
from dynmoe_dist.experts.grouped import GEMMS
from dynmoe_dist.layer import MoELayer

from .op_count import OpCounter
from .report import emit
from .timing import interleaved_medians

GATES = {"top2": {"kind": "top_k", "k": 2}, "top_any": {"kind": "top_any"}}
SWEEP_EXPERTS = (8, 32, 64, 128)
SWEEP_D = (256, 512)
# (experts, target expert / dense floor), 1 thread, forward+backward: no worse than a padded batched matmul
FLOOR_TARGETS = {8: 1.05, 32: 1.12, 64: 1.30, 128: 1.45}


def sweep_shapes() -> list[tuple[int, int, int]]:
    """(experts, d, d_ff): d_ff = 4d at 8 experts, 2d from 32 on (finer experts, as fine-grained MoEs do)."""
    return [(e, d, 4 * d if e == 8 else 2 * d) for e in SWEEP_EXPERTS for d in SWEEP_D]


def padded_bmm(groups: int, rows: int, d: int, d_ff: int, activation: str):
    """forward+backward of the FFN as batched matmuls (``torch.matmul`` = bmm) over [groups, rows, d], a set of
    weights per group, in plain autograd on aten's kernels: what a capacity-based layer computes."""
    g = torch.Generator().manual_seed(1)
    lead = (groups,)
    x = torch.randn(*lead, rows, d, generator=g, requires_grad=True)
    w_in = (torch.randn(*lead, d, d_ff, generator=g) * d**-0.5).requires_grad_()
    w_out = (torch.randn(*lead, d_ff, d, generator=g) * d_ff**-0.5).requires_grad_()
    w_gate = (torch.randn(*lead, d, d_ff, generator=g) * d**-0.5).requires_grad_() if activation in GATED else None
    grad = torch.randn(*lead, rows, d, generator=g)
    leaves = [t for t in (x, w_in, w_out, w_gate) if t is not None]

    def step() -> None:
        for t in leaves:
            t.grad = None
        h = x @ w_in
        h = GATED[activation](x @ w_gate) * h if w_gate is not None else PLAIN[activation](h)
        (h @ w_out).backward(grad)

    return step


def dense_floor(rows: int, d: int, d_ff: int, activation: str, gemm: str):
    """forward+backward of one FFN over all rows on the experts' kernels: a one-expert bank, one segment."""
    bank = ExpertBank(d, d_ff, [0], activation, seed=1, gemm=gemm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=g, requires_grad=True)
    grad = torch.randn(rows, d, generator=g)

    def step() -> None:
        x.grad = None
        bank.zero_grad(set_to_none=True)
        bank(x, [(0, rows)]).backward(grad)

    return step


def measure(
    gate: str, tokens: int, d: int, d_ff: int, experts: int, activation: str, repeats: int, gemm: str = "auto"
) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(d, d_ff, experts, router=GATES[gate], activation=activation, gemm=gemm)
    x = torch.randn(tokens, d, requires_grad=True)
    grad_out = torch.randn(tokens, d)

    # the rows the layer really computes, frozen, for the matmul-only baseline
    with torch.no_grad():
        plan = layer.router(x)
        rows, segments, _ = layer.dispatcher.segments(x, plan)
    rows = rows.detach().requires_grad_(True)
    grad_rows = torch.randn_like(rows)

    # every step starts from no gradients, as a training step after zero_grad(set_to_none=True) does: accumulating
    # into existing gradients would charge the experts (128x the dense FFN's parameters at 128 experts) an extra
    # read-add-write of their whole gradient that a training step does not pay
    def layer_step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [grad_out, torch.ones(())])

    def experts_only() -> None:
        rows.grad = None
        layer.experts.zero_grad(set_to_none=True)
        layer.experts(rows, segments).backward(grad_rows)

    counts = [n for _, n in segments]
    steps = {
        "layer": layer_step,
        "experts": experts_only,
        "dense": dense_floor(rows.shape[0], d, d_ff, activation, gemm),
        "padded_bmm": padded_bmm(len(counts), max(counts), d, d_ff, activation),  # [E, largest count, d]
    }
    times = interleaved_medians(steps, repeats)
    layer.zero_grad(set_to_none=True)
    return {
        "gate": gate,
        "gemm": gemm,
        "activation": activation,
        "experts": experts,
        "d_model": d,
        "d_ff": d_ff,
        "tokens": tokens,
        "assignments": rows.shape[0],
        "avg_k": rows.shape[0] / tokens,
        "layer_ms": times["layer"] * 1e3,
        "experts_ms": times["experts"] * 1e3,
        "dense_ms": times["dense"] * 1e3,
        "overhead_ratio": times["layer"] / times["experts"],
        "experts_over_dense": times["experts"] / times["dense"],
        "layer_over_dense": times["layer"] / times["dense"],
        "padded_bmm_over_dense": times["padded_bmm"] / times["dense"],
        "bmm_padding": max(counts) * len(counts) / max(sum(counts), 1),
        "floor_target": FLOOR_TARGETS.get(experts),
    }


OPS_EXPERTS = (8, 64)


@contextlib.contextmanager
def unchunked_combine() -> Iterator[None]:
    """The combine and gather take each piece in one go, as they do on a GPU (``combine.chunk_rows``)."""
    saved = combine.CHUNK_BYTES
    combine.CHUNK_BYTES = 1 << 62
    try:
        yield
    finally:
        combine.CHUNK_BYTES = saved


def available_gemms(d: int, d_ff: int) -> list[str]:
    """The expert kernels this build runs float32 CPU rows on (``auto`` picks one of them)."""
    gemms = ["loop"]
    if onednn_usable(torch.zeros(1)):
        gemms.append("onednn")
    if hasattr(torch.nn.functional, "grouped_mm") and d % 4 == 0 and d_ff % 4 == 0:  # 16-byte rows
        gemms.append("grouped_mm")
    return gemms


def count_layer_ops(gate: str, tokens: int, d: int, d_ff: int, experts: int, gemm: str) -> dict:
    """Ops of one training forward+backward of the layer (after a warm-up one), here and on the GPU path."""
    torch.manual_seed(0)
    layer = MoELayer(d, d_ff, experts, router=GATES[gate], gemm=gemm, seed=1).train()
    x = torch.randn(tokens, d, requires_grad=True)
    grad_out = torch.randn(tokens, d)

    def step() -> OpCounter:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with OpCounter() as counter:
            y, aux = layer(x)
            torch.autograd.backward([y, aux.loss], [grad_out, torch.ones(())])
        return counter

    step()
    here = step()
    with unchunked_combine():
        gpu = step()
    return {
        "gate": gate,
        "gemm": gemm,
        "experts": experts,
        "d_model": d,
        "d_ff": d_ff,
        "tokens": tokens,
        "ops": here.total,
        "ops_gpu_path": gpu.total,
        "syncs_gpu_path": len(gpu.syncs),
        "top_ops_gpu_path": ", ".join(f"{name} {n}" for name, n in gpu.ops.most_common(5)),
    }


@dataclass(frozen=True)
class Saved:
    """One tensor a forward saved for backward: where (``router``, or ``after`` it), its shape and dtype, and its
    storage (views of one storage count once)."""

    phase: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    storage: int
    nbytes: int


def saved_for_backward(layer: MoELayer, x: torch.Tensor) -> tuple[list[Saved], object]:
    """Every activation one training forward of ``layer`` saves for backward (not its parameters, not ``x``), and
    what the forward returned (kept alive, so the saved tensors are too)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip = params | {x.untyped_storage().data_ptr()}
    phase = ["after"]
    saved: list[Saved] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.nbytes():
            saved.append(Saved(phase[0], tuple(t.shape), t.dtype, storage.data_ptr(), storage.nbytes()))
        return t

    def enter(*_):
        phase[0] = "router"

    def leave(*_):
        phase[0] = "after"

    hooks = [layer.router.register_forward_pre_hook(enter), layer.router.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(x)
    finally:
        for h in hooks:
            h.remove()
    return saved, out


def unique_bytes(saved: list[Saved]) -> int:
    return sum({s.storage: s.nbytes for s in saved}.values())


def floor_bytes_per_row(layer: MoELayer, dtype: torch.dtype) -> int:
    """What the expert GEMMs' backward keeps per routed row: its pre-activation (d_ff; two for a gated activation)
    and, where the rows are a tensor of their own, its input (d), in the rows' dtype. The activation output is an
    elementwise function of the pre-activations, recomputed in backward by the segment path (segment_ffn.py); the
    grouped-GEMM path (torch's grouped_mm under autograd) keeps it (one d_ff more). On one process the segment path
    gathers each expert's rows from the tokens itself (``ExpertUp``) and keeps no row input: the tokens are the
    layer's input, kept by the router anyway."""
    bank = layer.experts
    grouped = bank.gemm == "grouped_mm"
    kept = (2 if bank.w_gate is not None else 1) + grouped
    rows_kept = grouped or not isinstance(layer.dispatcher, LocalDispatcher)
    return (rows_kept * bank.d_model + kept * bank.d_ff) * torch.finfo(dtype).bits // 8


def measure_memory(gate: str, tokens: int, d: int, d_ff: int, experts: int, activation: str, gemm: str) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(d, d_ff, experts, router=GATES[gate], activation=activation, gemm=gemm, seed=1).train()
    x = torch.randn(tokens, d, requires_grad=True)
    saved, (_, aux) = saved_for_backward(layer, x)
    rows = aux.traffic.rows_computed
    after = [s for s in saved if s.phase == "after"]
    router = [s for s in saved if s.phase == "router"]
    per_row = unique_bytes(after) / max(rows, 1)
    floor = floor_bytes_per_row(layer, x.dtype)
    return {
        "gate": gate,
        "gemm": gemm,
        "activation": activation,
        "experts": experts,
        "d_model": d,
        "d_ff": d_ff,
        "tokens": tokens,
        "rows": rows,
        "saved_bytes_per_row": per_row,
        "floor_bytes_per_row": floor,
        "saved_over_floor": per_row / floor,
        "router_bytes_per_token": unique_bytes(router) / max(tokens, 1),
        "largest_after_router": str(max(after, key=lambda s: s.nbytes).shape) if after else "-",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks layer", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--gates", default="top2,top_any")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gemm", choices=GEMMS, default="auto", help="the experts' kernels (and the dense floor's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; the sweep uses 1)")
    p.add_argument("--sweep", action="store_true", help="granularity sweep: top-2 at every shape of sweep_shapes()")
    p.add_argument("--ops", action="store_true", help="count the ops of one forward+backward instead of timing")
    p.add_argument(
        "--ops-tokens", type=int, default=512, help="tokens for --ops (only the CPU combine's chunks depend on them)"
    )
    p.add_argument("--memory", action="store_true", help="activation bytes saved for backward instead of timing")
    p.add_argument("--json", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    threads = a.threads or (1 if a.sweep else None)
    if threads:
        torch.set_num_threads(threads)
    if a.ops:
        gemms = available_gemms(a.d_model, a.d_ff)
        rows = [
            count_layer_ops(g, a.ops_tokens, a.d_model, a.d_ff, e, gemm)
            for g in a.gates.split(",")
            for e in OPS_EXPERTS
            for gemm in gemms
        ]
        columns = ["gate", "gemm", "experts", "tokens", "ops", "ops_gpu_path", "syncs_gpu_path", "top_ops_gpu_path"]
        meta = {"threads": torch.get_num_threads(), "counted": "aten ops, one training forward+backward"}
        emit("layer_ops", rows, columns, meta, a.json)
        return
    if a.memory:
        gemms = available_gemms(a.d_model, a.d_ff)
        rows = [
            measure_memory(g, a.tokens, a.d_model, a.d_ff, e, a.activation, gemm)
            for g in a.gates.split(",")
            for e in OPS_EXPERTS
            for gemm in gemms
        ]
        columns = [
            "gate",
            "gemm",
            "experts",
            "rows",
            "saved_bytes_per_row",
            "floor_bytes_per_row",
            "saved_over_floor",
            "router_bytes_per_token",
            "largest_after_router",
        ]
        meta = {"threads": torch.get_num_threads(), "dtype": "float32", "measured": "saved_tensors_hooks, one forward"}
        emit("layer_memory", rows, columns, meta, a.json)
        return
    if a.sweep:
        rows = [measure("top2", a.tokens, d, f, e, a.activation, a.repeats, a.gemm) for e, d, f in sweep_shapes()]
    else:
        gates = a.gates.split(",")
        rows = [measure(g, a.tokens, a.d_model, a.d_ff, a.experts, a.activation, a.repeats, a.gemm) for g in gates]
    meta = {
        "threads": torch.get_num_threads(),
        "sweep": a.sweep,
        "targets": "overhead_ratio <= 1.15 for top2; experts_over_dense <= floor_target (1 thread)",
    }
    cols = [
        "gate",
        "gemm",
        "experts",
        "d_model",
        "d_ff",
        "assignments",
        "avg_k",
        "layer_ms",
        "experts_ms",
        "dense_ms",
        "overhead_ratio",
        "experts_over_dense",
        "layer_over_dense",
        "padded_bmm_over_dense",
        "bmm_padding",
        "floor_target",
    ]
    emit("layer_sweep" if a.sweep else "layer", rows, cols, meta, a.json)
