"""``dynmoe-report RUN_FOLDER``: PNG plots and a Markdown summary of a run, from its metrics.jsonl and events.jsonl.

    plots/loss.png          training and validation loss over steps
    plots/experts.png       experts per MoE layer over steps, adaptation events marked; average k below
    plots/k_distribution.png   per layer: share of tokens by k, first and last quarter of the run
    plots/load.png          per layer: each expert id's share of the assignments over time (blank: expert absent)
    plots/unrouted.png      per layer: the share of tokens the gate sent to no expert, with the collapse line
    plots/throughput.png    tokens per second (and peak memory per rank)
    summary.md              the numbers that matter, and the plots

Reads only the files, so it works on a finished run, a running one, or one copied from a cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .unrouted import ADVICE, COLLAPSE_SHARE

EVENT_STYLE = {"add": ("^", "tab:green"), "remove": ("v", "tab:red"), "rebalance": ("D", "tab:blue")}


@dataclass
class Run:
    folder: Path
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    collapses: list[dict] = field(default_factory=list)  # layers that routed too few tokens for too long

    @property
    def layers(self) -> list[str]:
        return list(self.train[-1]["moe"]) if self.train else []


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"dynmoe-report: {path}:{number} is not a JSON line (a damaged file?)") from None
    return out


def load_run(folder: Path) -> Run:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        raise SystemExit(f"dynmoe-report: {folder} holds no metrics.jsonl; give the folder of a run (runs/<name>)")
    records = read_jsonl(metrics)
    run = Run(folder, [r for r in records if r.get("kind") == "train"], [r for r in records if r.get("kind") == "val"])
    events = read_jsonl(folder / "events.jsonl")
    run.events = [e for e in events if e.get("committed")]
    run.collapses = [e for e in events if e.get("kind") == "unrouted"]
    if not run.train:
        raise SystemExit(f"dynmoe-report: {metrics} has no training record yet (one is written every logging.every)")
    return run


def event_kinds(event: dict) -> list[str]:
    kinds = []
    if event.get("added"):
        kinds.append("add")
    if event.get("removed"):
        kinds.append("remove")
    if event.get("kind") == "rebalance":
        kinds.append("rebalance")
    return kinds


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


def _grid(n: int):
    plt = _pyplot()
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_loss(run: Run, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], label="train (mean over the interval)")
    if run.val:
        ax.plot([r["step"] for r in run.val], [r["loss"] for r in run.val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_experts(run: Run, path: Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    steps = [r["step"] for r in run.train]
    for layer in run.layers:
        line = top.step(steps, [r["moe"][layer]["experts"] for r in run.train], where="post", label=layer)[0]
        bottom.plot(steps, [r["moe"][layer]["avg_k"] for r in run.train], color=line.get_color(), label=layer)
        for event in (e for e in run.events if e["layer"] == layer):
            for kind in event_kinds(event):
                marker, color = EVENT_STYLE[kind]
                top.plot(event["step"], event["experts"], marker, color=color, markersize=7)
    for kind, (marker, color) in EVENT_STYLE.items():
        top.plot([], [], marker, color=color, linestyle="none", label=kind)
    top.set(ylabel="experts", title="Experts per MoE layer (markers: adaptation events)")
    bottom.set(xlabel="step", ylabel="average k (experts per token)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=8, ncol=2)
    _save(fig, path)


def k_shares(records: list[dict], layer: str) -> list[float]:
    bins = [0.0] * max((len(r["moe"][layer]["k_hist"]) for r in records), default=0)
    for r in records:
        for k, v in enumerate(r["moe"][layer]["k_hist"]):
            bins[k] += v
    total = sum(bins) or 1.0
    return [b / total for b in bins]


def plot_k(run: Run, path: Path) -> None:
    fig, axes = _grid(len(run.layers))
    quarter = max(1, len(run.train) // 4)
    for ax, layer in zip(axes, run.layers):
        first, last = k_shares(run.train[:quarter], layer), k_shares(run.train[-quarter:], layer)
        top = max([k for k, v in enumerate(first) if v > 0] + [k for k, v in enumerate(last) if v > 0] + [1])
        ks = list(range(top + 1))
        ax.bar([k - 0.2 for k in ks], first[: top + 1], width=0.4, label="first quarter")
        ax.bar([k + 0.2 for k in ks], last[: top + 1], width=0.4, label="last quarter")
        ax.set(xlabel="k (experts per token; 0 = unrouted)", ylabel="share of tokens", title=layer, xticks=ks)
        ax.legend(fontsize=8)
    fig.suptitle("Distribution of k")
    _save(fig, path)


def plot_load(run: Run, path: Path) -> None:
    import numpy as np

    fig, axes = _grid(len(run.layers))
    steps = [r["step"] for r in run.train]
    for ax, layer in zip(axes, run.layers):
        ids = sorted({int(i) for r in run.train for i in r["moe"][layer]["load"]})
        grid = np.full((len(ids), len(steps)), np.nan)
        row = {i: n for n, i in enumerate(ids)}
        for col, r in enumerate(run.train):
            load = r["moe"][layer]["load"]
            total = sum(load.values()) or 1
            for i, v in load.items():
                grid[row[int(i)], col] = v / total
        image = ax.imshow(
            grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
            extent=(steps[0], steps[-1], -0.5, len(ids) - 0.5),
        )  # fmt: skip
        ax.set(xlabel="step", ylabel="expert id", title=layer)
        ax.set_yticks(range(len(ids)), [str(i) for i in ids], fontsize=7)
        fig.colorbar(image, ax=ax, label="share of assignments")
    fig.suptitle("Per-expert load over time")
    _save(fig, path)


def unrouted_share(record: dict, layer: str) -> float:
    stats = record["moe"][layer]
    if "unrouted_share" in stats:
        return stats["unrouted_share"]
    return stats["unrouted"] / max(sum(stats["k_hist"]), 1)


def plot_unrouted(run: Run, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in run.train]
    for layer in run.layers:
        ax.plot(steps, [unrouted_share(r, layer) for r in run.train], label=layer)
    for c in run.collapses:
        ax.axvspan(c["start"], c["step"], color="tab:red", alpha=0.12)
    ax.axhline(COLLAPSE_SHARE, color="tab:red", linestyle="--", linewidth=0.8, label="collapse line")
    ax.set(xlabel="step", ylabel="share of tokens", ylim=(0, 1), title="Tokens the gate sent to no expert")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_throughput(run: Run, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in run.train]
    ax.plot(steps, [r["tokens_per_s"] for r in run.train], color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens / s (all ranks)", title="Throughput")
    ax.grid(alpha=0.3)
    mem = ax.twinx()
    mem.plot(steps, [r["peak_mem_mb"] for r in run.train], color="tab:gray", linestyle="--")
    mem.set_ylabel("peak memory per rank (MB, dashed)")
    _save(fig, path)


PLOTS = {
    "loss.png": plot_loss,
    "experts.png": plot_experts,
    "k_distribution.png": plot_k,
    "load.png": plot_load,
    "unrouted.png": plot_unrouted,
    "throughput.png": plot_throughput,
}


def summary(run: Run) -> str:
    last = run.train[-1]
    rows = [("steps", f"{last['step']}"), ("tokens", f"{last['tokens']:,}")]
    rows.append(("training time", f"{last['time']:.1f} s"))
    rows.append(("train loss (last interval)", f"{last['loss']:.4f}"))
    if run.val:
        first, end = run.val[0]["loss"], run.val[-1]["loss"]
        rows.append(("validation loss, first -> last", f"{first:.4f} -> {end:.4f} ({end / first:.1%} of first)"))
        if "bpb" in run.val[-1]:
            rows.append(("validation bits per byte (last)", f"{run.val[-1]['bpb']:.3f}"))
    rows.append(("tokens / s (median)", f"{statistics.median(r['tokens_per_s'] for r in run.train):,.0f}"))
    rows.append(("peak memory per rank", f"{max(r['peak_mem_mb'] for r in run.train):.0f} MB"))
    counts = {k: sum(k in event_kinds(e) for e in run.events) for k in EVENT_STYLE}
    added = sum(len(e["added"]) for e in run.events)
    removed = sum(len(e["removed"]) for e in run.events)
    moved = sum(len(e["moved"]) for e in run.events)
    rows.append(("adaptation events", f"{counts['add']} with adds, {counts['remove']} with removals, "
                 f"{counts['rebalance']} rebalances"))  # fmt: skip
    rows.append(("experts added / removed / moved", f"{added} / {removed} / {moved}"))
    if run.events:
        rows.append(("event cost (mean)", f"{statistics.mean(e['seconds'] for e in run.events) * 1e3:.1f} ms, "
                     f"{statistics.mean(e['bytes_moved'] for e in run.events) / 1e6:.2f} MB"))  # fmt: skip
    out = [f"# Run {run.folder.name}", ""]
    for c in run.collapses:
        out.append(
            f"**Warning: {c['layer']} collapsed**: it routed fewer than 90% of its tokens to any expert for "
            f"{c['steps']} steps ({c['start']} to {c['step']}, up to {c['peak_share']:.0%} unrouted). "
            f"To change: {ADVICE}.\n"
        )
    out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out += ["", "| MoE layer | experts at start -> end | average k (last) | load imbalance (last) | unrouted (last) |"]
    out += ["|---|---|---|---|---|"]
    for layer in run.layers:
        start, end = run.train[0]["moe"][layer], last["moe"][layer]
        out.append(
            f"| {layer} | {start['experts']} -> {end['experts']} | {end['avg_k']:.2f} | "
            f"{end['load_imbalance']:.2f} | {unrouted_share(last, layer):.1%} |"
        )
    out += [""] + [f"![{name}](plots/{name})" for name in PLOTS]
    return "\n".join(out) + "\n"


def write_report(folder: Path) -> list[Path]:
    run = load_run(folder)
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        plot(run, plots / name)
        written.append(plots / name)
    (folder / "summary.md").write_text(summary(run))
    return written + [folder / "summary.md"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="dynmoe-report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("run_folder", type=Path, help="a run folder, e.g. runs/demo")
    a = p.parse_args(argv)
    written = write_report(a.run_folder)
    print(f"report: {a.run_folder / 'summary.md'}")
    for path in written[:-1]:
        print(f"  plot: {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
