"""`python -m benchmarks report`: the README's results table ("where we stand"), generated from the committed JSON
documents in benchmarks/results/.

Why generated: a table typed by hand drifts from the numbers behind it. Here every row is read from the document
``make bench`` wrote, with the machine it ran on; ``--write`` puts the table between two marker lines of a file and
``--check`` fails (exit 1, with a diff) when the file's table is not what the documents give, so a hand edit or new
results without a regenerated table are caught by the test suite.

One row per target a benchmark states (its ``meta["targets"]`` or its code's constants), plus the few measurements
the README quotes without a target. ``verdict``: ``met`` / ``missed`` against the target; for the end-to-end ratios,
measured over rounds, ``noise`` when their 95% interval straddles the target (``timing.verdict``); ``-`` without a
target; ``not run`` when the document is missing.
"""

from __future__ import annotations

import argparse
import difflib
import json
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .machine import short_label
from .timing import verdict as interval_verdict

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN = "<!-- benchmarks report: begin -->"
END = "<!-- benchmarks report: end -->"
DETAILS = "docs/BENCHMARKS.md"
COLUMNS = ("what", "measured", "target", "verdict", "document", "machine")
OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, "<": operator.lt, "=": operator.eq}


@dataclass(frozen=True)
class Target:
    """``value op bound`` is met, e.g. ``Target("<=", 0.85)``."""

    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.op} {self.bound}"

    def met(self, value: float) -> bool:
        return OPS[self.op](value, self.bound)


@dataclass(frozen=True)
class Targets:
    """Several measures in one row, each against its own target: met when every one is."""

    each: tuple[Target, ...]

    def __str__(self) -> str:
        return "; ".join(str(t) for t in self.each)

    def met(self, values: Sequence[float]) -> bool:
        return all(t.met(v) for t, v in zip(self.each, values, strict=True))


@dataclass(frozen=True)
class Row:
    """One line of the table, before the document and machine columns are added."""

    what: str
    measured: str
    target: Target | Targets | None = None
    verdict: str = "-"


def judged(what: str, values: Sequence[float], measured: str, target: Target) -> Row:
    """A row whose values must all meet the target (one measurement, or one per shape or event)."""
    return Row(what, measured, target, "met" if all(target.met(v) for v in values) else "missed")


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def span(values: Sequence[float], digits: int = 2) -> str:
    """``lo-hi``, or the one value when they are all equal at this precision."""
    lo, hi = fmt(min(values), digits), fmt(max(values), digits)
    return lo if lo == hi else f"{lo}-{hi}"


# ---------------------------------------------------------------------------------------------------------------------
# one function per document: its rows


def layer_rows(doc: dict) -> list[Row]:
    by_gate = {r["gate"]: r for r in doc["results"]}
    rows = []
    if "top2" in by_gate:
        x = by_gate["top2"]["overhead_ratio"]
        rows.append(judged("layer / its expert matmuls alone, top-2", [x], fmt(x), Target("<=", 1.15)))
    if "top_any" in by_gate:
        rows.append(Row("layer / its expert matmuls alone, Top-Any", fmt(by_gate["top_any"]["overhead_ratio"])))
    return rows


def sweep_rows(kernels: str) -> Callable[[dict], list[Row]]:
    """The granularity sweep: per expert count, the expert FFN over the dense FFN of the same rows, every width."""

    def rows(doc: dict) -> list[Row]:
        out = []
        for experts in sorted({r["experts"] for r in doc["results"]}):
            shapes = sorted((r for r in doc["results"] if r["experts"] == experts), key=lambda r: r["d_model"])
            values = [r["experts_over_dense"] for r in shapes]
            widths = " and ".join(str(r["d_model"]) for r in shapes)
            what = f"expert FFN / dense FFN, same rows, {experts} experts, d {widths}, {kernels}"
            measured = "; ".join(fmt(v) for v in values)
            bound = shapes[0].get("floor_target")
            out.append(judged(what, values, measured, Target("<=", bound)) if bound else Row(what, measured))
        return out

    return rows


