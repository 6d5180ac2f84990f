"""The benchmark commands run and report what their docs promise, at tiny shapes (``make bench`` is not in CI).

No timing is asserted: the numbers at these shapes mean nothing. What must hold: every documented column is there,
and the peers computed what ours computed (the benchmarks compare outputs before they time anything).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch
from scipy import stats

from benchmarks import cpu_gemm, expert_parallel, layer, machine, row_ops, timing, train
from benchmarks.report import format_table


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_bench_layer_reports_both_floors(capsys):
    layer.main(["--tokens", "64", "--d-model", "16", "--d-ff", "32", "--experts", "4", "--repeats", "1"])
    doc = last_json(capsys.readouterr().out)
    assert [r["gate"] for r in doc["results"]] == ["top2", "top_any"]
    # every benchmark says whether torch's huge-page allocation was on (importing dynmoe_dist set the variable)
    assert doc["meta"]["huge_pages"] is (os.environ["THP_MEM_ALLOC_ENABLE"] != "0")
    # and names the machine, with the threads it ran on
    assert doc["meta"]["machine"]["threads_per_process"] == torch.get_num_threads()
    assert doc["meta"]["machine"]["logical_cores"] == os.cpu_count()
    for r in doc["results"]:
        for key in ("overhead_ratio", "experts_over_dense", "layer_over_dense", "padded_bmm_over_dense"):
            assert r[key] > 0, key
        assert r["bmm_padding"] >= 1.0


def test_bench_row_ops_checks_both_implementations_agree(capsys):
    row_ops.main(["--shape", "50,8,2,3", "--shape", "40,8,3,1", "--repeats", "1"])
    doc = last_json(capsys.readouterr().out)
    assert [(r["op"], r["tokens"], r["pieces"]) for r in doc["results"]] == [
        ("combine", 50, 3),
        ("combine", 40, 1),
        ("gather", 50, 3),
        ("gather", 40, 1),
    ]
    for r in doc["results"]:
        assert r["max_abs_diff"] == 0.0 and r["fused_ms"] > 0 and r["fused_over_plain"] > 0


def test_bench_cpu_gemm_times_every_product_and_the_ffn(tmp_path):
    out = tmp_path / "cpu_gemm.json"
    cpu_gemm.main(["--shape", "16,32", "--rows", "8", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["case"] for r in rows] == ["product"] * 6 + ["ffn fwd+bwd, new sizes per call", "auto's choice"]
    assert all(r["rel_diff"] <= 1e-5 and r["onednn_ms"] > 0 and r["aten_ms"] > 0 for r in rows[:-1])
    choice = rows[-1]  # what gemm="auto" runs this shape class on, and the probe's figures behind it
    assert choice["op"] in ("aten", "onednn") and choice["capability"] and 0 < choice["margin"] < 1
    assert (choice["op"] == "onednn") == (choice["onednn_over_aten"] <= choice["margin"])


def test_bench_expert_parallel_runs_with_shared_experts(capsys):
    args = ["--tokens", "64", "--d-model", "16", "--d-ff", "32", "--repeats", "1", "--no-tutel"]
    expert_parallel.main([*args, "--shared-experts", "2", "--shadow-min-rows", "1"])
    doc = last_json(capsys.readouterr().out)
    balanced, skewed, _, shadowed = doc["results"]
    assert [r["scenario"] for r in doc["results"]] == ["balanced", "skewed", "skewed+rebalanced", "skewed+shadows"]
    assert shadowed["ours_rows_computed"] < skewed["ours_rows_computed"]  # the busiest rank's rows
    assert balanced["shared_experts"] == 2 and balanced["shared_alone_ms"] > 0 and "shared_cost_ratio" in balanced
    for r in doc["results"]:
        assert r["max_abs_diff"] < 1e-4  # DeepSpeed computed what ours did
        assert r["ours_rows_sent_per_assignment"] == 1.0


def test_bench_train_runs_the_peer_on_its_own_allocator(capsys):
    """Each variant in its own ranks: ours with dynmoe_dist's huge pages, DeepSpeed with torch's default allocator,
    as each rank's own process reports it (the env switch must reach the spawned ranks)."""
    tiny = ["--d-model", "32", "--d-ff", "64", "--layers", "1", "--seq-len", "16", "--batch", "2"]
    steps = ["--warm-steps", "2", "--warmup", "1", "--steps", "2", "--rounds", "1"]
    train.main([*tiny, *steps, "--variants", "ours_top2,deepspeed_cf1"])
    doc = last_json(capsys.readouterr().out)
    rows = {r["variant"]: r for r in doc["results"]}
    assert rows["ours_top2"]["huge_pages"] is (os.environ["THP_MEM_ALLOC_ENABLE"] != "0")
    assert rows["deepspeed_cf1"]["huge_pages"] is False
    assert doc["meta"]["peer_huge_pages"] == "off"
    # both went on from the warm run's Adam moments, every parameter of theirs (DeepSpeed's by expert id)
    assert rows["ours_top2"]["params_without_warm_moments"] == 0
    assert rows["deepspeed_cf1"]["params_without_warm_moments"] == 0
    assert rows["ours_top2"]["busiest_rank_rows_over_mean"] > 1.0  # routed by its gate: uneven at this size
    ratios = {r["ratio"]: r for r in doc["meta"]["ratios"]}
    assert ratios["ours_top2 / deepspeed_cf1"]["target"] is not None
    # one round: the best rounds' ratio is the only round's ratio
    for r in ratios.values():
        assert r["round_ratio_min"] == r["round_ratio_median"] == r["round_ratio_max"] == r["time_ratio"]
    assert all(len(r["ms_per_step_rounds"]) == 1 for r in doc["results"])


