"""Gates: one file per rule, all returning a RoutingPlan."""

from __future__ import annotations

from .base import Router
from .config import (
    CONFIGS,
    ImportanceKConfig,
    NullExpertConfig,
    ReLUConfig,
    RouterConfig,
    TopAnyConfig,
    TopKConfig,
    TopPConfig,
    router_config,
)
from .importance_k import IMPORTANCE_FUNCTIONS, ImportanceKRouter
from .null_experts import NullExpertRouter
from .plan import RoutingPlan, RoutingStats
from .relu import ReLURouter
from .top_any import TopAnyRouter
from .top_k import TopKRouter
from .top_p import TopPRouter

ROUTERS: dict[str, type[Router]] = {
    "top_any": TopAnyRouter,
    "top_k": TopKRouter,
    "top_p": TopPRouter,
    "importance_k": ImportanceKRouter,
    "relu": ReLURouter,
    "null": NullExpertRouter,
}


def build_router(spec: str | dict | RouterConfig, d_model: int, num_experts: int) -> Router:
    """The gate a config names, sized for ``d_model`` and ``num_experts``."""
    cfg = router_config(spec)
    return ROUTERS[cfg.kind](d_model, num_experts, cfg)


__all__ = [
    "CONFIGS",
    "IMPORTANCE_FUNCTIONS",
    "ROUTERS",
    "ImportanceKConfig",
    "ImportanceKRouter",
    "NullExpertConfig",
    "NullExpertRouter",
    "ReLUConfig",
    "ReLURouter",
    "Router",
    "RouterConfig",
    "RoutingPlan",
    "RoutingStats",
    "TopAnyConfig",
    "TopAnyRouter",
    "TopKConfig",
    "TopKRouter",
    "TopPConfig",
    "TopPRouter",
    "build_router",
    "router_config",
]
