"""MoELayer: router -> plan -> dispatcher -> experts -> combine, as one module a model adopts in one line.

    y, aux = moe(x)                      # x: [batch, seq, d] or [tokens, d]
    loss = task_loss + aux.loss

Data flows one way; the layer holds no routing decision beyond the current forward, so an adaptation (adapt/) only
has to change the router rows, the expert bank and the placement table.

Distributed: pass ``groups`` (parallel.build_groups) with ep_size > 1 and the experts are sharded over the
expert-parallel group by a PlacementTable (contiguous blocks unless given); tokens travel by all-to-all sized by the
real assignment counts. Every rank builds the same router and the same experts from ``seed`` (or from the global RNG,
which all ranks must seed alike), so no broadcast is needed at start.

Shared experts (``num_shared_experts``, DeepSeekMoE): always-on FFNs every token passes through, added to the
routed output. They are dense parameters (``moe_parameters`` leaves them out) and run while the routed rows travel.
``shared_gate`` scales their output by a per-token sigmoid gate (Qwen2-MoE).

Shadow experts (``shadow_experts=n``, FasterMoE's shadowing): per step, up to n of the busiest rank's hottest experts
are copied to the other ranks, which compute part of their own rows for them instead of sending them; the copies'
gradients are summed into the owners' at the end of the backward (``dispatch/shadow.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import LocalDispatcher, apply_capacity, check_capacity_factor
from .dispatch.expert_parallel import ExpertParallelDispatcher
from .dispatch.shadow import SHADOW_MIN_ROWS
from .dispatch.traffic import Traffic
from .errors import ConfigError, NonFiniteError, ShapeError, check
from .experts import ExpertBank, SharedExperts
from .experts.grouped import autocast_dtype
from .parallel.collectives import all_reduce
from .parallel.groups import ParallelGroups
from .placement import PlacementTable
from .routing import RouterConfig, RoutingStats, build_router


@dataclass
class MoEAux:
    """What the layer returns beside its output: the total auxiliary loss, its terms, and routing statistics."""

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    traffic: Traffic


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        router: str | dict | RouterConfig = "top_any",
        activation: str = "gelu",
        expert_bias: bool = False,
        capacity_factor: float | None = None,
        min_capacity: int = 0,
        num_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_gate: bool = False,
        check_finite: bool = False,
        groups: ParallelGroups | None = None,
        placement: PlacementTable | None = None,
        seed: int | None = None,
        name: str = "moe",
        shadow_experts: int = 0,
        shadow_min_rows: int = SHADOW_MIN_ROWS,
        gemm: str = "auto",
    ) -> None:
        super().__init__()
        check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an integer >= 1")
        check_capacity_factor(capacity_factor)
        check(
            isinstance(shadow_experts, int) and shadow_experts >= 0, "shadow_experts", shadow_experts, "an integer >= 0"
        )
        check(
            isinstance(shadow_min_rows, int) and shadow_min_rows >= 1,
            "shadow_min_rows",
            shadow_min_rows,
            "an integer >= 1",
        )
        self.d_model = d_model
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity  # with a capacity factor: no expert keeps fewer (DeepSpeed's min_capacity)
        self.check_finite = check_finite
        self.name = name
        if seed is None:
            seed = int(torch.randint(2**62, ()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.router = build_router(router, d_model, num_experts)
        self.groups = groups
        if groups is not None and groups.ep_size > 1:
            table = placement or PlacementTable.contiguous(self.router.expert_ids.tolist(), groups.ep_size)
            if list(table.expert_ids) != self.router.expert_ids.tolist() or table.ep_size != groups.ep_size:
                raise ConfigError(
                    "placement",
                    f"{table.num_experts} experts on {table.ep_size} ranks",
                    f"the router's {num_experts} expert ids on ep_size={groups.ep_size} ranks",
                )
            local_ids = table.experts_on(groups.ep_rank)
            self.dispatcher: LocalDispatcher | ExpertParallelDispatcher = ExpertParallelDispatcher(
                groups, table, name, shadow_experts, shadow_min_rows
            )
        else:
            local_ids = self.router.expert_ids.tolist()
            self.dispatcher = LocalDispatcher(PlacementTable.contiguous(local_ids, 1))
        self.experts = ExpertBank(d_model, d_ff, local_ids, activation, seed, bias=expert_bias, gemm=gemm)
        check(
            isinstance(num_shared_experts, int) and num_shared_experts >= 0,
            "num_shared_experts",
            num_shared_experts,
            "an integer >= 0",
        )
        self.shared = (
            SharedExperts(d_model, shared_d_ff or d_ff, num_shared_experts, activation, seed, expert_bias, shared_gate)
            if num_shared_experts
            else None
        )
        self.seed = seed
        # ids are never reused: the next new expert takes this one
        self.register_buffer("next_expert_id", torch.tensor(num_experts, dtype=torch.int64))
        self.recorder = None  # set by the control plane (adapt.recorder); called with every training forward's stats

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def placement(self) -> PlacementTable:
        return self.dispatcher.placement

    def forward(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """``importance``: attention probabilities [B, H, S, S] or a per-token vector, for importance-k routing."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.d_model:
            raise ShapeError(
                f"MoELayer(d_model={self.d_model}) takes [batch, seq, {self.d_model}] or [tokens, {self.d_model}]; "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ConfigError(
                "MoELayer input dtype",
                x.dtype,
                "a floating-point tensor (float32, bfloat16, float16 or float64): "
                "the layer takes hidden states; embed token ids before it",
            )
        flat = x.reshape(-1, self.d_model)
        if self.check_finite:
            self.assert_finite(flat, "input")
        plan = self.route(flat, importance)
        plan, dropped = apply_capacity(plan, self.capacity_factor, self.min_capacity)
        plan.stats.dropped = dropped
        if self.recorder is not None and self.training:
            self.recorder.observe(plan.stats)
        out, traffic = self.dispatch(flat, plan)
        if self.check_finite:
            self.assert_finite(out, "output")
        return out.view(x.shape), MoEAux(plan.aux_loss(), plan.aux_losses, plan.stats, traffic)

    def dispatch(self, flat: torch.Tensor, plan) -> tuple[torch.Tensor, Traffic]:
        """Rows to the experts and back. Under autocast the rows travel and compute in its dtype (bf16: half the bytes
        on the wire) with autocast off inside, where the experts' preallocated outputs could not follow its casts;
        the shared experts, ordinary modules, keep autocast."""
        device = flat.device.type
        low = autocast_dtype(device)
        if low is None:
            alongside = (lambda: self.shared(flat)) if self.shared is not None else None
            return self.dispatcher.run(flat, plan, self.experts, alongside)

        def shared_under_autocast() -> torch.Tensor:
            with torch.autocast(device, dtype=low):
                return self.shared(flat)

        alongside = shared_under_autocast if self.shared is not None else None
        with torch.autocast(device, enabled=False):
            return self.dispatcher.run(flat.to(low), plan, self.experts, alongside)

    def route(self, flat: torch.Tensor, importance: torch.Tensor | None):
        """The gate runs in its own parameters' dtype with autocast off, whatever the activations' dtype.

        Under bf16 training the MoE parameters stay fp32 (they are their own master copy): thresholds, cosine
        similarities and top-k picks are then not left to bf16 rounding, as DeepSpeed and Megatron also route in fp32.
        """
        with torch.autocast(flat.device.type, enabled=False):
            return self.router(flat.to(self.router.weight.dtype), importance)

    def row_parameters(self) -> list[nn.Parameter]:
        """Parameters whose leading dimension is the expert: gate rows (by position) and expert weights (by slot)."""
        return list(self.router.row_parameters().values()) + list(self.experts.weights().values())

    def moe_parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(gate, routed experts): gate rows are replicated over the world, experts over their data-parallel replicas
        (parallel/grads.py asks every module for these)."""
        return list(self.router.parameters()), list(self.experts.parameters())

    def moe_parameters(self) -> list[nn.Parameter]:
        """What the MoE side owns (MoEAdam, expert-parallel sync, adaptation): the gate and the routed experts. The
        shared experts are dense: the dense engine owns them."""
        return list(self.router.parameters()) + list(self.experts.parameters())

    def install(self, table: PlacementTable, next_expert_id: int) -> None:
        """Adopt a new placement whose rows were already written into the parameters (adapt/protocol commit)."""
        device = self.router.expert_ids.device
        rank = self.groups.ep_rank if self.groups is not None else 0
        self.router.expert_ids = torch.tensor(table.expert_ids, dtype=torch.int64, device=device)
        self.experts.expert_ids = torch.tensor(table.experts_on(rank), dtype=torch.int64, device=device)
        self.next_expert_id.fill_(next_expert_id)
        self.dispatcher.placement = table

    def on_optimizer_step(self) -> None:
        """Call once per optimizer step: rules with per-step state update it from statistics summed over the world."""
        world = self.groups.world_group if self.groups is not None else None
        reduce = None if world is None else (lambda t: all_reduce(t, world, f"{self.name}.router.step"))
        self.router.on_optimizer_step(reduce)

    def assert_finite(self, t: torch.Tensor, what: str) -> None:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = bad.any(-1).nonzero().flatten()
            raise NonFiniteError(
                f"MoE layer {what} has {int(bad.sum())} non-finite values (NaN/Inf) in {rows.numel()} of "
                f"{t.shape[0]} tokens, first at token {int(rows[0])}; look upstream of this layer (learning rate, "
                "loss scale, data), or build the layer with check_finite=False to skip this check"
            )
