"""One reader per launcher family (torchrun/DeepSpeed, Slurm, MPI) and ``detect_env`` choosing among them."""

from .common import DEFAULT_PORT, DistEnv
from .detect import LAUNCHERS, detect_env
from .slurm import expand_hostlist, expand_tasks_per_node, slurm_port

__all__ = [
    "DEFAULT_PORT",
    "LAUNCHERS",
    "DistEnv",
    "detect_env",
    "expand_hostlist",
    "expand_tasks_per_node",
    "slurm_port",
]
