"""``python -m benchmarks report``: the README's results table, generated from the benchmark documents.

On synthetic documents the rows, verdicts and machines are checked against values chosen here; ``--write`` and
``--check`` are checked on a temporary file; and the README in the repository must hold exactly the table the committed
documents give (edit the table by hand, or commit new results without ``--write``, and this fails).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import summary

REPO = Path(__file__).resolve().parents[1]
CPU_A = {"device": "cpu", "cpu": "Test CPU", "vector_extensions": ["avx512f", "avx2"], "logical_cores": 4}
CPU_A |= {"torch": "2.0", "date": "2030-01-02T03:04:05+00:00"}
CPU_B = {**CPU_A, "cpu": "Other CPU", "vector_extensions": ["avx2"], "date": "2030-01-03T00:00:00+00:00"}


def write(folder: Path, name: str, results: list[dict], machine: dict = CPU_A, **meta) -> None:
    doc = {"benchmark": name, "meta": {**meta, "machine": machine}, "results": results}
    (folder / f"{name}.json").write_text(json.dumps(doc))


def ratio(name: str, rounds: int, mean: float, lo: float, hi: float, target: float | None, best: float) -> dict:
    return {
        "ratio": name,
        "time_ratio": best,
        "rounds": rounds,
        "round_ratio_mean": mean,
        "round_ratio_ci95_low": lo,
        "round_ratio_ci95_high": hi,
        "target": target,
    }


def table_rows(text: str) -> list[dict[str, str]]:
    """The markdown table as dicts by column (header and separator skipped)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    write(folder, "layer", [{"gate": "top2", "overhead_ratio": 1.08}, {"gate": "top_any", "overhead_ratio": 1.3}])
    sweep = [
        {"experts": e, "d_model": d, "experts_over_dense": v, "floor_target": t}
        for e, t, vals in ((8, 1.05, (1.0, 0.85)), (32, 1.12, (1.03, 1.2)))
        for d, v in zip((256, 512), vals)
    ]
    write(folder, "layer_sweep", sweep)
    ep = {"ours_rows_sent_per_assignment": 1.0}
    write(
        folder,
        "expert_parallel",
        [
            {"scenario": "balanced", "time_ratio": 0.48, "ours_tutel_ratio": 0.9, **ep},
            {"scenario": "skewed", "time_ratio": 0.55, "ours_tutel_ratio": 0.3, **ep},
            {"scenario": "skewed+rebalanced", "time_ratio": 0.2, **ep},
        ],
        machine=CPU_B,
    )
    write(
        folder,
        "adapt",
        [
            {"event": "add_one", "event_per_step": 0.02, "bytes_ratio": 1.0, "bit_exact": True},
            {"event": "rebalance", "event_per_step": 0.06, "bytes_ratio": 1.0, "bit_exact": False},
        ],
    )
    variants = [
        {"variant": "ours_top2", "dropped_share": 0.0},
        {"variant": "deepspeed_dropless", "dropped_share": 0.0},
        {"variant": "deepspeed_cf1", "dropped_share": 0.14},
    ]
    write(
        folder,
        "train_targets",
        variants,
        ratios=[
            ratio("ours_top2 / deepspeed_dropless", 8, 0.52, 0.50, 0.54, 0.85, 0.53),
            ratio("ours_top2 / deepspeed_cf1", 8, 0.99, 0.96, 1.02, 1.0, 0.98),
        ],
    )
    write(
        folder,
        "train",
        [*variants, {"variant": "ours_top2_cf1", "dropped_share": 0.1}, {"variant": "ours_top2_aten"}],
        ratios=[
            ratio("ours_top2 / deepspeed_dropless", 2, 0.6, 0.1, 3.0, 0.85, 0.6),  # fewer rounds: not the one shown
            ratio("ours_top2_cf1 / deepspeed_cf1", 2, 1.2, 1.1, 1.3, 1.0, 1.2),
            ratio("ours_top2 / ours_top2_balanced", 2, 1.1, 1.0, 1.2, None, 1.1),  # no target: left out
            ratio("ours_top2_aten / deepspeed_cf1", 2, 1.0, 0.9, 1.1, None, 1.0),  # no target, shown all the same
        ],
    )
    hf = [(1, "mixtral", 0.75, 0.9), (1, "qwen2_moe", 0.85, 1.0), (2, "mixtral", 1.3, 0.6), (2, "qwen2_moe", 1.1, 0.7)]
    write(folder, "hf", [{"world": w, "family": f, "time_ratio": t, "mem_ratio": m} for w, f, t, m in hf])
    return folder


