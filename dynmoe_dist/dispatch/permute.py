"""Permutation of assignments into expert order, and its inverse for the combine.

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


def combine_rows(y: torch.Tensor, perm: Permutation, num_tokens: int, base: torch.Tensor | None = None) -> torch.Tensor:
    """[A, d] expert outputs -> [S, d]: weighted sum per token (index_add), added to ``base`` ([S, d], e.g. the
    shared experts' output) or to zeros; tokens with k = 0 get ``base`` (or 0)."""
    out = y.new_zeros(num_tokens, y.shape[-1]) if base is None else base.to(y.dtype)
    return out.index_add(0, perm.token, y * perm.weight.to(y.dtype).unsqueeze(-1))
