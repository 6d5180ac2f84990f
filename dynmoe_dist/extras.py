"""Optional dependencies: the core needs torch, numpy and safetensors; the rest comes with an extra.

A missing extra is reported as the command to run, not as an ImportError from deep inside a module.
"""

from __future__ import annotations

import importlib.util
import sys

from .errors import DynMoEError

# extra -> the top-level modules it provides (the import names, not the package names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("deepspeed", "hydra", "omegaconf", "wandb", "tqdm", "matplotlib"),
    "slurm": ("hostlist",),
    "mpi": ("mpi4py",),
    "tutel": ("tutel",),
    "bench": ("scipy", "cpuinfo"),
    "hf": ("transformers", "tokenizers"),
}


class MissingExtraError(DynMoEError, ImportError):
    """A feature needs an optional dependency that is not installed."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtraError`` naming the extra to install when any of its modules is absent."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{what} needs the [{extra}] extra ({', '.join(absent)} not installed): pip install 'dynmoe_dist[{extra}]'"
        )


def exit_without_extra(extra: str, command: str) -> None:
    """For console scripts: print what to install and exit with status 2 instead of a traceback."""
    try:
        require_extra(extra, command)
    except MissingExtraError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
