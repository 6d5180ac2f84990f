"""``dynmoe-export CHECKPOINT OUT``: one single-process state dict (safetensors) with every expert, no runtime needed.

The keys are the model's own ``state_dict`` keys on one process: dense parameters, and per MoE layer the gate rows
and stacked experts in router-position order with their ``expert_ids``. The resolved config and the step ride in the
file's metadata (the application's ``model_from_export`` rebuilds its model from them); ``load_exported`` resizes each
MoE layer to the exported expert set before ``load_state_dict``. Optimizer state stays in the checkpoint: this is
for evaluation and inference.

The command line is ``dynmoe-export`` (dynmoe_dist/cli.py); its ``--hf`` form, for a ``model=hf`` run, writes a
folder transformers loads instead (train/hf_model.py rebuilds the run's model, ``dynmoe_dist.hf.export`` writes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..layer import MoELayer
from ..placement import PlacementTable
from .io import SHARED, _read, resolve, verify
from .manifest import CheckpointError, Manifest

FORMAT = "dynmoe_dist.export/1"


def exported_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of the checkpoint in ``folder`` (verified first)."""
    manifest = Manifest.read(folder)
    problems = verify(folder, manifest)
    if problems:
        raise CheckpointError(f"checkpoint {folder} is damaged:\n  - " + "\n  - ".join(problems))
    shared = _read(folder, SHARED)
    state = {k[len("dense/") :]: v for k, v in shared.items() if k.startswith("dense/") and "@" not in k}
    where = manifest.expert_files()
    for name, rec in manifest.layers.items():
        prefix = f"moe/{name}/"
        for key, value in shared.items():
            if key.startswith(prefix + "router/") and "@" not in key:
                state[f"{name}.router.{key[len(prefix + 'router/') :]}"] = value
            elif key.startswith(prefix + "buffer/"):
                state[f"{name}.router.{key[len(prefix + 'buffer/') :]}"] = value
        ids = torch.tensor(rec.expert_ids, dtype=torch.int64)
        state[f"{name}.router.expert_ids"] = ids
        state[f"{name}.experts.expert_ids"] = ids.clone()
        state[f"{name}.next_expert_id"] = torch.tensor(rec.next_expert_id, dtype=torch.int64)
        weights = sorted(
            {k.rsplit("/", 1)[1] for k in manifest.tensors if k.startswith(prefix + "expert/") and "@" not in k}
        )
        for w in weights:
            rows = []
            for expert_id in rec.expert_ids:
                key = f"{prefix}expert/{expert_id}/{w}"
                rows.append(_read(folder, where[(name, expert_id)], [key])[key])
            state[f"{name}.experts.{w}"] = torch.stack(rows)
    layers = {name: rec.expert_ids for name, rec in manifest.layers.items()}
    meta = {
        "format": FORMAT,
        "step": str(manifest.step),
        "config": json.dumps(manifest.config),
        "layers": json.dumps(layers),
    }
    return state, meta


def export(checkpoint: Path, out: Path) -> Path:
    folder = resolve(checkpoint)
    state, meta = exported_state(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    return out


@torch.no_grad()
def adopt_experts(layer: MoELayer, expert_ids: list[int]) -> None:
    """Resize a single-process layer to ``expert_ids`` (values to be loaded next): new, empty parameters.

    For evaluation and inference: a layer that an optimizer already tracks must change through ``MoEAdam``.
    """
    if layer.groups is not None and layer.groups.ep_size > 1:
        raise CheckpointError(f"{layer.name}: an exported model loads on one process (ep_size 1)")
    n = len(expert_ids)
    for module, params in ((layer.router, layer.router.row_parameters()), (layer.experts, layer.experts.weights())):
        for name, p in params.items():
            setattr(module, name, nn.Parameter(p.new_zeros((n, *p.shape[1:])), requires_grad=p.requires_grad))
    table = PlacementTable.contiguous(expert_ids, 1)
    layer.install(table, int(layer.next_expert_id))


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata with ``config``, ``step`` and ``layers`` decoded) of an export."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dynmoe_dist export (format {meta.get('format')!r})")
    return state, {
        "step": int(meta["step"]),
        "config": json.loads(meta["config"]),
        "layers": json.loads(meta["layers"]),
    }


def load_exported(path: Path, model: nn.Module) -> nn.Module:
    """Load an export into ``model``, its MoE layers resized to the exported expert sets first."""
    state, meta = read_export(path)
    for m in model.modules():
        if isinstance(m, MoELayer) and m.name in meta["layers"]:
            adopt_experts(m, meta["layers"][m.name])
    model.load_state_dict(state, strict=True)
    return model
