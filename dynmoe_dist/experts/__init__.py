"""Expert banks: stacked weights, grouped matmul over contiguous segments; shared (always-on) experts."""

from .bank import ExpertBank
from .grouped import ACTIVATIONS, expert_ffn, grouped_ffn
from .shared import SharedExperts

__all__ = ["ACTIVATIONS", "ExpertBank", "SharedExperts", "expert_ffn", "grouped_ffn"]
