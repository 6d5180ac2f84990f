"""The control plane: recorder, policy, placement planner, migration protocol, and the schedule that runs them."""

from .controller import AdaptConfig, AdaptController
from .planner import imbalance, moved_experts, plan_placement, should_rebalance
from .policy import POLICIES, Decision, NewExpert, PolicyConfig, dynmoe_policy
from .protocol import AdaptEvent, ExpertMigration
from .recorder import RoutingRecorder, WindowStats

__all__ = [
    "POLICIES",
    "AdaptConfig",
    "AdaptController",
    "AdaptEvent",
    "Decision",
    "ExpertMigration",
    "NewExpert",
    "PolicyConfig",
    "RoutingRecorder",
    "WindowStats",
    "dynmoe_policy",
    "imbalance",
    "moved_experts",
    "plan_placement",
    "should_rebalance",
]
