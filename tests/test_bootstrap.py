"""Launcher bootstrap: every launcher's environment, Slurm's compressed lists, clear errors, and real launches.

The environment tests pass a dict to ``detect_env``, so they never touch this process's environment. The two
end-to-end tests start real 2-process jobs (MPICH's ``mpiexec`` and torchrun) on gloo over loopback, each under a
hard timeout so a hang fails the test instead of blocking the suite; they run in the background of the suite from its
start (launch_support).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from launch_support import Commands, Launches, Runs

from dynmoe_dist.errors import ConfigError, DynMoEError
from dynmoe_dist.parallel.bootstrap import free_port, init_distributed, shutdown
from dynmoe_dist.parallel.launchers import (
    DEFAULT_PORT,
    DistEnv,
    detect_env,
    expand_hostlist,
    expand_tasks_per_node,
    slurm_port,
)
from dynmoe_dist.parallel.launchers import mpi as launchers_mpi

REPO = Path(__file__).resolve().parent.parent
_REAL_MPI4PY_QUERY = launchers_mpi._mpi4py_query
LAUNCH_TIMEOUT_S = 45.0  # each real launch; the collective timeout inside is shorter, so a hang reports itself first


def _no_mpi4py() -> None:
    raise AssertionError("mpi4py must not be consulted when the environment has everything")


@pytest.fixture(autouse=True)
def _forbid_mpi4py(monkeypatch):
    """The dict-driven tests must never reach the real MPI library; tests that want the fallback patch it again."""
    monkeypatch.setattr(launchers_mpi, "_mpi4py_query", _no_mpi4py)


# ---------------------------------------------------------------------------------------------------------------------
# One environment per launcher, as the launcher itself writes it.

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "16",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "GROUP_RANK": "1",
    "ROLE_RANK": "5",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "none",
}
DEEPSPEED = {
    "RANK": "9",
    "WORLD_SIZE": "16",
    "LOCAL_RANK": "1",
    "LOCAL_SIZE": "8",
    "CROSS_RANK": "1",
    "CROSS_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
}
SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_PROCID": "11",
    "SLURM_NTASKS": "16",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
    "SLURM_NODELIST": "gpu[007-008]",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "6",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    "MASTER_ADDR": "head",
    "MASTER_PORT": "29600",
}
MPICH = {
    "PMI_RANK": "3",
    "PMI_SIZE": "4",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "2",
    "PMI_FD": "9",
    "MASTER_ADDR": "head",
}


def _with(base: dict[str, str], drop: tuple[str, ...] = (), **changes: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in drop}
    env.update(changes)
    return env


def test_single_process_when_nothing_is_set():
    assert detect_env({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "single")
    assert detect_env({"MASTER_PORT": "31000", "PATH": "/usr/bin"}).master_port == 31000


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (TORCHRUN, DistEnv(5, 16, 1, 4, "node0", 29400, "torchrun")),
        (DEEPSPEED, DistEnv(9, 16, 1, 8, "10.0.0.1", 29500, "deepspeed")),
        (SLURM, DistEnv(11, 16, 3, 8, "gpu007", 23456, "slurm")),
        (OPENMPI, DistEnv(6, 8, 2, 4, "head", 29600, "openmpi")),
        (MPICH, DistEnv(3, 4, 1, 2, "head", DEFAULT_PORT, "mpich")),
    ],
    ids=["torchrun", "deepspeed", "slurm", "openmpi", "mpich"],
)
def test_each_launcher(environ, expected):
    assert detect_env(environ) == expected


def test_torch_style_without_local_variables_assumes_one_node():
    env = detect_env({"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.local_rank, env.local_world_size) == (2, 4)
    assert detect_env({"RANK": "0", "WORLD_SIZE": "1"}) == DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "torchrun")


def test_slurm_variants():
    # Uneven nodes: this node's entry of the per-node counts.
    env = detect_env(_with(SLURM, SLURM_TASKS_PER_NODE="8,4", SLURM_NTASKS="12", SLURM_PROCID="9", SLURM_LOCALID="1"))
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 12, 1, 4)
    # Only --ntasks-per-node given.
    env = detect_env(_with(SLURM, drop=("SLURM_TASKS_PER_NODE",), SLURM_NTASKS_PER_NODE="8"))
    assert env.local_world_size == 8
    # A step on a subset of the job's nodes: the step's lists win.
    env = detect_env(_with(SLURM, SLURM_STEP_NODELIST="gpu008,gpu[010-011]", SLURM_STEP_TASKS_PER_NODE="4(x3)"))
    assert (env.master_addr, env.local_world_size) == ("gpu008", 4)
    # Only the old name of the node list; MASTER_ADDR / MASTER_PORT override.
    env = detect_env(_with(SLURM, drop=("SLURM_JOB_NODELIST",), SLURM_NODELIST="a[3-4],b1"))
    assert env.master_addr == "a3"
    env = detect_env(_with(SLURM, MASTER_ADDR="ib-gpu007", MASTER_PORT="12345"))
    assert (env.master_addr, env.master_port) == ("ib-gpu007", 12345)
    # No job id: the default port. One task: no node list needed.
    assert detect_env(_with(SLURM, drop=("SLURM_JOB_ID",))).master_port == DEFAULT_PORT
    single = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1"}
    assert detect_env(single) == DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "slurm")


def test_slurm_port_is_deterministic_and_in_range():
    ports = {slurm_port(job) for job in range(0, 10**6, 37)}
    assert min(ports) >= 20000 and max(ports) <= 29999
    assert slurm_port(123456) == slurm_port(123456) == 23456
    assert slurm_port(1) != slurm_port(2)


def test_mpi_fallback_to_mpi4py(monkeypatch):
    calls = []

    def fake_query():
        calls.append(1)
        return (1, 4, 1, 3, "rank0-host")

    monkeypatch.setattr(launchers_mpi, "_mpi4py_query", fake_query)
    # Variables complete but no MASTER_ADDR: rank 0's host name comes from MPI.
    env = detect_env(_with(OPENMPI, drop=("MASTER_ADDR", "MASTER_PORT")))
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (6, 8, "rank0-host", DEFAULT_PORT)
    # Local size missing: MPI fills only that one in.
    env = detect_env(_with(OPENMPI, drop=("OMPI_COMM_WORLD_LOCAL_SIZE",)))
    assert (env.rank, env.local_rank, env.local_world_size, env.master_addr) == (6, 2, 3, "head")
    # An MPI launch without rank variables at all (PMIx only).
    env = detect_env({"PMIX_RANK": "1", "MASTER_PORT": "29700"})
    assert env == DistEnv(1, 4, 1, 3, "rank0-host", 29700, "mpi4py")
    assert len(calls) == 3


def test_mpi_with_one_process_needs_no_mpi4py():
    env = detect_env({"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"})
    assert env == DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "mpich")


def test_nested_launchers():
    # torchrun (8 per node) inside one srun task per node: different world sizes, the innermost launcher wins.
    nested = _with(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="1(x2)")
    nested.update(_with(TORCHRUN, RANK="13", LOCAL_RANK="5", LOCAL_WORLD_SIZE="8"))
    assert (detect_env(nested).rank, detect_env(nested).launcher) == (13, "torchrun")
    # srun --mpi=pmix: Slurm and PMI agree.
    agree = _with(SLURM, PMI_RANK="11", PMI_SIZE="16")
    assert detect_env(agree).launcher == "slurm"
    # mpirun inside an sbatch script: stale SLURM_PROCID, DYNMOE_LAUNCHER says whom to trust.
    stale = _with(OPENMPI, SLURM_PROCID="0", SLURM_NTASKS="8", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="4")
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        detect_env(stale)
    assert detect_env(_with(stale, DYNMOE_LAUNCHER="openmpi")).rank == 6


# ---------------------------------------------------------------------------------------------------------------------
# Slurm's compressed lists.


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[0-2]", ["n0", "n1", "n2"]),
        ("node[5]", ["node5"]),
        ("x[000-001]y", ["x000y", "x001y"]),
        ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
        ("a[1,3],b[2-3]-ib,c", ["a1", "a3", "b2-ib", "b3-ib", "c"]),
        ("gpu-a100-[01-02],gpu-h100-07", ["gpu-a100-01", "gpu-a100-02", "gpu-h100-07"]),
        ("h1.cluster.org,h2.cluster.org", ["h1.cluster.org", "h2.cluster.org"]),
        ("n[1-2] m3", ["n1", "n2", "m3"]),
        (" n[1,2] ", ["n1", "n2"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "  ", "n[1-", "n]1[", "n[3-1]", "n[a-b]", "n[[1]]", "n[1-2", "n[]", "n[1-]"])
def test_expand_hostlist_rejects(text):
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST"):
        expand_hostlist(text, "SLURM_STEP_NODELIST")


@pytest.mark.parametrize(
    ("text", "counts"), [("8", [8]), ("2(x3),1", [2, 2, 2, 1]), ("8(x2)", [8, 8]), ("4,2(x2),1", [4, 2, 2, 1])]
)
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "0", "x", "2(x0)", "2(3)", "-1"])
def test_expand_tasks_per_node_rejects(text):
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node(text)


# ---------------------------------------------------------------------------------------------------------------------
# Inconsistent environments: a ConfigError whose message names the variable to fix.

BAD = {
    "rank >= world": (_with(TORCHRUN, RANK="16"), "RANK", "WORLD_SIZE=16"),
    "negative rank": (_with(TORCHRUN, RANK="-1"), "RANK", ">= 0"),
    "non-integer rank": (_with(TORCHRUN, RANK="one"), "RANK", "integer"),
    "zero world": (_with(TORCHRUN, WORLD_SIZE="0"), "WORLD_SIZE", ">= 1"),
    "local rank >= local world": (_with(TORCHRUN, LOCAL_RANK="4"), "LOCAL_RANK", "LOCAL_WORLD_SIZE=4"),
    "negative local rank": (_with(TORCHRUN, LOCAL_RANK="-2"), "LOCAL_RANK", ">= 0"),
    "local world > world": (_with(TORCHRUN, LOCAL_WORLD_SIZE="32"), "LOCAL_WORLD_SIZE", "WORLD_SIZE=16"),
    "deepspeed local size": (_with(DEEPSPEED, LOCAL_RANK="8"), "LOCAL_RANK", "LOCAL_SIZE=8"),
    "RANK without WORLD_SIZE": (_with(TORCHRUN, drop=("WORLD_SIZE",)), "WORLD_SIZE", "RANK=5 is set"),
    "WORLD_SIZE without RANK": (_with(TORCHRUN, drop=("RANK",)), "RANK", "WORLD_SIZE=16 is set"),
    "no master address": (_with(TORCHRUN, drop=("MASTER_ADDR",)), "MASTER_ADDR", "WORLD_SIZE=16"),
    "empty master address": (_with(TORCHRUN, MASTER_ADDR=" "), "MASTER_ADDR", "host name"),
    "no master port": (_with(TORCHRUN, drop=("MASTER_PORT",)), "MASTER_PORT", "WORLD_SIZE=16"),
    "port too large": (_with(TORCHRUN, MASTER_PORT="70000"), "MASTER_PORT", "65535"),
    "port not a number": (_with(TORCHRUN, MASTER_PORT="auto"), "MASTER_PORT", "integer"),
    "slurm rank >= ntasks": (_with(SLURM, SLURM_PROCID="16"), "SLURM_PROCID", "SLURM_NTASKS=16"),
    "slurm ntasks missing": (_with(SLURM, drop=("SLURM_NTASKS",)), "SLURM_NTASKS", "SLURM_PROCID=11"),
    "slurm localid missing": (_with(SLURM, drop=("SLURM_LOCALID",)), "SLURM_LOCALID", "unset"),
    "slurm localid too big": (_with(SLURM, SLURM_LOCALID="8"), "SLURM_LOCALID", "SLURM_TASKS_PER_NODE=8"),
    "slurm no per-node count": (_with(SLURM, drop=("SLURM_TASKS_PER_NODE",)), "SLURM_TASKS_PER_NODE", "NTASKS_PER"),
    "slurm uneven, no node id": (
        _with(SLURM, drop=("SLURM_NODEID",), SLURM_TASKS_PER_NODE="8,4", SLURM_NTASKS="12"),
        "SLURM_NODEID",
        "8,4",
    ),
    "slurm node id past list": (_with(SLURM, SLURM_NODEID="2"), "SLURM_NODEID", "[0, 2)"),
    "slurm bad node list": (_with(SLURM, SLURM_JOB_NODELIST="gpu[3-1]"), "SLURM_JOB_NODELIST", "start > stop"),
    "slurm no node list": (
        _with(SLURM, drop=("SLURM_JOB_NODELIST", "SLURM_NODELIST")),
        "SLURM_JOB_NODELIST",
        "MASTER_ADDR",
    ),
    "slurm bad job id": (_with(SLURM, SLURM_JOB_ID="12a"), "SLURM_JOB_ID", "integer"),
    "openmpi rank >= size": (_with(OPENMPI, OMPI_COMM_WORLD_RANK="8"), "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    "openmpi local": (_with(OPENMPI, OMPI_COMM_WORLD_LOCAL_RANK="4"), "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_SIZE=4"),
    "mpich negative rank": (_with(MPICH, PMI_RANK="-2"), "PMI_RANK", ">= 0"),
    "mpich bad local size": (_with(MPICH, MPI_LOCALNRANKS="two"), "MPI_LOCALNRANKS", "integer"),
    "torchrun vs slurm rank": (
        _with(TORCHRUN, SLURM_PROCID="6", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="4"),
        "RANK",
        "SLURM_PROCID=6",
    ),
    "slurm vs mpich rank": (_with(SLURM, PMI_RANK="3", PMI_SIZE="16"), "SLURM_PROCID", "PMI_RANK=3"),
    "unknown forced launcher": (_with(TORCHRUN, DYNMOE_LAUNCHER="pbs"), "DYNMOE_LAUNCHER", "torchrun"),
}


@pytest.mark.parametrize(("environ", "variable", "detail"), BAD.values(), ids=BAD.keys())
def test_inconsistent_environment_names_the_variable(environ, variable, detail):
    with pytest.raises(ConfigError) as info:
        detect_env(environ)
    assert info.value.setting == variable
    message = str(info.value)
    assert message.startswith(f"invalid {variable}="), message
    assert detail in message, message
    assert isinstance(info.value, DynMoEError)


def test_mpi_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setattr(launchers_mpi, "_mpi4py_query", _REAL_MPI4PY_QUERY.__wrapped__)  # uncached
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed
    with pytest.raises(DynMoEError, match="mpi4py"):
        detect_env({"PMIX_RANK": "0"})


# ---------------------------------------------------------------------------------------------------------------------
# init_distributed / shutdown in this process (one rank) and in real 2-process launches.


def test_init_distributed_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="backend"):
        init_distributed(backend="mpi", env=DistEnv(0, 1, 0, 1, "127.0.0.1", 1, "single"))
    with pytest.raises(ConfigError, match="timeout_s"):
        init_distributed(timeout_s=0, env=DistEnv(0, 1, 0, 1, "127.0.0.1", 1, "single"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="nccl"):
            init_distributed(backend="nccl", env=DistEnv(0, 1, 0, 1, "127.0.0.1", 1, "single"))


def case_check_one_gpu_per_rank(gpus: list[list[str]]) -> str:
    import torch.distributed as dist

    from dynmoe_dist.parallel.bootstrap import check_one_gpu_per_rank

    try:
        check_one_gpu_per_rank(tuple(gpus[dist.get_rank()]), 1)
    except DynMoEError as exc:
        return str(exc)
    return "ok"


def test_ranks_on_one_gpu_get_an_error_naming_them_and_the_fix():
    """Real ranks compare their (host, GPU UUID) over gloo: all of them fail alike on a shared GPU, none otherwise."""
    import dist_pool

    pool = dist_pool.pool(2)
    for message in pool.run(case_check_one_gpu_per_rank, [["node0", "GPU-a"], ["node0", "GPU-a"]]):
        assert "ranks [0, 1] all run on GPU GPU-a of node0" in message, message
        assert "--nproc_per_node" in message and "parallel.device=cpu" in message, message
    assert pool.run(case_check_one_gpu_per_rank, [["node0", "GPU-a"], ["node0", "GPU-b"]]) == ["ok", "ok"]
    assert pool.run(case_check_one_gpu_per_rank, [["node0", "GPU-a"], ["node1", "GPU-a"]]) == ["ok", "ok"]


@pytest.fixture
def restore_environ():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.timeout(60)
def test_init_distributed_single_process_is_idempotent(restore_environ):
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_PORT, "single")
    try:
        got = init_distributed(timeout_s=30, backend="gloo", env=env)
        assert (got.rank, got.world_size) == (0, 1)
        assert os.environ["MASTER_PORT"] == str(got.master_port) and os.environ["WORLD_SIZE"] == "1"
        assert init_distributed(timeout_s=30, backend="gloo", env=env).rank == 0  # already up: no second group
        value = torch.tensor([3.0])
        dist.all_reduce(value)
        assert value.item() == 3.0
        with pytest.raises(DynMoEError, match="already initialised"):
            init_distributed(env=DistEnv(1, 2, 1, 2, "127.0.0.1", 1, "torchrun"))
    finally:
        shutdown()
    assert not dist.is_initialized()
    shutdown()  # no group: nothing to do


WORKER = """
import os
import torch
import torch.distributed as dist
from dynmoe_dist.parallel.bootstrap import init_distributed, shutdown
from dynmoe_dist.parallel.launchers import detect_env

