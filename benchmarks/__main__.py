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
    "hf": "benchmarks.hf",  # a transformers MoE model's training step, as transformers runs it and converted
    "gpu": "benchmarks.gpu",  # one CUDA device: the layer against its grouped GEMMs, Mixtral's block and DeepSpeed
    "quality": "benchmarks.quality",  # hours: validation loss per gate at equal model, data, steps and seeds
    "report": "benchmarks.summary",  # the README's results table from benchmarks/results/*.json
}

# run on a GPU machine's preinstalled torch, where the [bench] extra may be missing: they use it where it is there
RUN_WITHOUT_EXTRA = {"gpu"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [options]  (--help per benchmark)")
        raise SystemExit(2)
    if sys.argv[1] not in RUN_WITHOUT_EXTRA:
        exit_without_extra("bench", "python -m benchmarks")  # scipy (intervals), py-cpuinfo (the machine's record)
    importlib.import_module(BENCHMARKS[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
