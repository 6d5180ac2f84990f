"""``model=hf``: a transformers model from a local folder, converted or upcycled onto ``MoELayer``, trained by the
application as it trains its demo transformer.

Three kinds of folder (docs/HF.md):

- an MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) with ``model.convert=true``: its blocks become
  ``MoEBlock``s, routed by the family's own rule (``moe=family``) or by the gate ``moe`` names;
- a dense model (Llama, Mistral, Qwen2, Qwen3) with ``model.upcycle.num_experts=N``: the MLP of the chosen layers
  copied into N experts, routed by ``moe``'s gate;
- a folder ``dynmoe_dist.hf.export`` wrote in our format (``dynmoe_<family>``): loaded with its own gates and
  sharded over the expert-parallel group.

Every rank builds the same model (``from_pretrained`` with local files only, then the same convert or upcycle with
the run's groups, each rank keeping its own experts). ``HFModel`` gives the trainer what it uses of a model:
``forward(tokens, targets) -> (loss, ForwardInfo)`` with the next-token loss plus the blocks' auxiliary losses,
``logits``, ``moe_layers`` and ``vocab_size``. ``inspect_folder`` reads the folder before any process group starts,
so a wrong path, a folder without config.json, an unsupported architecture, a tokenizer larger than the model's
vocabulary or an upcycle layer out of range stop every rank at once with the setting to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check
from ..layer import MoELayer
from ..parallel.groups import ParallelGroups
from .config import FAMILY, router_spec
from .model import ForwardInfo

# kept in step with dynmoe_dist.hf.families (which needs transformers to import)
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PREFIX = "dynmoe_"


def supported() -> str:
    return (
        f"an MoE model to convert ({', '.join(MOE_TYPES)}), a dense model to upcycle ({', '.join(DENSE_TYPES)}), or a "
        f"folder dynmoe_dist exported ({PREFIX}<one of those>)"
    )


@dataclass
class FolderInfo:
    """What the application needs to know about a model folder before it builds anything."""

    path: Path
    model_type: str
    workflow: str  # convert | upcycle | dynmoe (an exported folder of ours)
    vocab_size: int
    num_layers: int
    experts: list[int]  # per MoE layer, at the start
    max_positions: int | None
    tokenizer_size: int | None = None  # with data.tokenizer=model


def folder_of(cfg: Any) -> Path:
    path = Path(str(cfg.model.path)).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file"
        raise ConfigError(
            "model.path",
            str(cfg.model.path),
            f"a local folder holding a transformers model (config.json and its weights, as save_pretrained writes "
            f"them); {path} {what}. Nothing is fetched from a hub: download the model first",
        )
    if not (path / "config.json").is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
        raise ConfigError(
            "model.path",
            str(cfg.model.path),
            f"a folder with config.json (save_pretrained writes one); {path} holds {found}",
        )
    return path


def inspect_folder(cfg: Any) -> FolderInfo:
    """Read ``model.path``'s config (and tokenizer) and refuse what cannot train, naming what to change."""
    from .tokens import load_tokenizer, uses_model_tokenizer

    path = folder_of(cfg)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", str(path), f"a folder whose config.json is valid JSON ({exc})") from None
    model_type = str(raw.get("model_type"))
    if model_type not in MOE_TYPES + DENSE_TYPES and model_type.removeprefix(PREFIX) not in MOE_TYPES + DENSE_TYPES:
        raise ConfigError(f"model_type of {path / 'config.json'}", model_type, supported())
    from transformers import AutoConfig

    import dynmoe_dist.hf  # noqa: F401 - registers our dynmoe_<family> types with AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    m, u = cfg.model, cfg.model.upcycle
    layers = int(config.num_hidden_layers)
    if model_type.startswith(PREFIX):
        check(
            not m.convert and u.num_experts is None,
            "model.convert / model.upcycle.num_experts",
            "set",
            f"unset: {path} holds a model dynmoe_dist exported ({model_type}); it trains with its own gates",
        )
        workflow = "dynmoe"
        experts = [int(spec["num_experts"]) for spec in config.dynmoe["layers"].values()]
    elif model_type in MOE_TYPES:
        check(
            u.num_experts is None,
            "model.upcycle.num_experts",
            u.num_experts,
            f"null: {path} holds an MoE model ({model_type}); convert it with model.convert=true",
        )
        check(
            m.convert,
            "model.convert",
            False,
            f"true: {path} holds an MoE model ({model_type}); moe=family keeps its routing, moe=top_any (or another "
            "gate) makes it dynamic",
        )
        workflow = "convert"
        from dynmoe_dist.hf.families import num_experts

        experts = [num_experts(config)]
    else:
        check(
            not m.convert,
            "model.convert",
            True,
            f"false: {path} holds a dense model ({model_type}) with no MoE block to convert; upcycle it with "
            "model.upcycle.num_experts=<N>",
        )
        check(
            u.num_experts is not None,
            "model.upcycle.num_experts",
            None,
            f"a number of experts: {path} holds a dense model ({model_type}) to upcycle",
        )
        from dynmoe_dist.hf.upcycle import chosen_layers

        try:
            chosen_layers(list(u.layers) if u.layers is not None else None, layers)
        except ConfigError as exc:
            raise ConfigError("model.upcycle.layers", exc.value, exc.allowed) from None
        workflow = "upcycle"
        experts = [int(u.num_experts)]
    info = FolderInfo(
        path,
        model_type,
        workflow,
        int(config.vocab_size),
        layers,
        experts,
        getattr(config, "max_position_embeddings", None),
    )
    check_counts(cfg, info)
    d = cfg.data
    if info.max_positions is not None:
        check(
            d.seq_len <= info.max_positions,
            "data.seq_len",
            d.seq_len,
            f"at most the model's max_position_embeddings={info.max_positions}",
        )
    if uses_model_tokenizer(cfg):
        info.tokenizer_size = len(load_tokenizer(path))
        check(
            info.tokenizer_size <= info.vocab_size,
            "data.tokenizer",
            "model",
            f"a tokenizer of at most the model's vocab_size={info.vocab_size} tokens: the one in {path} has "
            f"{info.tokenizer_size} (its ids would index past the embedding); put the model's own tokenizer in the "
            "folder, or set data.tokenizer=bytes",
        )
    return info


