"""Benchmark output: a plain table for people and JSON for machines (whose ``meta`` names the machine)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from dynmoe_dist._allocator import huge_pages_enabled

from .machine import describe_machine


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]  # no rows: headers
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def emit(name: str, rows: list[dict[str, Any]], columns: Sequence[str], meta: dict[str, Any], path: str | None) -> None:
    """Print the table and the JSON document; also write the JSON to ``path`` when given. ``meta`` gains the machine
    (``machine.describe_machine``: threads from ``meta["threads"]`` or ``meta["threads_per_rank"]``, processes from
    ``meta["world"]``) and whether torch's huge-page CPU allocation was on (it moves CPU timings of large fresh tensors;
    dynmoe_dist._allocator)."""
    threads = meta.get("threads", meta.get("threads_per_rank"))
    machine = describe_machine(threads, processes=meta.get("world", 1), device=meta.get("device", "cpu"))
    doc = {"benchmark": name, "meta": {**meta, "machine": machine, "huge_pages": huge_pages_enabled()}, "results": rows}
    print(format_table(rows, columns))
    print(json.dumps(doc))
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f, indent=2)
