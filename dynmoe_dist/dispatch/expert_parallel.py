"""Expert-parallel dispatcher: rows travel to the rank that owns their expert and come back for the combine.

    start the all-to-all of per-(destination, slot) counts -> every rank will know what it receives
      meanwhile: sort the assignments (own experts first, then by (owner rank, slot)) and gather the rows
    read the counts, sent and received, in one host read: the forward's one host sync (the backward has none: it
      reuses the split sizes); everything before it stays on the device
      (with shadow experts, ``shadow_route``: an all-gather of every rank's counts instead; once they are here, the
      shadows are planned, the rows this rank keeps for them move up behind its own, the rows are gathered and the
      hot experts' weights are broadcast)
    (with shared experts: they run while the rows for other ranks travel, whichever mode below)
    with many rows per local expert (>= OVERLAP_MIN_ROWS), overlap:
    start the all-to-all of the rows for other ranks      -> uneven split sizes, the row count of each peer
      meanwhile: experts on the first half of the own rows -> communication hidden behind compute
    finish it; experts on the received rows, one segment per (source rank, slot): no reordering
    start the reverse all-to-all of their outputs
      meanwhile: experts on the second half of the own rows
    finish it; weighted index_add of the output pieces into [S, d] (combine.py: no cat)
    with few rows per local expert (fine-grained experts), merge: exchange the rows, run each expert once on its own
    and received rows together (one GEMM), exchange the outputs back, weighted index_add

The backward overlaps the same way, in reverse order: each exchange of gradients travels while half of the own
rows' backward runs. Bytes on the wire and rows in the matmuls are exactly the assignments: no capacity padding,
no MAX all-reduce, and rows a rank routes to itself never touch the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from ..experts import ExpertBank
from ..parallel.collectives import GuardedWork
from ..parallel.groups import ParallelGroups
from ..placement import PlacementTable
from ..routing.plan import RoutingPlan, count_per
from .all_to_all import InFlight, exchange_counts, finish_all_to_all, gather_counts, start_all_to_all
from .combine import combine_rows
from .permute import Permutation, gather_pieces, sort_by_expert, start_gather
from .shadow import SHADOW_MIN_ROWS, ShadowCopies, kept_order, plan_shadows, shadow_rows
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
# GEMM small, and small GEMMs lose more than the overlap gains; with many rows per expert the overlap wins
# (measured: docs/BENCHMARKS.md, expert_parallel, `--sweep`).
OVERLAP_MIN_ROWS = 1024


def piece_sizes(n_self: int, n_rows: int, n_kept: int = 0) -> list[int]:
    """Rows per piece of the send order: this rank's own rows in two halves (the overlapped mode computes one while
    each exchange travels), the rows it keeps for shadows, the outgoing rows."""
    return [n_self // 2, n_self - n_self // 2, n_kept, n_rows - n_self - n_kept]


def no_rows(rows: torch.Tensor) -> torch.Tensor:
    """The kept rows' outputs where nothing is shadowed: there are none."""
    return rows.new_zeros(0, rows.shape[1])


@dataclass
class Route:
    """One dispatch on this rank once the counts are here: what the exchanges, the experts and the combine need,
    with shadows or without."""

    counts: list[int]  # rows this rank sends per rank-order position (to itself included)
    n_self: int  # of those, rows for its own experts
    per_source: list[list[int]]  # rows this rank's experts compute, [source rank][slot] (its own rows included)
    token: torch.Tensor  # [A] each row's token, in send order: own rows, kept rows, outgoing rows
    weight: torch.Tensor  # [A] each row's combine weight, in the same order
    pieces: list[torch.Tensor]  # the rows: own (first half, second half), kept for shadows, outgoing
    kept_from: list[int]  # per owner rank, rows kept here for its shadows instead of sent to it
    kept_ffn: Callable[[torch.Tensor], torch.Tensor] = no_rows  # the experts of the kept rows (the shadow copies)
    copies: ShadowCopies | None = None  # this forward's shadow copies (None: nothing shadowed)

    @property
    def n_kept(self) -> int:
        return self.pieces[2].shape[0]


