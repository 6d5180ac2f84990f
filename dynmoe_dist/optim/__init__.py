"""The MoE-side optimizer, whose parameters can change shape."""

from .moe_adam import STATE_KEYS, MoEAdam

__all__ = ["STATE_KEYS", "MoEAdam"]
