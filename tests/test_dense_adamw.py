"""The dense side's AdamW: torch's fused kernel where it runs, the same updates as torch's per-tensor loop."""

from __future__ import annotations

import torch
from torch import nn

from dynmoe_dist.optim import dense_adamw
from dynmoe_dist.optim.adamw import fused_runs_on


def test_cpu_parameters_get_the_fused_kernel_with_the_loops_updates():
    g = torch.Generator().manual_seed(0)
    mine = [nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)) for _ in range(3)]
    ref = [nn.Parameter(p.detach().clone()) for p in mine]
    start = mine[0].detach().clone()
    kw = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}
    opt = dense_adamw([{"params": mine[:2], "weight_decay": 0.1}, {"params": mine[2:], "weight_decay": 0.0}], **kw)
    loop = torch.optim.AdamW(
        [{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}], foreach=False, **kw
    )
    assert all(group["fused"] for group in opt.param_groups)
    for _ in range(5):
        for p, q in zip(mine, ref):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        loop.step()
    for p, q in zip(mine, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], loop.state[q]["exp_avg_sq"], rtol=0, atol=1e-12)
    assert (mine[0].detach() - start).abs().min() > 0  # every entry moved


def test_tensors_the_kernel_cannot_take_fall_back_to_the_loop():
    assert fused_runs_on([torch.zeros(2)])
    assert not fused_runs_on([])
    assert not fused_runs_on([torch.zeros(2, dtype=torch.int64)])
    assert not fused_runs_on([torch.zeros(2), torch.zeros(2, device="meta")])
    opt = dense_adamw([nn.Parameter(torch.zeros(2, device="meta"))], lr=0.1)
    assert not opt.param_groups[0]["fused"]
