"""Expert-parallel dispatcher: rows travel to the rank that owns their expert and come back for the combine.

    start the all-to-all of per-(destination, slot) counts -> every rank will know what it receives
      (with shadow experts: an all-gather of every rank's counts, and the hot experts' weights are broadcast)
      meanwhile: sort the assignments (own experts first, then by (owner rank, slot)) and gather the rows
    (with shared experts: they run while the rows for other ranks travel, whichever mode below)
    with many rows per local expert (>= OVERLAP_MIN_ROWS), overlap:
    start the all-to-all of the rows for other ranks      -> uneven split sizes, the row count of each peer
      meanwhile: experts on the first half of the own rows -> communication hidden behind compute
    finish it; experts on the received rows, one segment per (source rank, slot): no reordering
    start the reverse all-to-all of their outputs
      meanwhile: experts on the second half of the own rows
    finish it; weighted index_add of the three output pieces into [S, d] (combine.py: no cat)
    with few rows per local expert (fine-grained experts), merge: exchange the rows, run each expert once on its own
    and received rows together (one GEMM), exchange the outputs back, weighted index_add

The backward overlaps the same way, in reverse order: each exchange of gradients travels while half of the own
rows' backward runs. Bytes on the wire and rows in the matmuls are exactly the assignments: no capacity padding,
no MAX all-reduce, and rows a rank routes to itself never touch the network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..experts import ExpertBank
from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan
from .all_to_all import exchange_counts, finish_all_to_all, gather_counts, start_all_to_all
from .combine import combine_rows
from .permute import gather_pieces, sort_by_expert
from .shadow import (
    SHADOW_MIN_ROWS,
    PendingShadows,
    Shadow,
    broadcast_weights,
    flush_after_backward,
    plan_shadows,
    register,
    shadow_rows,
)
from .traffic import Traffic


def send_order(table: PlacementTable, rank: int) -> torch.Tensor:
    """[E] position -> send position: ``rank``'s own experts first (by slot), then the others by (rank, slot)."""
    index = table.dispatch_index
    lo, hi = table.rank_offsets[rank], table.rank_offsets[rank + 1]
    own = (index >= lo) & (index < hi)
    return torch.where(own, index - lo, torch.where(index < lo, index + (hi - lo), index))


