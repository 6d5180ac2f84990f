"""The expert FFN's matrix products on CPU, oneDNN's against aten's (experts/cpu_gemm.py), in one process:

* ``product``: each of the six products of the FFN's forward and backward alone (rows @ w_in, h @ w_out, the two
  weight gradients with a transposed operand, the two input gradients with a transposed weight), same inputs;
* ``ffn``: the grouped FFN forward+backward over segments whose row counts change at every call, as a dropless
  layer's do (so oneDNN pays for the kernels of new shapes where the row padding does not spare them).

Both must agree to float32 rounding before anything is timed. ``onednn / aten`` below 1.0 is time saved.

Last, per shape, what ``gemm="auto"`` runs float32 experts of that shape class on at these threads, and why: the
CPU's vector extension, the library's own probe's ratio and the margin it had to beat (experts/cpu_gemm.py).
"""

from __future__ import annotations

import argparse

import torch

from dynmoe_dist.experts import ExpertBank
from dynmoe_dist.experts.cpu_gemm import ATEN, ONEDNN, auto_choice, onednn_usable, shape_class

from .report import emit
from .timing import interleaved_medians

# (d, d_ff): bench train's experts, and a wider model's
SHAPES = ((256, 1024), (1024, 4096))
ROWS = (256, 1024, 2048)


def products(rows: int, d: int, d_ff: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (a, b) of a @ b, in the orientations the FFN's segment loop passes them."""
    g = torch.Generator().manual_seed(0)
    x, h, dy = (torch.randn(rows, n, generator=g) for n in (d, d_ff, d))
    w_in, w_out = torch.randn(d, d_ff, generator=g), torch.randn(d_ff, d, generator=g)
    return {
        "x @ w_in": (x, w_in),
        "h @ w_out": (h, w_out),
        "h.t() @ dy (dw_out)": (h.t(), dy),
        "dy @ w_out.t()": (dy, w_out.t()),
        "x.t() @ dh (dw_in)": (x.t(), h),
        "dh @ w_in.t()": (h, w_in.t()),
    }


def ffn_case(d: int, d_ff: int, experts: int, mean_rows: int, calls: int) -> dict:
    """forward+backward closures of the grouped FFN, one per kernel, over a new set of segment sizes at each call."""
    g = torch.Generator().manual_seed(1)
    bank = ExpertBank(d, d_ff, list(range(experts)), "gelu", seed=2)
    plans = []
    for _ in range(calls):
        sizes = torch.randint(mean_rows // 2, mean_rows * 3 // 2, (experts,), generator=g).tolist()
        plans.append([(slot, n) for slot, n in enumerate(sizes)])
    inputs = [torch.randn(sum(n for _, n in p), d, generator=g) for p in plans]
    grads = [torch.randn(x.shape[0], d, generator=g) for x in inputs]

    def run(gemm: str):
        state = {"i": 0}

        def step() -> list[torch.Tensor]:
            i = state["i"] % calls
            state["i"] += 1
            bank.gemm = gemm
            x = inputs[i].clone().requires_grad_()
            y = bank(x, plans[i])
            got = torch.autograd.grad(y, [x, bank.w_in, bank.w_out], grads[i])
            return [y.detach(), *got]

        return step

    return {"onednn": run("onednn"), "aten": run("loop")}


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks cpu_gemm", description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shape", action="append", default=None, metavar="D,D_FF", help="instead of the default set")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts of the single products")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else SHAPES
    torch.set_num_threads(a.threads)
    if not onednn_usable(torch.zeros(1)):
        raise SystemExit("oneDNN does not serve float32 matmuls in this torch build or on this CPU: nothing to compare")
    rows = []
    for d, d_ff in shapes:
        for n in (int(v) for v in a.rows.split(",")):
            for name, (x, w) in products(n, d, d_ff).items():
                fns = {"onednn": lambda x=x, w=w: ONEDNN.mm(x, w), "aten": lambda x=x, w=w: ATEN.mm(x, w)}
                diff = rel_diff([fns["onednn"]()], [fns["aten"]()])
                if diff > 1e-5:
                    raise SystemExit(f"oneDNN's {name} differs from aten's by {diff:.1e} (relative) at {n} rows")
                t = interleaved_medians(fns, a.repeats)
                flops = 2 * x.shape[0] * x.shape[1] * w.shape[1]
                rows.append(
                    {"case": "product", "op": name, "rows": n, "d": d, "d_ff": d_ff}
                    | {"onednn_ms": t["onednn"] * 1e3, "aten_ms": t["aten"] * 1e3}
                    | {"onednn_gflops": flops / t["onednn"] / 1e9, "aten_gflops": flops / t["aten"] / 1e9}
                    | {"onednn_over_aten": t["onednn"] / t["aten"], "rel_diff": diff}
                )
        calls = 2 * a.repeats + 4
        fns = ffn_case(d, d_ff, experts=4, mean_rows=min(1024, max(16, 2**30 // (d * d_ff))), calls=calls)
        diff = rel_diff(fns["onednn"](), fns["aten"]())
        if diff > 1e-5:
            raise SystemExit(f"the grouped FFN on oneDNN differs from aten's by {diff:.1e} (relative) at d={d}")
        t = interleaved_medians(fns, a.repeats)
        rows.append(
            {"case": "ffn fwd+bwd, new sizes per call", "op": "4 experts, gelu", "rows": "0.5-1.5x mean", "d": d}
            | {"d_ff": d_ff, "onednn_ms": t["onednn"] * 1e3, "aten_ms": t["aten"] * 1e3}
            | {"onednn_over_aten": t["onednn"] / t["aten"], "rel_diff": diff}
        )
    for d, d_ff in shapes:
        choice = auto_choice(*shape_class(d, d_ff), torch.get_num_threads())
        rows.append(
            {"case": "auto's choice", "op": choice.kernel.name, "rows": "probe", "d": d, "d_ff": d_ff}
            | {"onednn_over_aten": choice.ratio, "capability": choice.capability, "margin": choice.margin}
            | {"reason": choice.reason}
        )
    meta = {"threads": a.threads, "dtype": "float32"}
    columns = ["case", "op", "rows", "d", "d_ff", "onednn_ms", "aten_ms", "onednn_gflops", "aten_gflops"]
    emit("cpu_gemm", rows, [*columns, "onednn_over_aten", "rel_diff", "capability", "margin"], meta, a.json)


if __name__ == "__main__":
    main()