def by_what(rows: list[dict[str, str]], start: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["what"].startswith(start)]
    return row


def test_report_rows_and_verdicts(results: Path) -> None:
    text = summary.report(results)
    rows = table_rows(text)
    layer = by_what(rows, "layer / its expert matmuls alone, top-2")
    assert (layer["measured"], layer["target"], layer["verdict"]) == ("1.08", "<= 1.15", "met")
    assert layer["document"] == "`layer`"
    assert by_what(rows, "layer / its expert matmuls alone, Top-Any")["verdict"] == "-"  # no target for Top-Any
    # the sweep: one row per expert count, every width must meet that count's target
    eight = by_what(rows, "expert FFN / dense FFN, same rows, 8 experts")
    thirty_two = by_what(rows, "expert FFN / dense FFN, same rows, 32 experts")
    assert (eight["measured"], eight["target"], eight["verdict"]) == ("1.00; 0.85", "<= 1.05", "met")
    assert (thirty_two["measured"], thirty_two["target"], thirty_two["verdict"]) == ("1.03; 1.20", "<= 1.12", "missed")
    # expert parallel: both peers, both scenarios, each against its own target
    verdicts = {r["what"].split(": ours / ")[1]: r["verdict"] for r in rows if "2 ranks: ours /" in r["what"]}
    assert verdicts == {
        "DeepSpeed-MoE dropless, balanced routing": "met",
        "DeepSpeed-MoE dropless, skewed routing": "missed",  # 0.55 > 0.5
        "Tutel dropless, balanced routing": "missed",  # 0.9 > 0.85
        "Tutel dropless, skewed routing": "met",
    }
    assert by_what(rows, "ours: rows sent per assignment")["verdict"] == "met"
    # adaptation: one event not bit-exact fails its row, the rest hold
    assert by_what(rows, "adaptation event / training step")["measured"] == "0.020-0.060"
    assert by_what(rows, "adaptation event / training step")["verdict"] == "met"
    assert by_what(rows, "adaptation: moved experts bit-identical")["verdict"] == "missed"
    # end to end: the interval decides; each ratio from the document with the most rounds
    ab = by_what(rows, "end to end: (a) ours top-2 dropless / (b)")
    assert (ab["measured"], ab["verdict"], ab["document"]) == ("0.52 (0.50-0.54), 8 rounds", "met", "`train_targets`")
    ac = by_what(rows, "end to end: (a) ours top-2 dropless / (c)")
    assert ac["what"].endswith("which drops 14%") and ac["verdict"] == "noise"  # 0.96-1.02 straddles 1.0
    dc = by_what(rows, "end to end: (d)")
    assert (dc["verdict"], dc["document"]) == ("missed", "`train`")
    assert by_what(rows, "end to end: (k)")["verdict"] == "-"
    assert not [r for r in rows if "(i)" in r["what"]]  # a ratio without a target is not a row (but (k)'s)


