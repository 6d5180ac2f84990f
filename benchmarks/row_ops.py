"""The row ops at both ends of the dispatch, each alone, forward+backward, against the plain autograd ops they replace,
interleaved in one process on the same inputs:

* ``combine`` (``dispatch/combine.py``): the weighted combine of the experts' output pieces, against a cat of the
  pieces, the weighted rows and ``index_add``;
* ``gather`` (``dispatch/permute.py``): the rows by token in the dispatcher's pieces, against ``index_select`` and
  ``split`` (whose backward cats the pieces' gradients).

Shapes: the layer's tokens and width, top-k assignments, in the pieces the expert-parallel dispatcher hands over (own
rows in two halves, received rows: three) or one piece (the single-process dispatcher). Both must give bitwise the
same output and gradients before anything is timed. ``fused / plain`` below 1.0 is time saved per MoE layer and step.
"""

from __future__ import annotations

import argparse

import torch

from dynmoe_dist.dispatch.combine import combine_rows, combine_rows_reference
from dynmoe_dist.dispatch.permute import gather_pieces

from .report import emit
from .timing import interleaved_medians

# (tokens, d, k, pieces): bench train's layer (4096 tokens per rank, d 256, top-2) in both dispatchers' pieces, a wider
# model, and a larger batch
SHAPES = ((4096, 256, 2, 3), (4096, 256, 2, 1), (4096, 1024, 2, 3), (16384, 256, 2, 3), (4096, 256, 4, 3))


def combine_case(tokens: int, d: int, k: int, pieces: int, dtype: torch.dtype):
    """A forward+backward closure per implementation of the combine over the same leaves (each token routed k times);
    each returns the output and the gradients."""
    g = torch.Generator().manual_seed(0)
    a = tokens * k
    token = torch.arange(tokens).repeat_interleave(k)[torch.randperm(a, generator=g)]
    weight = torch.rand(a, generator=g).requires_grad_()
    rows = [torch.randn(n, d, generator=g).to(dtype).requires_grad_() for n in piece_sizes(a, pieces)]
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


def gather_case(tokens: int, d: int, k: int, pieces: int, dtype: torch.dtype):
    """The same for the gather: [tokens, d] -> pieces of the k * tokens assignment rows, and back."""
    g = torch.Generator().manual_seed(0)
    a = tokens * k
    token = torch.arange(tokens).repeat_interleave(k)[torch.randperm(a, generator=g)]
    sizes = piece_sizes(a, pieces)
    x = torch.randn(tokens, d, generator=g).to(dtype).requires_grad_()
    grads = [torch.randn(n, d, generator=g).to(dtype) for n in sizes]

    def run(fn):
        def step() -> list[torch.Tensor]:
            x.grad = None
            out = fn(x)
            torch.autograd.backward(list(out), grads)
            return [*(o.detach() for o in out), x.grad]

        return step

    return {
        "fused": run(lambda x: gather_pieces(x, token, sizes)),
        "plain": run(lambda x: x.index_select(0, token).split(sizes)),
    }


def piece_sizes(a: int, pieces: int) -> list[int]:
    """Three: the own rows in two halves and the rows for other ranks (half of them, at 2 ranks); one: all rows."""
    return [a // 4, a // 4, a - 2 * (a // 4)] if pieces == 3 else [a]


CASES = {"combine": combine_case, "gather": gather_case}


def max_abs_diff(fns: dict) -> float:
    """Largest difference between the two implementations' output and gradients (0.0: bitwise the same)."""
    fused, plain = fns["fused"](), fns["plain"]()
    return max(float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in zip(fused, plain))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks row_ops", description=__doc__)
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
    for op, make in CASES.items():
        for tokens, d, k, pieces in shapes:
            fns = make(tokens, d, k, pieces, dtype)
            diff = max_abs_diff(fns)
            if diff:
                raise SystemExit(f"the fused {op} differs from the plain ops by {diff} at {(tokens, d, k, pieces)}")
            t = interleaved_medians(fns, a.repeats)
            row = {"op": op, "tokens": tokens, "d": d, "k": k, "pieces": pieces}
            row |= {"fused_ms": t["fused"] * 1e3, "plain_ms": t["plain"] * 1e3}
            rows.append(row | {"fused_over_plain": t["fused"] / t["plain"], "max_abs_diff": diff})
    meta = {"threads": a.threads, "dtype": a.dtype}
    columns = ["op", "tokens", "d", "k", "pieces", "fused_ms", "plain_ms", "fused_over_plain", "max_abs_diff"]
    emit("row_ops", rows, columns, meta, a.json)
