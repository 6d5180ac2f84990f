"""Host synchronisations per MoE layer forward+backward (issue 29, point 1).

On a GPU, an op that reads a device value on the host (``item``, ``tolist``) or sizes its result from one
(``nonzero``, a boolean index, ``bincount``, ``repeat_interleave`` without ``output_size``) stops the host until the
device has caught up. The single-process top-k layer on grouped GEMMs has none: counts, offsets and the permutation
stay on the device. A gate whose k varies per token has one (the number of assignments sizes everything after it).
Under expert parallelism the forward reads the counts once (the all-to-all's split sizes), the backward never.

Counted on the CPU with ``benchmarks.op_count`` (a dispatch mode, and ``tolist``/``numpy`` watched), and on a GPU,
where one is present, with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from benchmarks.op_count import OpCounter, host_reads
from dynmoe_dist import MoELayer
from dynmoe_dist.adapt.recorder import RoutingRecorder

import dist_pool

D, D_FF, E, TOKENS = 16, 32, 8, 40  # feature sizes in 16-byte multiples: the grouped GEMM's kernels need them
TOP2 = {"kind": "top_k", "k": 2}


def layer_step(layer: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> None:
    y, aux = layer(x)
    torch.autograd.backward([y, aux.loss], [grad, torch.ones(())])


def inputs(seed: int, tokens: int = TOKENS, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, d, generator=g).requires_grad_(), torch.randn(tokens, d, generator=g)


def counted(fn, forbid_reads: bool = True) -> tuple[OpCounter, list[str]]:
    with host_reads(forbid=forbid_reads) as reads, OpCounter() as counter:
        fn()
    return counter, reads


@pytest.mark.parametrize("shared", [0, 1])
def test_top2_layer_on_grouped_gemm_never_waits_for_the_device(shared, monkeypatch):
    """Forward and backward, with the adaptation recorder and the metrics window observing: no op that syncs, no
    tensor made from host data, no host read; and the experts really ran as grouped GEMMs."""
    from dynmoe_dist.train.metrics import LayerWindow

    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, router=TOP2, gemm="grouped_mm", num_shared_experts=shared, seed=1).train()
    layer.recorder = RoutingRecorder(E, D)
    layer.recorder.active = True
    window = LayerWindow(k_bins=4)
    x, grad = inputs(0)
    _, aux = layer(x)
    window.observe(aux, layer)  # the first call reads the layer's expert ids (once per placement version)
    calls, real = [], torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))

    def step() -> None:
        y, aux = layer(x)
        window.observe(aux, layer)
        torch.autograd.backward([y, aux.loss], [grad, torch.ones(())])

    counter, _ = counted(step)
    assert counter.syncs == [] and counter.host_tensors == 0, counter.syncs
    assert len(calls) == 2
    # what was accumulated is right, read once afterwards
    assert layer.recorder.tokens.sum().item() == 2 * (2 * TOKENS)  # the warm-up forward and the counted one
    assert window.counts[0].item() == 2 * TOKENS


@pytest.mark.parametrize(
    "router",
    [
        {"kind": "top_any"},
        {"kind": "top_any", "unrouted": "drop", "efficiency_free": 0, "route_weight": 0.0},
        {"kind": "top_p", "p": 0.5},
        {"kind": "relu"},
        {"kind": "null", "k": 2, "num_null": 2},
        {"kind": "importance_k", "k_max": 3},
    ],
    ids=["top_any", "top_any_reference", "top_p", "relu", "null", "importance_k"],
)
def test_gates_with_a_varying_k_wait_once_for_their_assignment_count(router):
    torch.manual_seed(0)
    layer = MoELayer(D, D_FF, E, router=router, gemm="grouped_mm", seed=1).train()
    layer.recorder = RoutingRecorder(E, D)
    layer.recorder.active = True
    x, grad = inputs(1)
    counter, _ = counted(lambda: layer_step(layer, x, grad))
    assert [name for name, _ in counter.syncs] == ["nonzero"], counter.syncs
    assert counter.host_tensors == 0


def test_the_segment_loop_reads_the_counts_once():
    """Off the grouped GEMM (the CPU default), the loop needs each expert's row count on the host: one read."""
    layer = MoELayer(D, D_FF, E, router=TOP2, gemm="loop", seed=1).train()
    x, grad = inputs(2)
    counter, reads = counted(lambda: layer_step(layer, x, grad), forbid_reads=False)
    assert counter.syncs == [] and reads == ["tolist"]


