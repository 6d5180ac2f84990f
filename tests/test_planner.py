"""Expert placement planner: brute-force oracles on small inputs, properties and timing on large ones.

The oracles enumerate every assignment of experts to ranks and compute loads, caps and moved bytes with plain Python,
independent of the planner. ``ALLOW`` is the planner's documented relative rounding allowance on the balance bound.
"""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest

from dynmoe_dist.adapt import planner
from dynmoe_dist.adapt.planner import imbalance, moved_experts, plan_placement, rank_loads, should_rebalance
from dynmoe_dist.errors import ConfigError
from dynmoe_dist.placement import PlacementTable

ALLOW = 1e-12


# --------------------------------------------------------------------------------------------------------------------
# plain references


def loads_by_rank(owners, ids, loads, m):
    per = [[] for _ in range(m)]
    for e, o in zip(ids, owners):
        per[o].append(loads[e])
    return [math.fsum(v) for v in per]


def bytes_moved(owners, ids, current, size):
    before = dict(zip(current.expert_ids, current.owners)) if current is not None else {}
    return sum(size[e] for e, o in zip(ids, owners) if e in before and before[e] != o)


def lpt_makespan(ids, loads, m, cap):
    """Largest load first onto the least-loaded rank with room (ties: fewer experts, lower rank)."""
    bins = [[0.0, 0] for _ in range(m)]
    for e in sorted(ids, key=lambda e: (-loads[e], e)):
        r = min((r for r in range(m) if bins[r][1] < cap), key=lambda r: (bins[r][0], bins[r][1], r))
        bins[r][0] += loads[e]
        bins[r][1] += 1
    return max(b[0] for b in bins)


