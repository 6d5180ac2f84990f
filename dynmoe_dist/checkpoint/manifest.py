"""manifest.json: what a checkpoint holds, enough to verify every byte and to place every expert on any world.

JSON, never pickle: a checkpoint is data. Tensors live in safetensors shards; the manifest lists each shard's size
and SHA-256, and each tensor's shard, shape and dtype, so a missing, truncated or corrupted shard, or a checkpoint of
another model, is found before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DynMoEError

FORMAT = "dynmoe_dist.checkpoint/1"
MANIFEST = "manifest.json"


class CheckpointError(DynMoEError, RuntimeError):
    """A checkpoint cannot be written or does not match what loads it; the message lists every mismatch."""


@dataclass
class LayerRecord:
    """One MoE layer at save time: experts by router position, their placement, and the id counter."""

    expert_ids: list[int]
    owners: list[int]
    slots: list[int]
    ep_size: int
    version: int
    next_expert_id: int
    d_model: int
    d_ff: int
    activation: str
    gate: str
    expert_bias: bool = False  # experts with biases (layers imported from DeepSpeed-MoE or Tutel)


@dataclass
class Manifest:
    step: int
    world_size: int
    ep_size: int
    layers: dict[str, LayerRecord]
    state: dict[str, Any]  # the training state that is not tensors (step counters, data position, schedule)
    config: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {bytes, sha256, rank}
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> {file, shape, dtype}
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        if not path.exists():
            raise CheckpointError(
                f"{folder} is not a checkpoint: no {MANIFEST} (a save that never finished leaves no manifest; "
                "use the folder that 'latest' names)"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is damaged: not JSON ({exc})") from None
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {raw.get('format')!r}; this version reads {FORMAT!r}")
        raw["layers"] = {name: LayerRecord(**rec) for name, rec in raw["layers"].items()}
        return cls(**raw)

    def expert_files(self) -> dict[tuple[str, int], str]:
        """(layer, expert id) -> the shard that holds that expert."""
        out = {}
        for key, entry in self.tensors.items():
            if key.startswith("moe/") and "/expert/" in key:
                layer, rest = key[len("moe/") :].split("/expert/", 1)
                out[(layer, int(rest.split("/", 1)[0]))] = entry["file"]
        return out
