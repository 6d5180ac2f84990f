"""Expert placement planner: which rank owns each expert after an add, remove or rebalance event.

Step 4 of the control plane (docs/ARCHITECTURE.md, "One training step"). Every rank runs it on the same agreed
statistics and must get the same table, so it is pure and deterministic: no randomness, never iterates a caller's
mapping, breaks every tie by expert id and then rank, sums rank loads with ``math.fsum`` (order-free), and bounds
search in nodes, not seconds.

Objective, in order: (1) balance: max rank load within ``1 + tolerance`` of a target makespan ``T``; (2) among such
plans, move the fewest bytes. An expert moves when its owner changes; new experts are created, so placing them is free.

Guarantees (load comparisons allow a relative rounding error of 1e-12):

* Always: every rank holds at most ``max_experts_per_rank`` experts, and max rank load <= (1 + tolerance) * T, where T
  is no worse than the LPT (largest load first) greedy makespan. Without new experts, a current placement that is
  already within that bound and the cap moves nothing.
* Small inputs (at most ``EXACT_MAX_EXPERTS`` experts and both searches finished within ``NODE_BUDGET`` nodes, as on
  every size the tests use): T is the optimal makespan under the cap, and no cap-respecting plan whose max load is
  <= (1 + tolerance) * T moves fewer bytes; among the plans that move the fewest bytes, the lowest max load is returned.
* Larger inputs: a local optimum: no moved expert can return to its old owner, alone or by pushing a new or
  already-moved expert elsewhere (or a cheaper resident that then moves), without breaking the bound or the cap.
* All loads zero: expert counts differ by at most one, and no such plan moves fewer bytes (exact at every size).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError, check
from ..placement import PlacementTable

EXACT_MAX_EXPERTS = 10
"""Up to this many experts the planner searches exactly (branch and bound) instead of trusting the heuristic."""
NODE_BUDGET = 100_000
"""Nodes per exact search; counted, not timed, so an unfinished search stops at the same point on every rank."""
_ROUNDING = 1e-12


def plan_placement(
    expert_ids: Sequence[int],
    loads: Mapping[int, float],
    ep_size: int,
    current: PlacementTable | None = None,
    expert_bytes: Mapping[int, int] | int = 1,
    max_experts_per_rank: int | None = None,
    tolerance: float = 0.05,
    version: int | None = None,
) -> PlacementTable:
    """Place ``expert_ids`` (router order) on ``ep_size`` ranks: balanced load first, fewest bytes moved second.

    Experts in ``current`` are resident at their owner there (an owner beyond ``ep_size`` must move wherever it goes);
    the others are new. The result's version is ``version``, else ``current.version + 1``, else 0.
    """
    ids = [int(e) for e in expert_ids]
    n = len(ids)
    check(isinstance(ep_size, int) and ep_size >= 1, "ep_size", ep_size, "an integer >= 1")
    check(len(set(ids)) == n, "expert_ids", ids, "unique expert ids")
    check(math.isfinite(tolerance) and tolerance >= 0, "tolerance", tolerance, "a finite number >= 0")
    cap = max(n, 1) if max_experts_per_rank is None else max_experts_per_rank
    check(isinstance(cap, int) and cap >= 1, "max_experts_per_rank", max_experts_per_rank, "an integer >= 1 or None")
    if n > ep_size * cap:
        need = -(-n // ep_size)
        raise ConfigError("max_experts_per_rank", cap, f">= {need} to hold {n} experts on {ep_size} ranks")
    load = _loads_of(ids, loads)
    size = _bytes_of(ids, expert_bytes)
    home = [-1] * n
    if current is not None:
        where = dict(zip(current.expert_ids, current.owners))
        home = [where.get(e, -1) if where.get(e, -1) < ep_size else -1 for e in ids]
    if version is None:
        version = current.version + 1 if current is not None else 0
    if ep_size == 1:
        owners = [0] * n
    elif not any(load):
        owners = _balance_counts(ids, size, home, ep_size)
    else:
        owners = _Planner(ids, load, size, home, ep_size, cap, tolerance).solve()
    return PlacementTable.from_owners(ids, owners, ep_size, version)


def rank_loads(table: PlacementTable, loads: Mapping[int, float]) -> list[float]:
    """Sum of expert loads per rank (exactly rounded, so independent of summation order)."""
    load = _loads_of(table.expert_ids, loads)
    per_rank: list[list[float]] = [[] for _ in range(table.ep_size)]
    for owner, value in zip(table.owners, load):
        per_rank[owner].append(value)
    return [math.fsum(values) for values in per_rank]


def imbalance(table: PlacementTable, loads: Mapping[int, float]) -> float:
    """Max rank load over mean rank load; 1.0 when all loads are zero (nothing to balance)."""
    per_rank = rank_loads(table, loads)
    total = math.fsum(per_rank)
    return 1.0 if total == 0 else max(per_rank) * table.ep_size / total


def should_rebalance(table: PlacementTable, loads: Mapping[int, float], threshold: float) -> bool:
    """True when the imbalance exceeds ``threshold`` (e.g. 1.2: the busiest rank does 20% more than average)."""
    return imbalance(table, loads) > threshold


def moved_experts(old: PlacementTable, new: PlacementTable) -> list[tuple[int, int, int]]:
    """(expert id, from rank, to rank) for experts in both tables whose owner changed, sorted by id: the migration."""
    before = dict(zip(old.expert_ids, old.owners))
    return sorted((e, before[e], o) for e, o in zip(new.expert_ids, new.owners) if e in before and before[e] != o)


def _loads_of(ids: Sequence[int], loads: Mapping[int, float]) -> list[float]:
    missing = [e for e in ids if e not in loads]
    check(not missing, "loads", f"missing expert ids {missing}", "a load for every expert id")
    values = [float(loads[e]) for e in ids]
    bad = [(e, v) for e, v in zip(ids, values) if not (math.isfinite(v) and v >= 0)]
    check(not bad, "loads", bad[:1], "finite loads >= 0")
    return values


def _bytes_of(ids: Sequence[int], expert_bytes: Mapping[int, int] | int) -> list[int]:
    if isinstance(expert_bytes, Mapping):
        missing = [e for e in ids if e not in expert_bytes]
        check(not missing, "expert_bytes", f"missing expert ids {missing}", "bytes for every expert id, or one int")
        values = [int(expert_bytes[e]) for e in ids]
    else:
        values = [int(expert_bytes)] * len(ids)
    check(all(v >= 0 for v in values), "expert_bytes", min(values, default=0), "byte counts >= 0")
    return values


def _balance_counts(ids: list[int], size: list[int], home: list[int], m: int) -> list[int]:
    """Zero loads: counts n//m or n//m + 1; each rank keeps its most expensive residents, so bytes moved is minimal."""
    n = len(ids)
    base, extra = divmod(n, m)
    residents: list[list[int]] = [[] for _ in range(m)]
    for i in range(n):
        if home[i] >= 0:
            residents[home[i]].append(i)
    for r in range(m):
        residents[r].sort(key=lambda i: (-size[i], ids[i]))
    # The ranks holding one more expert are those whose next resident is dearest to move (-1: no such resident).
    gain = [size[residents[r][base]] if len(residents[r]) > base else -1 for r in range(m)]
    bigger = set(sorted(range(m), key=lambda r: (-gain[r], r))[:extra])
    target = [base + (1 if r in bigger else 0) for r in range(m)]
    owners = [-1] * n
    for r in range(m):
        for i in residents[r][: target[r]]:
            owners[i] = r
    pool = iter([i for i in range(n) if owners[i] < 0])
    for r in range(m):
        for _ in range(target[r] - len(residents[r][: target[r]])):
            owners[next(pool)] = r
    return owners


