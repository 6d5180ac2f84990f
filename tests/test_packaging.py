"""The core installs and imports with torch alone; the application says which extra it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "hydra", "omegaconf", "wandb", "matplotlib", "mpi4py", "tutel", "hostlist", "transformers")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_core_declares_torch_numpy_safetensors_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = sorted(dep.split(">")[0].split("<")[0].split("=")[0].strip() for dep in project["dependencies"])
    assert names == ["numpy", "safetensors", "torch"]
    extras = project["optional-dependencies"]
    assert {"train", "mpi", "tutel", "dev"} <= set(extras)
    assert any("deepspeed" in dep for dep in extras["train"]) and any("mpi4py" in dep for dep in extras["mpi"])
    assert any("[train,mpi" in dep for dep in extras["dev"])  # make test installs every extra through [dev]
    assert any(dep.startswith("transformers") for dep in extras["hf"]) and any("hf]" in dep for dep in extras["dev"])


def test_core_modules_import_no_application_dependency() -> None:
    code = f"""
import sys
import dynmoe_dist
from dynmoe_dist import MoELayer
import dynmoe_dist.adapt, dynmoe_dist.checkpoint, dynmoe_dist.parallel, dynmoe_dist.optim, dynmoe_dist.compat
from dynmoe_dist.parallel.bootstrap import init_distributed
MoELayer(16, 32, 4, router="top_any")(__import__("torch").randn(8, 16))
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print("HEAVY", heavy)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


# Packages made unimportable in the child, as if the extra had not been installed.
ABSENT = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


@pytest.mark.parametrize("command", ["train", "report"])
def test_application_without_train_extra_names_the_extra(command: str) -> None:
    code = ABSENT.format(mods=["hydra", "omegaconf"]) + f"from dynmoe_dist.cli import {command}\n{command}()\n"
    proc = run_python(code)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "[train] extra" in proc.stderr and "pip install 'dynmoe_dist[train]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_slurm_job_without_hostlist_names_the_extra() -> None:
    code = ABSENT.format(mods=["hostlist"]) + (
        "from dynmoe_dist.parallel.launchers import expand_hostlist\n"
        "from dynmoe_dist.extras import MissingExtraError\n"
        "try:\n    expand_hostlist('gpu[001-002]')\nexcept MissingExtraError as exc:\n    print('REFUSED', exc)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED" in proc.stdout and "dynmoe_dist[slurm]" in proc.stdout, proc.stdout
