"""``dynmoe-train`` / ``python -m dynmoe_dist.train``: the hydra application every launcher starts.

    dynmoe-train                                   # the demo: configs/config.yaml
    dynmoe-train moe=top_k adapt=off steps=100     # presets and overrides, hydra style
    torchrun --nproc_per_node 8 -m dynmoe_dist.train model=small engine.zero_stage=2

Order, chosen so that a mistake costs nothing: hydra composes and type-checks the config (unknown keys and wrong
types stop here, named); ``check_config`` rejects combinations that cannot work on the launcher's world size; the data
is read and split. Only then does the process group start. Every rank runs the same checks on the same inputs, so all
of them stop together with the same message (printed once, by rank 0) instead of leaving peers waiting.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..errors import DynMoEError, NonFiniteError
from ..parallel.launchers import detect_env
from .config import CONFIG_DIR

log = logging.getLogger("dynmoe_dist.train")


# Rank 0 speaks for every rank; the others give it this long before they exit. A launcher that sees one rank exit
# stops the rest (torchrun, srun --kill-on-bad-exit): had rank 1 exited first, rank 0 could be killed with its
# message unprinted, and the user would see an exit status without a reason.
REFUSAL_GRACE_S = 5.0


def fail(message: str, rank: int) -> None:
    if rank == 0:
        print(f"dynmoe-train: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(REFUSAL_GRACE_S)
    raise SystemExit(2)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(name)s: %(message)s", force=True)
    logging.getLogger("dynmoe_dist.adapt").setLevel(logging.WARNING)  # events are reported by the trainer


def run(cfg: DictConfig) -> None:
    from .preempt import Preemption

    preemption = Preemption().install()  # first: a SIGTERM during start-up is then seen at the first step

    from .config import TrainConfig, check_config, ep_size_for

    try:
        env = detect_env()
    except DynMoEError as exc:  # the launcher's variables contradict each other: no rank to trust, every rank says it
        fail(str(exc), 0)
    setup_logging(env.rank)
    try:
        tc: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except MissingMandatoryValue as exc:
        fail(f"{exc.full_key} has no value (??? in its preset); set it, e.g. {exc.full_key}=<value>", env.rank)
    try:
        check_config(tc, env.world_size, env.launcher)
        corpus, folder = prepare_data(tc)
        device = pick_device(tc.parallel.device, env.local_rank)
    except DynMoEError as exc:
        fail(str(exc), env.rank)

    from ..checkpoint import CheckpointError
    from ..parallel import build_groups
    from ..parallel.bootstrap import init_distributed, shutdown
    from .checkpointing import load_checkpoint
    from .trainer import Trainer

    backend = "nccl" if device.type == "cuda" else "gloo"
    env = init_distributed(timeout_s=tc.parallel.timeout_s, backend=backend, env=env)
    groups = build_groups(ep_size_for(tc, env.world_size))
    if corpus is None:  # the model's tokenizer: rank 0 finds or writes the token cache, the others wait for it
        try:
            from .tokens import tokenized_corpus

            corpus = tokenized_corpus(tc, env.rank, groups)
        except DynMoEError as exc:
            shutdown()
            fail(str(exc), env.rank)
    if folder is not None:
        log.info("model: %s (%s, %s)", folder.path, folder.model_type, folder.workflow)
    path = Path(tc.out_dir) / tc.name
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    start = agree_start(tc, path, env.rank, groups, config_yaml)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trainer = Trainer(tc, corpus, groups, device, None, checkpoint_root=path / "checkpoints", resolved_config=resolved)
    if start is not None:
        try:
            manifest = load_checkpoint(trainer, start)  # verified first: a refused checkpoint writes nothing
        except CheckpointError as exc:
            shutdown()
            fail(str(exc), env.rank)
        log.info("resumed from %s (step %d, saved on %d ranks)", start, manifest.step, manifest.world_size)
    sink = open_run_folder(cfg, tc, path, env.rank, trainer.state.step if start is not None else None)
    trainer.sink = sink
    trainer.preemption = preemption
    stopped = ""
    try:
        log.info(
            "training %s: %d ranks (expert-parallel %d), %s engine, %s on %s; data: %s",
            tc.name,
            env.world_size,
            groups.ep_size,
            tc.engine.name,
            trainer.precision,
            device,
            corpus.description,
        )
        if trainer.state.step >= tc.steps:
            log.info(
                "nothing to train: the run is at step %d of steps=%d; pass steps=<more> to go on",
                trainer.state.step,
                tc.steps,
            )
        else:
            trainer.fit()
    except (NonFiniteError, CheckpointError) as exc:  # every rank stops at the same step: a clean exit, 'latest'
        # the last good checkpoint (a save that failed on any rank, in the background or not, fails on all)
        stopped = str(exc)
    finally:
        lines = sink.close() if sink is not None else []
    if trainer.preempted:  # said before the last barrier: a launcher may kill the ranks once one has exited
        say_preempted(trainer, preemption, env.rank)
    shutdown()
    for line in lines:
        print(line, flush=True)
    if stopped:
        fail(stopped, env.rank)
    if trainer.preempted:
        exit_preempted()


def say_preempted(trainer, preemption, rank: int) -> None:
    """Rank 0 says which signal stopped the run, where its checkpoint is and the exit status that follows."""
    from .preempt import PREEMPTED

    if rank == 0:
        signals = ", ".join(sorted(set(preemption.received))) or "a signal on another rank"
        print(
            f"dynmoe-train: preempted ({signals}) at step {trainer.state.step}: checkpoint "
            f"{trainer.checkpoint_root}/step_{trainer.state.step:06d} written; exiting with status {PREEMPTED} "
            "(requeue the job: resume=auto continues from it)",
            file=sys.stderr,
            flush=True,
        )


def exit_preempted() -> None:
    """Exit with PREEMPTED: the scheduler (or launch/slurm.sbatch) requeues the job, and the next launch resumes from
    the checkpoint just written (resume=auto)."""
    import signal

    from .preempt import PREEMPTED, SIGNALS

    for sig in SIGNALS:  # more signals while the interpreter exits must not turn this exit into a kill
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(PREEMPTED)


def prepare_data(tc):
    """(the corpus, or None where the model's tokenizer makes it after the process group starts; the model folder's
    description with model=hf): everything a rank can check alone, before any collective."""
    from .data import load_corpus
    from .tokens import source_fingerprint, uses_model_tokenizer

    folder = None
    if tc.model.kind == "hf":
        from .hf_model import inspect_folder

        folder = inspect_folder(tc)
    if uses_model_tokenizer(tc):
        source_fingerprint(tc)  # a missing or wrong data.path stops here, on every rank
        return None, folder
    return load_corpus(tc.data), folder


def agree_start(tc, path: Path, rank: int, groups, config_yaml: str = "") -> Path | None:
    """Which checkpoint to start from (rank 0 decides, every rank learns it); refuses to start over an earlier run,
    except this run's own first attempt when torchrun restarted it before its first checkpoint."""
    import torch.distributed as dist

    from ..checkpoint import latest, resolve
    from ..parallel.bootstrap import shutdown
    from .run_folder import existing_run_error, holds_run

    verdict: tuple[str | None, str] = (None, "")
    if rank == 0:
        try:
            if tc.resume == "auto":
                found = latest(path / "checkpoints")
                verdict = (str(found) if found is not None else None, "")
            elif tc.resume != "none":
                verdict = (str(resolve(Path(tc.resume))), "")
            clash = holds_run(path) and not tc.overwrite and not restarted_before_a_checkpoint(path, config_yaml)
            if verdict[0] is None and clash:  # nothing to resume from: a clash
                verdict = (None, str(existing_run_error(path)))
        except DynMoEError as exc:
            verdict = (None, str(exc))
    everyone = [verdict] * groups.world_size
    if groups.world_group is not None:
        dist.all_gather_object(everyone, verdict, group=groups.world_group)
    start, error = everyone[0]
    if error:
        shutdown()
        fail(error, rank)
    return Path(start) if start is not None else None


