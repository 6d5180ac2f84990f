"""Save and load: collective over the world, sharded by what each rank owns, verified before anything is loaded.

Save (every rank, same order):
  1. gather what is collective to read (ZeRO's partitioned dense state);
  2. rank 0 writes ``shared.safetensors`` (dense state, gate rows), the owner of each expert in the first
     expert-data-parallel replica writes ``experts-<ep rank>.safetensors`` (each expert once), every rank writes
     ``rank-<rank>.safetensors`` (its RNG streams and open recording window), all into ``.partial-...``;
  3. every rank reports its files' sizes, SHA-256 and tensor shapes; a vote (all-reduce MIN) makes a failed write on
     any rank fail the save on all, leaving the previous checkpoint as ``latest``;
  4. rank 0 writes manifest.json, renames the folder to ``step_NNNNNN``, points ``latest`` at it, prunes to ``keep``.

``save`` runs them in a row. ``save_async`` runs step 1 and copies every tensor into host memory, then a background
thread writes step 2's shards while training goes on. Step 3 is collective, so it stays on the training thread:
``AsyncSave.commit``, which every rank calls at the same point (the trainer's next step boundary once every rank's
writer has finished), waits for this rank's writer and votes; step 4 follows on rank 0, inline or (``background``) in
a thread that ``AsyncSave.settle`` (collective) waits for and reports on before the next save begins.

Load: rank 0 verifies the manifest against the files (sizes, checksums, tensor shapes and dtypes) and against the model
(dense names and shapes, MoE layers, expert shapes); every rank gets the verdict, so all stop with the same list of
mismatches. Then each rank reads only what it needs: the shared shard and the experts the new placement gives it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..layer import MoELayer
from ..optim import MoEAdam
from ..parallel.collectives import all_reduce, guarded
from ..parallel.groups import ParallelGroups
from . import files, moe
from .dense import DenseState
from .manifest import MANIFEST, CheckpointError, Manifest

SHARED = "shared.safetensors"
DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def expert_file(ep_rank: int) -> str:
    return f"experts-{ep_rank:05d}.safetensors"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _world(groups: ParallelGroups):
    return groups.world_group


def _agree_token(groups: ParallelGroups) -> str:
    """A random folder suffix chosen by rank 0, so every rank writes into the same partial folder."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64)
    if _world(groups) is not None:
        guarded("checkpoint.token", lambda: dist.broadcast(token, 0, group=_world(groups)))
    return f"{int(token):x}"