def case_dealt_rows() -> list[int]:
    """Rows each expert-parallel rank computes in one forward of a top-2 layer, routed by its gate, then dealt."""
    import torch.distributed as dist

    from dynmoe_dist.layer import MoELayer

    import dist_pool

    rank, counts = dist.get_rank(), []
    layer = MoELayer(16, 32, 8, router={"kind": "top_k", "k": 2}, groups=dist_pool.groups(2), seed=1)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(rank)) * 4  # skewed enough to be uneven
    for dealt in (False, True):
        if dealt:
            train.deal_round_robin(layer, rank)
        _, aux = layer(x)
        counts.append(aux.traffic.rows_computed)
    return counts


def test_the_balanced_variant_deals_every_rank_the_mean_rows():
    """(i): after the deal each rank computes exactly the mean rows (64 tokens x 2 per rank over 8 experts, 4 per
    rank); routed by the gate the same tokens load the ranks unevenly."""
    import dist_pool

    (routed0, dealt0), (routed1, dealt1) = dist_pool.pool(2).run(case_dealt_rows)
    assert dealt0 == dealt1 == 64 * 2
    assert routed0 + routed1 == 2 * 64 * 2 and routed0 != routed1


def test_ratio_spread_pairs_the_variants_of_each_round():
    best = {"a": {"ms_per_step": 90.0}, "b": {"ms_per_step": 100.0}}
    r = train.time_ratio("a", "b", 1.0, best, {"a": [90.0, 120.0], "b": [110.0, 100.0]})
    assert r["time_ratio"] == 0.9  # best round over best round
    assert (r["round_ratio_min"], r["round_ratio_max"]) == (90.0 / 110.0, 1.2)  # round by round
    assert r["round_ratio_median"] == (90.0 / 110.0 + 1.2) / 2


def test_rounds_alternate_the_order_of_the_variants(monkeypatch, capsys):
    """A steady drift of the machine must not always favour the variants that run first in a round: the bench runs
    them in the given order, then reversed. The ranks are not spawned here (the order is the bench's, not theirs)."""
    ran = []

    def fake_ranks(body, a):
        ran.append(a.variant)
        return [{"variant": a.variant, "ms_per_step": 100.0, "first_loss": 1.0}]

    monkeypatch.setattr(train, "run_ranks", fake_ranks)
    train.main(["--warm-steps", "0", "--rounds", "3", "--variants", "ours_top2,ours_top2_balanced,deepspeed_cf1"])
    forward = ["ours_top2", "ours_top2_balanced", "deepspeed_cf1"]
    assert ran == forward + forward[::-1] + forward
    doc = last_json(capsys.readouterr().out)
    assert {r["variant"]: r["ms_per_step_rounds"] for r in doc["results"]} == {v: [100.0] * 3 for v in forward}


def test_table_of_no_rows_prints_its_header():
    # bench train with variants that form no ratio pair printed an empty ratio table: max() of one int crashed
    lines = format_table([], ["ratio", "time_ratio"]).splitlines()
    assert lines == ["ratio  time_ratio", "-----  ----------"]
    row = format_table([{"ratio": "a / b", "time_ratio": 0.5}], ["ratio", "time_ratio"]).splitlines()[2]
    assert row == "a / b         0.5"
    assert format_table([{"ratio": "a / b", "target": None}], ["ratio", "target"]).splitlines()[2] == "a / b       -"