def test_quality_rows_judge_each_top_any_variant_against_top_2(results: Path) -> None:
    """One row per default Top-Any gate: loss over top-2's (<= 1.01) and experts per token (<= 2.0), met only when
    both are; top-2 and the other gates make no row."""
    variants = [
        {"variant": "top2", "steps": 300, "seeds": 4, "loss_vs_top2": 1.0, "avg_k": 2.0},
        {"variant": "top_any_demo", "steps": 300, "seeds": 4, "loss_vs_top2": 0.964, "avg_k": 1.78},
        {"variant": "top_any_paper", "steps": 300, "seeds": 4, "loss_vs_top2": 1.005, "avg_k": 2.1},
        {"variant": "top_any_t_paper", "steps": 300, "seeds": 4, "loss_vs_top2": 0.99, "avg_k": 1.9},
        {"variant": "top_p", "steps": 300, "seeds": 4, "loss_vs_top2": 0.99, "avg_k": 1.5},
    ]
    write(results, "quality_stdlib", variants, corpus="stdlib", world=2)
    write(results, "quality_fortunes", variants[:2], corpus="fortunes", world=2)
    rows = [r for r in table_rows(summary.report(results)) if r["what"].startswith("quality")]
    head = "quality, stdlib corpus, 2 ranks, 300 steps, 4 seeds: Top-Any"
    demo = by_what(rows, f"{head}, `make train`'s gate: validation loss / top-2's; experts per token")
    assert (demo["measured"], demo["target"], demo["verdict"]) == ("0.964; 1.78", "<= 1.01; <= 2.0", "met")
    paper = by_what(rows, f"{head}, `moe=top_any adapt=dynmoe_paper`")
    assert (paper["measured"], paper["verdict"]) == ("1.005; 2.10", "missed")  # the loss meets, k does not
    other = by_what(rows, "quality, fortunes corpus, 2 ranks, 300 steps, 4 seeds: Top-Any, `make train`'s gate")
    assert other["document"] == "`quality_fortunes`"
    assert len([r for r in rows if r["verdict"] != "not run"]) == 3


def test_every_gate_in_one_row_without_a_target(results: Path) -> None:
    variants = [
        {"variant": "top1", "steps": 300, "seeds": 2, "loss_vs_top2": 1.29},
        {"variant": "top2", "steps": 300, "seeds": 2, "loss_vs_top2": 1.0},
        {"variant": "top_any_t", "steps": 300, "seeds": 2, "loss_vs_top2": 0.931},
        {"variant": "top_any_demo", "steps": 300, "seeds": 2, "loss_vs_top2": 0.92},
        {"variant": "relu", "steps": 300, "seeds": 2, "loss_vs_top2": 0.865},
    ]
    write(results, "quality_stdlib_gates", variants, corpus="stdlib", world=2)
    rows = table_rows(summary.report(results))
    row = by_what(rows, "quality, stdlib corpus, 2 ranks, 300 steps, 2 seeds: every gate")
    assert (row["measured"], row["target"], row["verdict"]) == ("relu 0.86, Top-Any 0.92-0.93, top1 1.29", "-", "-")


def test_hf_rows_judge_one_rank_and_show_two(results: Path) -> None:
    rows = table_rows(summary.report(results))
    time1 = by_what(rows, "transformers MoE training step, 1 rank: converted / transformers, step time")
    assert time1["what"].endswith("(Mixtral, Qwen2-MoE)") and time1["measured"] == "0.75; 0.85"
    assert (time1["target"], time1["verdict"]) == ("<= 0.8", "missed")  # Qwen2-MoE's 0.85 > 0.8
    mem1 = by_what(rows, "transformers MoE training step, 1 rank: converted / transformers, peak memory")
    assert (mem1["measured"], mem1["target"], mem1["verdict"]) == ("0.90; 1.00", "<= 1.0", "met")
    two = by_what(rows, "transformers MoE training step, 2 ranks: converted / transformers, step time; peak memory")
    assert (two["measured"], two["target"], two["verdict"]) == ("1.30, 1.10; 0.60, 0.70", "-", "-")  # no target