def check_counts(cfg: Any, info: FolderInfo) -> None:
    """The model's expert counts against the adaptation bounds and the gate's k (check_config checks the demo's)."""
    a = cfg.adapt
    if a.enabled:
        for n in info.experts:
            check(
                a.min_experts <= n <= a.max_experts,
                "adapt.max_experts" if n > a.max_experts else "adapt.min_experts",
                a.max_experts if n > a.max_experts else a.min_experts,
                f"bounds around the model's {n} experts per MoE layer: adapt.min_experts <= {n} <= adapt.max_experts",
            )
    if info.workflow == "dynmoe" or cfg.moe.router.kind == FAMILY:
        return
    fewest = min(info.experts + ([a.min_experts] if a.enabled else []))
    spec = router_spec(cfg.moe)
    for option in ("k", "k_max"):
        value = spec.get(option)
        if value is not None and value > fewest:
            raise ConfigError(f"moe.router.{option}", value, f"at most {fewest}, the fewest experts a layer may hold")


class HFModel(nn.Module):
    """A converted or upcycled transformers causal LM, seen by the trainer like its demo transformer."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model
        self.vocab_size = int(hf_model.config.vocab_size)
        self._blocks: list | None = None  # the converted blocks, found once (a plain list: not registered twice)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def blocks(self) -> list:
        """The model's MoE blocks; adaptation changes their experts, never which blocks there are."""
        if self._blocks is None:
            from dynmoe_dist.hf import moe_blocks

            self._blocks = [b for _, b in moe_blocks(self.hf)]
        return self._blocks

    @torch.no_grad()
    def settle_calibration(self) -> None:
        """A block converted to Top-Any calibrates its thresholds on its first batch, unless they were loaded: a
        resumed run's thresholds (non-zero once set) are kept."""
        for block in self.blocks():
            if block.pending_calibration and bool(block.moe.router.threshold.detach().ne(0).any()):
                block.pending_calibration.clear()

    def logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
        if any(b.pending_calibration for b in self.blocks()):
            self.settle_calibration()
        logits = self.hf(input_ids=tokens, use_cache=False).logits
        return logits, [b.aux for b in self.blocks()]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ForwardInfo]:
        logits, auxes = self.logits(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays fp64
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        aux = sum((a.loss for a in auxes), task.new_zeros(()))
        info = ForwardInfo(task.detach(), aux.detach(), auxes, targets.numel())
        return task + aux.to(task.dtype), info


def load_pretrained(path: Path) -> nn.Module:
    """The folder's causal LM in fp32 (the engines keep fp32 masters; bf16 is the engine's), train mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import dynmoe_dist.hf  # noqa: F401 - our dynmoe_<family> types

    hf_logging.disable_progress_bar()  # one bar per rank per load: the application reports progress itself
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def build_hf_model(cfg: Any, groups: ParallelGroups | None) -> HFModel:
    """The run's model, the same on every rank: loaded, then converted, upcycled or sharded with ``groups``."""
    from dynmoe_dist import hf

    path = folder_of(cfg)
    model = load_pretrained(path)
    m, u = cfg.model, cfg.model.upcycle
    gate = None if cfg.moe.router.kind == FAMILY else router_spec(cfg.moe)
    if model.config.model_type.startswith(PREFIX):
        if groups is not None:
            hf.shard(model, groups)
    elif m.convert:
        hf.convert(model, gate, groups, seed=cfg.seed)
    else:
        layers = list(u.layers) if u.layers is not None else None
        hf.upcycle(model, u.num_experts, gate, layers, u.noise, groups, drop=u.drop, seed=cfg.seed)
    return HFModel(model)


# ----------------------------------------------------------------------------------------------------------------------
# dynmoe-export --hf


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """A training checkpoint of a ``model=hf`` run as a folder ``from_pretrained`` loads (``dynmoe_dist.hf.export``):
    the run's model rebuilt on one process from the checkpoint's config, every expert loaded, then exported."""
    from omegaconf import OmegaConf

    from ..checkpoint import CheckpointError
    from ..checkpoint.export import adopt_experts, exported_state
    from ..checkpoint.io import resolve
    from ..checkpoint.manifest import Manifest
    from .config import TrainConfig

    folder = resolve(checkpoint)
    manifest = Manifest.read(folder)
    if not manifest.config or manifest.config.get("model", {}).get("kind") != "hf":
        raise CheckpointError(f"{folder} is not a checkpoint of a model=hf run: dynmoe-export --hf needs one")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), manifest.config))
    model = build_hf_model(cfg, None)
    state, meta = exported_state(folder)
    layers = json.loads(meta["layers"])
    path_of = {m.name: name for name, m in model.named_modules() if isinstance(m, MoELayer)}
    renamed = {}
    for key, value in state.items():
        layer = next((n for n in path_of if key.startswith(n + ".")), None)
        renamed[path_of[layer] + key[len(layer) :] if layer is not None else key] = value
    for layer in model.moe_layers():
        adopt_experts(layer, layers[layer.name])
    for block in model.blocks():
        block.pending_calibration.clear()  # the thresholds come from the checkpoint
    model.load_state_dict(renamed, strict=True)
    from dynmoe_dist.hf import export

    return export(model.hf, out)