def row_ops_rows(doc: dict) -> list[Row]:
    parts = []
    for op in ("combine", "gather"):
        values = [r["fused_over_plain"] for r in doc["results"] if r["op"] == op]
        if values:
            parts.append((op, span(values)))
    return [
        Row(f"fused row ops / plain autograd ops ({'; '.join(op for op, _ in parts)})", "; ".join(m for _, m in parts))
    ]


def cpu_gemm_rows(doc: dict) -> list[Row]:
    products = [r["onednn_over_aten"] for r in doc["results"] if r["case"] == "product"]
    ffn = [r["onednn_over_aten"] for r in doc["results"] if r["case"] != "product"]
    measured = "; ".join(span(v) for v in (products, ffn) if v)
    return [Row("oneDNN GEMM / aten mm: each FFN product; the grouped FFN", measured)]


EP_TARGETS = {"balanced": 0.85, "skewed": 0.5}  # meta["targets"] of bench expert_parallel, for both peers
EP_PEERS = {"time_ratio": "DeepSpeed-MoE dropless", "ours_tutel_ratio": "Tutel dropless"}


def expert_parallel_rows(doc: dict) -> list[Row]:
    by_scenario = {r["scenario"]: r for r in doc["results"]}
    rows = []
    for key, peer in EP_PEERS.items():
        for scenario, bound in EP_TARGETS.items():
            what = f"expert-parallel layer, 2 ranks: ours / {peer}, {scenario} routing"
            r = by_scenario.get(scenario)
            if r is None or key not in r:
                rows.append(Row(what, "not in this run"))
                continue
            rows.append(judged(what, [r[key]], fmt(r[key]), Target("<=", bound)))
    sent = [r["ours_rows_sent_per_assignment"] for r in doc["results"]]
    rows.append(judged("ours: rows sent per assignment, every scenario", sent, span(sent, 3), Target("=", 1.0)))
    return rows


def expert_parallel_sweep_rows(doc: dict) -> list[Row]:
    rows = []
    for key, peer in EP_PEERS.items():
        shapes = [r for r in doc["results"] if key in r]
        what = f"expert-parallel layer, 2 ranks: ours / {peer}, balanced, every sweep shape"
        if not shapes:
            rows.append(Row(what, "not in this run"))
            continue
        worst = max(shapes, key=lambda r: r[key])
        experts = sorted({r["experts"] for r in shapes})
        what += f" ({experts[0]}-{experts[-1]} experts)" if len(experts) > 1 else ""
        measured = f"{span([r[key] for r in shapes])} (highest: {worst['experts']} experts, d {worst['d_model']})"
        rows.append(judged(what, [r[key] for r in shapes], measured, Target("<=", EP_TARGETS["balanced"])))
    return rows


def adapt_rows(doc: dict) -> list[Row]:
    events = doc["results"]
    names = ", ".join(r["event"] for r in events)
    per_step = [r["event_per_step"] for r in events]
    ratios = [r["bytes_ratio"] for r in events]
    exact = sum(bool(r["bit_exact"]) for r in events)
    return [
        judged(f"adaptation event / training step ({names})", per_step, span(per_step, 3), Target("<", 1.0)),
        judged("adaptation: bytes moved / bytes needed, every event", ratios, span(ratios, 3), Target("=", 1.0)),
        judged("adaptation: moved experts bit-identical on their new rank", [exact], f"{exact} of {len(events)}",
               Target("=", len(events))),
    ]  # fmt: skip


VARIANTS = {
    "ours_top2": "(a) ours top-2 dropless",
    "deepspeed_dropless": "(b) DeepSpeed-MoE dropless",
    "deepspeed_cf1": "(c) DeepSpeed-MoE capacity 1.0",
    "ours_top2_cf1": "(d) ours capacity 1.0",
    "ours_top_any": "(e) ours Top-Any",
    "tutel_dropless": "(f) Tutel dropless",
    "tutel_cf1": "(g) Tutel capacity 1.0",
    "ours_top2_rebalanced": "(h) ours rebalanced",
    "ours_top2_balanced": "(i) ours dealt evenly",
    "ours_top2_shadowed": "(j) ours shadow experts",
    "ours_top2_aten": "(k) ours on aten mm",
}
# the ratios without a target that the table shows all the same (equal kernels: the like-for-like comparison)
TRAIN_MEASURED = ("ours_top2_aten / deepspeed_cf1",)


