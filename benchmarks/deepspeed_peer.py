"""DeepSpeed-MoE as the peer in head-to-head benchmarks: same router and expert weights, DeepSpeed's own dispatch.

What this module pins down about ``deepspeed.moe.layer.MoE`` (read from DeepSpeed 0.19's ``moe/sharded_moe.py``):

* Routing. ``TopKGate`` computes ``logits = x @ wg.weight.T`` in fp32 (``wg`` is a bias-free ``Linear``) and
  ``softmax`` over experts. Three sources of randomness exist and all are switched off here: ``noisy_gate_policy``
  (``'Jitter'`` / ``'RSample'``, top-1 only), ``use_rts`` (random token selection, top-1 only) and
  ``top2_2nd_expert_sampling`` (Gumbel noise added to the logits before picking the *second* expert, top-2 only,
  on by default). With all three off, routing is plain softmax top-k.
* Gate weights. k=1 uses the raw softmax probability of the chosen expert (no renormalisation). k=2
  (``top2gating``) renormalises the pair: ``g1 / (g1 + g2)`` and ``g2 / (g1 + g2)`` (denominator clamped at eps).
  k>2 (``topkgating``) renormalises over the k selected experts in the same way.
* Capacity. With ``drop_tokens=False`` the capacity is the largest per-expert assignment count on this rank, then an
  ``all_reduce(MAX)`` over the expert-parallel group makes it the world-wide maximum; ``capacity_factor`` and
  ``min_capacity`` are ignored. With ``drop_tokens=True`` it is ``max(ceil(S / E * capacity_factor * k),
  min_capacity)`` and overflowing routes are dropped (top-2: by position, first choices before second choices).
* Dispatch. Every rank builds an ``[E, C, d]`` buffer (padding rows are zeros) and sends it with one equal-split
  ``all_to_all_single`` over the expert-parallel group; the reply comes back the same way. So rank ``r`` of the group
  owns experts ``r * E / ep .. (r + 1) * E / ep - 1`` and runs them on ``[ep, E / ep, C, d]``, i.e. ``E * C`` rows,
  whatever the real load is. Backward runs the two all-to-alls again in reverse.

Set-up order on every rank: ``torch.distributed.init_process_group(...)``, then :func:`init_deepspeed_groups`, then
:func:`build_deepspeed_moe`. Import of ``deepspeed`` is deferred to those calls (it is slow and chatty).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dynmoe_dist.train.engines.deepspeed_engine import import_deepspeed, init_deepspeed_comm
from dynmoe_dist.train.model import MLP

from .padded_traffic import PaddedTraffic, check_peer_weights

__all__ = [
    "DeepSpeedTraffic",
    "GeluExpert",
    "build_deepspeed_moe",
    "deepspeed_traffic",
    "expert_group_name",
    "init_deepspeed_groups",
    "local_expert_range",
    "make_deepspeed_moe",
]


def expert_group_name(ep_size: int) -> str:
    """The name DeepSpeed files the expert-parallel group of size ``ep_size`` under."""
    return f"ep_size_{ep_size}"


def init_deepspeed_groups(ep_size: int) -> dist.ProcessGroup:
    """Attach DeepSpeed to the running ``torch.distributed`` world and create its expert-parallel groups.

    Collective: call on every rank, after ``torch.distributed.init_process_group`` (gloo works on CPU). Returns this
    rank's expert-parallel group. Ranks ``[i * ep_size, (i + 1) * ep_size)`` form one group (DeepSpeed's default
    "expert before data" layout); the remaining factor ``world / ep_size`` is expert-data parallelism.
    Safe to call again (also with another ``ep_size``); existing groups are reused.
    """
    if not dist.is_initialized():
        raise RuntimeError("init_deepspeed_groups needs torch.distributed to be initialised first")
    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    # With torch.distributed already up this only wraps the existing default group (no rendezvous, no env vars, no
    # MPI discovery). The shared-memory comm op it loads stays idle unless LOCAL_SIZE is set.
    init_deepspeed_comm()
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        # Same call MoE.set_deepspeed_parallelism() makes when no tensor-parallel mpu is registered.
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def local_expert_range(num_experts: int, ep_size: int) -> range:
    """Global ids of the experts this rank holds under DeepSpeed's placement (contiguous block by group rank)."""
    import_deepspeed()
    from deepspeed.utils import groups

    ep_rank = dist.get_rank(group=groups._get_expert_parallel_group(expert_group_name(ep_size)))
    per_rank = num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