def test_the_counter_sees_what_syncs():
    """The dispatch mode flags the ops that would wait for a GPU, and host_reads the reads it cannot see."""
    t = torch.tensor([0, 3, 1, 0])
    with host_reads() as reads, OpCounter() as counter:
        t.nonzero()
        t[t > 0]
        t.bincount()
        int(t[1])
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=4)
        t.tolist()
        t.argsort(stable=True)
    names = [name for name, _ in counter.syncs]
    assert names == ["nonzero", "index", "bincount", "_local_scalar_dense", "repeat_interleave"]
    assert reads == ["tolist"]


def test_grouped_path_op_count_does_not_grow_with_the_experts_and_is_under_half_the_loop():
    """``bench layer --ops``' count on the GPU path (the combine unchunked): the grouped GEMM's layer dispatches the
    same ops at 8 and 64 experts, and at most half of what the segment loop dispatches at 8 (issue 29, point 2)."""
    from benchmarks.layer import count_layer_ops

    def ops(gemm: str, experts: int) -> int:
        return count_layer_ops("top2", 64, D, D_FF, experts, gemm)["ops_gpu_path"]

    grouped = ops("grouped_mm", 8)
    assert grouped == ops("grouped_mm", 64)
    assert grouped <= ops("loop", 8) / 2


# ----------------------------------------------------------------------------------------------------------------------
# expert parallelism: the counts are read once per forward, the backward reuses the split sizes


def case_expert_parallel_syncs(overlap_min_rows: int, shadows: int) -> list:
    world = dist.get_world_size()
    layer = MoELayer(
        D,
        D_FF,
        E,
        router=TOP2,
        gemm="grouped_mm",
        groups=dist_pool.groups(world),
        seed=3,
        shadow_experts=shadows,
        shadow_min_rows=1,
    ).train()
    layer.dispatcher.overlap_min_rows = overlap_min_rows
    x, grad = inputs(10 + dist.get_rank(), tokens=24)
    layer_step(layer, x, grad)  # warm-up
    out = []
    with host_reads() as reads, OpCounter() as forward:
        y, aux = layer(x)
    out.append((forward.syncs, list(reads)))
    with host_reads() as reads, OpCounter() as backward:
        torch.autograd.backward([y, aux.loss], [grad, torch.ones(())])
    out.append((backward.syncs, list(reads)))
    return out


@pytest.mark.parametrize("overlap_min_rows,shadows", [(0, 0), (10**9, 0), (0, 2)], ids=["overlap", "merged", "shadow"])
def test_expert_parallel_reads_the_counts_once_per_forward_and_never_in_backward(overlap_min_rows, shadows):
    for forward, backward in dist_pool.pool(2).run(case_expert_parallel_syncs, overlap_min_rows, shadows):
        assert forward == ([], ["tolist"]), forward
        assert backward == ([], []), backward


# ----------------------------------------------------------------------------------------------------------------------
# on a GPU: the CUDA runtime's own check


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability 8.0+: the grouped GEMM runs there, and the sync check is CUDA's",
)
def test_cuda_top2_layer_forward_backward_has_no_synchronising_call():
    torch.manual_seed(0)
    d, d_ff = 256, 512
    layer = MoELayer(d, d_ff, E, router=TOP2, gemm="grouped_mm", seed=1).cuda().train()
    layer.recorder = RoutingRecorder(E, d)
    layer.recorder.active = True
    x = torch.randn(1024, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1024, d, device="cuda", dtype=torch.bfloat16)
    ones = torch.ones((), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [grad, ones])

    step()  # warm-up: lazy initialisation (cuBLAS handles, allocator) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
