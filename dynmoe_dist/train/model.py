"""Decoder-only transformer with an MoE layer in place of the MLP every ``moe_every``-th block.

Pre-norm blocks, rotary (or learned) positions, tied input/output embeddings, causal attention through
``scaled_dot_product_attention``. A block whose MoE gate reads attention (DA-MoE's importance-k, arXiv 2409.06669)
computes its attention probabilities explicitly and hands them to its MoE layer; every other block keeps the fused
kernel. The auxiliary losses of every MoE layer enter the training loss.

``forward(tokens, targets)`` returns ``(loss, ForwardInfo)``: the loss is the one tensor DeepSpeed's engine hooks for
its backward; ``ForwardInfo`` is plain data (detached task loss, each MoE layer's ``MoEAux``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import MoEAux, MoELayer
from ..parallel.groups import ParallelGroups
from .config import ModelConfig, MoESettings, TrainConfig, router_spec

# MoE block factory: (block index, d_model) -> a module called as ``ffn(h, importance=...)`` returning (y, aux) where
# aux has a ``.loss`` (an MoEAux for dynmoe_dist's layer). The benchmark swaps in DeepSpeed-MoE through it.
MoEFactory = Callable[[int, int], nn.Module]


@dataclass
class ForwardInfo:
    task_loss: torch.Tensor  # detached mean cross-entropy over this rank's tokens
    aux_loss: torch.Tensor  # detached sum of the MoE layers' auxiliary losses
    moe: list = field(default_factory=list)  # per MoE layer: its MoEAux (or the factory's aux object)
    tokens: int = 0


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of ``x [B, H, S, D]`` by position-dependent angles (RoFormer, arXiv 2104.09864)."""
    s = x.shape[-2]
    cos, sin = cos[:s].to(x.dtype), sin[:s].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, want_probs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, d = x.shape
        heads = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(d, dim=-1))
        q, k, v = heads  # [B, H, S, D] each
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        drop = self.dropout if self.training else 0.0
        probs = None
        if want_probs:  # the gate needs the probabilities themselves: no fused kernel for this block
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            y = F.dropout(probs, drop, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, d)), probs


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff, bias=False)
        self.fc_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


def make_norm(kind: str, d_model: int) -> nn.Module:
    return nn.RMSNorm(d_model) if kind == "rmsnorm" else nn.LayerNorm(d_model)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module, is_moe: bool, wants_attention: bool) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.is_moe, self.wants_attention = is_moe, wants_attention
        if is_moe:
            self.moe = ffn
        else:
            self.mlp = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rotary) -> tuple[torch.Tensor, object | None]:
        a, probs = self.attn(self.norm1(x), rotary, self.wants_attention)
        x = x + self.drop(a)
        h = self.norm2(x)
        if not self.is_moe:
            return x + self.drop(self.mlp(h)), None
        y, aux = self.moe(h, importance=probs)
        return x + self.drop(y), aux


class Transformer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        moe: MoESettings,
        groups: ParallelGroups | None = None,
        seed: int = 0,
        moe_factory: MoEFactory | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        spec = router_spec(moe)
        wants_attention = spec["kind"] == "importance_k"
        if moe_factory is None:

            def moe_factory(i: int, d: int) -> nn.Module:
                return MoELayer(
                    d,
                    moe.d_ff or cfg.d_ff,
                    moe.num_experts,
                    router=spec,
                    activation=moe.activation,
                    capacity_factor=moe.capacity_factor,
                    gemm=moe.gemm,
                    num_shared_experts=moe.num_shared_experts,
                    shared_d_ff=moe.shared_d_ff,
                    check_finite=moe.check_finite,
                    groups=groups,
                    shadow_experts=moe.shadow_experts,
                    shadow_min_rows=moe.shadow_min_rows,
                    seed=seed * 1000 + i,  # the same experts on every rank, wherever they are placed
                    name=f"blocks.{i}.moe",
                )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # dense weights: the same on every rank, with no broadcast
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
            blocks = []
            for i in range(cfg.n_layers):
                is_moe = (i + 1) % cfg.moe_every == 0
                ffn = moe_factory(i, cfg.d_model) if is_moe else MLP(cfg.d_model, cfg.d_ff)
                blocks.append(Block(cfg, ffn, is_moe, is_moe and wants_attention))
            self.blocks = nn.ModuleList(blocks)
            self.norm = make_norm(cfg.norm, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self._init_dense()
        if cfg.positions == "rotary":
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def _init_dense(self) -> None:
        """GPT-2's scheme: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers). MoE layers keep
        their own seeded initialisation (a function of seed and expert id)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            for name, p in block.named_parameters():
                if name.startswith("moe.") or p.dim() < 2:
                    continue
                p.normal_(0.0, residual_std if name.endswith(("proj.weight", "fc_out.weight")) else 0.02)
        self.embed.weight.normal_(0.0, 0.02)
        if self.pos is not None:
            self.pos.weight.normal_(0.0, 0.02)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def logits(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
        b, s = tokens.shape
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(s, device=tokens.device))
        x = self.drop(x)
        rotary = (self.rope_cos, self.rope_sin) if self.cfg.positions == "rotary" else None
        auxes = []
        for block in self.blocks:
            x, aux = block(x, rotary)
            if aux is not None:
                auxes.append(aux)
        return self.norm(x) @ self.embed.weight.t(), auxes  # tied output embedding

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ForwardInfo]:
        logits, auxes = self.logits(tokens)
        task = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        aux = sum((a.loss for a in auxes), task.new_zeros(()))
        info = ForwardInfo(task.detach(), aux.detach(), auxes, targets.numel())
        return task + aux.to(task.dtype), info


def build_model(cfg: TrainConfig, groups: ParallelGroups | None, moe_factory: MoEFactory | None = None) -> nn.Module:
    """The run's model: the demo transformer, or with ``model=hf`` a transformers model (hf_model.py)."""
    if cfg.model.kind == "hf":
        from .hf_model import build_hf_model

        return build_hf_model(cfg, groups)
    return Transformer(cfg.model, cfg.moe, groups, seed=cfg.seed, moe_factory=moe_factory)


def moe_auxes(info: ForwardInfo) -> list[MoEAux]:
    return [a for a in info.moe if isinstance(a, MoEAux)]


def model_from_export(path) -> Transformer:
    """The model an exported checkpoint (``dynmoe-export``) describes, with its weights, on one process."""
    from omegaconf import OmegaConf

    from ..checkpoint.export import load_exported, read_export
    from .config import TrainConfig

    _, meta = read_export(path)
    if meta["config"] is None:
        from ..checkpoint import CheckpointError

        raise CheckpointError(f"{path} carries no config: build the model yourself and pass it to load_exported")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), meta["config"]))
    return load_exported(path, Transformer(cfg.model, cfg.moe, groups=None, seed=cfg.seed))