before = detect_env()
env = init_distributed(timeout_s=20.0, backend="gloo")
assert env == before, (env, before)
total = torch.tensor([float(env.rank)])
dist.all_reduce(total)
assert total.item() == sum(range(env.world_size)), total
after = detect_env()
assert (after.rank, after.world_size) == (dist.get_rank(), dist.get_world_size()) == (env.rank, env.world_size)
shutdown()
line = f"OK {env.rank} {env.world_size} {env.local_rank} {env.local_world_size} {env.launcher} {total.item():g}\\n"
os.write(1, line.encode())  # one write: the ranks share the pipe, and print() may split a line in two writes
"""

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _child_environ(**extra: str) -> dict[str, str]:
    """This environment minus any launcher's variables (the suite itself may run under one), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(("SLURM_", "OMPI_", "PMI", "MPI_", "HYDI_", "DYNMOE_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _mpiexec() -> Path:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    return mpiexec if mpiexec.exists() else Path(shutil.which("mpiexec") or "mpiexec")


def queue_launches(runs: Runs, wanted: set[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """At the start of the session (launch_support): the two real launches, which run beside the other tests."""
    if "test_mpiexec_two_ranks" in wanted and _mpiexec().exists() and importlib.util.find_spec("mpi4py"):
        # No MASTER_ADDR: rank 0's host name is broadcast through mpi4py.
        def mpiexec() -> Commands:
            return [
                (
                    [str(_mpiexec()), "-n", "2", sys.executable, "-c", WORKER],
                    _child_environ(MASTER_PORT=str(free_port())),
                )
            ]

        runs.submit("mpiexec", mpiexec, LAUNCH_TIMEOUT_S, cwd=REPO)
    if "test_torchrun_two_ranks" in wanted:
        script = tmp_path_factory.mktemp("bootstrap") / "worker.py"
        script.write_text(WORKER)

        def torchrun() -> Commands:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
            cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)]
            return [(cmd, _child_environ())]

        runs.submit("torchrun", torchrun, LAUNCH_TIMEOUT_S, cwd=REPO)


@pytest.fixture(scope="module")
def launches(background: Launches) -> Runs:
    return background.module(__name__)


def _ok_lines(launches: Runs, name: str) -> list[list[str]]:
    """The launch's ranks' report lines; it ran in its own session, killed whole had it not finished in time."""
    (done,) = launches.result(name)
    assert done.returncode == 0, done.output
    return sorted(match.split() for match in re.findall(r"OK (\d+ \d+ \d+ \d+ \w+ \d+)", done.output))


@pytest.mark.timeout(60)
def test_mpiexec_two_ranks(launches: Runs):
    if not _mpiexec().exists():
        pytest.skip("no mpiexec next to the Python interpreter (pip install mpich)")
    pytest.importorskip("mpi4py")
    lines = _ok_lines(launches, "mpiexec")
    assert lines == [["0", "2", "0", "2", "mpich", "1"], ["1", "2", "1", "2", "mpich", "1"]]


@pytest.mark.timeout(60)
def test_torchrun_two_ranks(launches: Runs):
    lines = _ok_lines(launches, "torchrun")
    assert lines == [["0", "2", "0", "2", "torchrun", "1"], ["1", "2", "1", "2", "torchrun", "1"]]
