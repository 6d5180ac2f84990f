"""dynmoe_dist turns on torch's huge-page CPU allocation at import (a user's own setting wins), and it takes effect:
a fresh 64 MB tensor costs far fewer page faults. See dynmoe_dist/_allocator.py for why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = """
import os, resource, dynmoe_dist, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 << 20).fill_(1.0)  # 64 MB, fresh from the allocator
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    value, faults = out.stdout.split()
    return value, int(faults)


def test_import_sets_huge_pages_and_the_users_value_wins() -> None:
    assert probe()[0] == "1"
    assert probe(THP_MEM_ALLOC_ENABLE="0")[0] == "0"


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="this kernel has transparent huge pages off"
)
def test_huge_pages_cut_the_page_faults_of_a_fresh_large_tensor() -> None:
    on, off = probe()[1], probe(THP_MEM_ALLOC_ENABLE="0")[1]
    assert off > 10_000  # 64 MB in 4 KiB pages is 16384 first touches
    assert on < off / 4, (on, off)


def test_bench_train_runs_peers_with_their_own_allocator_and_restores_ours(monkeypatch) -> None:
    from benchmarks.train import allocator_env

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    with allocator_env("0"):
        assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"  # what the peer's spawned ranks inherit
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    with allocator_env("0"):
        pass
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
