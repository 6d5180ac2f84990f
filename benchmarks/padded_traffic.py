"""Capacity-padded peer layers (DeepSpeed-MoE, Tutel): the weights they are loaded with, and their traffic on one
rank in one forward.

Both peers build an [E, C, d] buffer per rank (padding rows are zeros), exchange it with one equal-split all-to-all
over the expert-parallel group, and run each local expert on [ep, C, d]: E * C rows whatever the real load. Backward
repeats both all-to-alls with the same sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def check_peer_weights(
    d_model: int, d_ff: int, num_experts: int, router_weight: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor
) -> None:
    """The weights a peer layer is loaded with: router [E, d], w_in [E, d, d_ff], w_out [E, d_ff, d] (all experts)."""
    if router_weight.shape != (num_experts, d_model):
        raise ValueError(f"router_weight must be [{num_experts}, {d_model}], got {tuple(router_weight.shape)}")
    if w_in.shape != (num_experts, d_model, d_ff) or w_out.shape != (num_experts, d_ff, d_model):
        raise ValueError(
            f"w_in must be [{num_experts}, {d_model}, {d_ff}] and w_out [{num_experts}, {d_ff}, {d_model}], "
            f"got {tuple(w_in.shape)} and {tuple(w_out.shape)}"
        )


@dataclass(frozen=True)
class PaddedTraffic:
    num_experts: int
    ep_size: int
    num_local_experts: int
    d_model: int
    tokens: int  # tokens this rank fed in
    capacity: int  # rows per (source rank, expert) slot, as the layer chose it
    exp_counts: tuple[int, ...]  # routes from this rank's tokens per global expert, counted before any drop
    global_local_counts: tuple[int, ...]  # routes from all group ranks to each of this rank's experts, before drops
    rows_computed: int  # rows this rank's experts ran: ep * E_local * C = E * C
    rows_per_all_to_all: int  # rows in each all-to-all buffer this rank sends: E * C
    bytes_per_all_to_all: int  # rows_per_all_to_all * d * element size (0 when ep_size == 1: no all-to-all)
    element_size: int

    DERIVED = (
        "assignments_sent",
        "assignments_computed",
        "compute_padding",
        "send_padding",
        "forward_bytes",
        "forward_backward_bytes",
    )

    @property
    def assignments_sent(self) -> int:
        """Real (token, expert) routes from this rank (k * tokens when nothing is dropped)."""
        return sum(self.exp_counts)

    @property
    def assignments_computed(self) -> int:
        """Real routes the whole group sends to this rank's experts (counted before any capacity drop)."""
        return sum(self.global_local_counts)

    @property
    def compute_padding(self) -> float:
        """rows_computed / assignments_computed (>= 1 without drops; 1 means no padding)."""
        return self.rows_computed / max(self.assignments_computed, 1)

    @property
    def send_padding(self) -> float:
        """rows_per_all_to_all / assignments_sent (rows sent per assignment)."""
        return self.rows_per_all_to_all / max(self.assignments_sent, 1)

    @property
    def forward_bytes(self) -> int:
        """Bytes this rank hands to all-to-all in one forward: dispatch + combine."""
        return 2 * self.bytes_per_all_to_all

    @property
    def forward_backward_bytes(self) -> int:
        """Forward plus backward (the backward of each all-to-all is an all-to-all of the same size)."""
        return 4 * self.bytes_per_all_to_all

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in self.DERIVED:
            out[name] = getattr(self, name)
        out["exp_counts"] = list(self.exp_counts)
        out["global_local_counts"] = list(self.global_local_counts)
        return out
