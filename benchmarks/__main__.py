"""`python -m benchmarks NAME [options]`: run one benchmark (each prints a table and a JSON document), or `report`
(the README's results table from the committed documents)."""

from __future__ import annotations

import importlib
import sys

from dynmoe_dist.extras import exit_without_extra

BENCHMARKS = {
    "layer": "benchmarks.layer",
    "row_ops": "benchmarks.row_ops",
    "cpu_gemm": "benchmarks.cpu_gemm",
    "expert_parallel": "benchmarks.expert_parallel",
    "adapt": "benchmarks.adapt",
    "train": "benchmarks.train",
    "checkpoint": "benchmarks.checkpoint",
    "quality": "benchmarks.quality",  # hours: validation loss per gate at equal model, data, steps and seeds
    "report": "benchmarks.summary",  # the README's results table from benchmarks/results/*.json
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [options]  (--help per benchmark)")
        raise SystemExit(2)
    exit_without_extra("bench", "python -m benchmarks")  # scipy (intervals), py-cpuinfo (the machine in every document)
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
