"""The expert FFN's matrix products on CPU: aten's ``mm`` or oneDNN's fp32 GEMM, behind one small interface.

Why: on CPU, torch sends a float32 ``mm`` to MKL, and MKL runs AVX2 kernels on AMD processors. oneDNN, also inside
every x86 torch build, runs AVX-512 there, where the CPU has it: on such a CPU it took about half of aten's time per
product; on a CPU without AVX-512 it was no faster, often slower (docs/BENCHMARKS.md, cpu_gemm). torch only uses
oneDNN for float32 matmuls when told it may round to bf16 or tf32; here the arithmetic stays float32 (relative
differences from aten's ``mm`` of about 1e-6, the size of any change in summation order).

``gemm="auto"`` therefore decides per CPU, per shape class and per thread count (``auto_choice``; the margins moved
with the threads too): a short probe times both kernels on the FFN's products at that shape class, interleaved, and
oneDNN is taken only when its median time is at most a margin of aten's: ``MARGINS["avx512"]`` on a CPU with AVX-512
(where oneDNN is expected to win), the stricter ``MARGINS["other"]`` elsewhere (where it is expected not to). Noise
on a loaded machine must not flip the choice toward the kernel that pads rows and builds a kernel per shape. The
decision is cached per process; ``python -m benchmarks cpu_gemm`` reports it.

The kernel is ``torch.ops.mkldnn._linear_pointwise`` (``y = x @ w.T + b``, the op torch's own compiler emits for CPU
linear layers), a private op: ``onednn_usable`` checks once that it exists and agrees with ``mm`` before any layer
uses it, and everything falls back to aten where it does not (non-x86 builds, ``torch.backends.mkldnn.enabled =
False``, other dtypes and devices).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
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


# auto takes oneDNN only where its median probe time is at most this share of aten's (module docstring)
MARGINS = {"avx512": 0.9, "other": 0.8}
PROBE_ROUNDS = 7  # interleaved rounds; the median of their ratios decides
PROBE_FLOPS = 1 << 27  # per product: rows = this / (2 d d_ff), 128 to 256 (a dropless layer's segment sizes)


@dataclass(frozen=True)
class AutoChoice:
    """What ``gemm="auto"`` runs float32 CPU experts of one shape class on, and why."""

    kernel: Gemm
    capability: str  # torch.backends.cpu.get_cpu_capability(): the widest vector extension ATen uses here
    ratio: float | None  # oneDNN's median time over aten's in the probe (None: not probed)
    margin: float  # the ratio at or below which oneDNN is taken, for this capability
    reason: str


def shape_class(d: int, d_ff: int) -> tuple[int, int]:
    """The FFN's (d, d_ff) rounded up to powers of two: kernels behave alike within a class, so one probe serves it."""
    return 1 << max(d - 1, 0).bit_length(), 1 << max(d_ff - 1, 0).bit_length()


def cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def margin_for(capability: str) -> float:
    return MARGINS["avx512" if "AVX512" in capability.upper() else "other"]


def decide(capability: str, ratio: float | None) -> AutoChoice:
    """The rule, apart from any measurement (tests give it timings): oneDNN only where the probe measured it faster
    by the capability's margin; aten's otherwise, and where nothing was measured."""
    margin = margin_for(capability)
    if ratio is None:
        return AutoChoice(ATEN, capability, ratio, margin, "not probed (oneDNN does not serve float32 here)")
    kernel = ONEDNN if ratio <= margin else ATEN
    sign = "<=" if kernel is ONEDNN else ">"
    return AutoChoice(kernel, capability, ratio, margin, f"oneDNN took {ratio:.2f} of aten's time ({sign} {margin})")


def probe_products(d: int, d_ff: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) of the FFN's products as the segment loop passes them: forward into d_ff and back, and a weight
    gradient (a transposed operand); rows sized so that a probe costs about the same at every shape."""
    rows = min(max(PROBE_FLOPS // (2 * d * d_ff), 128), 256)
    g = torch.Generator().manual_seed(0)
    x, h = torch.randn(rows, d, generator=g), torch.randn(rows, d_ff, generator=g)
    w_in, w_out = torch.randn(d, d_ff, generator=g), torch.randn(d_ff, d, generator=g)
    return [(x, w_in), (h, w_out), (x.t(), h)]


def probe_ratio(d: int, d_ff: int, rounds: int = PROBE_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> float:
    """oneDNN's time over aten's for the probe's products, the median over interleaved rounds (each round times both
    kernels back to back, so both see the same load)."""
    products = probe_products(d, d_ff)

    def run(kernel: Gemm) -> float:
        t0 = clock()
        for a, b in products:
            kernel.mm(a, b)
        return clock() - t0

    run(ONEDNN), run(ATEN)  # warm-up: oneDNN builds its kernels for these shapes
    ratios = []
    for _ in range(rounds):
        onednn, aten = run(ONEDNN), run(ATEN)
        ratios.append(onednn / max(aten, 1e-12))
    return statistics.median(ratios)


@functools.cache
def auto_choice(d_class: int, d_ff_class: int, threads: int) -> AutoChoice:
    """The kernel ``auto`` runs this shape class on at this many threads, decided once per process (measured at
    the current thread count, which ``threads`` names)."""
    ratio = probe_ratio(d_class, d_ff_class) if _onednn_works() else None
    return decide(cpu_capability(), ratio)


def auto_kernel(x: torch.Tensor, d: int, d_ff: int) -> Gemm:
    """``gemm="auto"``'s kernel for rows ``x`` of an FFN (d, d_ff): aten's unless oneDNN serves them and was chosen."""
    if not onednn_usable(x):
        return ATEN
    return auto_choice(*shape_class(d, d_ff), torch.get_num_threads()).kernel