def split_segments(segments: list[tuple[int, int]], rows: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(slot, n) segments cut after ``rows`` rows (a segment may be cut in two)."""
    first, second, seen = [], [], 0
    for slot, n in segments:
        take = min(n, max(rows - seen, 0))
        if take:
            first.append((slot, take))
        if n - take:
            second.append((slot, n - take))
        seen += n
    return first, second


# Below this many rows per local expert, one GEMM per expert over all its rows (own and received) beats hiding the
# exchanges behind compute: splitting an expert's rows into own-first, received and own-second segments makes each
# GEMM small, and small GEMMs lose more than the overlap gains. Measured with `bench expert_parallel --sweep` (2 ranks
# x 1 thread, CPU): at 2048 rows per expert overlapping is 4-10% faster, at 512 and below merging is 10-30% faster.
OVERLAP_MIN_ROWS = 1024


def kept_order(
    counts: list[int], bounds: list[int], me: int, n_self: int, kept: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(start, length) ranges of the send order, reordered: own rows, then the rows this rank keeps for each shadow
    ((rank-order position, rows): the first rows of that expert's block), then the rest of the outgoing rows."""
    start, p_start = n_self, {}
    for p in [p for p in range(len(counts)) if not bounds[me] <= p < bounds[me + 1]]:
        p_start[p] = start
        start += counts[p]
    ranges, cut = [(0, n_self)], {}
    for p, k in kept:
        ranges.append((p_start[p], k))
        cut[p_start[p]] = k
    for p in sorted(p_start, key=p_start.get):
        skip = cut.get(p_start[p], 0)
        if counts[p] - skip:
            ranges.append((p_start[p] + skip, counts[p] - skip))
    return [(s, n) for s, n in ranges if n]


class ExpertParallelDispatcher:
    def __init__(
        self,
        groups: ParallelGroups,
        placement: PlacementTable,
        name: str = "moe",
        shadow_experts: int = 0,
        shadow_min_rows: int = SHADOW_MIN_ROWS,
    ) -> None:
        self.groups = groups
        self.name = name
        self.placement = placement
        self.overlap_min_rows = OVERLAP_MIN_ROWS
        self.shadow_experts = shadow_experts  # at most this many experts copied per step (0: off); see shadow.py
        self.shadow_min_rows = shadow_min_rows

    @property
    def placement(self) -> PlacementTable:
        return self._placement

    @placement.setter
    def placement(self, table: PlacementTable) -> None:
        self._placement = table
        self._keys: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def keys(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position -> (rank, slot) order and position -> send order, on ``device``; built once per table."""
        if device not in self._keys:
            table = self._placement
            order = send_order(table, self.groups.ep_rank)
            self._keys[device] = (table.dispatch_index.to(device), order.to(device))
        return self._keys[device]

    def run(
        self,
        x: torch.Tensor,
        plan: RoutingPlan,
        experts: ExpertBank,
        alongside: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Traffic]:
        """``alongside``: the [S, d] output of an undispatched FFN of the same tokens (shared experts), added to the
        combine; it runs while the dispatch exchange is in flight, and its backward while the gradients travel."""
        table = self.placement
        world, me, group = self.groups.ep_size, self.groups.ep_rank, self.groups.ep_group
        per_rank, bounds = list(table.rank_sizes), table.rank_offsets
        n_local = per_rank[me]
        rank_key, send_key = self.keys(plan.expert.device)

        # counts in (rank, slot) order for the exchange; rows in send order (own experts first). The counts travel
        # while the rows are sorted and gathered: that needs only what this rank sends itself.
        rank_order = torch.bincount(rank_key[plan.expert], minlength=table.num_experts)
        shadowing = self.shadow_experts > 0
        if shadowing:
            gathered, in_flight = gather_counts(rank_order, world, group, f"{self.name}.dispatch.counts")
        else:
            received, in_flight = exchange_counts(
                rank_order, per_rank, n_local, world, group, f"{self.name}.dispatch.counts", async_op=True
            )
        counts = rank_order.tolist()
        n_self = sum(counts[bounds[me] : bounds[me + 1]])
        perm = sort_by_expert(plan.token, send_key[plan.expert], plan.weight, table.num_experts)
        token, weight = perm.token, perm.weight
        # own rows in two halves (the overlapped mode computes one while each exchange travels), kept rows (shadows),
        # outgoing rows; without shadows they are gathered while the counts travel
        sizes = [n_self // 2, n_self - n_self // 2, 0, plan.num_assignments - n_self]
        pieces = None if shadowing else gather_pieces(x, token, sizes)
        in_flight.wait()

        shadows: list[Shadow] = []
        kept, kept_from = [], [0] * world  # rows kept per shadow; per owner, rows kept instead of sent
        if shadowing:
            matrix = gathered.view(world, table.num_experts).tolist()  # [source rank][rank-order position]
            shadows = plan_shadows(matrix, list(bounds), self.shadow_experts, self.shadow_min_rows)
            rows = shadow_rows(matrix, list(bounds), me, shadows)
            per_source, kept, kept_from = rows.received, rows.kept, rows.kept_from
        else:
            per_source = received.view(world, n_local).tolist()  # [source rank][my slot]
        n_kept = sum(k for _, k in kept)
        if n_kept:  # the kept rows move up behind the own rows, out of the outgoing block
            ranges = kept_order(counts, list(bounds), me, n_self, kept)
            order = torch.cat([torch.arange(s, s + n, device=token.device) for s, n in ranges])
            token, weight = token[order], weight[order]
        if pieces is None:
            pieces = gather_pieces(x, token, [*sizes[:2], n_kept, sizes[3] - n_kept])

        send_splits = [0 if r == me else sum(counts[bounds[r] : bounds[r + 1]]) - kept_from[r] for r in range(world)]
        recv_splits = [0 if r == me else sum(row) for r, row in enumerate(per_source)]
        own = [(slot, n) for slot, n in enumerate(per_source[me]) if n]
        remote = [(slot, n) for r, row in enumerate(per_source) if r != me for slot, n in enumerate(row) if n]
        rows_here = n_self + sum(recv_splits) + n_kept

        copies, shadow_segments = None, [(i, sh.keep[me]) for i, sh in enumerate(shadows) if sh.keep[me]]
        if shadows:
            owned = dict(experts.weights())
            copies = broadcast_weights(shadows, owned, me, group, self.name)
            if torch.is_grad_enabled():
                register(PendingShadows(shadows, copies, owned, me, group, self.name))

        def shadow_ffn(rows: torch.Tensor) -> torch.Tensor:
            return rows.new_zeros(0, x.shape[1]) if not rows.shape[0] else experts(rows, shadow_segments, copies)

        base = None  # alongside's output, computed while the dispatch exchange travels

        def dispatch(outgoing: torch.Tensor):
            nonlocal base
            started = start_all_to_all(outgoing, recv_splits, send_splits, group, f"{self.name}.dispatch.rows")
            if alongside is not None:
                base = alongside()
            return started

        def combine(results: torch.Tensor):
            return start_all_to_all(results, send_splits, recv_splits, group, f"{self.name}.combine.rows")

        run = self.overlapped if self.overlaps(rows_here, n_local) else self.merged
        outputs = run(pieces, own, remote, experts, shadow_ffn, dispatch, combine)
        out = combine_rows(outputs, token, weight, x.shape[0], base)
        if shadows:
            out = flush_after_backward(out)
        traffic = Traffic(
            assignments=plan.num_assignments,
            rows_sent=plan.num_assignments,
            rows_sent_off_rank=sum(send_splits),
            rows_computed=rows_here,
            row_bytes=x.shape[1] * x.element_size(),
            rows_shadowed=n_kept,
            experts_shadowed=len(shadows),
        )
        return out, traffic

    @staticmethod
    def overlapped(pieces, own, remote, experts, shadow, dispatch, combine) -> list[torch.Tensor]:
        """Output pieces in send order; half of the own rows and the kept rows hide the dispatch exchange, the other
        half the combine."""
        first, second, kept, outgoing = pieces
        own_first, own_second = split_segments(own, first.shape[0])
        buf, flight = dispatch(outgoing)
        y_first = experts(first, own_first)
        y_kept = shadow(kept)
        buf, flight = combine(experts(finish_all_to_all(buf, flight), remote))
        y_second = experts(second, own_second)
        return [y_first, y_second, y_kept, finish_all_to_all(buf, flight)]

    @staticmethod
    def merged(pieces, own, remote, experts, shadow, dispatch, combine) -> list[torch.Tensor]:
        """Output pieces in send order; every expert runs once on its own and received rows together."""
        first, second, kept, outgoing = pieces
        buf, flight = dispatch(outgoing)
        y_kept = shadow(kept)
        received = finish_all_to_all(buf, flight)
        sizes = [first.shape[0], second.shape[0], received.shape[0]]
        y_first, y_second, y_remote = experts(torch.cat([first, second, received]), own + remote).split(sizes)
        buf, flight = combine(y_remote)
        return [y_first, y_second, y_kept, finish_all_to_all(buf, flight)]

    def overlaps(self, rows: int, n_local: int) -> bool:
        """Overlap compute with the exchanges, or run every expert once on all its rows (see OVERLAP_MIN_ROWS)."""
        return rows >= self.overlap_min_rows * max(n_local, 1)
