"""`python -m dynmoe_dist.bench NAME [options]`: run one benchmark; each prints a table and a JSON document."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "layer": "dynmoe_dist.bench.layer",
    "row_ops": "dynmoe_dist.bench.row_ops",
    "cpu_gemm": "dynmoe_dist.bench.cpu_gemm",
    "expert_parallel": "dynmoe_dist.bench.expert_parallel",
    "adapt": "dynmoe_dist.bench.adapt",
    "train": "dynmoe_dist.bench.train",
    "checkpoint": "dynmoe_dist.bench.checkpoint",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m dynmoe_dist.bench {{{','.join(BENCHMARKS)}}} [options]  (--help per benchmark)")
        raise SystemExit(2)
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