def train_ratios(docs: Sequence[dict]) -> list[tuple[dict, dict, dict]]:
    """(ratio, its document, that document's best row per variant) for every targeted ratio and TRAIN_MEASURED, each
    from the document that measured it over the most rounds (``make bench``'s 8-round targets run before the 2-round
    run of every variant)."""
    chosen: dict[str, tuple[dict, dict, dict]] = {}
    order: list[str] = []
    for doc in docs:
        best = {r["variant"]: r for r in doc["results"]}
        for ratio in doc["meta"].get("ratios", []):
            name = ratio["ratio"]
            if ratio.get("target") is None and name not in TRAIN_MEASURED:
                continue
            if name not in chosen:
                order.append(name)
            if name not in chosen or ratio["rounds"] > chosen[name][0]["rounds"]:
                chosen[name] = (ratio, doc, best)
    return [chosen[name] for name in order]


def train_row(ratio: dict, best: dict) -> Row:
    num, den = (v.strip() for v in ratio["ratio"].split("/"))
    dropped = best.get(den, {}).get("dropped_share") or 0.0
    what = f"end to end: {VARIANTS.get(num, num)} / {VARIANTS.get(den, den)}"
    what += f", which drops {dropped:.0%}" if dropped >= 0.005 else ""
    rounds = ratio["rounds"]
    plural = "s" if rounds != 1 else ""
    if ratio.get("round_ratio_mean") is None:
        measured = f"{fmt(ratio['time_ratio'])}, {rounds} round{plural}"
        interval = None
    else:
        lo, hi = ratio["round_ratio_ci95_low"], ratio["round_ratio_ci95_high"]
        measured = f"{fmt(ratio['round_ratio_mean'])} ({fmt(lo)}-{fmt(hi)}), {rounds} round{plural}"
        interval = (ratio["round_ratio_mean"], lo, hi)
    bound = ratio.get("target")
    if bound is None:
        return Row(what, measured)
    return Row(what, measured, Target("<=", bound), interval_verdict(interval, bound))


def checkpoint_rows(doc: dict) -> list[Row]:
    stages = doc["results"]
    which = "; ".join(str(r["zero_stage"]) for r in stages)
    tensors = [r["tensor_bytes_over_state"] for r in stages]
    files = [r["file_bytes_over_state"] for r in stages]
    return [
        judged(f"checkpoint: tensor bytes / training state (ZeRO {which})", tensors,
               "; ".join(fmt(v, 3) for v in tensors), Target("=", 1.0)),
        Row(f"checkpoint: file bytes / training state (ZeRO {which})", "; ".join(fmt(v, 3) for v in files)),
    ]  # fmt: skip


QUALITY_LABELS = {
    "top_any_demo": "Top-Any, `make train`'s gate",
    "top_any_paper": "Top-Any, `moe=top_any adapt=dynmoe_paper`",
}


def quality_rows(doc: dict) -> list[Row]:
    """Top-Any as ``make train`` and the paper's schedule run it, against fixed top-2 at equal model, data, steps and
    seeds (docs/ALGORITHMS.md section 6): validation loss over top-2's and experts per token, one row per gate."""
    corpus, world = doc["meta"]["corpus"], doc["meta"]["world"]
    targets = Targets((Target("<=", 1.01), Target("<=", 2.0)))
    rows = []
    for r in doc["results"]:
        if r["variant"] not in QUALITY_LABELS or r.get("loss_vs_top2") is None:
            continue
        what = f"quality, {corpus} corpus, {world} ranks, {r['steps']} steps, {r['seeds']} seeds: "
        what += f"{QUALITY_LABELS[r['variant']]}: validation loss / top-2's; experts per token (last quarter)"
        values = (r["loss_vs_top2"], r["avg_k"])
        verdict = "met" if targets.met(values) else "missed"
        rows.append(Row(what, f"{fmt(values[0], 3)}; {fmt(values[1])}", targets, verdict))
    return rows