@dataclass
class RowExchange:
    """The two all-to-alls of the rows: out to the experts' ranks and back. ``alongside`` (shared experts) runs while
    the first travels."""

    send_splits: list[int]
    recv_splits: list[int]
    group: object
    name: str
    alongside: Callable[[], torch.Tensor] | None = None
    base: torch.Tensor | None = None  # alongside's output, once the dispatch exchange has started

    def dispatch(self, outgoing: torch.Tensor) -> tuple[torch.Tensor, InFlight]:
        started = start_all_to_all(
            outgoing, self.recv_splits, self.send_splits, self.group, f"{self.name}.dispatch.rows"
        )
        if self.alongside is not None:
            self.base = self.alongside()
        return started

    def combine(self, results: torch.Tensor) -> tuple[torch.Tensor, InFlight]:
        return start_all_to_all(results, self.send_splits, self.recv_splits, self.group, f"{self.name}.combine.rows")


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
        table, world, me = self.placement, self.groups.ep_size, self.groups.ep_rank
        bounds = table.rank_offsets
        rank_key, send_key = self.keys(plan.expert.device)

        # counts exchange: this rank's rows per (rank, slot) start travelling; the sort and gather need none of them
        rank_order = count_per(rank_key[plan.expert], table.num_experts)
        counts_in, arrival = self.start_counts(rank_order)

        # sort into send order (own experts first) and gather the rows; the counts arrive -> what this rank computes
        perm = sort_by_expert(plan.token, send_key[plan.expert], plan.weight, table.num_experts)
        if self.shadow_experts:
            route = self.shadow_route(x, perm, counts_in, arrival, experts)
        else:
            route = self.direct_route(x, perm, rank_order, counts_in, arrival)
        counts, n_self = route.counts, route.n_self

        # exchange rows, experts, exchange back: overlapped with compute, or merged into one GEMM per expert
        send_splits = [
            0 if r == me else sum(counts[bounds[r] : bounds[r + 1]]) - route.kept_from[r] for r in range(world)
        ]
        recv_splits = [0 if r == me else sum(row) for r, row in enumerate(route.per_source)]
        exchange = RowExchange(send_splits, recv_splits, self.groups.ep_group, self.name, alongside)
        own = [(slot, n) for slot, n in enumerate(route.per_source[me]) if n]
        remote = [(slot, n) for r, row in enumerate(route.per_source) if r != me for slot, n in enumerate(row) if n]
        rows_here = n_self + sum(recv_splits) + route.n_kept
        mode = self.overlapped if self.overlaps(rows_here, table.rank_sizes[me]) else self.merged
        outputs = mode(route.pieces, own, remote, experts, route.kept_ffn, exchange)

        # combine: weighted sum per token, onto the shared experts' output
        out = combine_rows(outputs, route.token, route.weight, x.shape[0], exchange.base)
        if route.copies is not None:
            out = route.copies.attach(out)
        traffic = Traffic(
            assignments=plan.num_assignments,
            rows_sent=plan.num_assignments,
            rows_sent_off_rank=sum(send_splits),
            rows_computed=rows_here,
            row_bytes=x.shape[1] * x.element_size(),
            rows_shadowed=route.n_kept,
            experts_shadowed=len(route.copies.shadows) if route.copies is not None else 0,
        )
        return out, traffic

    def start_counts(self, rank_order: torch.Tensor) -> tuple[torch.Tensor, GuardedWork]:
        """Start the counts exchange: (receive buffer, handle). Each rank receives its peers' counts for its own
        experts; with shadows, every rank's whole count vector (the shadow decision needs the world's loads)."""
        table, world, group = self.placement, self.groups.ep_size, self.groups.ep_group
        name = f"{self.name}.dispatch.counts"
        if self.shadow_experts:
            return gather_counts(rank_order, world, group, name)
        per_rank = list(table.rank_sizes)
        return exchange_counts(rank_order, per_rank, per_rank[self.groups.ep_rank], world, group, name, async_op=True)

    def direct_route(
        self,
        x: torch.Tensor,
        perm: Permutation,
        rank_order: torch.Tensor,
        counts_in: torch.Tensor,
        arrival: GuardedWork,
    ) -> Route:
        """Without shadows: the rows are gathered while the counts travel, in send order as sorted; then the counts
        sent and received are read in one go (the dispatch's one host sync) and cut the rows into pieces."""
        early = start_gather(x, perm.token)
        arrival.wait()
        table, world, me = self.placement, self.groups.ep_size, self.groups.ep_rank
        host = torch.cat([rank_order, counts_in]).tolist()
        counts, received = host[: table.num_experts], host[table.num_experts :]
        n_local = table.rank_sizes[me]
        n_self = sum(counts[table.rank_offsets[me] : table.rank_offsets[me + 1]])
        per_source = [received[r * n_local : (r + 1) * n_local] for r in range(world)]
        pieces = early.pieces(piece_sizes(n_self, perm.token.shape[0]))
        return Route(counts, n_self, per_source, perm.token, perm.weight, pieces, [0] * world)

    def shadow_route(
        self,
        x: torch.Tensor,
        perm: Permutation,
        gathered: torch.Tensor,
        arrival: GuardedWork,
        experts: ExpertBank,
    ) -> Route:
        """With shadows, once every rank's counts are here: plan this step's shadows, move the rows this rank keeps
        for them up behind its own rows, gather the rows, and broadcast the shadowed experts' weights (this forward's
        ``ShadowCopies``, which the kept rows are computed with)."""
        table, world, me = self.placement, self.groups.ep_size, self.groups.ep_rank
        bounds = list(table.rank_offsets)
        arrival.wait()
        matrix = gathered.view(world, table.num_experts).tolist()  # [source rank][rank-order position]: one host read
        counts = matrix[me]  # this rank's own, as gathered
        n_self = sum(counts[bounds[me] : bounds[me + 1]])
        shadows = plan_shadows(matrix, bounds, self.shadow_experts, self.shadow_min_rows)
        rows = shadow_rows(matrix, bounds, me, shadows)
        token, weight = perm.token, perm.weight
        n_kept = sum(k for _, k in rows.kept)
        if n_kept:  # the kept rows move up behind the own rows, out of the outgoing block
            ranges = kept_order(counts, bounds, me, n_self, rows.kept)
            order = torch.cat([torch.arange(s, s + n, device=token.device) for s, n in ranges])
            token, weight = token.index_select(0, order), weight.index_select(0, order)
        pieces = gather_pieces(x, token, piece_sizes(n_self, token.shape[0], n_kept))
        copies, kept_ffn = None, no_rows
        if shadows:
            copies = ShadowCopies.broadcast(shadows, dict(experts.weights()), me, self.groups.ep_group, self.name)
            kept_ffn = partial(copies.compute, experts)
        return Route(counts, n_self, rows.received, token, weight, pieces, rows.kept_from, kept_ffn, copies)

    @staticmethod
    def overlapped(pieces, own, remote, experts, kept_ffn, exchange: RowExchange) -> list[torch.Tensor]:
        """Output pieces in send order; half of the own rows and the kept rows hide the dispatch exchange, the other
        half the combine."""
        first, second, kept, outgoing = pieces
        own_first, own_second = split_segments(own, first.shape[0])
        buf, flight = exchange.dispatch(outgoing)
        y_first = experts(first, own_first)
        y_kept = kept_ffn(kept)
        buf, flight = exchange.combine(experts(finish_all_to_all(buf, flight), remote))
        y_second = experts(second, own_second)
        return [y_first, y_second, y_kept, finish_all_to_all(buf, flight)]

    @staticmethod
    def merged(pieces, own, remote, experts, kept_ffn, exchange: RowExchange) -> list[torch.Tensor]:
        """Output pieces in send order; every expert runs once on its own and received rows together."""
        first, second, kept, outgoing = pieces
        buf, flight = exchange.dispatch(outgoing)
        y_kept = kept_ffn(kept)
        received = finish_all_to_all(buf, flight)
        sizes = [first.shape[0], second.shape[0], received.shape[0]]
        y_first, y_second, y_remote = experts(torch.cat([first, second, received]), own + remote).split(sizes)
        buf, flight = exchange.combine(y_remote)
        return [y_first, y_second, y_kept, finish_all_to_all(buf, flight)]

    def overlaps(self, rows: int, n_local: int) -> bool:
        """Overlap compute with the exchanges, or run every expert once on all its rows (see OVERLAP_MIN_ROWS)."""
        return rows >= self.overlap_min_rows * max(n_local, 1)
