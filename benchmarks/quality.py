"""`python -m benchmarks quality`: what each gate buys in model quality, at what number of active expert parameters.

The same model, data, steps and seeds for every gate: each run is the training application itself (`dynmoe-train`
under torchrun, the demo model on the embedded corpus by default), so what is measured is what a user gets. Per
variant and run length it reports the final validation loss (mean and spread over the seeds), the average experts per
token over the last quarter, the active expert parameters per token, the expert count and the share of unrouted tokens
over time, and the longest run of steps a layer spent routing fewer than 90% of its tokens. A plot shows validation loss
against active expert parameters per token: the trade-off the DynMoE paper argues with (arXiv 2405.14297).

Runs take hours, so every run is cached in its own run folder (``--runs-dir``) and keyed by its overrides: a finished
run is read back, an interrupted one resumes from its last checkpoint (the application's ``resume=auto``), and a run
whose variant definition changed is refused until its folder is removed.

    python -m benchmarks quality                                  # every variant, 300 and 1000 steps, seeds 0 and 1
    python -m benchmarks quality --variants top2,top_any_demo --steps 300 --seeds 0 1 2
    python -m benchmarks quality --data books/ --tag books        # a folder of text files instead of the stdlib
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import emit

REPO = Path(__file__).resolve().parents[1]

# The unrouted share above which a layer counts as collapsed for a step (the trainer warns after 20 such steps).
COLLAPSE_SHARE = 0.10


@dataclass(frozen=True)
class Variant:
    """One gate configuration: hydra overrides on top of the demo, and what it stands for."""

    name: str
    overrides: tuple[str, ...]
    about: str


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("top1", ("moe=top_k", "moe.router.k=1", "adapt=off"), "softmax top-1, fixed 8 experts"),
        Variant("top2", ("moe=top_k", "adapt=off"), "softmax top-2, fixed 8 experts (the baseline)"),
        Variant("top_any_demo", (), "Top-Any, trainable temperature, demo adaptation (make train's defaults)"),
        Variant("top_any_t", ("adapt=off",), "Top-Any, trainable temperature, no adaptation"),
        Variant("top_any_t_paper", ("adapt=dynmoe_paper",), "Top-Any, trainable temperature, the paper's schedule"),
        Variant("top_any", ("moe=top_any", "adapt=demo"), "Top-Any, fixed temperature (scale 1), demo adaptation"),
        Variant("top_any_off", ("moe=top_any", "adapt=off"), "Top-Any, fixed temperature, no adaptation"),
        Variant("top_any_paper", ("moe=top_any", "adapt=dynmoe_paper"), "Top-Any, fixed temperature, paper schedule"),
        Variant("top_p", ("moe=top_p", "adapt=off"), "top-p, p=0.4 (Huang et al.)"),
        Variant("importance_k", ("moe=importance_k", "adapt=off"), "DA-MoE attention-importance k, k_max=4"),
        Variant("relu", ("moe=relu", "adapt=off"), "ReMoE ReLU routing, target 2 active"),
        Variant("null_experts", ("moe=null_experts", "adapt=off"), "AdaMoE top-2 over 8 real + 2 null experts"),
    )
}


@dataclass
class Run:
    """One training run of one variant, seed and length; its folder holds the application's own outputs."""

    variant: Variant
    seed: int
    steps: int
    folder: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}, {self.steps} steps"

    def recorded(self) -> dict[str, Any] | None:
        """What the run folder's marker says: the overrides it was trained with and whether it finished."""
        marker = self.folder / "quality.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def check_settings(self) -> None:
        """A cached run trained with other settings is refused: its figures would be read as this variant's."""
        recorded = self.recorded()
        if recorded is not None and recorded["overrides"] != self.overrides:
            raise SystemExit(
                f"quality: {self.folder} was trained with other settings ({shlex.join(recorded['overrides'])}); "
                "remove the folder to train it again with the current variant definition"
            )

    def done(self) -> bool:
        recorded = self.recorded()
        return recorded is not None and recorded["overrides"] == self.overrides and recorded["finished"]