def random_instance(rng):
    """Up to 7 experts on 2-3 ranks, integer loads (sometimes all zero), a random current placement and cap."""
    m = rng.choice((2, 3))
    n = rng.randint(1, 7)
    ids = rng.sample(range(20), n)
    zero = rng.random() < 0.15
    loads = {e: 0 if zero else rng.choice((0, rng.randint(1, 20), rng.randint(1, 20))) for e in ids}
    residents = [e for e in ids if rng.random() < 0.8]
    gone = rng.sample(range(20, 30), rng.randint(0, 2))  # experts removed by this event
    old_ids = residents + gone
    current = PlacementTable.from_owners(old_ids, [rng.randrange(m) for _ in old_ids], m, version=rng.randint(0, 5))
    size = {e: rng.randint(1, 50) for e in ids} if rng.random() < 0.6 else dict.fromkeys(ids, 1)
    need = -(-n // m)
    cap = rng.choice((None, need, rng.randint(need, n)))
    tol = rng.choice((0.0, 0.05, 0.2))
    return ids, loads, m, current, size, cap, tol


def all_plans(ids, loads, m, current, size, cap):
    """(max load, bytes moved, counts, owners) of every assignment that respects the cap."""
    limit = len(ids) if cap is None else cap
    out = []
    for owners in itertools.product(range(m), repeat=len(ids)):
        counts = [0] * m
        for o in owners:
            counts[o] += 1
        if max(counts) <= limit:
            out.append((max(loads_by_rank(owners, ids, loads, m)), bytes_moved(owners, ids, current, size), counts))
    return out


def plan(ids, loads, m, current, size, cap, tol):
    return plan_placement(ids, loads, m, current, expert_bytes=size, max_experts_per_rank=cap, tolerance=tol)


# --------------------------------------------------------------------------------------------------------------------
# exact on small inputs


@pytest.mark.parametrize("seed", range(100))
def test_small_instances_match_brute_force(seed):
    """Max load within (1+tol) of the optimum; no plan within that bound moves fewer bytes; ties: lowest max load."""
    rng = random.Random(seed)
    for _ in range(5):
        ids, loads, m, current, size, cap, tol = random_instance(rng)
        table = plan(ids, loads, m, current, size, cap, tol)
        assert table.expert_ids == tuple(ids)
        assert table.version == current.version + 1
        counts = table.counts_per_rank()
        assert max(counts) <= (len(ids) if cap is None else cap)
        got_max = max(loads_by_rank(table.owners, ids, loads, m))
        got_bytes = bytes_moved(table.owners, ids, current, size)
        plans = all_plans(ids, loads, m, current, size, cap)
        if not any(loads.values()):
            even = [p for p in plans if max(p[2]) - min(p[2]) <= 1]
            assert max(counts) - min(counts) <= 1
            assert got_bytes == min(p[1] for p in even)
            continue
        best = min(p[0] for p in plans)
        bound = best * (1 + tol) * (1 + ALLOW)
        within = [p for p in plans if p[0] <= bound]
        assert got_max <= bound, (got_max, best)
        assert got_bytes == min(p[1] for p in within), (ids, loads, current, size, cap, tol)
        assert got_max == min(p[0] for p in within if p[1] == got_bytes)
        # Pareto: no assignment at least as balanced moves fewer bytes.
        assert got_bytes == min(p[1] for p in plans if p[0] <= got_max)


@pytest.mark.parametrize("seed", range(100))
def test_heuristic_path_guarantees(seed, monkeypatch):
    """The large-input path on small inputs: bound vs LPT, cap, and no moved expert can simply go home."""
    monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    rng = random.Random(seed)
    for _ in range(5):
        ids, loads, m, current, size, cap, tol = random_instance(rng)
        if not any(loads.values()):
            continue
        limit = len(ids) if cap is None else cap
        table = plan(ids, loads, m, current, size, cap, tol)
        counts = table.counts_per_rank()
        assert max(counts) <= limit
        per_rank = loads_by_rank(table.owners, ids, loads, m)
        home = dict(zip(current.expert_ids, current.owners))
        load_list, size_list = [float(loads[e]) for e in ids], [size[e] for e in ids]
        home_list = [home.get(e, -1) for e in ids]
        target = planner._Planner(ids, load_list, size_list, home_list, m, limit, tol).min_makespan()[0]
        assert target <= lpt_makespan(ids, loads, m, limit)
        bound = target * (1 + tol) * (1 + ALLOW)
        assert max(per_rank) <= bound
        for e, o in zip(ids, table.owners):
            h = home.get(e, -1)
            if h >= 0 and h != o:
                assert counts[h] >= limit or per_rank[h] + loads[e] > bound, (e, h, o)
        current_max = max(loads_by_rank([home[e] for e in ids], ids, loads, m)) if set(ids) <= set(home) else None
        if current_max is not None and current_max <= bound and max(current.counts_per_rank()) <= limit:
            assert bytes_moved(table.owners, ids, current, size) == 0


def test_heuristic_target_improves_on_lpt(monkeypatch):
    """LPT puts 3+2+2 on one rank of two; one swap reaches the optimum 6 (3+3 and 2+2+2)."""
    monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    loads = {0: 3, 1: 3, 2: 2, 3: 2, 4: 2}
    assert lpt_makespan(list(loads), loads, 2, 5) == 7
    table = plan_placement(list(loads), loads, 2, tolerance=0.0)
    assert max(rank_loads(table, loads)) == 6


# --------------------------------------------------------------------------------------------------------------------
# behaviour


@pytest.mark.parametrize("exact", [True, False])
def test_balanced_current_moves_nothing(exact, monkeypatch):
    if not exact:
        monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    for n, m in ((7, 3), (6, 2), (256, 64)):
        ids = list(range(100, 100 + n))
        current = PlacementTable.contiguous(ids, m, version=4)
        table = plan_placement(ids, dict.fromkeys(ids, 3.0), m, current)
        assert table.owners == current.owners
        assert moved_experts(current, table) == []
        assert table.version == 5


@pytest.mark.parametrize("exact", [True, False])
def test_new_experts_do_not_move_residents(exact, monkeypatch):
    if not exact:
        monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    for residents, m in ((6, 3), (192, 64)):
        old = list(range(residents))
        current = PlacementTable.contiguous(old, m)
        ids = old + list(range(1000, 1000 + m))
        table = plan_placement(ids, dict.fromkeys(ids, 10.0), m, current)
        assert moved_experts(current, table) == []
        assert table.counts_per_rank() == [residents // m + 1] * m
        assert table.positions_on(0)[-1] >= residents  # new experts take the last slots


def test_new_heavy_expert_goes_to_lightest_rank():
    current = PlacementTable.from_owners([0, 1, 2, 3], [0, 0, 1, 2], 3)
    loads = {0: 5, 1: 5, 2: 6, 3: 9, 7: 4}
    table = plan_placement([0, 1, 2, 3, 7], loads, 3, current)
    assert moved_experts(current, table) == []
    assert table.owner_of(7) == 1  # rank loads 10, 10, 9: the optimum; rank 2 would reach 13


@pytest.mark.parametrize("exact", [True, False])
def test_cap_respected_and_forces_the_cheapest_move(exact, monkeypatch):
    if not exact:
        monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    ids = [0, 1, 2, 3, 4, 5]
    current = PlacementTable.from_owners(ids, [0, 0, 0, 0, 1, 2], 3)
    loads = {0: 1, 1: 1, 2: 1, 3: 1, 4: 3, 5: 3}  # balanced by load: 4, 3, 3
    size = {0: 50, 1: 40, 2: 7, 3: 60, 4: 1, 5: 1}
    assert moved_experts(current, plan_placement(ids, loads, 3, current, size, tolerance=0.5)) == []
    table = plan_placement(ids, loads, 3, current, size, max_experts_per_rank=3, tolerance=0.5)
    assert max(table.counts_per_rank()) <= 3
    assert moved_experts(current, table) == [(2, 0, 1)]


def test_impossible_cap_names_setting_and_minimum():
    ids = list(range(10))
    with pytest.raises(ConfigError, match=r"max_experts_per_rank=3.*>= 4"):
        plan_placement(ids, dict.fromkeys(ids, 1.0), 3, max_experts_per_rank=3)
    table = plan_placement(ids, dict.fromkeys(ids, 1.0), 3, max_experts_per_rank=4)
    assert sorted(table.counts_per_rank()) == [3, 3, 4]


def test_deterministic_under_mapping_order():
    rng = random.Random(7)
    for n, m in ((9, 3), (256, 64)):
        ids = list(range(n))
        values = {e: float(rng.choice((1, 2, 3, 2.5))) for e in ids}  # many ties
        sizes = {e: rng.choice((10, 20)) for e in ids}
        current = PlacementTable.from_owners(ids, [rng.randrange(m) for _ in ids], m)
        tables = set()
        for shuffle in range(4):
            order = list(ids)
            random.Random(shuffle).shuffle(order)
            loads = {e: values[e] for e in order}
            size = {e: sizes[e] for e in reversed(order)}
            table = plan_placement(ids, loads, m, current, size, max_experts_per_rank=6)
            tables.add((table.owners, table.slots, table.version, table.digest()))
        assert len(tables) == 1


def test_seven_experts_on_three_ranks():
    ids = [10, 11, 12, 13, 14, 15, 16]
    loads = dict(zip(ids, (7, 6, 5, 4, 3, 2, 1)))  # total 28: optimum 10 (7+3, 6+4, 5+2+1)
    table = plan_placement(ids, loads, 3, tolerance=0.0)
    assert max(rank_loads(table, loads)) == 10.0
    assert sum(table.counts_per_rank()) == 7
    assert table.version == 0
    again = plan_placement(ids, loads, 3, table, tolerance=0.0)
    assert again.owners == table.owners and again.version == 1


@pytest.mark.parametrize("exact", [True, False])
def test_prefers_moving_cheap_experts(exact, monkeypatch):
    if not exact:
        monkeypatch.setattr(planner, "EXACT_MAX_EXPERTS", 0)
    ids = [0, 1, 2, 3]
    current = PlacementTable.from_owners(ids, [0, 0, 0, 1], 2)
    loads = {0: 5, 1: 5, 2: 5, 3: 5}
    size = {0: 1000, 1: 10, 2: 900, 3: 1}
    table = plan_placement(ids, loads, 2, current, size)
    assert moved_experts(current, table) == [(1, 0, 1)]
    # Large: rank 0 holds one expert too many; the cheapest of its five moves, to the rank with one too few.
    ids = list(range(256))
    owners = [min(max((p - 1) // 4, 0), 63) if p else 0 for p in ids]
    assert owners.count(0) == 5 and owners.count(63) == 3
    current = PlacementTable.from_owners(ids, owners, 64)
    size = {e: 100 + (e * 37) % 50 for e in ids}
    cheapest = min(current.experts_on(0), key=lambda e: size[e])
    table = plan_placement(ids, dict.fromkeys(ids, 1.0), 64, current, size)
    assert moved_experts(current, table) == [(cheapest, 0, 63)]


def test_all_zero_loads_balance_counts():
    ids = list(range(7))
    current = PlacementTable.from_owners(ids, [0, 0, 0, 0, 0, 2, 2], 3)
    size = {0: 5, 1: 1, 2: 9, 3: 2, 4: 8, 5: 1, 6: 1}
    zero = dict.fromkeys(ids, 0)
    table = plan_placement(ids, zero, 3, current, size)
    assert sorted(table.counts_per_rank()) == [2, 2, 3]
    assert moved_experts(current, table) == [(1, 0, 1), (3, 0, 1)]  # the two cheapest on the crowded rank
    assert imbalance(table, zero) == 1.0 and not should_rebalance(table, zero, 1.0)
    fresh = plan_placement(list(range(256)), dict.fromkeys(range(256), 0.0), 64)
    assert fresh.counts_per_rank() == [4] * 64


def test_shrinking_ep_size_moves_only_orphans():
    ids = list(range(8))
    current = PlacementTable.contiguous(ids, 4)  # two experts per rank on 4 ranks
    table = plan_placement(ids, dict.fromkeys(ids, 1.0), 2, current)
    assert table.ep_size == 2 and table.counts_per_rank() == [4, 4]
    assert [e for e, _, _ in moved_experts(current, table)] == [4, 5, 6, 7]


def test_large_instance_speed_and_balance():
    rng = random.Random(3)
    ids = list(range(256))
    loads = {e: rng.uniform(0, 100) for e in ids}
    current = PlacementTable.contiguous(ids, 64)
    plan_placement(ids, loads, 64, current, max_experts_per_rank=6)  # warm-up
    start = time.perf_counter()
    table = plan_placement(ids, loads, 64, current, max_experts_per_rank=6)
    elapsed = time.perf_counter() - start
    print(f"plan_placement 256 experts on 64 ranks: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0
    assert max(table.counts_per_rank()) <= 6
    per_rank = rank_loads(table, loads)
    assert max(per_rank) <= 1.05 * lpt_makespan(ids, loads, 64, 6) * (1 + ALLOW)
    assert imbalance(table, loads) < 1.1 < imbalance(current, loads)
    assert 0 < len(moved_experts(current, table)) < 128


# --------------------------------------------------------------------------------------------------------------------
# helpers and validation


def test_rank_loads_imbalance_and_moves():
    old = PlacementTable.from_owners([3, 1, 2, 9], [0, 0, 1, 1], 3)
    loads = {1: 2.0, 2: 1.0, 3: 4.0, 9: 0.0}
    assert rank_loads(old, loads) == [6.0, 1.0, 0.0]
    assert imbalance(old, loads) == pytest.approx(6.0 / (7.0 / 3))
    assert should_rebalance(old, loads, 2.0) and not should_rebalance(old, loads, 3.0)
    new = PlacementTable.from_owners([9, 3, 1, 5], [2, 0, 1, 1], 3)
    assert moved_experts(old, new) == [(1, 0, 1), (9, 1, 2)]


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"loads": {0: 1.0}}, "loads"),
        ({"loads": {0: 1.0, 1: -1.0}}, "loads"),
        ({"loads": {0: 1.0, 1: math.nan}}, "loads"),
        ({"ep_size": 0}, "ep_size"),
        ({"expert_ids": [0, 0]}, "expert_ids"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"max_experts_per_rank": 0}, "max_experts_per_rank"),
        ({"expert_bytes": {0: 4}}, "expert_bytes"),
    ],
)
def test_bad_inputs_raise_config_error(kwargs, setting):
    args = {"expert_ids": [0, 1], "loads": {0: 1.0, 1: 2.0}, "ep_size": 2, **kwargs}
    with pytest.raises(ConfigError) as err:
        plan_placement(**args)
    assert err.value.setting == setting
