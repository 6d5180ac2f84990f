"""Drop-in layers for users of DeepSpeed-MoE and Tutel: their constructors and return values, their trained weights,
our runtime (dropless all-to-all, dynamic experts, any gate). See deepspeed_moe.py and tutel_moe.py for the mapping.
"""

from . import deepspeed_moe, tutel_moe
from .deepspeed_checkpoint import load_deepspeed_checkpoint

__all__ = ["deepspeed_moe", "load_deepspeed_checkpoint", "tutel_moe"]
