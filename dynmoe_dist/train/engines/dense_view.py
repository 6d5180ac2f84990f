"""What DeepSpeed is handed: the model's dense modules, and a forward that runs the whole model.

DeepSpeed's engine treats every parameter of its module as its own: it broadcasts them from rank 0 at start,
all-reduces their gradients (ZeRO 0) or flattens them into partitions (ZeRO 1/2), casts them to bf16, and keeps fp32
master copies that it writes back after each step. Expert weights differ per rank, gate rows and experts change shape
and are replaced by new objects at every adaptation event, and their optimizer state moves between ranks: none of that
may happen to them. So the engine's module registers only the largest submodules that hold no MoE layer, and holds
the model itself unregistered, to run its forward.
"""

from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ...layer import MoELayer


def _has_moe(module: nn.Module) -> bool:
    return any(isinstance(m, MoELayer) for m in module.modules())


def dense_submodules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The largest submodules of ``model`` that contain no ``MoELayer``, by dotted name.

    A module that holds an MoE layer is split into its children; a parameter held directly by such a module would be
    neither dense-owned nor MoE-owned, so it is refused. An MoE layer's shared experts are dense.
    """
    if isinstance(model, MoELayer):
        return [(f"{prefix}shared", model.shared)] if model.shared is not None else []
    if not _has_moe(model):
        return [(prefix.rstrip("."), model)]
    own = [name for name, _ in model.named_parameters(recurse=False)]
    if own:
        raise ConfigError(
            f"parameter {prefix}{own[0]}",
            "held by a module that also contains an MoE layer",
            "parameters inside submodules, so DeepSpeed can own the dense ones and never touch an MoE layer",
        )
    out = []
    for name, child in model.named_children():
        out += dense_submodules(child, f"{prefix}{name}.")
    return out


class DenseView(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name.replace(".", "/") or "model": m for name, m in dense_submodules(model)})
        object.__setattr__(self, "model", model)  # not a registered child: its MoE parameters stay invisible

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