class GeluExpert(MLP):
    """Bias-free FFN ``gelu(x @ w_in) @ w_out`` (exact erf GELU): the training model's dense MLP, loadable."""

    @torch.no_grad()
    def load(self, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """Load ``w_in [d, d_ff]`` and ``w_out [d_ff, d]`` (Linear stores the transposes)."""
        self.fc_in.weight.copy_(w_in.t())
        self.fc_out.weight.copy_(w_out.t())


def make_deepspeed_moe(
    d_model: int,
    d_ff: int,
    num_experts: int,
    ep_size: int,
    k: int,
    drop_tokens: bool = False,
    capacity_factor: float = 1.0,
    attach_groups: bool = True,
) -> nn.Module:
    """A ``deepspeed.moe.layer.MoE`` of GELU experts with deterministic routing.

    Needs :func:`init_deepspeed_groups` (``ep_size``) first; every rank of the expert-parallel group builds it alike.
    Weights are DeepSpeed's own initialisation; :func:`build_deepspeed_moe` loads given ones. ``attach_groups``:
    hand the layer its groups now (False when ``deepspeed.initialize`` will, which refuses to do it twice).
    """
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by ep_size={ep_size}")
    import_deepspeed()
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    if expert_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(f"call init_deepspeed_groups({ep_size}) on every rank before building a DeepSpeed MoE")
    moe = MoE(
        hidden_size=d_model,
        expert=GeluExpert(d_model, d_ff),
        num_experts=num_experts,
        ep_size=ep_size,
        k=k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=capacity_factor,  # the gate switches factor with .eval(); keep both the same
        noisy_gate_policy=None,
        drop_tokens=drop_tokens,
        use_rts=False,
        use_tutel=False,
        top2_2nd_expert_sampling=False,
    )
    if attach_groups:
        # Normally deepspeed.initialize() does this; it only looks the (already created) group up and hands it to the
        # gate (for the capacity all-reduce) and the layer (for the all-to-alls).
        moe.set_deepspeed_parallelism()
    return moe


def build_deepspeed_moe(
    d_model: int,
    d_ff: int,
    num_experts: int,
    ep_size: int,
    k: int,
    router_weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    drop_tokens: bool = False,
    capacity_factor: float = 1.0,
) -> nn.Module:
    """:func:`make_deepspeed_moe` with the given router and experts loaded.

    ``router_weight [E, d]`` becomes the gate weight (logits ``x @ router_weight.T``, no bias); ``w_in [E, d, d_ff]``
    and ``w_out [E, d_ff, d]`` hold all experts and this rank keeps its slice :func:`local_expert_range`. Call as
    ``out, l_aux, exp_counts = moe(x)`` with ``x [..., d]``; parameters are fp32.
    """
    check_peer_weights(d_model, d_ff, num_experts, router_weight, w_in, w_out)
    moe = make_deepspeed_moe(d_model, d_ff, num_experts, ep_size, k, drop_tokens, capacity_factor)
    local = local_expert_range(num_experts, ep_size)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(router_weight)
        for expert, e in zip(moe.deepspeed_moe.experts.deepspeed_experts, local, strict=True):
            expert.load(w_in[e], w_out[e])
    return moe


@dataclass(frozen=True)
class DeepSpeedTraffic(PaddedTraffic):
    """What one DeepSpeed-MoE forward did on this rank."""

    rows_off_rank_per_all_to_all: int  # rows of each all-to-all buffer that leave the rank: (E - E_local) * C


def _gate_capacity(gate_output: Any) -> int | None:
    """Capacity from TopKGate's return value: sparse routes (DeepSpeed >= 0.19) or dense combine weights (older)."""
    if not isinstance(gate_output, tuple):
        return None
    if len(gate_output) == 7:  # (l_aux, capacity, num_experts, indices, locations, gates, exp_counts)
        return int(gate_output[1])
    if len(gate_output) == 4:  # (l_aux, combine_weights [S, E, C], dispatch_mask, exp_counts)
        return int(gate_output[1].shape[-1])
    return None


def deepspeed_traffic(moe_module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, DeepSpeedTraffic]:
    """Run one forward of ``moe_module`` (built by :func:`build_deepspeed_moe`) on ``x`` and report its traffic.

    Collective: every rank of the expert-parallel group must call it (the forward all-to-alls, plus one extra
    ``all_reduce(SUM)`` of the per-expert counts to learn how many real rows each rank's experts received). The
    forward runs with whatever grad mode the caller has; returns ``(output, traffic)``. Capacity and row counts are read
    off the gate's return value and the tensor the local experts are handed, not recomputed.
    """
    layer = moe_module.deepspeed_moe
    seen: dict[str, Any] = {}

    def on_gate(_module: nn.Module, _args: Any, output: Any) -> None:
        seen["gate_capacity"] = _gate_capacity(output)

    def on_experts(_module: nn.Module, args: Any) -> None:
        seen["expert_input"] = (tuple(args[0].shape), args[0].element_size())

    hooks = [
        layer.gate.register_forward_hook(on_gate),
        layer.experts.register_forward_pre_hook(on_experts),
    ]
    try:
        out, _l_aux, exp_counts = moe_module(x)
    finally:
        for h in hooks:
            h.remove()

    (ep, e_local, capacity, d_model), element_size = seen["expert_input"]
    num_experts = ep * e_local
    gate_capacity = seen.get("gate_capacity")
    if gate_capacity is not None and gate_capacity != capacity:
        raise AssertionError(f"gate chose capacity {gate_capacity} but experts saw {capacity} rows per slot")

    counts = exp_counts.detach().to(torch.int64).reshape(num_experts)
    global_counts = counts.clone()
    if ep > 1:
        dist.all_reduce(global_counts, op=dist.ReduceOp.SUM, group=layer.ep_group)
    local = local_expert_range(num_experts, ep)
    rows_per_a2a = num_experts * capacity
    traffic = DeepSpeedTraffic(
        num_experts=num_experts,
        ep_size=ep,
        num_local_experts=e_local,
        d_model=d_model,
        tokens=x.numel() // x.shape[-1],
        capacity=capacity,
        exp_counts=tuple(int(c) for c in counts),
        global_local_counts=tuple(int(global_counts[e]) for e in local),
        rows_computed=ep * e_local * capacity,
        rows_per_all_to_all=rows_per_a2a,
        rows_off_rank_per_all_to_all=(num_experts - e_local) * capacity if ep > 1 else 0,
        bytes_per_all_to_all=rows_per_a2a * d_model * element_size if ep > 1 else 0,
        element_size=element_size,
    )
    return out, traffic