def restarted_before_a_checkpoint(path: Path, config_yaml: str) -> bool:
    """True for a worker torchrun restarted (``--max-restarts``) whose run folder holds the same configuration and no
    checkpoint: the earlier attempt of this very run died before its first checkpoint, so it starts over from step 0
    (nothing is lost that the restart does not recompute) instead of refusing to overwrite itself."""
    import os

    from ..checkpoint import latest

    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0"):
        return False
    try:
        same = (path / "config.yaml").read_text() == config_yaml
    except OSError:
        return False
    return same and latest(path / "checkpoints") is None


def open_run_folder(cfg: DictConfig, tc, path: Path, rank: int, resumed_step: int | None):
    """Rank 0 opens ``<out_dir>/<name>``: cleared first with overwrite=true (or when a restart before the first
    checkpoint starts the run over), its logs cut back to a resumed step."""
    from .run_folder import RunFolder, clear

    if rank != 0:
        return None
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    if resumed_step is None and (tc.overwrite or restarted_before_a_checkpoint(path, config_yaml)):
        clear(path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return RunFolder(path, config_yaml, resolved, tc.logging.wandb, tc.logging.project, resumed_step)


def pick_device(choice: str, local_rank: int):
    import torch

    from ..errors import ConfigError

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device", choice, "cpu or auto on a host without CUDA")
        count = torch.cuda.device_count()
        return torch.device("cuda", local_rank if local_rank < count else 0)
    return torch.device("cpu")


def main() -> None:
    if not (CONFIG_DIR / "config.yaml").exists():
        print(
            f"dynmoe-train: no configs/ found at {CONFIG_DIR}; install dynmoe_dist editable from a checkout "
            "(pip install -e .) or pass --config-dir",
            file=sys.stderr,
        )
        raise SystemExit(2)
    import hydra

    from .config import register_configs

    register_configs()
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(run)()
