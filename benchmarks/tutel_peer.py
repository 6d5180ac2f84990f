"""Tutel's MoE layer as a benchmark peer: same router and expert weights, Tutel's own dispatch.

What this module pins down about ``tutel.moe.moe_layer`` (read from Tutel 0.3, commit 82af7aad9fc3:
``impls/moe_layer.py``, ``impls/fast_dispatch.py``, ``impls/communicate.py``, ``gates/top.py``, ``experts/ffn.py``):

* Routing. The ``'top'`` gate is a bias-free ``Linear(d, E)`` (``wg``; ``fp32_gate=True`` runs it in fp32, which is
  what our fp32 parameters do anyway). ``scores = softmax(logits)`` over all experts, ``topk`` picks k. With
  ``normalize_gate=True`` (the default) and k > 1 the k chosen scores are divided by their sum (clamped at eps):
  exactly our ``top_k`` router. For k = 1 ``normalize_gate`` does nothing (raw softmax probability).
* Randomness. ``gate_noise`` adds ``noise * randn / E`` to the logits, but only in training mode and only when > 0;
  it is 0 here. ``batch_prioritized_routing`` (or env ``BATCH_PRIO``) is deterministic: it orders slot assignment by
  each token's top score instead of by position; off here. ``is_gshard_loss`` only picks the auxiliary loss (GShard
  by default) and never changes the output. ``seeds=(..)`` calls ``torch.manual_seed`` (the process-global RNG!)
  before building the gate / experts; not passed here. ``a2a_ffn_overlap_degree > 1`` only takes effect on CUDA.
  Env switches ``SKIP_MOE``, ``SKIP_EXPERT``, ``SKIP_A2A`` and ``CAP_FACTOR`` (default capacity factor when the gate
  dict has none) change behaviour globally; :func:`build_tutel_moe` always passes ``capacity_factor`` explicitly.
* Slots and drops. Slot (location) of a route inside its expert: all first choices in token order, then all second
  choices (offset by the first choices' count), etc. A route whose location is ``>= capacity`` is dropped (its
  output contribution is zero; the surviving gate is not renormalised). So the routes to expert e that survive are
  the first ``min(count_e, C)`` in that order, and ``max(count_e - C, 0)`` are dropped.
* Capacity (``extract_critical``), with ``S`` = tokens on this rank and ``spe = ceil(S / E)``:
  ``capacity_factor > 0``: ``C = k * int(capacity_factor * spe)`` (local, no communication; tokens past it drop).
  ``== 0`` (dropless): ``C`` = largest per-expert route count on this rank, then ``all_reduce(MAX)`` over the group
  passed as ``group``: the world-wide largest count. ``< 0``: that dropless value capped at
  ``k * int(-capacity_factor * spe)``. Then ``C`` is rounded up to a multiple of ``sharded_count *
  a2a_ffn_overlap_degree`` (1 here: no rounding). The capacity is not stored on the layer; :func:`tutel_traffic`
  reads it off the tensor handed to the experts and checks it against :func:`tutel_capacity` (the rule above).
* Expert sharding. ``experts={'num_experts_per_device': E_local, ...}`` and ``E = E_local * group size``; group rank
  ``r`` holds global experts ``r * E_local .. (r + 1) * E_local - 1`` (contiguous block). FFN weights:
  ``batched_fc1_w [E_local, d_ff, d]`` (``fc1.weight`` layout, i.e. ``w_in[e].T``), ``batched_fc2_w [E_local, d_ff,
  d]`` (``fc2.weight.T``, i.e. ``w_out[e]``), ``batched_fc1_bias [E_local, d_ff]``, ``batched_fc2_bias [E_local, d]``;
  ``y = act(x @ fc1_w.T + b1) @ fc2_w + b2``. ``has_fc1_bias`` / ``has_fc2_bias=False`` drop the biases; with
  ``bias=True`` here they exist and are zeroed.
* Activation. At this commit the default ``activation_fn`` is ``lambda x: F.relu(x)`` but ``experts/ffn.py`` never
  imports ``F``: the first forward raises ``NameError``. Always pass one; we pass exact (erf) ``F.gelu`` like ours.
* Dispatch. Every rank encodes its tokens into an ``[E, C, d]`` buffer (zero padding rows; gates are applied at
  decode, ``is_postscore=True``) and sends it with one equal-split ``dist.all_to_all_single`` over ``group`` (so gloo
  on CPU works; the custom NCCL paths are used only for ``use_2dh`` / overlap on CUDA). Each rank's experts run on
  ``[E_local, ep * C, d]``, i.e. ``E * C`` rows whatever the real load, and the result goes back the same way.
  Backward runs both all-to-alls again with the same sizes. With a group of size 1 there is no all-to-all.
* On CPU, encode/decode use the extension's ``invoke_cpu_fp32`` kernels (fp32 and fp64 only).

Set-up: ``torch.distributed.init_process_group(...)`` and an expert-parallel group of ``ep`` ranks (ours:
``build_groups(ep).ep_group``), then :func:`build_tutel_moe`. ``import tutel`` is deferred to those calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .padded_traffic import PaddedTraffic, check_peer_weights

__all__ = [
    "TutelTraffic",
    "build_tutel_moe",
    "group_rank_size",
    "tutel_available",
    "tutel_capacity",
    "tutel_local_expert_range",
    "tutel_traffic",
]


def tutel_available() -> tuple[bool, str]:
    """``(True, version info)`` when ``tutel.moe`` imports, else ``(False, why)``."""
    try:
        from tutel import moe  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "absent"; say why
        return False, f"import tutel failed: {type(exc).__name__}: {exc}"
    return True, "tutel importable"


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This rank's position in ``group`` and its size; ``(0, 1)`` without torch.distributed or without a group."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    if group is None:
        if dist.get_world_size() > 1:
            raise ValueError("a multi-rank world needs an explicit expert-parallel group (Tutel would use WORLD)")
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def tutel_local_expert_range(num_experts: int, group: dist.ProcessGroup | None) -> range:
    """Global ids Tutel places on this rank: a contiguous block by group rank."""
    rank, size = group_rank_size(group)
    per_rank = num_experts // size
    return range(rank * per_rank, (rank + 1) * per_rank)


def tutel_capacity(max_count: int, tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """Tutel's capacity rule (``extract_critical``, alignment 1), recomputed.

    ``max_count``: the world-wide largest per-expert route count (only used when ``capacity_factor <= 0``);
    ``tokens``: tokens on this rank.
    """
    per_expert = (tokens + num_experts - 1) // num_experts
    if capacity_factor > 0:
        return k * int(capacity_factor * per_expert)
    capacity = max_count
    if capacity_factor < 0:
        capacity = min(capacity, k * int(-capacity_factor * per_expert))
    return capacity


def build_tutel_moe(
    d_model: int,
    d_ff: int,
    num_experts: int,
    k: int,
    router_weight: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    group: dist.ProcessGroup | None,
    capacity_factor: float = 0.0,
    bias: bool = False,
) -> nn.Module:
    """A ``tutel.moe.moe_layer`` with gate ``{'type': 'top', 'k': k}`` and exact-GELU FFN experts, weights loaded.

    ``router_weight [E, d]`` becomes the gate's ``wg.weight`` (logits ``x @ router_weight.T``); ``w_in [E, d, d_ff]``
    and ``w_out [E, d_ff, d]`` hold all experts, this rank keeps :func:`tutel_local_expert_range`. ``group``: the
    expert-parallel group (all-to-all and the dropless capacity all-reduce); ``None`` only in a 1-rank world.
    ``capacity_factor``: Tutel's (0 = dropless). ``bias``: keep Tutel's FFN biases (zeroed) instead of building the
    experts without them; either way the function is ours, the biases only cost two adds. Call as ``y = moe(x)``.
    """
    check_peer_weights(d_model, d_ff, num_experts, router_weight, w_in, w_out)
    _, ep = group_rank_size(group)
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} must be divisible by the group size {ep}")
    from tutel import moe as tutel_moe

    moe = tutel_moe.moe_layer(
        gate_type={"type": "top", "k": k, "fp32_gate": True, "capacity_factor": capacity_factor, "gate_noise": 0.0},
        model_dim=d_model,
        experts={
            "type": "ffn",
            "num_experts_per_device": num_experts // ep,
            "hidden_size_per_expert": d_ff,
            "activation_fn": F.gelu,  # exact erf GELU; also avoids the default's NameError (F not imported)
            "has_fc1_bias": bias,
            "has_fc2_bias": bias,
        },
        group=group if ep > 1 else None,
        batch_prioritized_routing=False,
        normalize_gate=True,
        is_postscore=True,
        parallel_type="adaptive:1",
    )
    if moe.num_global_experts != num_experts:
        raise AssertionError(f"Tutel built {moe.num_global_experts} global experts, expected {num_experts}")
    local = tutel_local_expert_range(num_experts, group)
    experts = moe.experts
    with torch.no_grad():
        moe.gates[0].wg.weight.copy_(router_weight)
        experts.batched_fc1_w.copy_(w_in[local.start : local.stop].transpose(1, 2))
        experts.batched_fc2_w.copy_(w_out[local.start : local.stop])
        for name in ("batched_fc1_bias", "batched_fc2_bias"):
            b = getattr(experts, name)
            if b is not None:
                b.zero_()
    return moe


@dataclass(frozen=True)
class TutelTraffic(PaddedTraffic):
    """What one Tutel forward did on this rank."""

    k: int
    capacity_factor: float
    dropped: int  # routes from this rank past the capacity: sum_e max(count_e - C, 0)

    DERIVED = (*PaddedTraffic.DERIVED, "dropped_fraction")

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.assignments_sent, 1)


def tutel_traffic(moe: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, TutelTraffic]:
    """Run one forward of ``moe`` (from :func:`build_tutel_moe`) on ``x`` and report its traffic.

    Collective: every rank of the group calls it (the forward's own collectives plus one ``all_gather`` of the
    per-expert counts). The capacity is read off the tensor the experts receive (``[E_local, ep * C, d]``) and checked
    against :func:`tutel_capacity`; per-expert counts come from the layer's ``dispatch_count`` (Tutel's own count of
    routes per expert on this rank, before drops). Grad mode is the caller's; returns ``(output, traffic)``.
    """
    seen: dict[str, Any] = {}

    def on_experts(_module: nn.Module, args: Any) -> None:
        seen["expert_input"] = (tuple(args[0].shape), args[0].element_size())

    hook = moe.experts.register_forward_pre_hook(on_experts)
    try:
        out = moe(x)
    finally:
        hook.remove()

    group = moe.group if moe.world_size > 1 else None
    _, ep = group_rank_size(group)
    (e_local, rows_per_expert, d_model), element_size = seen["expert_input"]
    num_experts = e_local * ep
    capacity = rows_per_expert // ep
    counts = moe.dispatch_count.detach().to(torch.int64).reshape(num_experts)
    if ep > 1:
        everyone = [torch.empty_like(counts) for _ in range(ep)]
        dist.all_gather(everyone, counts, group=group)
        all_counts = torch.stack(everyone)
    else:
        all_counts = counts.unsqueeze(0)
    gate = moe.gates[0]
    tokens = x.numel() // x.shape[-1]
    expected = tutel_capacity(int(all_counts.max()), tokens, num_experts, gate.top_k, gate.capacity_factor)
    if expected != capacity:
        raise AssertionError(f"Tutel's experts saw capacity {capacity}, its rule gives {expected}")
    local = tutel_local_expert_range(num_experts, group)
    global_counts = all_counts.sum(0)
    rows = num_experts * capacity
    traffic = TutelTraffic(
        num_experts=num_experts,
        ep_size=ep,
        num_local_experts=e_local,
        d_model=d_model,
        k=gate.top_k,
        tokens=tokens,
        capacity_factor=float(gate.capacity_factor),
        capacity=capacity,
        exp_counts=tuple(int(c) for c in counts),
        global_local_counts=tuple(int(global_counts[e]) for e in local),
        dropped=int((counts - capacity).clamp(min=0).sum()),
        rows_computed=rows,
        rows_per_all_to_all=rows,
        bytes_per_all_to_all=rows * d_model * element_size if ep > 1 else 0,
        element_size=element_size,
    )
    return out, traffic
