"""The CUDA path of the application: one rank per GPU over NCCL, bf16 by default. Runs only where a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynmoe_dist.parallel.bootstrap import free_port

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: the NCCL/bf16 path is checked where a GPU is present"
)


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_training_on_gpus_in_bf16(tmp_path: Path, engine: str) -> None:
    ranks = min(torch.cuda.device_count(), 2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
    ]
    cmd += ["-m", "dynmoe_dist.train", "model=tiny", "data.seq_len=64", "data.batch_size=8", "steps=30"]
    cmd += ["logging.every=10", "logging.val_every=30", "logging.wandb=disabled", f"engine={engine}"]
    cmd += ["adapt.record_steps=5", "adapt.idle_steps=5", "adapt.min_experts=2", f"out_dir={tmp_path}", "name=gpu"]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # the suite's CPU default (conftest) off
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = (tmp_path / "gpu" / "config.yaml").read_text()
    assert "precision: auto" in config and "device: auto" in config
    assert "bf16 on cuda:0" in proc.stdout + proc.stderr  # auto resolved to the GPU and bf16
    rows = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["kind"] == "val"]
    assert val[-1] < val[0]
    assert all(r["grad_norm"] == r["grad_norm"] for r in rows if r["kind"] == "train")  # finite, not NaN
