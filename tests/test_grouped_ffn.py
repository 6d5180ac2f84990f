"""The grouped FFN autograd function against plain autograd through ``expert_ffn``, segment by segment.

Segments as the dispatchers make them: a slot in several segments (one per source rank), empty segments, slots with
no rows at all; every activation, with and without biases; float64 so that only real differences show.
"""

from __future__ import annotations

import pytest
import torch

from dynmoe_dist.experts import ExpertBank
from dynmoe_dist.experts.cpu_gemm import onednn_usable
from dynmoe_dist.experts.grouped import ACTIVATIONS, expert_ffn, grouped_ffn

D, F_, E = 6, 10, 5
SEGMENTS = [(2, 4), (0, 3), (4, 0), (2, 5), (1, 2), (0, 1)]  # slot 3 never appears; 2 and 0 twice


def bank(activation: str, bias: bool, d: int = D, d_ff: int = F_) -> ExpertBank:
    b = ExpertBank(d, d_ff, list(range(E)), activation, seed=3, bias=bias).double()
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


IN_SLOT_ORDER = [(0, 4), (1, 2), (2, 9), (3, 0), (4, 0)]  # as the one-process dispatcher makes them


@pytest.mark.parametrize("segments", ["slot order", "merged"])
@pytest.mark.parametrize("gemm", ["loop", "onednn"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_rows_gathered_inside_equal_rows_gathered_first(activation, bias, gemm, segments):
    """``token``: the experts take the tokens and each row's token, gather each segment's rows themselves and add
    the rows' gradients into the tokens'. Against the gather as its own op (``index_select``, whose backward adds
    them in row order): with segments in slot order (the one-process dispatcher's) the same bits; with a slot in
    several segments (the rows are merged by slot first, so a token's gradients add up in another order) equal to
    rounding. A token in several segments and a token in none; on oneDNN the segments are also padded."""
    if gemm == "onednn" and not onednn_usable(torch.zeros(1)):
        pytest.skip("this torch build has no oneDNN")
    dtype = torch.float32 if gemm == "onednn" else torch.float64
    segs = IN_SLOT_ORDER if segments == "slot order" else SEGMENTS
    b = bank(activation, bias).to(dtype)
    b.gemm = gemm
    n = sum(k for _, k in segs)
    tokens = torch.randn(9, D, dtype=dtype)
    token = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(5))  # token 8 is never taken
    grad = torch.randn(n, D, dtype=dtype)
    results = []
    for inside in (False, True):
        x = tokens.clone().requires_grad_()
        b.zero_grad(set_to_none=True)
        y = b(x, segs, token=token) if inside else b(x.index_select(0, token), segs)
        y.backward(grad)
        results.append([y.detach(), x.grad, *(w.grad for w in b.weights().values())])
    tol = {"rtol": 0, "atol": 0} if segments == "slot order" else {"rtol": 1e-5, "atol": 1e-6}
    for name, want, got in zip(["output", "tokens", *b.weights()], *results):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert not results[1][1][8].any() and results[1][1].abs().sum() > 0


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


# ----------------------------------------------------------------------------------------------------------------------
# the grouped-GEMM path (torch.nn.functional.grouped_mm): on CPU here, float32; on CUDA bf16 where a GPU is present


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "relu"])
def test_grouped_mm_path_equals_the_loop(activation, bias, monkeypatch):
    """The same segments (repeated slots, empty segments, a slot with no rows) through both ways, float32 (feature
    sizes in 16-byte multiples, as the kernels require)."""
    d, d_ff = 8, 12
    loop = bank(activation, bias, d, d_ff).float()
    gmm = bank(activation, bias, d, d_ff).float()
    gmm.gemm = "grouped_mm"
    n = sum(k for _, k in SEGMENTS)
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(9))
    grad = torch.randn(n, d, generator=torch.Generator().manual_seed(10))
    calls, real = [], torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for b in (loop, gmm):
        x = rows.clone().requires_grad_()
        y = b(x, SEGMENTS)
        y.backward(grad)
        results.append([y.detach(), x.grad, *(w.grad for w in b.weights().values())])
    for name, a, c in zip(["output", "rows", *loop.weights()], *results):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert all(float(w.grad[3].abs().sum()) == 0 for w in gmm.weights().values())  # no rows, zero gradient
    assert len(calls) == (3 if activation == "swiglu" else 2)  # one grouped GEMM per weight, the loop none


def test_empty_groups_get_zero_weight_gradients_whatever_the_kernel_writes():
    """The guard for kernels that leave garbage in empty groups' gradients (pytorch/pytorch#172439)."""
    from dynmoe_dist.experts.grouped_gemm import ZeroEmptyGroups

    w = torch.randn(4, 3, 2, requires_grad=True)
    empty = torch.tensor([False, True, False, True])
    ZeroEmptyGroups.apply(w, empty).backward(torch.ones(4, 3, 2))
    assert w.grad[[0, 2]].eq(1).all() and w.grad[[1, 3]].eq(0).all()


def test_auto_uses_the_loop_off_cuda():
    from dynmoe_dist.experts.grouped_gemm import grouped_gemm_available

    b = bank("gelu", False).float()
    assert b.gemm == "auto"
    assert not grouped_gemm_available(torch.randn(4, D, dtype=torch.bfloat16), b.w_in)


def test_bad_gemm_is_refused():
    from dynmoe_dist import ConfigError

    with pytest.raises(ConfigError, match="gemm"):
        ExpertBank(D, F_, [0, 1], gemm="cutlass")


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability 8.0+ (A100 or newer): the grouped GEMM kernels run there only",
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cuda_grouped_gemm_equals_the_loop_in_bf16(activation):
    from dynmoe_dist.experts.grouped_gemm import grouped_gemm_available

    d, f, e = 64, 128, 8
    segments = [(3, 40), (0, 17), (5, 0), (3, 9), (1, 64), (7, 33)]  # repeated, empty, and slots with no rows
    n = sum(k for _, k in segments)
    ref = ExpertBank(d, f, list(range(e)), activation, seed=1).cuda()
    ref.gemm = "loop"
    fast = ExpertBank(d, f, list(range(e)), activation, seed=1).cuda()
    rows = torch.randn(n, d, device="cuda").bfloat16()
    assert grouped_gemm_available(rows, fast.w_in)  # auto picks the grouped GEMM here
    grad = torch.randn(n, d, device="cuda").bfloat16()
    out = []
    for b in (ref, fast):
        x = rows.clone().requires_grad_()
        y = b(x, segments)
        y.backward(grad)
        out.append([y.float(), x.grad.float(), *(w.grad.float() for w in b.weights().values())])
    for a, c in zip(*out):
        torch.testing.assert_close(c, a, rtol=2e-2, atol=2e-2)
    for w in fast.weights().values():
        for slot in (2, 4, 6):  # no rows
            assert float(w.grad[slot].abs().sum()) == 0


def test_segments_that_do_not_cover_the_rows_are_refused():
    from dynmoe_dist import ShapeError

    b = bank("gelu", False)
    with pytest.raises(ShapeError, match="cover 12 rows but 6 were given"):
        b(torch.randn(6, D), [(0, 7), (3, 5)])
