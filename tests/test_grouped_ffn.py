"""The grouped FFN autograd function against plain autograd through ``expert_ffn``, segment by segment.

Segments as the dispatchers make them: a slot in several segments (one per source rank), empty segments, slots with
no rows at all; every activation, with and without biases; float64 so that only real differences show.
"""

from __future__ import annotations

import pytest
import torch

from dynmoe_dist.experts import ExpertBank
from dynmoe_dist.experts.grouped import ACTIVATIONS, expert_ffn, grouped_ffn

D, F_, E = 6, 10, 5
SEGMENTS = [(2, 4), (0, 3), (4, 0), (2, 5), (1, 2), (0, 1)]  # slot 3 never appears; 2 and 0 twice


def bank(activation: str, bias: bool) -> ExpertBank:
    b = ExpertBank(D, F_, list(range(E)), activation, seed=3, bias=bias).double()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.3)
    return b


def reference(b: ExpertBank, rows: torch.Tensor, segments) -> torch.Tensor:
    out, start = [], 0
    for slot, n in segments:
        w = {name: t[slot] for name, t in b.weights().items()}
        out.append(expert_ffn(rows[start : start + n], w, b.activation))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_ffn_equals_autograd_through_the_per_expert_reference(activation, bias):
    b = bank(activation, bias)
    n = sum(k for _, k in SEGMENTS)
    rows = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(n, D, dtype=torch.float64)
    params = [rows, *b.weights().values()]
    got = b(rows, SEGMENTS)
    got_grads = torch.autograd.grad(got, params, grad)
    want = reference(b, rows, SEGMENTS)
    want_grads = torch.autograd.grad(want, params, grad, allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(["rows", *b.weights()], got_grads, want_grads):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    assert all(float(g[3].abs().sum()) == 0 for g in got_grads[1:])  # the expert with no rows: zero, not garbage


def test_no_rows_gives_zero_gradients_to_every_weight():
    b = bank("swiglu", True)
    rows = torch.zeros(0, D, dtype=torch.float64, requires_grad=True)
    y = b(rows, [(0, 0), (1, 0)])
    (y.sum() * 1.0).backward()
    assert y.shape == (0, D)
    assert all(p.grad is not None and not p.grad.any() for p in b.parameters())


def test_bf16_rows_against_fp32_weights_give_fp32_gradients():
    b = ExpertBank(D, F_, list(range(E)), "gelu", seed=1)
    rows = torch.randn(12, D).to(torch.bfloat16).requires_grad_()
    y = grouped_ffn(rows, [(1, 5), (0, 7)], b.w_in, b.w_out)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and rows.grad.dtype == torch.bfloat16
    assert b.w_in.grad.dtype == torch.float32 and b.w_in.grad[1].abs().sum() > 0