def quality_gate_rows(doc: dict) -> list[Row]:
    """Every gate's validation loss over top-2's in one row, without a target (the Top-Any flavours as one range)."""
    rows = [r for r in doc["results"] if r.get("loss_vs_top2") is not None and r["variant"] != "top2"]
    if not rows:
        return []
    top_any = [r["loss_vs_top2"] for r in rows if r["variant"].startswith("top_any")]
    parts = [
        (r["loss_vs_top2"], f"{r['variant']} {fmt(r['loss_vs_top2'])}")
        for r in rows
        if not r["variant"].startswith("top_any")
    ]
    if top_any:
        parts.append((min(top_any), f"Top-Any {span(top_any)}"))
    r0, meta = rows[0], doc["meta"]
    what = f"quality, {meta['corpus']} corpus, {meta['world']} ranks, {r0['steps']} steps, {r0['seeds']} seeds: "
    return [Row(what + "every gate's validation loss / top-2's", ", ".join(text for _, text in sorted(parts)))]


HF_FAMILIES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE"}
HF_TARGETS = {"time_ratio": 0.8, "mem_ratio": 1.0}  # bench hf's targets (its TARGETS), at 1 rank


def hf_rows(doc: dict) -> list[Row]:
    """The converted model's training step over transformers' own: at 1 rank time and peak memory against ``bench
    hf``'s targets, each a row; at more ranks both in one row, measured without a target."""
    rows = []
    for world in sorted({r["world"] for r in doc["results"]}):
        runs = [r for r in doc["results"] if r["world"] == world]
        names = ", ".join(HF_FAMILIES.get(r["family"], r["family"]) for r in runs)
        what = f"transformers MoE training step, {world} rank{'s' if world > 1 else ''}: converted / transformers"
        if world > 1:
            measured = "; ".join(", ".join(fmt(r[key]) for r in runs) for key in HF_TARGETS)
            rows.append(Row(f"{what}, step time; peak memory ({names})", measured))
            continue
        for key, metric in (("time_ratio", "step time"), ("mem_ratio", "peak memory")):
            values = [r[key] for r in runs]
            measured = "; ".join(fmt(v) for v in values)
            rows.append(judged(f"{what}, {metric} ({names})", values, measured, Target("<=", HF_TARGETS[key])))
    return rows


# document name -> (what it is, when it is missing; its rows). The train documents share one function (train_ratios).
DOCUMENTS: dict[str, tuple[str, Callable[[dict], list[Row]] | None]] = {
    "layer": ("layer / its expert matmuls alone", layer_rows),
    "layer_sweep": ("expert FFN / dense FFN, granularity sweep, aten mm", sweep_rows("aten mm")),
    "layer_sweep_onednn": ("expert FFN / dense FFN, granularity sweep, oneDNN", sweep_rows("oneDNN")),
    "row_ops": ("fused row ops / plain autograd ops", row_ops_rows),
    "cpu_gemm": ("oneDNN GEMM / aten mm", cpu_gemm_rows),
    "expert_parallel": ("expert-parallel layer: ours / DeepSpeed-MoE and Tutel", expert_parallel_rows),
    "expert_parallel_sweep": ("expert-parallel layer, granularity sweep", expert_parallel_sweep_rows),
    "adapt": ("adaptation event / training step", adapt_rows),
    "train_targets": ("end to end: (a) / (b) and (a) / (c), the targets run", None),
    "train": ("end to end: every variant", None),
    "checkpoint": ("checkpoint bytes / training state", checkpoint_rows),
    "hf": ("transformers MoE training step: converted / transformers", hf_rows),
    "quality_stdlib": ("model quality per gate on the embedded corpus (make quality)", quality_rows),
    "quality_stdlib_1000": ("model quality per gate on the embedded corpus, 1000 steps", quality_rows),
    "quality_fortunes": ("model quality per gate on English prose (--data)", quality_rows),
    "quality_stdlib_gates": ("model quality of every gate on the embedded corpus", quality_gate_rows),
}
TRAIN_DOCUMENTS = ("train_targets", "train")


