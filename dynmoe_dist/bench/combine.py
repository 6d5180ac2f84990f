"""The weighted combine alone, forward+backward: the fused op (``dispatch/combine.py``) against the plain autograd ops
it replaces (cat of the pieces, weighted rows, ``index_add``), interleaved in one process on the same inputs.

Shapes: the layer's tokens and width, top-k assignments, in the pieces the expert-parallel dispatcher hands over (own
rows in two halves, received rows: three) or one piece (the single-process dispatcher). Both must give bitwise the
same output and gradients before anything is timed. ``fused / plain`` below 1.0 is time saved per MoE layer and step.
"""

from __future__ import annotations

import argparse
import platform

import torch

from ..dispatch.combine import combine_rows, combine_rows_reference
from .report import emit
from .timing import interleaved_medians

# (tokens, d, k, pieces): bench train's layer (4096 tokens per rank, d 256, top-2) in both dispatchers' pieces, a wider
# model, and a larger batch
SHAPES = ((4096, 256, 2, 3), (4096, 256, 2, 1), (4096, 1024, 2, 3), (16384, 256, 2, 3), (4096, 256, 4, 3))


def case(tokens: int, d: int, k: int, pieces: int, dtype: torch.dtype):
    """A forward+backward closure per implementation over the same leaves (each token routed k times)."""
    g = torch.Generator().manual_seed(0)
    a = tokens * k
    token = torch.arange(tokens).repeat_interleave(k)[torch.randperm(a, generator=g)]
    weight = torch.rand(a, generator=g).requires_grad_()
    sizes = [a // 4, a // 4, a - 2 * (a // 4)] if pieces == 3 else [a]
    rows = [torch.randn(n, d, generator=g).to(dtype).requires_grad_() for n in sizes]
    grad = torch.randn(tokens, d, generator=g).to(dtype)

    def run(fn):
        def step() -> list[torch.Tensor]:
            for t in (weight, *rows):
                t.grad = None
            out = fn(rows, token, weight, tokens)
            out.backward(grad)
            return [out.detach(), weight.grad, *(r.grad for r in rows)]

        return step

    return {"fused": run(combine_rows), "plain": run(combine_rows_reference)}


def max_abs_diff(fns: dict) -> float:
    """Largest difference between the two implementations' output and gradients (0.0: bitwise the same)."""
    fused, plain = fns["fused"](), fns["plain"]()
    return max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(fused, plain))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dynmoe_dist.bench combine", description=__doc__)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--shape",
        action="append",
        default=None,
        metavar="TOKENS,D,K,PIECES",
        help="a shape to time instead of the default set (repeatable); PIECES is 1 or 3",
    )
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] if a.shape else SHAPES
    rows = []
    for tokens, d, k, pieces in shapes:
        fns = case(tokens, d, k, pieces, dtype)
        diff = max_abs_diff(fns)
        if diff:
            raise SystemExit(f"the fused combine differs from the plain ops by {diff} at {(tokens, d, k, pieces)}")
        t = interleaved_medians(fns, a.repeats)
        rows.append(
            {
                "tokens": tokens,
                "d": d,
                "k": k,
                "pieces": pieces,
                "fused_ms": t["fused"] * 1e3,
                "plain_ms": t["plain"] * 1e3,
                "fused_over_plain": t["fused"] / t["plain"],
                "max_abs_diff": diff,
            }
        )
    meta = {"torch": torch.__version__, "threads": a.threads, "dtype": a.dtype, "cpu": platform.processor()}
    columns = ["tokens", "d", "k", "pieces", "fused_ms", "plain_ms", "fused_over_plain", "max_abs_diff"]
    emit("combine", rows, columns, meta, a.json)
