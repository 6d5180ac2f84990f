"""The expert FFN's matrix products on CPU: aten's ``mm`` or oneDNN's fp32 GEMM, behind one small interface.

Why: on CPU, torch sends a float32 ``mm`` to MKL, and MKL runs AVX2 kernels on AMD processors. oneDNN, also inside
every x86 torch build, runs AVX-512 there. Measured on one core of the development machine (AMD EPYC, AVX-512,
torch 2.13.0), float32, at the expert FFN's shapes (d 256 and 1024, d_ff 4d, 256-2048 rows): aten ``mm`` 93-113
GFLOP/s, oneDNN 159-250 GFLOP/s in each of the FFN's six products, forward and backward (``python -m benchmarks
cpu_gemm``). torch only uses oneDNN for float32 matmuls when told it may round to bf16 or tf32; here the arithmetic
stays float32 (relative differences from aten's ``mm`` of about 1e-6, the size of any change in summation order).

The kernel is ``torch.ops.mkldnn._linear_pointwise`` (``y = x @ w.T + b``, the op torch's own compiler emits for CPU
linear layers), a private op: ``onednn_usable`` checks once that it exists and agrees with ``mm`` before any layer
uses it, and everything falls back to aten where it does not (non-x86 builds, ``torch.backends.mkldnn.enabled =
False``, other dtypes and devices).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gemm:
    """``mm(a, b, out)`` = a @ b, ``addmm(bias, a, b, out)`` = bias + a @ b, ``addmm_(c, a, b)``: c += a @ b.

    ``out`` and ``c`` may have fewer rows than ``a`` (only where ``rows`` pads): they take the product's first rows,
    and the padding rows' are dropped."""

    name: str

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.addmm(None, a, b, out)

    def addmm(
        self, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.name == "onednn":
            if bias is None and a.stride(0) == 1 and b.shape[1] < a.shape[0]:
                # a weight gradient (a transposed) with fewer columns than rows: oneDNN computes the transposed
                # product faster (dw_out at d=256, d_ff=1024: 2.6 against 3.6 ms at 1024 rows)
                y = torch.ops.mkldnn._linear_pointwise(b.t(), a, None, "none", [], "").t()
            else:
                y = torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")
            return y if out is None else out.copy_(y[: out.shape[0]])
        if bias is None:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)

    def addmm_(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return c.add_(self.mm(a, b)[: c.shape[0]]) if self.name == "onednn" else c.addmm_(a, b)

    def rows(self, n: int) -> int:
        """The row count to compute ``n`` rows as: ``n`` for aten; for oneDNN, ``n`` rounded up to 16 values per
        power of two (at most 1/16 more rows), because oneDNN builds and caches a kernel per shape, and a new shape
        costs more than the GEMM (measured: 1.4 ms per new shape against 2.2 ms for a 1024 x 256 x 1024 product),
        while a dropless layer's row counts change every step."""
        if self.name != "onednn":
            return n
        quantum = max(16, 1 << max(0, n.bit_length() - 5))
        return -(-n // quantum) * quantum


ATEN = Gemm("aten")
ONEDNN = Gemm("onednn")


@functools.cache
def _onednn_works() -> bool:
    """The op exists in this build and computes what ``mm`` computes (checked once per process, on a small case with
    a transposed operand, as the backward passes them)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(24, 40, generator=gen)
        b = torch.randn(16, 40, generator=gen).t()
        bias = torch.randn(16, generator=gen)
        got = ONEDNN.addmm(bias, a, b)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, torch.addmm(bias, a, b), rtol=1e-5, atol=1e-5))


def onednn_usable(x: torch.Tensor) -> bool:
    """oneDNN serves these rows: float32 on CPU, oneDNN enabled (``torch.backends.mkldnn``) and working."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.enabled and _onednn_works()
