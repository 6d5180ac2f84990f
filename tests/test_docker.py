"""The Docker image for 8xA100 nodes, checked without a Docker engine: hadolint lints the Dockerfile, and the parsed
Dockerfile must pin what constraints.txt pins, start the training application, and name only launch scripts that
exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE))


def instructions(parser: DockerfileParser, kind: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == kind]


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_torch_is_the_cuda_build_of_the_pinned_version(dockerfile: DockerfileParser) -> None:
    torch = constraints()["torch"]
    assert dockerfile.args["TORCH_VERSION"] == torch, "docker/Dockerfile's TORCH_VERSION drifted from constraints.txt"
    assert dockerfile.baseimage.startswith(f"pytorch/pytorch:{torch}-cuda")  # the CUDA build of that version
    checks = " ".join(instructions(dockerfile, "RUN"))
    assert "TORCH_VERSION" in checks  # the build also checks the installed torch against it


def test_every_install_is_constrained_and_no_pin_drifts(dockerfile: DockerfileParser) -> None:
    pins = constraints()
    runs = instructions(dockerfile, "RUN")
    installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert installs and all("-c /tmp/constraints.txt" in cmd for cmd in installs), installs
    derived = next(run for run in runs if "> /tmp/constraints.txt" in run)
    assert "constraints.txt" in derived.split(">")[0]  # derived from the repository's pins, not written by hand
    text = DOCKERFILE.read_text()
    for name, version in re.findall(r"([A-Za-z][\w.-]*)==([0-9][\w.+-]*)", text):
        assert pins.get(name.lower()) == version, (
            f"docker/Dockerfile pins {name}=={version}, constraints.txt says {pins.get(name.lower())}"
        )
    for package in ("deepspeed", "mpi4py", "wandb", "hydra-core"):
        assert package in pins  # installed through the constrained installs above
    assert "DS_BUILD_FUSED_ADAM=1" in text and "--no-binary mpi4py" in text


def test_tutel_is_built_at_a_pinned_commit(dockerfile: DockerfileParser) -> None:
    commit = dockerfile.args["TUTEL_COMMIT"]
    assert re.fullmatch(r"[0-9a-f]{12,40}", commit), commit
    wheels = REPO.parent / "shared" / "wheels" / "README.md"
    if wheels.exists():  # the wheel the tests use was built from the same commit
        assert commit in wheels.read_text()
    assert any('checkout --quiet "${TUTEL_COMMIT}"' in run for run in instructions(dockerfile, "RUN"))


def test_entry_point_is_the_training_application(dockerfile: DockerfileParser) -> None:
    (entrypoint,) = instructions(dockerfile, "ENTRYPOINT")
    command = json.loads(entrypoint)
    script = REPO / command[0]
    assert script.exists() and script.stat().st_mode & 0o111, f"{command[0]} is not an executable launch script"
    assert 'MODULE="${MODULE:-dynmoe_dist.train}"' in script.read_text()  # which starts the training application


def test_named_launch_scripts_exist_and_the_app_is_copied(dockerfile: DockerfileParser) -> None:
    named = set(re.findall(r"launch/[\w.-]+", DOCKERFILE.read_text() + (REPO / "docker" / "README.md").read_text()))
    assert named and all((REPO / name).exists() for name in named), sorted(n for n in named if not (REPO / n).exists())
    copied = " ".join(instructions(dockerfile, "COPY"))
    for needed in ("pyproject.toml", "constraints.txt", "dynmoe_dist", "launch", "configs"):
        assert needed in copied


def test_tutel_commit_is_the_one_the_package_extra_and_the_tests_use(dockerfile: DockerfileParser) -> None:
    """Tutel is not on the package index: the image, the ``tutel`` extra and the wheel the suite tests against must
    name the same commit."""
    extra = re.search(r'"tutel @ git\+\S+@([0-9a-f]+)"', (REPO / "pyproject.toml").read_text())
    assert extra, "pyproject.toml has no tutel extra pinned to a commit"
    assert dockerfile.args["TUTEL_COMMIT"] == extra.group(1)
    assert constraints().get("tutel"), "constraints.txt does not pin tutel"