def data_overrides(data: str | None, pattern: str | None) -> list[str]:
    """The corpus: the embedded one (``None``) or a text file/folder."""
    if data is None:
        return []
    path = Path(data).expanduser().resolve()
    if not path.exists():
        raise SystemExit(f"quality: --data {data}: no such file or folder (a text file, or a folder of text files)")
    out = ["data=text", f"data.path={path}"]
    if pattern:
        out.append(f"data.pattern={pattern}")
    return out


def plan_runs(args: argparse.Namespace) -> list[Run]:
    names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"quality: unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    base = [*data_overrides(args.data, args.pattern), *args.override]
    runs = []
    for steps in args.steps:
        for name in names:
            for seed in args.seeds:
                v = VARIANTS[name]
                folder = Path(args.runs_dir) / args.tag / f"{name}-s{seed}-n{steps}"
                every = max(steps // 10, 10)
                overrides = [
                    *v.overrides,
                    *base,
                    f"seed={seed}",
                    f"steps={steps}",
                    f"name={folder.name}",
                    f"out_dir={folder.parent.resolve()}",
                    "resume=auto",
                    "logging.wandb=disabled",
                    "logging.progress=lines",
                    "logging.every=10",
                    f"logging.val_every={every}",
                    f"checkpoint.every={max(steps // 3, 50)}",
                    "checkpoint.keep=1",
                ]
                runs.append(Run(v, seed, steps, folder, overrides))
    return runs


def command(run: Run, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dynmoe_dist.train", *run.overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dynmoe_dist.train",
        *run.overrides,
    ]


def execute(run: Run, nproc: int, threads: int) -> float:
    """Train (or resume) one run; its output goes to ``train.log`` in its folder. Returns the seconds it took."""
    run.folder.mkdir(parents=True, exist_ok=True)
    run.check_settings()
    marker = run.folder / "quality.json"
    marker.write_text(json.dumps({"overrides": run.overrides, "finished": False}, indent=1))
    # interrupted before its first checkpoint: nothing to resume, start it again
    fresh = (run.folder / "metrics.jsonl").exists() and not (run.folder / "checkpoints" / "latest").exists()
    cmd = command(run, nproc) + (["overwrite=true"] if fresh else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with (run.folder / "train.log").open("a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"quality: {run.label} failed (exit {proc.returncode}); see {run.folder / 'train.log'}")
    marker.write_text(json.dumps({"overrides": run.overrides, "finished": True}, indent=1))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------------------
# Reading a finished run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expert_parameters(config: dict[str, Any]) -> int:
    """Parameters of one routed expert in the run's resolved config (gated activations have three matrices)."""
    moe, d = config["moe"], config["model"]["d_model"]
    gated = moe["activation"] in ("swiglu", "geglu")
    weights = (3 if gated else 2) * d * moe["d_ff"]
    biases = (moe["d_ff"] * (2 if gated else 1) + d) if moe.get("expert_bias") else 0
    return weights + biases


def summarise(run: Run) -> dict[str, Any]:
    """The figures of one finished run, from its metrics.jsonl, events.jsonl and config.yaml."""
    import yaml  # hydra's dependency; the resolved config is YAML

    base = run.folder  # out_dir is its parent and name its own name: the application writes into it
    metrics = read_jsonl(base / "metrics.jsonl")
    config = yaml.safe_load((base / "config.yaml").read_text())
    events = read_jsonl(base / "events.jsonl")
    train = [r for r in metrics if r["kind"] == "train"]
    val = [r for r in metrics if r["kind"] == "val"]
    final = [r for r in val if r["step"] == run.steps]
    if not final:
        raise SystemExit(f"quality: {run.label}: no validation loss at step {run.steps} in {base / 'metrics.jsonl'}")
    layers = sorted(train[-1]["moe"]) if train else []
    quarter = [r for r in train if r["step"] > 0.75 * run.steps] or train[-1:]

    def share(r: dict, layer: str, key: str) -> float:
        m = r["moe"][layer]
        tokens = max(sum(m["k_hist"]), 1)
        return (m["unrouted"] if key == "unrouted" else sum(m["load"].values())) / tokens

    per_expert = expert_parameters(config)
    # k as computed: assignments the experts ran per token (a gate's own k can be 0 for a token it still sends on)
    k_last = {layer: statistics.fmean(share(r, layer, "compute") for r in quarter) for layer in layers}
    gate_k = {layer: statistics.fmean(r["moe"][layer]["avg_k"] for r in quarter) for layer in layers}
    # the trainer's own count: the longest run of steps a layer spent above the collapse share (metrics), and the
    # collapses it reported (events); the larger, for runs whose last streak was still open at the last record
    streaks = [r["moe"][layer].get("unrouted_streak", 0) for r in train[-1:] for layer in layers]
    collapse = [e.get("steps", 0) for e in events if e.get("kind") == "unrouted"]
    return {
        "variant": run.variant.name,
        "seed": run.seed,
        "steps": run.steps,
        "val_loss": final[-1]["loss"],
        "val_curve": [[r["step"], r["loss"]] for r in val],
        "avg_k_last_quarter": statistics.fmean(k_last.values()) if k_last else 0.0,
        "gate_k_last_quarter": statistics.fmean(gate_k.values()) if gate_k else 0.0,
        "k_per_layer": k_last,
        "active_expert_params_per_token": sum(k * per_expert for k in k_last.values()),
        "experts_over_time": {layer: [[r["step"], r["moe"][layer]["experts"]] for r in train] for layer in layers},
        "unrouted_over_time": {layer: [[r["step"], share(r, layer, "unrouted")] for r in train] for layer in layers},
        "longest_collapse_steps": max([*streaks, *collapse], default=0),
        "adapt_events": sum(1 for e in events if e.get("kind") == "adapt" and e.get("committed")),
    }


def aggregate(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, steps): means and spreads over the seeds."""
    rows = []
    keys = sorted({(s["steps"], s["variant"]) for s in summaries}, key=lambda k: (k[0], list(VARIANTS).index(k[1])))
    for steps, name in keys:
        group = [s for s in summaries if s["variant"] == name and s["steps"] == steps]
        losses = [s["val_loss"] for s in group]
        rows.append(
            {
                "variant": name,
                "steps": steps,
                "seeds": len(group),
                "val_loss": statistics.fmean(losses),
                "val_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "val_loss_min": min(losses),
                "val_loss_max": max(losses),
                "avg_k": statistics.fmean(s["avg_k_last_quarter"] for s in group),
                "gate_k": statistics.fmean(s["gate_k_last_quarter"] for s in group),
                "active_params": statistics.fmean(s["active_expert_params_per_token"] for s in group),
                "longest_collapse": max(s["longest_collapse_steps"] for s in group),
                "events": statistics.fmean(s["adapt_events"] for s in group),
                "about": VARIANTS[name].about,
                "runs": group,
            }
        )
    for row in rows:  # every variant against top-2 at the same length, when top-2 ran
        base = next((r for r in rows if r["variant"] == "top2" and r["steps"] == row["steps"]), None)
        row["loss_vs_top2"] = row["val_loss"] / base["val_loss"] if base else None
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss against active expert parameters per token, one panel per run length; and, per variant, the
    unrouted share and expert count over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.8), squeeze=False)
    colours = plt.get_cmap("tab20")
    for ax, steps in zip(axes[0], lengths):
        for i, name in enumerate(VARIANTS):
            row = next((r for r in rows if r["steps"] == steps and r["variant"] == name), None)
            if row is None:
                continue
            spread = [[row["val_loss"] - row["val_loss_min"]], [row["val_loss_max"] - row["val_loss"]]]
            ax.errorbar(row["active_params"] / 1e3, row["val_loss"], yerr=spread, fmt="o", color=colours(i), capsize=3)
            ax.annotate(
                name,
                (row["active_params"] / 1e3, row["val_loss"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("active expert parameters per token (thousands, all MoE layers)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{title}: {steps} steps (bars: min-max over seeds)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    over_time = path.with_name(path.stem + "_over_time" + path.suffix)
    steps = max(lengths)
    names = [n for n in VARIANTS if any(r["variant"] == n and r["steps"] == steps for r in rows)]
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for i, name in enumerate(names):
        row = next(r for r in rows if r["variant"] == name and r["steps"] == steps)
        first = row["runs"][0]
        for layer, series in first["unrouted_over_time"].items():
            xs, ys = zip(*series) if series else ((), ())
            axes[0].plot(xs, ys, color=colours(i), label=name if layer == min(first["unrouted_over_time"]) else None)
        for series in first["experts_over_time"].values():
            xs, ys = zip(*series) if series else ((), ())
            axes[1].plot(xs, ys, color=colours(i))
    axes[0].axhline(COLLAPSE_SHARE, color="grey", linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("unrouted share (per MoE layer)")
    axes[1].set_ylabel("experts (per MoE layer)")
    axes[1].set_xlabel("step")
    axes[0].legend(fontsize=7, ncol=3)
    axes[0].set_title(f"{title}: {steps} steps, seed {rows[0]['runs'][0]['seed']}")
    fig.tight_layout()
    fig.savefig(over_time, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, nargs="+", default=[300, 1000], help="run lengths (each its own schedule)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--data", default=None, help="a text file or folder (default: the embedded stdlib corpus)")
    p.add_argument("--pattern", default=None, help="file pattern inside --data (default: every file)")
    p.add_argument("--tag", default=None, help="the corpus's name in folders and titles (default: stdlib or --data's)")
    p.add_argument("--override", action="append", default=[], help="a hydra override for every run (repeatable)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun); 1 runs one process")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--runs-dir", default=str(REPO / "benchmarks" / "quality_runs"), help="cache of run folders")
    p.add_argument("--json", default=None, help="the JSON document (default: benchmarks/results/quality_<tag>.json)")
    p.add_argument("--plot", default=None, help="the plot (default: beside the JSON, .png)")
    p.add_argument("--no-train", action="store_true", help="only read finished runs; fail on a missing one")
    args = p.parse_args(argv)
    args.tag = args.tag or ("stdlib" if args.data is None else Path(args.data).resolve().name)
    args.json = args.json or str(REPO / "benchmarks" / "results" / f"quality_{args.tag}.json")
    args.plot = args.plot or str(Path(args.json).with_suffix(".png"))

    runs = plan_runs(args)
    for run in runs:  # before anything trains
        run.check_settings()
    todo = [r for r in runs if not r.done()]
    print(f"quality: {len(runs)} runs, {len(runs) - len(todo)} cached in {Path(args.runs_dir) / args.tag}", flush=True)
    if todo and args.no_train:
        raise SystemExit(f"quality: {len(todo)} runs not trained yet (first: {todo[0].label}); drop --no-train")
    spent: list[float] = []
    for i, run in enumerate(todo, 1):
        eta = f", about {statistics.fmean(spent) * (len(todo) - i + 1) / 60:.0f} min left" if spent else ""
        print(f"[{i}/{len(todo)}] {run.label}{eta}", flush=True)
        spent.append(execute(run, args.nproc, args.threads))
        s = summarise(run)
        print(
            f"    {spent[-1]:.0f} s: validation loss {s['val_loss']:.4f}, k {s['avg_k_last_quarter']:.2f}, "
            f"longest collapse {s['longest_collapse_steps']} steps",
            flush=True,
        )

    rows = aggregate([summarise(r) for r in runs])
    columns = ["variant", "steps", "seeds", "val_loss", "val_loss_sd", "loss_vs_top2", "avg_k", "gate_k"]
    columns += ["active_params", "longest_collapse", "events"]
    meta = {
        "corpus": args.tag,
        "data": "embedded stdlib" if args.data is None else Path(args.data).name,
        "steps": args.steps,
        "seeds": args.seeds,
        "world": args.nproc,
        "threads": args.threads,
        "overrides": args.override,
        "variants": {name: {"overrides": list(v.overrides), "about": v.about} for name, v in VARIANTS.items()},
        "collapse_share": COLLAPSE_SHARE,
    }
    emit(f"quality_{args.tag}", rows, columns, meta, args.json)
    plot(rows, Path(args.plot), args.tag)
    print(f"plots: {args.plot}, {Path(args.plot).with_name(Path(args.plot).stem + '_over_time.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
