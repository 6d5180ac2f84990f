"""Expert-parallel dispatcher: rows travel to the rank that owns their expert and come back for the combine.

    sort assignments: this rank's own experts first, then by (owner rank, slot)
    all-to-all of per-(destination, slot) counts          -> every rank knows what it will receive
    start the all-to-all of the rows for other ranks      -> uneven split sizes, the row count of each peer
      meanwhile: experts on this rank's own rows           -> communication hidden behind compute
    finish it; experts on the received rows, one segment per (source rank, slot): no reordering
    reverse all-to-all, weighted index_add into [S, d]

The backward overlaps the same way: the gradients of the received rows travel back while the own rows' backward
runs. Bytes on the wire and rows in the matmuls are exactly the assignments: no capacity padding, no MAX all-reduce,
and rows a rank routes to itself never touch the network.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank
from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan
from .all_to_all import all_to_all, exchange_counts, finish_all_to_all, start_all_to_all
from .permute import combine_rows, gather_rows, sort_by_expert
from .traffic import Traffic


def send_order(table: PlacementTable, rank: int) -> torch.Tensor:
    """[E] position -> send position: ``rank``'s own experts first (by slot), then the others by (rank, slot)."""
    index = table.dispatch_index
    counts = table.counts_per_rank()
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    own = (index >= lo) & (index < hi)
    return torch.where(own, index - lo, torch.where(index < lo, index + (hi - lo), index))


class ExpertParallelDispatcher:
    def __init__(self, groups: ParallelGroups, placement: PlacementTable, name: str = "moe") -> None:
        self.groups = groups
        self.name = name
        self.placement = placement

    @property
    def placement(self) -> PlacementTable:
        return self._placement

    @placement.setter
    def placement(self, table: PlacementTable) -> None:
        self._placement = table
        self._send_order = send_order(table, self.groups.ep_rank)

    def run(self, x: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> tuple[torch.Tensor, Traffic]:
        table = self.placement
        world, me, group = self.groups.ep_size, self.groups.ep_rank, self.groups.ep_group
        per_rank = table.counts_per_rank()
        n_local = per_rank[me]

        # counts in (rank, slot) order for the exchange; rows in send order (own experts first)
        rank_order = torch.bincount(
            table.dispatch_index.to(plan.expert.device)[plan.expert], minlength=table.num_experts
        )
        received = exchange_counts(rank_order, per_rank, n_local, world, group, f"{self.name}.dispatch.counts")
        per_source = received.view(world, n_local).tolist()  # [source rank][my slot]
        counts = rank_order.tolist()
        bounds = [sum(per_rank[:r]) for r in range(world + 1)]
        send_splits = [0 if r == me else sum(counts[bounds[r] : bounds[r + 1]]) for r in range(world)]
        recv_splits = [0 if r == me else sum(row) for r, row in enumerate(per_source)]

        perm = sort_by_expert(
            plan.token, self._send_order.to(plan.expert.device)[plan.expert], plan.weight, table.num_experts
        )
        rows = gather_rows(x, perm)
        n_self = sum(per_source[me])
        buf, flight = start_all_to_all(rows[n_self:], recv_splits, send_splits, group, f"{self.name}.dispatch.rows")
        y_self = experts(rows[:n_self], [(slot, n) for slot, n in enumerate(per_source[me]) if n])
        received_rows = finish_all_to_all(buf, flight)
        segments = [(slot, n) for r, row in enumerate(per_source) if r != me for slot, n in enumerate(row) if n]
        y_remote = experts(received_rows, segments)
        back = all_to_all(y_remote, send_splits, recv_splits, group, f"{self.name}.combine.rows")
        out = combine_rows(torch.cat([y_self, back]), perm, x.shape[0])
        traffic = Traffic(
            assignments=plan.num_assignments,
            rows_sent=plan.num_assignments,
            rows_sent_off_rank=sum(send_splits),
            rows_computed=n_self + sum(recv_splits),
            row_bytes=x.shape[1] * x.element_size(),
        )
        return out, traffic
