"""Expert-parallel dispatcher: rows travel to the rank that owns their expert and come back for the combine.

    sort assignments by (owner rank, local slot)      -> rows leave grouped by destination
    all-to-all of per-(destination, slot) counts      -> every rank knows what it will receive
    all-to-all of rows with uneven split sizes        -> received grouped by source, then slot
    regroup to slot-major                             -> one contiguous segment per local expert
    ... experts ...
    inverse regroup, reverse all-to-all, weighted index_add into [S, d]

Bytes on the wire and rows in the matmuls are exactly |A| rows each way: no capacity padding, no MAX all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan
from .all_to_all import all_to_all, exchange_counts
from .permute import Permutation, combine_rows, gather_rows, sort_by_expert
from .traffic import Traffic


@dataclass
class ExchangeState:
    perm: Permutation
    send_splits: list[int]
    recv_splits: list[int]
    regroup: torch.Tensor | None  # received (source-major) -> slot-major; None when already slot-major
    num_tokens: int
    traffic: Traffic


def slot_major_index(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts [sources, slots] -> index that reorders source-major rows into slot-major rows."""
    sources, slots = recv_counts.shape
    flat = recv_counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # block starts in source-major order
    block_order = torch.arange(sources * slots, device=flat.device).view(sources, slots).t().reshape(-1)
    lengths = flat[block_order]
    new_starts = torch.cumsum(lengths, 0) - lengths
    total = int(flat.sum())
    return torch.arange(total, device=flat.device) + torch.repeat_interleave(
        starts[block_order] - new_starts, lengths, output_size=total
    )


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(index)
    inv[index] = torch.arange(index.numel(), device=index.device)
    return inv


class ExpertParallelDispatcher:
    def __init__(self, groups: ParallelGroups, placement: PlacementTable, name: str = "moe") -> None:
        self.groups = groups
        self.placement = placement
        self.name = name

    def dispatch(self, x: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, list[int], ExchangeState]:
        table = self.placement
        world, me, group = self.groups.ep_size, self.groups.ep_rank, self.groups.ep_group
        per_rank = table.counts_per_rank()
        n_local = per_rank[me]
        key = table.dispatch_index.to(plan.expert.device)[plan.expert]
        perm = sort_by_expert(plan.token, key, plan.weight, table.num_experts)
        recv_counts = exchange_counts(perm.counts, per_rank, n_local, world, group, f"{self.name}.dispatch.counts")
        recv_counts = recv_counts.view(world, n_local)
        counts = perm.counts.tolist()
        bounds = [sum(per_rank[:r]) for r in range(world + 1)]
        send_splits = [sum(counts[bounds[r] : bounds[r + 1]]) for r in range(world)]
        recv_splits = recv_counts.sum(1).tolist()
        rows = all_to_all(gather_rows(x, perm), recv_splits, send_splits, group, f"{self.name}.dispatch.rows")
        regroup = slot_major_index(recv_counts) if (world > 1 and n_local > 1) else None
        if regroup is not None:
            rows = rows.index_select(0, regroup)
        local_counts = recv_counts.sum(0).tolist()
        traffic = Traffic(
            assignments=plan.num_assignments,
            rows_sent=sum(send_splits),
            rows_sent_off_rank=sum(send_splits) - send_splits[me],
            rows_computed=sum(local_counts),
            row_bytes=x.shape[1] * x.element_size(),
        )
        return rows, local_counts, ExchangeState(perm, send_splits, recv_splits, regroup, x.shape[0], traffic)

    def combine(self, y: torch.Tensor, state: ExchangeState) -> torch.Tensor:
        if state.regroup is not None:
            y = y.index_select(0, inverse_permutation(state.regroup))
        back = all_to_all(y, state.send_splits, state.recv_splits, self.groups.ep_group, f"{self.name}.combine.rows")
        return combine_rows(back, state.perm, state.num_tokens)