def test_missing_documents_are_rows_that_say_so(results: Path) -> None:
    rows = table_rows(summary.report(results))
    missing = {r["document"].strip("`") for r in rows if r["verdict"] == "not run"}
    assert missing == {"layer_sweep_onednn", "row_ops", "cpu_gemm", "expert_parallel_sweep", "checkpoint"} | {
        "quality_stdlib",
        "quality_stdlib_1000",
        "quality_fortunes",
        "quality_stdlib_gates",
    }
    assert all(r["measured"] == "not run" and r["machine"] == "-" for r in rows if r["verdict"] == "not run")
    (results / "train_targets.json").unlink()
    rows = table_rows(summary.report(results))
    assert by_what(rows, "end to end: (a) / (b) and (a) / (c)")["verdict"] == "not run"
    # (a) / (b) now comes from the 2-round run, whose interval straddles the target
    assert by_what(rows, "end to end: (a) ours top-2 dropless / (b)")["measured"] == "0.60 (0.10-3.00), 2 rounds"
    empty = results.parent / "empty"
    empty.mkdir()
    rows = table_rows(summary.report(empty))
    assert len(rows) == len(summary.DOCUMENTS) and {r["verdict"] for r in rows} == {"not run"}


def test_machines_are_keyed_and_named_under_the_table(results: Path) -> None:
    text = summary.report(results)
    rows = table_rows(text)
    assert by_what(rows, "layer / its expert matmuls alone, top-2")["machine"] == "A"
    assert by_what(rows, "ours: rows sent per assignment")["machine"] == "B"
    footer = text.strip().splitlines()[-1]
    assert "A: Test CPU (avx512f), 4 cores, torch 2.0 (2030-01-02)" in footer
    assert "B: Other CPU (avx2), 4 cores, torch 2.0 (2030-01-03)" in footer
    assert "[docs/BENCHMARKS.md](docs/BENCHMARKS.md)" in footer


def test_write_then_check_round_trip(results: Path, tmp_path: Path, capsys) -> None:
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n", "\n## Next\n\nmore\n"
    readme.write_text(f"{before}{summary.BEGIN}\nold table\n{summary.END}\n{after}")
    summary.main(["--results", str(results), "--write", str(readme)])
    text = readme.read_text()
    assert text.startswith(before + summary.BEGIN + "\n") and text.endswith(summary.END + "\n" + after)
    assert summary.report(results) in text and "old table" not in text
    summary.main(["--results", str(results), "--check", str(readme)])  # up to date: returns
    summary.main(["--results", str(results), "--write", str(readme)])
    assert readme.read_text() == text  # writing again changes nothing
    capsys.readouterr()
    readme.write_text(text.replace("| 1.08 |", "| 1.07 |"))  # a hand edit
    with pytest.raises(SystemExit) as exit_info:
        summary.main(["--results", str(results), "--check", str(readme)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert re.search(r"^-.*\| 1\.07 \|", out, re.M) and re.search(r"^\+.*\| 1\.08 \|", out, re.M)


def test_write_without_markers_says_what_is_missing(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    with pytest.raises(SystemExit, match="benchmarks report: begin"):
        summary.main(["--results", str(results), "--write", str(readme)])
    assert readme.read_text() == "# no markers here\n"


def test_every_make_bench_document_has_rows() -> None:
    makefile = (REPO / "Makefile").read_text()
    written = set(re.findall(r"-m benchmarks \w+ .*--json \$\(RESULTS\)/(\w+)\.json", makefile))
    assert "-m benchmarks quality" in makefile  # make quality: benchmarks/results/quality_<corpus>.json
    assert written | {n for n in summary.DOCUMENTS if n.startswith("quality_")} == set(summary.DOCUMENTS)


def test_readme_table_is_the_one_the_committed_documents_give(capsys) -> None:
    """The README's table equals ``python -m benchmarks report`` on benchmarks/results/; after new results or a hand
    edit, run ``python -m benchmarks report --write README.md`` (``make bench`` does)."""
    assert sorted(p.stem for p in summary.RESULTS.glob("*.json")) == sorted(summary.DOCUMENTS)  # all committed
    summary.main(["--check", str(REPO / "README.md")])
    assert "matches" in capsys.readouterr().out