def _vote(groups: ParallelGroups, ok: bool, name: str) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int64)
    if _world(groups) is not None:
        all_reduce(flag, _world(groups), name, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gather(groups: ParallelGroups, obj):
    if _world(groups) is None:
        return [obj]
    out = [None] * groups.world_size
    guarded("checkpoint.gather", lambda: dist.all_gather_object(out, obj, group=_world(groups)))
    return out


def _write(folder: Path, name: str, tensors: dict[str, torch.Tensor], rank: int) -> dict:
    path = folder / name
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    files.fsync_file(path)
    entry = {"bytes": path.stat().st_size, "sha256": files.sha256(path), "rank": rank}
    shapes = {k: {"file": name, "shape": list(v.shape), "dtype": DTYPES[v.dtype]} for k, v in tensors.items()}
    return {"file": {name: entry}, "tensors": shapes}


def save(
    root: Path,
    step: int,
    groups: ParallelGroups,
    model: nn.Module,
    moe_opt: MoEAdam,
    dense: DenseState | None,
    state: dict,
    rank_tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    keep: int = 3,
    fault: Callable[[str], None] | None = None,
) -> Path:
    """Write a checkpoint of ``step`` under ``root`` (collective); returns the published folder."""
    pending = prepare(root, step, groups, model, moe_opt, dense, state, rank_tensors, config, keep, fault)
    write_shards(pending)
    return commit(pending)


def save_async(
    root: Path,
    step: int,
    groups: ParallelGroups,
    model: nn.Module,
    moe_opt: MoEAdam,
    dense: DenseState | None,
    state: dict,
    rank_tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    keep: int = 3,
    fault: Callable[[str], None] | None = None,
) -> AsyncSave:
    """Take the state of ``step`` now (collective; copies in host memory) and write it in a background thread.

    Training may change every parameter and optimizer state as soon as this returns. Nothing is published until
    ``AsyncSave.commit`` (collective, on the thread that trains), which every rank calls at the same point."""
    pending = prepare(root, step, groups, model, moe_opt, dense, state, rank_tensors, config, keep, fault, copy=True)
    return AsyncSave(pending)


@dataclass
class PendingSave:
    """A checkpoint whose state is taken: its shards in memory, the partial folder they go to, what the writer
    reported (files, sizes, checksums, shapes) or the error that stopped it."""

    root: Path
    step: int
    groups: ParallelGroups
    partial: Path
    shards: dict[str, dict[str, torch.Tensor]]
    manifest: Manifest | None  # rank 0's, without the files and tensors the reports add
    keep: int
    fault: Callable[[str], None] | None = None
    report: dict = dataclass_field(default_factory=lambda: {"files": {}, "tensors": {}})
    error: str = ""
    write_seconds: float = 0.0
    publisher: threading.Thread | None = None  # rank 0, commit(background=True): step 4 in progress
    publish_error: str = ""


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy in host memory that nothing else references (one copy, from any device)."""
    out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="cpu")
    out.copy_(tensor.detach())
    return out


def prepare(
    root: Path,
    step: int,
    groups: ParallelGroups,
    model: nn.Module,
    moe_opt: MoEAdam,
    dense: DenseState | None,
    state: dict,
    rank_tensors: dict[str, torch.Tensor],
    config: dict | None = None,
    keep: int = 3,
    fault: Callable[[str], None] | None = None,
    copy: bool = False,
) -> PendingSave:
    """Steps 1 and the start of 2 (collective): what each rank writes, the manifest's records as of now, and the
    partial folder's name. ``copy``: every tensor and the plain state copied, so training can go on changing them."""
    rank = groups.rank
    layers = moe_layers(model)
    dense_tensors = dense.read() if dense is not None else {}  # collective under ZeRO: before any rank-0-only work
    # each rank's own tensors under rank/<rank>/: the manifest lists every tensor of every shard by a unique key
    shards: dict[str, dict[str, torch.Tensor]] = {
        rank_file(rank): {f"rank/{rank}/{k}": v for k, v in rank_tensors.items()}
    }
    if rank == 0:
        shared = dict(dense_tensors)
        for layer in layers:
            shared.update(moe.replicated_tensors(layer, moe_opt))
        shards[SHARED] = shared
    if groups.edp_rank == 0 and layers:
        shards[expert_file(groups.ep_rank)] = {
            k: v for layer in layers for k, v in moe.expert_tensors(layer, moe_opt).items()
        }
    manifest = None
    if rank == 0:  # the placement as of this step: adaptation may move experts before an async save is published
        manifest = Manifest(
            step=step,
            world_size=groups.world_size,
            ep_size=groups.ep_size,
            layers={layer.name: moe.record(layer) for layer in layers},
            state=deepcopy(state) if copy else state,
            config=config,
        )
    if copy:
        shards = {name: {k: _host_copy(v) for k, v in tensors.items()} for name, tensors in shards.items()}
    root.mkdir(parents=True, exist_ok=True)
    partial = files.partial_dir(root, step, _agree_token(groups))
    return PendingSave(root, step, groups, partial, shards, manifest, keep, fault)


def write_shards(pending: PendingSave) -> None:
    """Step 2 (no collective: runs on any thread): this rank's shards into the partial folder. Never raises; an
    error is kept in ``pending.error`` for the vote."""
    t0 = time.perf_counter()
    rank = pending.groups.rank
    try:
        if pending.fault is not None:
            pending.fault("writing")
        pending.partial.mkdir(parents=True, exist_ok=True)
        for name, tensors in pending.shards.items():
            written = _write(pending.partial, name, tensors, rank)
            pending.report["files"].update(written["file"])
            pending.report["tensors"].update(written["tensors"])
        if pending.fault is not None:
            pending.fault("written")
    except OSError as exc:
        pending.error = f"rank {rank}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure must reach the vote, or the other ranks would wait on it
        pending.error = f"rank {rank}: {type(exc).__name__}: {exc}"
    pending.shards = {}  # the host copies are not needed any more
    pending.write_seconds = time.perf_counter() - t0


def commit(pending: PendingSave, background: bool = False) -> Path:
    """Steps 3 and 4 (collective): the vote, then rank 0 writes the manifest, publishes and prunes. ``background``:
    rank 0 does step 4 in a thread and no rank waits for it; ``settle`` (collective) must follow before the next save
    under the same root begins and before the processes end."""
    groups, step, rank = pending.groups, pending.step, pending.groups.rank
    if not _vote(groups, not pending.error, "checkpoint.vote"):
        errors = [e for e in _gather(groups, pending.error) if e]
        raise CheckpointError(f"checkpoint of step {step} not written ({'; '.join(errors)}); 'latest' is unchanged")
    reports = _gather(groups, pending.report)
    final = pending.root / files.step_name(step)
    if rank == 0:
        manifest = pending.manifest
        for r in reports:
            manifest.files.update(r["files"])
            manifest.tensors.update(r["tensors"])
        if background:
            pending.publisher = threading.Thread(target=_publish_or_keep_error, args=(pending,), name=f"publish-{step}")
            pending.publisher.start()
            return final
        _publish_or_keep_error(pending)
    if not background:
        settle(pending)  # the vote is the barrier: every rank learns whether rank 0 published, none waits on a failure
    return final


def _publish(pending: PendingSave) -> None:
    """Step 4, rank 0: the manifest into the partial folder, the rename, ``latest``, the pruning."""
    files.write_text_atomic(pending.partial / MANIFEST, pending.manifest.to_json())
    if pending.fault is not None:
        pending.fault("manifest")
    files.publish(pending.partial, pending.root, pending.step)
    files.prune(pending.root, pending.keep)


def _publish_or_keep_error(pending: PendingSave) -> None:
    try:
        _publish(pending)
    except Exception as exc:  # noqa: BLE001 - reported by settle() on every rank
        pending.publish_error = f"{type(exc).__name__}: {exc}"


def settle(pending: PendingSave) -> None:
    """After ``commit(background=True)`` (collective): rank 0 waits for its publishing thread, and every rank learns
    whether the checkpoint was published; if not, CheckpointError on every rank."""
    if pending.publisher is not None:
        pending.publisher.join()
        pending.publisher = None
    if not _vote(pending.groups, not pending.publish_error, "checkpoint.published"):
        errors = [e for e in _gather(pending.groups, pending.publish_error) if e]
        raise CheckpointError(
            f"checkpoint of step {pending.step} not published (rank 0: {'; '.join(errors)}); 'latest' is the one before"
        )


class AsyncSave:
    """A checkpoint being written by a background thread. ``done`` asks without waiting; ``commit`` (collective, every
    rank at the same point, never from the writer thread) waits for this rank's writer, then votes and publishes
    (``background``: rank 0 renames in a thread; then ``settle``, collective, before the next save and at the end)."""

    def __init__(self, pending: PendingSave) -> None:
        self.pending = pending
        self.thread = threading.Thread(target=write_shards, args=(pending,), name=f"checkpoint-{pending.step}")
        self.thread.start()

    @property
    def step(self) -> int:
        return self.pending.step

    @property
    def write_seconds(self) -> float:
        return self.pending.write_seconds

    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self) -> None:
        """This rank's writer finished (no collective): what an error path does before the process goes away."""
        self.thread.join()

    def commit(self, background: bool = False) -> Path:
        self.wait()
        return commit(self.pending, background)

    def settle(self) -> None:
        settle(self.pending)

    def wait_published(self) -> None:
        """Rank 0's publishing thread finished, if any (no collective: for error paths)."""
        if self.pending.publisher is not None:
            self.pending.publisher.join()

    def bytes(self) -> int:
        """Rank 0: the checkpoint's size on disk (its shards and manifest), known once committed."""
        manifest = self.pending.manifest
        return sum(f["bytes"] for f in manifest.files.values()) + len(manifest.to_json().encode())


