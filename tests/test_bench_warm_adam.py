"""``bench train`` starts each variant where the warm run left off, Adam moments included (resume == uninterrupted).

Single process: a dense layer on torch's AdamW and an MoE layer on MoEAdam, as the training engines split them.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.train import adam_moments, seed_adam
from dynmoe_dist.layer import MoELayer
from dynmoe_dist.optim import MoEAdam


class Tiny(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.moe = MoELayer(8, 16, 4, {"kind": "top_k", "k": 2, "balance_weight": 0.0}, seed=0)
        self.out = nn.Linear(8, 8, bias=False)
        self.out.weight = self.inp.weight  # tied: one parameter under two names
        self.extra = nn.Parameter(torch.zeros(8)) if extra else None  # a peer's own parameter, with no warm moment

    def forward(self, x):
        h = self.inp(x)
        y, _ = self.moe(h)
        out = self.out(y)
        return out if self.extra is None else out + self.extra


def optimizers(model: Tiny) -> list[torch.optim.Optimizer]:
    moe = {id(p) for p in model.moe.parameters()}
    dense = [p for p in model.parameters() if id(p) not in moe]
    return [torch.optim.AdamW(dense, lr=1e-2), MoEAdam.for_moe(model, lr=1e-2)]


def train(model: Tiny, opts, batches) -> None:
    for x in batches:
        for o in opts:
            o.zero_grad()
        model(x).pow(2).mean().backward()
        for o in opts:
            o.step()


def fresh(extra: bool = False) -> tuple[Tiny, list[torch.optim.Optimizer]]:
    torch.manual_seed(1)  # other initial weights than the warm run's: loading must replace them all
    model = Tiny(extra)
    return model, optimizers(model)


def test_a_seeded_variant_goes_on_exactly_as_the_warm_run():
    torch.manual_seed(0)
    batches = [torch.randn(32, 8) for _ in range(5)]
    warm = Tiny()
    warm_opts = optimizers(warm)
    train(warm, warm_opts, batches[:3])
    shard = {k: v.clone() for k, v in warm.state_dict().items()}  # state_dict shares storage with the model
    moments = adam_moments(warm, warm_opts)
    assert set(moments["exp_avg"]) >= {"inp.weight", "out.weight", "moe.experts.w_in"}
    train(warm, warm_opts, batches[3:])
    reference = warm.state_dict()

    seeded, opts = fresh()
    seed_adam(seeded, opts, lambda s: seeded.load_state_dict(s[0]), [shard], [moments], 3)
    train(seeded, opts, batches[3:])
    for name, value in seeded.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=name)

    # the old bench (weights only, Adam from zero moments) does not: the check above can fail
    plain, opts = fresh()
    plain.load_state_dict(shard)
    train(plain, opts, batches[3:])
    assert (plain.state_dict()["moe.experts.w_in"] - reference["moe.experts.w_in"]).abs().max() > 1e-3


def test_a_parameter_the_loader_does_not_fill_starts_from_zero_and_keeps_its_value():
    torch.manual_seed(0)
    warm = Tiny()
    warm_opts = optimizers(warm)
    train(warm, warm_opts, [torch.randn(32, 8) for _ in range(2)])
    peer, opts = fresh(extra=True)
    with torch.no_grad():
        peer.extra.fill_(0.5)
    seed_adam(
        peer,
        opts,
        lambda s: peer.load_state_dict(s[0], strict=False),
        [warm.state_dict()],
        [adam_moments(warm, warm_opts)],
        2,
    )
    assert not opts[0].state[peer.extra]
    assert torch.equal(peer.extra.detach(), torch.full((8,), 0.5))
    torch.testing.assert_close(
        opts[0].state[peer.inp.weight]["exp_avg"], warm_opts[0].state[warm.inp.weight]["exp_avg"]
    )
    torch.testing.assert_close(
        opts[1].state[peer.moe.experts.w_in]["exp_avg_sq"], warm_opts[1].state[warm.moe.experts.w_in]["exp_avg_sq"]
    )
    assert opts[1].state[peer.moe.experts.w_in]["step"].tolist() == [2] * 4
