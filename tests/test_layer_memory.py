"""Activation memory the layer saves for backward (issue 29, point 3), measured as ``bench layer --memory`` does it.

Past the router nothing is sized by experts x capacity or tokens x experts: no [E, capacity, d] buffer and no
[tokens, E] float tensor is saved for backward or returned, and the bytes saved per routed row are the floor (what
the expert GEMMs' backward needs: each row's pre-activation, and its input where the rows are a tensor of their own;
the grouped GEMM keeps the activation output too) plus one row of the expert output (the combine's weight gradient reads
it), the row's token, its place in the sort and its combine weight. On one process the segment loop keeps no row
input at all (it gathers each expert's rows from the tokens itself): a saved [rows, d] input would exceed the bound.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.layer import GATES, floor_bytes_per_row, saved_for_backward, unique_bytes
from dynmoe_dist import MoELayer

S, D, D_FF, E = 64, 16, 32, 8


@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("gate", ["top2", "top_any"])
def test_nothing_past_the_router_is_sized_by_experts_and_rows_cost_the_floor(gate, activation, gemm):
    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, router=GATES[gate], activation=activation, gemm=gemm, seed=1).train()
    x = torch.randn(S, D, requires_grad=True)
    saved, (y, aux) = saved_for_backward(layer, x)
    after = [s for s in saved if s.phase == "after"]
    assert after and any(s.phase == "router" for s in saved)
    for s in after:
        assert not (s.dtype.is_floating_point and s.shape == (S, E)), f"a [tokens, experts] float saved: {s}"
        assert not (len(s.shape) == 3 and s.shape[0] == E and s.shape[-1] == D), f"an [E, capacity, d] buffer: {s}"
    # what the forward returns: nothing [tokens, experts] either
    returned = [aux.loss, *aux.losses.values()]
    returned += [v for v in dataclasses.asdict(aux.stats).values() if isinstance(v, torch.Tensor)]
    assert all(t.shape != (S, E) for t in returned)

    rows = aux.traffic.rows_computed
    per_row = unique_bytes(after) / rows
    floor = floor_bytes_per_row(layer, x.dtype)
    # the floor, one expert output row (D floats), the row's token and sort position (int64), its weight (float32);
    # per expert a few numbers (the grouped GEMM's offsets and empty-group mask)
    assert floor <= per_row <= floor + D * 4 + 8 + 8 + 4 + 64 * E / rows, (per_row, floor)
    y.sum().backward()  # the graph the hooks saw is whole
    assert x.grad is not None


def test_backward_peaks_at_the_weight_gradients_and_the_pre_activations_worth():
    """Where a training step's memory peaks: at the end of a layer's backward, beside every weight gradient. There
    the layer may hold the pre-activations' worth (their gradients take their place) and the tokens' and the output's
    gradients, and less than one more [rows, d] tensor: not the output gradient and the pre-activations together with
    the new weight gradients (one autograd function for the whole FFN), nor the rows' copy and its gradient (the gather
    outside the FFN); each of those exceeds the bound. Measured from torch's allocation events, forward included, so
    the frees of what forward saved are seen."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    s, d, d_ff, e = 128, 512, 1024, 8  # weight gradients (48 MB) well above the activations, as in a real model
    layer = MoELayer(d, d_ff, e, router={"kind": "top_k", "k": 4}, activation="swiglu", gemm="loop", seed=1).train()
    x = torch.randn(s, d, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y, aux = layer(x)
        loss = y.sum()
        since = time.time_ns()  # kineto's clock
        loss.backward()
    events = sorted(
        (ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]"
    )
    alive = peak = 0
    for start, nbytes in events:
        alive += nbytes
        if start >= since:
            peak = max(peak, alive)
    rows = aux.traffic.rows_computed
    grads = sum(p.numel() * p.element_size() for p in layer.parameters())
    bound = grads + (2 * rows * d_ff + 2 * s * d + rows * d) * 4
    assert grads < peak <= bound, (peak - grads, bound - grads)
