"""Permutation of assignments into expert order (its weighted inverse is ``combine.py``).

A stable sort by expert position keeps token order inside each expert's segment, so results do not depend on
how the sort breaks ties. Sized by |A| (the number of assignments), never by experts x capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    """Assignments sorted by expert: ``counts[e]`` rows per expert, then each sorted row's token and weight."""

    counts: torch.Tensor  # [E] int64
    token: torch.Tensor  # [A] int64, token of each sorted row
    weight: torch.Tensor  # [A] float, combine weight of each sorted row

    def counts_list(self) -> list[int]:
        return self.counts.tolist()


def sort_by_expert(token: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, num_experts: int) -> Permutation:
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    return Permutation(counts=counts, token=token[order], weight=weight[order])


def gather_rows(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """[S, d] -> [A, d]: one row per assignment, in expert order."""
    return x.index_select(0, perm.token)
