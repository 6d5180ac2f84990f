"""Expert banks: stacked weights, grouped matmul over contiguous segments."""

from .bank import ExpertBank
from .grouped import ACTIVATIONS, expert_ffn, grouped_ffn

__all__ = ["ACTIVATIONS", "ExpertBank", "expert_ffn", "grouped_ffn"]