class _State:
    """A (partial) assignment with per-rank members, loads and counts, kept in step."""

    def __init__(self, owner: list[int], load: list[float], m: int) -> None:
        self.owner = list(owner)
        self.load = load
        self.members: list[list[int]] = [[] for _ in range(m)]
        for i, r in enumerate(owner):
            if r >= 0:
                self.members[r].append(i)
        self.L = [math.fsum(load[i] for i in mem) for mem in self.members]
        self.C = [len(mem) for mem in self.members]

    def _refresh(self, r: int) -> None:
        self.L[r] = math.fsum(self.load[i] for i in self.members[r])
        self.C[r] = len(self.members[r])

    def move(self, i: int, r: int) -> None:
        a = self.owner[i]
        if a >= 0:
            self.members[a].remove(i)
            self._refresh(a)
        self.owner[i] = r
        self.members[r].append(i)
        self._refresh(r)


class _Planner:
    """One planning problem: positions 0..n-1 with load, bytes and home rank (-1: free to place)."""

    def __init__(
        self, ids: list[int], load: list[float], size: list[int], home: list[int], m: int, cap: int, tol: float
    ) -> None:
        self.ids, self.load, self.size, self.home, self.m, self.cap, self.tol = ids, load, size, home, m, cap, tol
        self.n = len(ids)

    # --- objective helpers ---------------------------------------------------------------------------------------

    def cost_at(self, i: int, r: int) -> int:
        """Bytes that expert ``i`` costs when it ends on ``r``: its size unless ``r`` is its home (or it has none)."""
        return self.size[i] if self.home[i] >= 0 and r != self.home[i] else 0

    def moved_bytes(self, owner: list[int]) -> int:
        return sum(self.cost_at(i, r) for i, r in enumerate(owner))

    def max_load(self, owner: list[int]) -> float:
        return max(_State(owner, self.load, self.m).L)

    def fits(self, st: _State, r: int, extra: float) -> bool:
        return st.C[r] < self.cap and st.L[r] + extra <= self.budget

    # --- driver ---------------------------------------------------------------------------------------------------

    def solve(self) -> list[int]:
        """Target makespan from LPT + improvement (exact when small), then the cheapest plan within the bound."""
        target, ref = self.min_makespan()
        self.budget = target * (1 + self.tol) * (1 + _ROUNDING)
        candidates = [self.undo(_State(self.relabel(ref), self.load, self.m))]
        repaired = self.repair(self.start())
        if repaired is not None:
            candidates.append(self.undo(repaired))
        best = min(candidates, key=lambda o: (self.moved_bytes(o), self.max_load(o), o))
        if self.n <= EXACT_MAX_EXPERTS:
            best = self.exact_bytes(best)
        return best

    # --- target makespan ------------------------------------------------------------------------------------------

    def min_makespan(self) -> tuple[float, list[int]]:
        load, ids, m, cap = self.load, self.ids, self.m, self.cap
        order = sorted(range(self.n), key=lambda i: (-load[i], ids[i]))
        st = _State([-1] * self.n, load, m)
        heap = [(0.0, 0, r) for r in range(m)]
        for i in order:
            _, _, r = heapq.heappop(heap)
            st.move(i, r)
            if st.C[r] < cap:
                heapq.heappush(heap, (st.L[r], st.C[r], r))
        floor = max(max(load), math.fsum(load) / m)
        self.improve(st, floor)
        best, owner = max(st.L), st.owner
        if self.n <= EXACT_MAX_EXPERTS:
            best, owner = self.exact_makespan(order, best, owner)
        return best, owner

    def improve(self, st: _State, floor: float) -> None:
        """Lower the busiest rank by the move or swap with one other rank that minimises the pair's new maximum."""
        load, ids, m, cap = self.load, self.ids, self.m, self.cap
        for _ in range(4 * self.n + 4 * m):
            r = max(range(m), key=lambda q: (st.L[q], -q))
            top = st.L[r]
            if top <= floor:
                return
            best: tuple | None = None
            for s in sorted(range(m), key=lambda q: (st.L[q], q)):
                low = st.L[s]
                if s == r:
                    continue
                if low >= top or (best is not None and (top + low) / 2 >= best[0]):
                    break
                for i in st.members[r]:
                    li = load[i]
                    if st.C[s] < cap and li > 0:
                        cand = (max(top - li, low + li), ids[i], -1, s, i, -1)
                        if cand[0] < top and (best is None or cand < best):
                            best = cand
                    for j in st.members[s]:
                        d = li - load[j]
                        if d > 0:
                            cand = (max(top - d, low + d), ids[i], ids[j], s, i, j)
                            if cand[0] < top and (best is None or cand < best):
                                best = cand
            if best is None:
                return
            _, _, _, s, i, j = best
            st.move(i, s)
            if j >= 0:
                st.move(j, r)

    def exact_makespan(self, order: list[int], best: float, owner: list[int]) -> tuple[float, list[int]]:
        """Branch and bound over identical ranks (symmetric states skipped); returns the incumbent if unbeaten."""
        load, m, cap, n = self.load, self.m, self.cap, self.n
        floor = math.fsum(load) / m
        L, C, assign = [0.0] * m, [0] * m, [-1] * n
        result = [best, list(owner)]
        nodes = [NODE_BUDGET]

        def rec(k: int, top: float) -> None:
            if nodes[0] <= 0:
                return
            nodes[0] -= 1
            if k == n:
                result[0], result[1] = top, list(assign)
                return
            if max(top, floor) >= result[0]:
                return
            i = order[k]
            seen: set[tuple[float, int]] = set()
            for r in sorted(range(m), key=lambda q: (L[q], q)):
                if C[r] >= cap or (L[r], C[r]) in seen:
                    continue
                seen.add((L[r], C[r]))
                new_top = max(top, L[r] + load[i])
                if new_top >= result[0]:
                    break
                old = L[r]
                L[r], C[r], assign[i] = old + load[i], C[r] + 1, r
                rec(k + 1, new_top)
                L[r], C[r], assign[i] = old, C[r] - 1, -1

        rec(0, 0.0)
        if result[1] != owner:
            result[0] = self.max_load(result[1])
        return result[0], result[1]

    # --- cheap plan within the bound ------------------------------------------------------------------------------

    def relabel(self, ref: list[int]) -> list[int]:
        """Give each bin of the reference plan to the rank already holding most of its bytes (greedy matching)."""
        weight: dict[tuple[int, int], tuple[int, int]] = {}
        for i, (b, h) in enumerate(zip(ref, self.home)):
            if h >= 0:
                w = weight.get((b, h), (0, 0))
                weight[(b, h)] = (w[0] + self.size[i], w[1] + 1)
        rank_of: dict[int, int] = {}
        taken: set[int] = set()
        for (b, h), _ in sorted(weight.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0])):
            if b not in rank_of and h not in taken:
                rank_of[b] = h
                taken.add(h)
        spare = iter(r for r in range(self.m) if r not in taken)
        for b in range(self.m):
            if b not in rank_of:
                rank_of[b] = next(spare)
        return [rank_of[b] for b in ref]

    def start(self) -> _State:
        """Residents where they are; new experts, largest first, on the least-loaded rank with room."""
        load, ids = self.load, self.ids
        st = _State(list(self.home), load, self.m)
        for i in sorted((i for i in range(self.n) if self.home[i] < 0), key=lambda i: (-load[i], ids[i])):
            r = min((q for q in range(self.m) if st.C[q] < self.cap), key=lambda q: (st.L[q], st.C[q], q))
            st.move(i, r)
        return st

    def repair(self, st: _State) -> _State | None:
        """Fix the worst violating rank by the move or swap that removes the most overload per byte; None if stuck."""
        load, ids, m, cap, budget = self.load, self.ids, self.m, self.cap, self.budget
        for _ in range(8 * self.n + 8 * m):
            bad = [r for r in range(m) if st.L[r] > budget or st.C[r] > cap]
            if not bad:
                return st
            r = max(bad, key=lambda q: (st.C[q] > cap, st.L[q], -q))
            over_cap = st.C[r] > cap
            excess = st.L[r] - budget
            by_load = sorted(range(m), key=lambda q: (st.L[q], q))
            best: tuple | None = None
            for i in st.members[r]:
                li = load[i]
                gain = min(li, excess) if excess > 0 else 0.0
                if not over_cap and gain <= 0:
                    continue
                # Destination: home if it fits (cheapest), else the least-loaded rank with room.
                dests = [self.home[i]] if self.home[i] >= 0 and self.home[i] != r else []
                dests += [next((s for s in by_load if s != r and st.C[s] < cap), -1)]
                for s in dests:
                    if s < 0 or not self.fits(st, s, li):
                        continue
                    delta = self.cost_at(i, s) - self.cost_at(i, r)
                    score = delta if over_cap else delta / gain
                    cand = (score, -gain, ids[i], -1, s, i, -1)
                    if best is None or cand < best:
                        best = cand
                if over_cap:
                    continue
                out = self.cost_at(i, r)
                for s in range(m):
                    slack = budget - st.L[s]
                    if s == r or slack <= 0:
                        continue
                    there = self.cost_at(i, s) - out
                    for j in st.members[s]:
                        d = li - load[j]
                        if d <= 0 or d > slack:
                            continue
                        g = min(d, excess)
                        delta = there + self.cost_at(j, r) - self.cost_at(j, s)
                        cand = (delta / g, -g, ids[i], ids[j], s, i, j)
                        if best is None or cand < best:
                            best = cand
            if best is None:
                return None
            _, _, _, _, s, i, j = best
            st.move(i, s)
            if j >= 0:
                st.move(j, r)
        return None

    def undo(self, st: _State) -> list[int]:
        """Send moved experts home, dearest first, alone or by pushing away an expert that costs less to move."""
        load, ids, m, cap, budget = self.load, self.ids, self.m, self.cap, self.budget
        for _ in range(self.n + 1):
            changed = False
            moved = [i for i in range(self.n) if self.home[i] >= 0 and st.owner[i] != self.home[i]]
            for i in sorted(moved, key=lambda i: (-self.size[i], ids[i])):
                h, a, li = self.home[i], st.owner[i], load[i]
                if self.fits(st, h, li):
                    st.move(i, h)
                    changed = True
                    continue
                best: tuple | None = None
                back = self.cost_at(i, a)
                roomiest = None
                for j in st.members[h]:
                    lj = load[j]
                    if st.L[h] + li - lj > budget:
                        continue
                    dests = [a]
                    if self.home[j] >= 0 and self.home[j] not in (a, h):
                        dests.append(self.home[j])
                    if roomiest is None:
                        spare = [q for q in range(m) if q not in (a, h) and st.C[q] < cap]
                        roomiest = min(spare, key=lambda q: (st.L[q], q)) if spare else -1
                    dests.append(roomiest)
                    for t in dests:
                        if t < 0:
                            continue
                        ok = st.L[a] - li + lj <= budget if t == a else self.fits(st, t, lj)
                        gain = back + self.cost_at(j, h) - self.cost_at(j, t)
                        if ok and gain > 0:
                            cand = (-gain, ids[j], t, j)
                            if best is None or cand < best:
                                best = cand
                if best is not None:
                    _, _, t, j = best
                    st.move(j, t)
                    st.move(i, h)
                    changed = True
            if not changed:
                break
        return st.owner

    # --- exact bytes on small inputs ------------------------------------------------------------------------------

    def exact_bytes(self, incumbent: list[int]) -> list[int]:
        """Branch and bound for the fewest bytes within the bound, then the lowest max load; dearest residents first."""
        load, size, home, m, cap, n, budget = self.load, self.size, self.home, self.m, self.cap, self.n, self.budget
        ids = self.ids
        residents = sorted((i for i in range(n) if home[i] >= 0), key=lambda i: (-size[i], ids[i]))
        free = sorted((i for i in range(n) if home[i] < 0), key=lambda i: (-load[i], ids[i]))
        items = residents + free
        needed: list[frozenset[int]] = [frozenset()] * (n + 1)
        rest = [0.0] * (n + 1)
        for k in range(n - 1, -1, -1):
            i = items[k]
            needed[k] = needed[k + 1] | ({home[i]} if home[i] >= 0 else set())
            rest[k] = rest[k + 1] + load[i]
        L, C, assign = [0.0] * m, [0] * m, [-1] * n
        best = [(self.moved_bytes(incumbent), self.max_load(incumbent)), list(incumbent)]
        nodes = [NODE_BUDGET]

        def rec(k: int, cost: int, top: float) -> None:
            if nodes[0] <= 0:
                return
            nodes[0] -= 1
            if k == n:
                key = (cost, self.max_load(assign))
                if key < best[0]:
                    best[0], best[1] = key, list(assign)
                return
            forced = cost
            for j in items[k:]:
                h = home[j]
                if h >= 0 and (C[h] >= cap or L[h] + load[j] > budget):
                    forced += size[j]
            if (forced, top) >= best[0]:
                return
            room = math.fsum(budget - L[r] for r in range(m) if C[r] < cap)
            if rest[k] > room * (1 + _ROUNDING) or n - k > sum(cap - c for c in C):
                return
            i = items[k]
            h = home[i]
            order = ([h] if h >= 0 else []) + [r for r in sorted(range(m), key=lambda q: (L[q], q)) if r != h]
            seen: set[tuple[float, int]] = set()
            for r in order:
                if C[r] >= cap or L[r] + load[i] > budget:
                    continue
                if r not in needed[k]:
                    if (L[r], C[r]) in seen:
                        continue
                    seen.add((L[r], C[r]))
                new_cost = cost + (size[i] if h >= 0 and r != h else 0)
                new_top = max(top, L[r] + load[i])
                if (new_cost, new_top) >= best[0]:
                    continue
                old = L[r]
                L[r], C[r], assign[i] = old + load[i], C[r] + 1, r
                rec(k + 1, new_cost, new_top)
                L[r], C[r], assign[i] = old, C[r] - 1, -1

        rec(0, 0, 0.0)
        return best[1]
