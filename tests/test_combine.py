"""The fused row ops at both ends of the dispatch equal the plain autograd ops they replace, bitwise."""

from __future__ import annotations

import pytest
import torch

from dynmoe_dist.dispatch import combine as combine_module
from dynmoe_dist.dispatch import combine_rows, gather_pieces
from dynmoe_dist.dispatch.combine import combine_rows_reference as plain


def leaves(sizes, d, num_tokens, dtype, with_base, seed):
    g = torch.Generator().manual_seed(seed)
    a = sum(sizes)
    token = torch.randint(num_tokens, (a,), generator=g)  # repeats: a token with several assignments; some with none
    weight = torch.rand(a, generator=g).requires_grad_()
    pieces = [torch.randn(n, d, generator=g).to(dtype).requires_grad_() for n in sizes]
    base = torch.randn(num_tokens, d, generator=g).requires_grad_() if with_base else None
    grad = torch.randn(num_tokens, d, generator=g).to(dtype)
    return token, weight, pieces, base, grad


@pytest.mark.parametrize("sizes", [[37], [20, 0, 45, 3], [0, 0, 0], [64, 64]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("chunk_bytes", [1, 300, 1 << 19])  # one row per chunk, a few rows, whole pieces
def test_fused_combine_equals_the_plain_ops(sizes, dtype, with_base, chunk_bytes, monkeypatch):
    monkeypatch.setattr(combine_module, "CHUNK_BYTES", chunk_bytes)
    results = []
    for fn in (plain, combine_rows):
        token, weight, pieces, base, grad = leaves(sizes, 6, 11, dtype, with_base, seed=sum(sizes) + 1)
        out = fn(pieces, token, weight, 11, base)
        out.backward(grad)
        grads = [weight.grad] + [p.grad for p in pieces] + ([base.grad] if with_base else [])
        results.append([out] + [torch.zeros(0) if t is None else t for t in grads])
    for name, ours, ref in zip(
        ["output", "weight grad", *[f"piece {i} grad" for i in range(len(sizes))], "base grad"], results[1], results[0]
    ):
        assert ours.dtype == ref.dtype, name
        assert torch.equal(ours, ref), f"{name}: differs by {(ours.double() - ref.double()).abs().max()}"


def test_fused_combine_without_gradients_keeps_none():
    token, weight, pieces, base, _ = leaves([5, 7], 4, 6, torch.float32, True, seed=3)
    with torch.no_grad():
        out = combine_rows(pieces, token, weight, 6, base)
    assert torch.equal(out, plain(pieces, token, weight, 6, base).detach())
    assert not out.requires_grad
    frozen = [p.detach() for p in pieces]  # only the weights need a gradient (a frozen expert bank)
    combine_rows(frozen, token, weight, 6).sum().backward()
    assert weight.grad is not None and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("sizes", [[37], [20, 0, 45, 3], [0, 0], [64, 64]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [1, 300, 1 << 19])
@pytest.mark.parametrize("unused", [None, 0])  # every piece in the loss, or the first left out
def test_gather_pieces_equals_index_select_and_split(sizes, dtype, chunk_bytes, unused, monkeypatch):
    """The other end of the layer: rows by token, cut into the pieces the dispatcher computes (no cat in backward)."""
    monkeypatch.setattr(combine_module, "CHUNK_BYTES", chunk_bytes)
    unused = unused if len(sizes) > 1 else None
    g = torch.Generator().manual_seed(len(sizes))
    token = torch.randint(9, (sum(sizes),), generator=g)
    x0 = torch.randn(9, 5, generator=g).to(dtype)
    grads = [torch.randn(n, 5, generator=g).to(dtype) for n in sizes]
    results = []
    for pieces_of in (lambda x: x.index_select(0, token).split(sizes), lambda x: gather_pieces(x, token, sizes)):
        x = x0.clone().requires_grad_()
        pieces = pieces_of(x)
        assert [p.shape[0] for p in pieces] == sizes
        used = [(p, gr) for i, (p, gr) in enumerate(zip(pieces, grads)) if i != unused]
        torch.autograd.backward([p for p, _ in used], [gr for _, gr in used])
        results.append([*(p.detach() for p in pieces), x.grad])
    for ours, ref in zip(results[1], results[0]):
        assert ours.dtype == ref.dtype and torch.equal(ours, ref)
