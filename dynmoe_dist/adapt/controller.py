"""AdaptController: the control plane's schedule, called once per optimizer step.

Every ``record_steps + idle_steps`` steps it closes a recording window, reduces it over the world, asks the policy
for a decision, plans the placement (balance first, fewest bytes second) and runs the migration protocol; with no
expert to add or remove it still rebalances when the load imbalance passes ``rebalance_threshold``. Always at an
optimizer-step boundary, never inside forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from ..layer import MoELayer
from ..optim import MoEAdam
from ..parallel.groups import ParallelGroups
from .planner import plan_placement, should_rebalance
from .policy import POLICIES, PolicyConfig
from .protocol import AdaptEvent, ExpertMigration, payload_bytes
from .recorder import RoutingRecorder

log = logging.getLogger("dynmoe_dist.adapt")


@dataclass
class AdaptConfig:
    record_steps: int = 300
    idle_steps: int = 600
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    policy_name: str = "dynmoe"
    rebalance_threshold: float | None = 1.25  # max / mean rank load that triggers a rebalance; None: never
    max_experts_per_rank: int | None = None
    tolerance: float = 0.05
    # The run's last optimizer step. A window closing fewer than max(idle_steps, 1) steps before it takes no event:
    # what an event adds would get too little training to settle (the idle window is that time), and the final
    # validation, checkpoint and export would hold it untrained. None: no end known, every window acts (the reference).
    end_step: int | None = None

    def __post_init__(self) -> None:
        check(self.record_steps >= 1, "record_steps", self.record_steps, "an integer >= 1")
        check(self.idle_steps >= 0, "idle_steps", self.idle_steps, "an integer >= 0")
        check(self.policy_name in POLICIES, "policy_name", self.policy_name, " | ".join(POLICIES))
        if self.rebalance_threshold is not None:
            check(self.rebalance_threshold >= 1, "rebalance_threshold", self.rebalance_threshold, ">= 1 or None")


class AdaptController:
    def __init__(
        self,
        model: nn.Module,
        optimizer: MoEAdam,
        groups: ParallelGroups | None = None,
        cfg: AdaptConfig | None = None,
        dense_init: dict[str, torch.Tensor] | None = None,
        fault=None,
    ) -> None:
        self.cfg = cfg or AdaptConfig()
        self.optimizer, self.groups = optimizer, groups
        self.dense_init, self.fault = dense_init, fault
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        for layer in self.layers:
            layer.recorder = RoutingRecorder(layer.num_experts, layer.d_model)
        self.steps = 0
        self.events: list[AdaptEvent] = []
        self._set_recording()

    def state_dict(self) -> dict:
        """The schedule position and every layer's open window; the events so far live in the run's log."""
        return {"steps": self.steps, "recorders": {layer.name: layer.recorder.state_dict() for layer in self.layers}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for layer in self.layers:
            layer.recorder.load_state_dict(state["recorders"][layer.name])

    @property
    def period(self) -> int:
        return self.cfg.record_steps + self.cfg.idle_steps

    def _set_recording(self) -> None:
        active = self.steps % self.period < self.cfg.record_steps
        for layer in self.layers:
            layer.recorder.active = active

    def step(self) -> list[AdaptEvent]:
        """Call after every optimizer step; returns the events of this boundary (usually none)."""
        self.steps += 1
        events = []
        if self.steps % self.period == self.cfg.record_steps % self.period:  # idle_steps=0: period == record_steps
            if self.near_end():
                for layer in self.layers:
                    layer.recorder.reset(layer.num_experts)
                left = self.cfg.end_step - self.steps
                log.info("adaptation: no event at step %d, %d before the end of the run", self.steps, left)
            else:
                events = [e for layer in self.layers if (e := self.adapt(layer)) is not None]
        self._set_recording()
        return events

    def near_end(self) -> bool:
        """Too close to the run's end for an event to settle (``AdaptConfig.end_step``)."""
        end = self.cfg.end_step
        return end is not None and end - self.steps < max(self.cfg.idle_steps, 1)

    def adapt(self, layer: MoELayer) -> AdaptEvent | None:
        """Close ``layer``'s window and apply what it calls for (collective over the world)."""
        world = self.groups.world_group if self.groups is not None else None
        window = layer.recorder.reduce(layer.router.expert_ids.tolist(), world, layer.router.expert_ids.device)
        decision = POLICIES[self.cfg.policy_name](window, int(layer.next_expert_id), self.cfg.policy)
        loads = window.tokens_by_id()
        old = layer.placement
        ep_size = old.ep_size
        if decision.empty:
            threshold = self.cfg.rebalance_threshold
            if ep_size == 1 or threshold is None or not should_rebalance(old, loads, threshold):
                layer.recorder.reset(layer.num_experts)
                return None
            kind = "rebalance"
        else:
            kind = "adapt"
        removed = set(decision.remove)
        ids = [i for i in window.expert_ids if i not in removed] + [n.expert_id for n in decision.add]
        expected = dict(loads)
        for n in decision.add:  # the unrouted tokens are what a new expert is expected to take
            expected[n.expert_id] = window.unrouted_count / len(decision.add)
        new = plan_placement(
            ids,
            {i: expected[i] for i in ids},
            ep_size,
            current=old,
            expert_bytes=payload_bytes(layer, "move"),
            max_experts_per_rank=self.cfg.max_experts_per_rank,
            tolerance=self.cfg.tolerance,
            version=old.version + 1,
        )
        if kind == "rebalance" and new.owners == old.owners:
            layer.recorder.reset(layer.num_experts)  # already as balanced as the planner can make it
            return None
        event = ExpertMigration(layer, self.optimizer, self.groups, self.dense_init, self.fault).run(
            decision, new, kind, self.steps, expected
        )
        layer.recorder.reset(layer.num_experts)
        self.events.append(event)
        log.info("adaptation %s", event.as_dict())
        return event
