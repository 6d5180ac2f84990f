"""The experts as grouped GEMMs (``torch.nn.functional.grouped_mm``): one kernel per weight for all experts.

On CUDA in bf16 with compute capability 8.0+ (A100 and newer) one grouped GEMM launch replaces a loop of one GEMM per
expert, which is what makes many small experts cheap on a GPU. Rows must be sorted by local slot, with every slot
present as a (possibly empty) group; ``offs`` holds each group's end row. Biases are added per row by slot.

Two guards around the kernel:
- zero-row groups get zero weight gradients whatever the kernel writes (grouped_mm leaves nonzero gradients for
  empty groups on Blackwell GPUs: pytorch/pytorch#172439);
- shapes the kernels do not take (rows or features not in 16-byte multiples, dtypes other than bf16, older GPUs)
  stay on the segment loop (``segment_ffn.py``), which computes the same function.

On CPU grouped_mm exists too (float32/bf16) at about the loop's speed; the tests use that to check this path
against the loop where no GPU is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import DERIVATIVES, GATE_OF, PLAIN

ALIGN_BYTES = 16  # the CUDA kernels read rows of K and N elements in 16-byte vectors


def grouped_gemm_available(rows: torch.Tensor, w_in: torch.Tensor) -> bool:
    """Whether the CUDA grouped GEMM serves these rows and weights: bf16 on an SM80+ GPU, aligned feature sizes."""
    if not (hasattr(F, "grouped_mm") and rows.is_cuda and rows.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(rows.device) < (8, 0):
        return False
    per_vector = ALIGN_BYTES // rows.element_size()
    return rows.shape[0] > 0 and w_in.shape[1] % per_vector == 0 and w_in.shape[2] % per_vector == 0


class ZeroEmptyGroups(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient of groups with no rows (see the module docstring)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, empty: torch.Tensor):  # noqa: D102
        ctx.save_for_backward(empty)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (empty,) = ctx.saved_tensors
        return grad.masked_fill(empty.view(-1, *([1] * (grad.dim() - 1))), 0), None


class GatedProduct(torch.autograd.Function):
    """act(g) * h, keeping only g and h for backward: act(g) is recomputed there. As autograd ops the product would
    also keep act(g), one [rows, d_ff] more per layer than the backward needs; the arithmetic is autograd's."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, h: torch.Tensor, name: str) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(g, h)
        ctx.name = name
        return PLAIN[name](g) * h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        g, h = ctx.saved_tensors
        need_g, need_h = ctx.needs_input_grad[:2]
        dh = PLAIN[ctx.name](g).mul_(grad) if need_h else None
        dg = DERIVATIVES[ctx.name](grad * h, g) if need_g else None
        return dg, dh, None


def grouped_gemm_ffn(
    x: torch.Tensor,
    counts: list[int] | torch.Tensor,
    activation: str,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` sorted by slot, ``counts[slot]`` rows each, one count per slot of the stacked weights: a list, or an
    int64 tensor on ``x``'s device (then nothing here reads the host or waits for the device)."""
    device = x.device
    if isinstance(counts, torch.Tensor):
        sizes = counts.to(device=device, dtype=torch.int64)
    else:
        sizes = torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)
    offs = torch.cumsum(sizes, 0, dtype=torch.int32)
    empty = sizes == 0
    slot_of_row = None
    if b_in is not None or b_out is not None:
        slots = torch.arange(sizes.shape[0], device=device)
        slot_of_row = torch.repeat_interleave(slots, sizes, output_size=x.shape[0])

    def linear(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = F.grouped_mm(t, ZeroEmptyGroups.apply(w, empty), offs=offs)
        return y if b is None else y + b.index_select(0, slot_of_row)  # no rows, no bias gradient

    h = linear(x, w_in, b_in)
    if activation in GATE_OF:
        h = GatedProduct.apply(linear(x, w_gate, b_gate), h, GATE_OF[activation])
    else:
        h = PLAIN[activation](h)
    return linear(h, w_out, b_out)