def load(results: Path) -> dict[str, dict]:
    """The documents present: name -> document."""
    docs = {}
    for name in DOCUMENTS:
        path = results / f"{name}.json"
        if path.exists():
            docs[name] = json.loads(path.read_text())
    return docs


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def report(results: Path = RESULTS) -> str:
    """The markdown the markers enclose: the table, then the machines the documents ran on."""
    docs = load(results)
    machines: dict[str, str] = {}  # short label -> key A, B, ...
    dates: dict[str, list[str]] = {}

    def machine_key(doc: dict) -> str:
        m = doc["meta"].get("machine")
        label = short_label(m)
        if label not in machines:
            machines[label] = chr(ord("A") + len(machines))
            dates[label] = []
        if m and m.get("date"):
            dates[label].append(m["date"][:10])
        return machines[label]

    lines = [f"| {' | '.join(COLUMNS)} |", "|" + "---|" * len(COLUMNS)]

    def add(row: Row, name: str, key: str) -> None:
        target = str(row.target) if row.target else "-"
        cells = (row.what, row.measured, target, row.verdict, f"`{name}`", key)
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")

    for name, (title, rows_of) in DOCUMENTS.items():
        if name in TRAIN_DOCUMENTS:
            if name != TRAIN_DOCUMENTS[0]:
                continue
            present = [(n, docs[n]) for n in TRAIN_DOCUMENTS if n in docs]
            keys = {id(doc): (n, machine_key(doc)) for n, doc in present}
            for ratio, doc, best in train_ratios([doc for _, doc in present]):
                add(train_row(ratio, best), *keys[id(doc)])
            for n in TRAIN_DOCUMENTS:
                if n not in docs:
                    add(Row(DOCUMENTS[n][0], "not run", verdict="not run"), n, "-")
            continue
        if name not in docs:
            add(Row(title, "not run", verdict="not run"), name, "-")
            continue
        key = machine_key(docs[name])
        for row in rows_of(docs[name]):
            add(row, name, key)

    def when(label: str) -> str:
        days = sorted(set(dates[label]))
        return "no date" if not days else days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"

    where = "; ".join(f"{key}: {label} ({when(label)})" for label, key in machines.items())
    footer = (
        f"Documents in `benchmarks/results/`, written by `make bench`; machines: {where or 'none'}. "
        f"What each benchmark measures, and the figures behind each row: [{DETAILS}]({DETAILS})."
    )
    return "\n".join([*lines, "", footer]) + "\n"


def between_markers(text: str, path: Path) -> tuple[str, str, str]:
    """(before, enclosed, after) around the marker lines; SystemExit naming the file when they are not there once."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.strip() == BEGIN]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise SystemExit(
            f"{path}: expected one line '{BEGIN}' followed by one line '{END}' around the results table "
            f"(found {len(begins)} and {len(ends)}); add them where the table goes"
        )
    b, e = begins[0], ends[0]
    return "".join(lines[: b + 1]), "".join(lines[b + 1 : e]), "".join(lines[e:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON documents")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="replace the table between FILE's marker lines")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 with a diff when FILE's table differs")
    a = p.parse_args(argv)
    table = report(a.results)
    if a.write is None and a.check is None:
        sys.stdout.write(table)
        return
    path = a.write or a.check
    text = path.read_text()
    before, enclosed, after = between_markers(text, path)
    wanted = "\n" + table + "\n"  # a blank line after the begin marker and before the end marker
    if a.write:
        path.write_text(before + wanted + after)
        print(f"{path}: results table written from {a.results}")
        return
    if enclosed != wanted:
        diff = difflib.unified_diff(
            enclosed.splitlines(keepends=True),
            wanted.splitlines(keepends=True),
            f"{path} (as it is)",
            f"{path} (python -m benchmarks report)",
        )
        sys.stdout.writelines(diff)
        print(f"{path}: the results table differs from the documents; run: python -m benchmarks report --write {path}")
        raise SystemExit(1)
    print(f"{path}: the results table matches the documents")