def test_ratio_interval_is_the_t_interval_of_the_log_ratios():
    """The confidence interval a verdict rests on, against values computed by hand: two rounds at 0.9 and 1.1 have
    log ratios -0.10536 and 0.09531 (mean -0.005025, sd 0.14190), t(1) = 12.706."""
    mean, lo, hi = timing.ratio_interval([0.9, 1.1])
    assert math.isclose(mean, math.sqrt(0.99))
    half = 12.706 * 0.141897 / math.sqrt(2)
    assert math.isclose(lo, math.exp(-0.0050252 - half), rel_tol=1e-4)
    assert math.isclose(hi, math.exp(-0.0050252 + half), rel_tol=1e-4)
    assert timing.ratio_interval([0.95]) is None  # one round: no interval
    same = timing.ratio_interval([0.97] * 5)  # no spread: the interval is the ratio
    assert same == pytest.approx((0.97, 0.97, 0.97))
    # reciprocal ratios give reciprocal intervals
    a, b = timing.ratio_interval([0.9, 0.97, 1.02]), timing.ratio_interval([1 / 0.9, 1 / 0.97, 1 / 1.02])
    assert a == pytest.approx((1 / b[0], 1 / b[2], 1 / b[1]))
    # the quantiles as printed tables give them, the normal quantile in the limit
    assert [round(timing.t95(df), 3) for df in (1, 2, 10, 30, 40)] == [12.706, 4.303, 2.228, 2.042, 2.021]
    assert abs(timing.t95(10**6) - 1.96) < 1e-3
    with pytest.raises(ValueError, match="degree"):
        timing.t95(0)
    # and the interval is scipy's t interval around the mean log ratio, with the standard error of the mean
    ratios = [0.91, 0.97, 1.02, 0.95, 0.99]
    logs = [math.log(r) for r in ratios]
    sem = stats.sem(logs)
    lo, hi = stats.t.interval(0.95, len(logs) - 1, loc=sum(logs) / len(logs), scale=sem)
    assert timing.ratio_interval(ratios)[1:] == pytest.approx((math.exp(lo), math.exp(hi)), rel=1e-12)


def test_verdict_needs_the_whole_interval_on_one_side_of_the_target():
    below, around, above = [0.95, 0.96, 0.97, 0.96], [0.95, 1.03, 0.97, 1.04], [1.05, 1.06, 1.04, 1.05]
    assert timing.verdict(timing.ratio_interval(below), 1.0) == "met"
    assert timing.verdict(timing.ratio_interval(around), 1.0) == "noise"
    assert timing.verdict(timing.ratio_interval(above), 1.0) == "missed"
    assert timing.verdict(timing.ratio_interval(below), None) == "-"
    assert timing.verdict(None, 1.0) == "-"
    best = {"a": {"ms_per_step": 95.0}, "b": {"ms_per_step": 100.0}}
    r = train.time_ratio("a", "b", 1.0, best, {"a": [95.0, 96.0, 97.0], "b": [100.0, 100.0, 100.0]})
    assert r["verdict"] == "met" and r["round_ratio_ci95_low"] < r["round_ratio_mean"] < r["round_ratio_ci95_high"] < 1
    one = train.time_ratio("a", "b", 1.0, best, {"a": [95.0], "b": [100.0]})
    assert one["verdict"] == "-" and one["round_ratio_mean"] is None and (one["rounds"], r["rounds"]) == (1, 3)


def proc_cpuinfo_flags() -> set[str] | None:
    """The first processor's flags as Linux lists them (x86 ``flags``, Arm ``Features``); None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def test_machine_record_names_the_cpu_its_extensions_and_the_software():
    m = machine.describe_machine(threads=3, processes=2)
    assert (m["threads_per_process"], m["processes"], m["device"]) == (3, 2, "cpu")
    assert m["logical_cores"] == os.cpu_count() and m["arch"] == platform.machine()
    assert (m["torch"], m["cuda"], m["python"]) == (torch.__version__, torch.version.cuda, platform.python_version())
    assert m["deepspeed"] == importlib.metadata.version("deepspeed")  # installed by the [train] extra
    assert m["cpu"]
    # only the SIMD / matrix extensions, best first; on Linux the same as the kernel's list of the CPU's flags
    assert m["vector_extensions"] == [f for f in machine.VECTOR_FLAGS if f in m["vector_extensions"]]
    flags = proc_cpuinfo_flags()
    if flags is not None:
        assert set(m["vector_extensions"]) == flags & set(machine.VECTOR_FLAGS)
    when = datetime.datetime.fromisoformat(m["date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 600
    if not torch.cuda.is_available():
        assert (m["gpu"], m["gpu_capability"], m["gpus"]) == (None, None, 0)
    json.dumps(m)  # goes into the JSON document as it is


def test_machine_record_names_the_gpu_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    m = machine.describe_machine(device="cuda")
    assert (m["gpu"], m["gpu_capability"], m["gpus"]) == ("NVIDIA H100 80GB HBM3", "9.0", 4)
    assert machine.short_label(m) == f"NVIDIA H100 80GB HBM3 (sm 9.0), torch {torch.__version__}"
    # a CPU benchmark on a host with a GPU is labelled by its CPU
    assert machine.short_label({**m, "device": "cpu"}).startswith(m["cpu"])


def test_short_label_names_the_best_vector_extension():
    cpu = {"cpu": "Xeon", "vector_extensions": ["amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2"]}
    assert machine.short_label({**cpu, "logical_cores": 8, "torch": "2.5"}) == "Xeon (amx_bf16), 8 cores, torch 2.5"
    assert machine.best_extension(["avx2", "fma", "avx"]) == "avx2"
    assert machine.best_extension(["asimd", "sve"]) == "sve"
    assert machine.best_extension([]) is None
    assert machine.short_label({"cpu": "M1", "vector_extensions": [], "torch": "2.5"}) == "M1, torch 2.5"
    assert machine.short_label(None) == "?"
