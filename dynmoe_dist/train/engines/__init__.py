"""Engines: who owns the dense parameters' reduction, precision and optimizer. The MoE side is always dynmoe_dist's."""

from .base import Engine, dense_param_groups
from .deepspeed_engine import DeepSpeedEngine, deepspeed_config
from .dense_view import DenseView, dense_submodules
from .torch_engine import TorchEngine

__all__ = [
    "DeepSpeedEngine",
    "DenseView",
    "Engine",
    "TorchEngine",
    "deepspeed_config",
    "dense_param_groups",
    "dense_submodules",
]
