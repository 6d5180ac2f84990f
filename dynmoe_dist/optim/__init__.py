"""The optimizers: MoEAdam for the MoE side, whose parameters can change shape; torch's AdamW, fused, for the rest."""

from .adamw import dense_adamw
from .moe_adam import STATE_KEYS, MoEAdam

__all__ = ["STATE_KEYS", "MoEAdam", "dense_adamw"]