# ----------------------------------------------------------------------------------------------------------------------
# load


def resolve(path: Path) -> Path:
    """A checkpoint folder, or the one ``latest`` names in a checkpoints root (or in ``<run>/checkpoints``)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        found = files.latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint at {path}: no {MANIFEST} there and no 'latest' pointer beside it")


def verify(folder: Path, manifest: Manifest, model: nn.Module | None = None) -> list[str]:
    """Every mismatch between the manifest, the files on disk and (when given) the model that would load them."""
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = folder / name
        if not path.exists():
            problems.append(f"shard {name} is missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"shard {name} has {size} bytes, the manifest says {entry['bytes']} (truncated?)")
        elif files.sha256(path) != entry["sha256"]:
            problems.append(f"shard {name} does not match its SHA-256 (a corrupted byte)")
    if problems:
        return problems
    by_file: dict[str, list[str]] = {name: [] for name in manifest.files}
    for key, entry in manifest.tensors.items():
        by_file.setdefault(entry["file"], []).append(key)
    for name, keys in sorted(by_file.items()):
        try:
            with safe_open(str(folder / name), "pt") as f:
                present = set(f.keys())
                unlisted = sorted(present - set(keys))
                if unlisted:
                    problems.append(
                        f"shard {name} holds {len(unlisted)} tensors the manifest does not list ({unlisted[0]})"
                    )
                for key in keys:
                    if key not in present:
                        problems.append(f"{key} is not in {name}")
                        continue
                    tensor = f.get_slice(key)
                    want = manifest.tensors[key]
                    if list(tensor.get_shape()) != want["shape"] or tensor.get_dtype() != want["dtype"]:
                        problems.append(f"{key} in {name} is {tensor.get_dtype()}{tensor.get_shape()}, not as listed")
        except (SafetensorError, OSError) as exc:
            problems.append(f"shard {name} cannot be read: {exc}")
    if model is not None:
        problems += compatibility(manifest, model)
    return problems


def compatibility(manifest: Manifest, model: nn.Module) -> list[str]:
    """What in the checkpoint does not fit ``model``: dense parameters by name and shape, MoE layers and experts."""
    problems = []
    layers = {layer.name: layer for layer in moe_layers(model)}
    moe_ids = {id(p) for layer in layers.values() for p in layer.moe_parameters()}
    dense = {n: p for n, p in model.named_parameters() if id(p) not in moe_ids}
    saved = {k[len("dense/") :]: v for k, v in manifest.tensors.items() if k.startswith("dense/") and "@" not in k}
    if saved:  # a checkpoint written without dense state (library use) is not checked against dense parameters
        for name in sorted(set(dense) - set(saved)):
            problems.append(f"the model's parameter {name} is not in the checkpoint")
        for name in sorted(set(saved) - set(dense)):
            problems.append(f"the checkpoint's parameter {name} is not in the model")
        for name in sorted(set(saved) & set(dense)):
            if saved[name]["shape"] != list(dense[name].shape):
                problems.append(f"{name}: checkpoint {saved[name]['shape']}, model {list(dense[name].shape)}")
    for name in sorted(set(layers) ^ set(manifest.layers)):
        where = "the model" if name in layers else "the checkpoint"
        problems.append(f"MoE layer {name} exists only in {where}")
    for name in sorted(set(layers) & set(manifest.layers)):
        rec, layer = manifest.layers[name], layers[name]
        mine = moe.record(layer)
        for field in ("d_model", "d_ff", "activation", "gate", "expert_bias"):
            if getattr(rec, field) != getattr(mine, field):
                problems.append(f"{name}.{field}: checkpoint {getattr(rec, field)!r}, model {getattr(mine, field)!r}")
    return problems


def _read(folder: Path, name: str, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / name), "pt") as f:
        return {k: f.get_tensor(k) for k in (keys if keys is not None else f.keys())}


def load(
    path: Path,
    groups: ParallelGroups,
    model: nn.Module,
    moe_opt: MoEAdam,
    dense: DenseState | None,
) -> tuple[Manifest, Path]:
    """Verify, then load dense state, gate rows and this rank's experts (placed for ``groups``); collective."""
    folder = resolve(path)
    manifest = Manifest.read(folder)
    problems = verify(folder, manifest, model) if groups.rank == 0 else []
    verdicts = _gather(groups, problems)
    if verdicts[0]:
        listed = "\n  - ".join(verdicts[0])
        raise CheckpointError(f"checkpoint {folder} cannot be loaded into this model:\n  - {listed}")
    shared = _read(folder, SHARED) if SHARED in manifest.files else {}
    if dense is not None:
        dense.write(shared)
    where = manifest.expert_files()
    for layer in moe_layers(model):
        rec = manifest.layers[layer.name]
        table = moe.placement_for(rec, groups.ep_size)
        mine = table.experts_on(groups.ep_rank)
        wanted: dict[str, list[str]] = {}
        for expert_id in mine:
            name = where[(layer.name, expert_id)]
            prefix = f"moe/{layer.name}/expert/{expert_id}/"
            wanted.setdefault(name, []).extend(k for k in manifest.tensors if k.startswith(prefix))
        tensors = dict(shared)
        for name, keys in wanted.items():
            tensors.update(_read(folder, name, keys))
        moe.install(layer, moe_opt, rec, tensors)
    return manifest, folder


def read_rank_tensors(folder: Path, manifest: Manifest, rank: int) -> dict[str, torch.Tensor] | None:
    """What saved rank ``rank`` wrote for itself (RNG, recording window), or None if that rank did not exist."""
    name = rank_file(rank)
    if name not in manifest.files:
        return None
    prefix = f"rank/{rank}/"
    return {k[len(prefix) :]: v for k, v in _read(folder, name).items()}
