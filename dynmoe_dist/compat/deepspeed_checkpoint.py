"""Read a checkpoint folder written by DeepSpeed's engine into a model built with the drop-in layers.

DeepSpeed (0.19, runtime/engine.py ``_save_moe_checkpoint``) writes ``<dir>/<tag>/mp_rank_00_model_states.pt`` with
the model's state dict minus expert weights (``module``; the gate stays there), and one file per expert and MoE layer,
``layer_<L>_expert_<g>_mp_rank_00_model_states.pt``, whose keys carry the global expert id ``g`` in place of the local
index. ``L`` counts MoE layers in ``named_modules()`` order, which a model that only swapped the import keeps. Whatever
expert-parallel size wrote the folder, every expert is in its own file, so any size can read it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint.manifest import CheckpointError
from .deepspeed_moe import MoE

MODEL_FILE = "mp_rank_00_model_states.pt"


def resolve_tag(folder: Path, tag: str | None) -> Path:
    if tag is None:
        latest = folder / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{folder}: no 'latest' file; pass tag= with one of the checkpoint's sub-folders")
        tag = latest.read_text().strip()
    root = folder / str(tag)
    if not (root / MODEL_FILE).is_file():
        raise CheckpointError(f"{root}: no {MODEL_FILE}; is this a DeepSpeed checkpoint folder (and tag)?")
    return root


def load_deepspeed_checkpoint(model: nn.Module, folder: str | Path, tag: str | None = None, strict: bool = True):
    """Load DeepSpeed's checkpoint at ``folder`` (tag from its ``latest`` file by default) into ``model``.

    The files are read with ``weights_only=False`` (DeepSpeed stores its config objects beside the tensors): load
    only checkpoints you trust. Returns ``model.load_state_dict``'s result for the dense part.
    """
    root = resolve_tag(Path(folder), tag)
    states = torch.load(root / MODEL_FILE, map_location="cpu", weights_only=False)
    dense = dict(states["module"])
    for layer_id, (name, layer) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        for expert_id in range(layer.num_experts):
            path = root / f"layer_{layer_id}_expert_{expert_id}_{MODEL_FILE}"
            if not path.is_file():
                raise CheckpointError(
                    f"{path.name} is missing in {root}: the model's MoE layer {layer_id} ({name}) has "
                    f"{layer.num_experts} experts; is the model the one that wrote this checkpoint?"
                )
            dense.update(torch.load(path, map_location="cpu", weights_only=True))
    # every expert is now in the dict under its global id: each drop-in layer converts its part on load
    return model.load_state_dict(dense, strict=strict)
