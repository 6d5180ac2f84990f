"""The machine a benchmark ran on, recorded in every JSON document's ``meta["machine"]``.

Why: a ratio such as oneDNN / aten or ours / DeepSpeed depends on the CPU's vector units, the core count, the torch
build and the peers' versions; a number without them cannot be compared with a later run or another machine. The
report names each document's machine from this record.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import os
import platform
from typing import Any

import torch

# The SIMD and matrix extensions that decide which GEMM kernels a CPU runs, best first (py-cpuinfo's flag names, as
# Linux reports them). x86: AMX tiles, AVX-512 with bf16/fp16/VNNI, AVX2 with FMA; Arm: SVE2, SVE, NEON (asimd).
VECTOR_FLAGS = (
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "avx512_fp16",
    "avx512_bf16",
    "avx512_vnni",
    "avx512bw",
    "avx512vl",
    "avx512f",
    "avx_vnni",
    "avx2",
    "fma",
    "avx",
    "sse4_2",
    "sve2",
    "sve",
    "i8mm",
    "bf16",
    "asimd",
    "neon",
)
# the one a short label names: the first of these the CPU has
LABEL_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2", "avx", "sse4_2", "sve2", "sve", "asimd", "neon")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(CPU model, its vector extensions in VECTOR_FLAGS order). Cached: py-cpuinfo takes seconds (it probes in a
    subprocess); without py-cpuinfo, the platform's processor string and no flags."""
    try:
        import cpuinfo
    except ImportError:
        return platform.processor() or platform.machine(), ()
    info = cpuinfo.get_cpu_info()
    flags = set(info.get("flags", ()))
    model = info.get("brand_raw") or platform.processor() or platform.machine()
    return model, tuple(f for f in VECTOR_FLAGS if f in flags)


def package_version(name: str) -> str | None:
    """The installed distribution's version, or None where it is not installed (not imported: DeepSpeed's import
    takes seconds and prints)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpu_info() -> dict[str, Any]:
    """The first CUDA device's name and compute capability, and how many there are; None values without CUDA."""
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_capability": None, "gpus": 0}
    major, minor = torch.cuda.get_device_capability(0)
    name, count = torch.cuda.get_device_name(0), torch.cuda.device_count()
    return {"gpu": name, "gpu_capability": f"{major}.{minor}", "gpus": count}


def describe_machine(threads: int | None = None, processes: int = 1, device: str = "cpu") -> dict[str, Any]:
    """What a JSON document records about where it ran. ``threads``: torch threads per process (default: this
    process's); ``processes``: ranks that ran at once; ``device``: where the timed work ran (a GPU present but idle
    is still recorded, and the short label then names the CPU)."""
    model, flags = cpu_info()
    return {
        "device": device,
        "cpu": model,
        "arch": platform.machine(),
        "vector_extensions": list(flags),
        "logical_cores": os.cpu_count(),
        "threads_per_process": threads if threads is not None else torch.get_num_threads(),
        "processes": processes,
        **gpu_info(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "deepspeed": package_version("deepspeed"),
        "tutel": package_version("tutel"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def best_extension(flags: list[str] | tuple[str, ...]) -> str | None:
    """The extension a short label names: the best of LABEL_FLAGS present, or None."""
    return next((f for f in LABEL_FLAGS if f in flags), None)


def short_label(machine: dict[str, Any] | None) -> str:
    """One line for a table cell: the GPU where the timed work ran on one, else the CPU model with its best vector
    extension and the cores; then torch's version. ``?`` for a document that does not say."""
    if not machine:
        return "?"
    if str(machine.get("device", "cpu")).startswith("cuda") and machine.get("gpu"):
        where = f"{machine['gpu']} (sm {machine.get('gpu_capability')})"
    else:
        ext = best_extension(machine.get("vector_extensions", ()))
        where = machine.get("cpu", "?") + (f" ({ext})" if ext else "")
        if machine.get("logical_cores"):
            where += f", {machine['logical_cores']} cores"
    return f"{where}, torch {machine.get('torch', '?')}"
