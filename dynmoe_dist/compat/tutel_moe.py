"""Tutel's ``moe_layer`` as a drop-in: its dictionary arguments and ``y.l_aux``, our runtime underneath.

    from dynmoe_dist.compat import tutel_moe             # was: from tutel import moe as tutel_moe
    moe = tutel_moe.moe_layer(
        gate_type={"type": "top", "k": 2, "capacity_factor": 0},
        model_dim=d, experts={"type": "ffn", "count_per_node": 2, "hidden_size_per_expert": f,
                              "activation_fn": torch.nn.functional.gelu})
    y = moe(x); loss = task_loss + y.l_aux

What maps (Tutel 0.3 at 82af7aad9fc3, impls/moe_layer.py, impls/fast_dispatch.py, gates/top.py, experts/ffn.py):

* ``gate_type``: ``{"type": "top", "k": k}``: softmax top-k, renormalised for k>1 (``normalize_gate``), l_aux is
  Tutel's ``gshard_loss`` (first choices counted); ``gate_noise`` adds N(0, 1) * noise / E to the logits in training.
  ``"gated_multi_gate"`` (scale 1) and ``"gated_multi_gate_t"`` (trainable temperature from 10, clamped at 100):
  DynMoE's Top-Any gate as its reference code named it on its Tutel fork. One gate per layer (no gate lists).
* ``capacity_factor`` (in the gate dict, or per call): 0 is dropless, our native mode (Tutel pads every expert to the
  largest count instead); > 0 keeps at most ``ceil(f * k * S / E)`` per expert (Tutel: ``k * int(f * ceil(S / E))``);
  < 0 keeps at most ``ceil(-f * k * S / E)``. Tutel's default, when nothing says otherwise, is 1.0, and so is ours
  here. Dropped assignments are the lowest-scored first, as Tutel's ``batch_prioritized_routing`` does.
* ``experts``: ``{"type": "ffn", "count_per_node" | "num_experts_per_device": n, "hidden_size_per_expert": f,
  "activation_fn": fn, "has_fc1_bias", "has_fc2_bias"}``: n experts per rank of ``group`` (E = n * its size).
  ``activation_fn`` is recognised among ReLU, GELU (exact or tanh) and SiLU by its values; pass it explicitly (Tutel's
  own default raises NameError at that commit; ours is ReLU, what Tutel intends). Custom experts, sharded experts
  (n < 0) and ``output_dim`` other than ``model_dim`` are refused.
* ``is_postscore=True`` only (scores applied after the expert); ``is_gshard_loss=True`` only.
  ``a2a_ffn_overlap_degree``, ``parallel_type`` and ``use_2dh`` are Tutel kernel choices: accepted, no effect.
* ``router=``: any of our gates instead ("top_any", {"kind": "importance_k", ...}); the gate weight carries over.

Weights: ``load_state_dict`` takes a Tutel state dict holding every expert; ``load_tutel_state_dicts`` the per-rank
dicts (rank order) of a layer saved on several ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import ConfigError, check
from ..experts.activations import PLAIN
from ..layer import MoEAux, MoELayer
from ..routing import RouterConfig
from .drop_in import DropInLayer
from .groups import groups_for
from .weights import PeerWeights, as_rank_list

GATE_KEY = "gates.0.wg.weight"
TOP_ANY_GATES = {"gated_multi_gate": False, "gated_multi_gate_t": True}  # -> trainable temperature


def identify_activation(fn) -> str:
    """Which of our plain activations ``fn`` computes, by its values on [-4, 4]."""
    if fn is None:
        return "relu"
    t = torch.linspace(-4, 4, 161, dtype=torch.float64)
    try:
        values = fn(t)
    except Exception as e:  # noqa: BLE001 - any failure of a user callable is reported the same way
        raise ConfigError("activation_fn", fn, f"a callable on tensors ({e})") from e
    for name, ref in PLAIN.items():
        if torch.allclose(values, ref(t), atol=1e-6):
            return name
    raise ConfigError("activation_fn", fn, "ReLU, GELU (exact or tanh) or SiLU, as torch.nn.functional computes them")


def ep_size_of(group) -> int:
    """Tutel's group is the expert-parallel group; ours are contiguous rank blocks, so it must be one of them."""
    if not dist.is_initialized():
        return 1
    if group is None:
        return dist.get_world_size()
    ranks = dist.get_process_group_ranks(group)
    size = len(ranks)
    if ranks != list(range(ranks[0], ranks[0] + size)) or ranks[0] % size:
        raise ConfigError("group", ranks, "the world, or a contiguous block of ranks [i * n, (i + 1) * n)")
    return size


def tutel_router(gate: dict, normalize_gate: bool) -> tuple[dict, float]:
    """Our router config and the capacity factor from one Tutel gate dict."""
    gate = dict(gate)
    kind = gate.pop("type", None)
    capacity = float(gate.pop("capacity_factor", 1.0))
    noise = float(gate.pop("gate_noise", 0.0))
    gate.pop("fp32_gate", None)  # ours always routes in the gate's own (fp32) dtype
    if kind == "top":
        k = int(gate.pop("k", 1))
        router = {
            "kind": "top_k",
            "k": k,
            "renormalize": normalize_gate and k > 1,
            "balance_weight": 1.0,
            "balance_counts": "first",
            "logit_noise": noise,
        }
    elif kind in TOP_ANY_GATES:
        gate.pop("k", None)  # the reference passed k for its fallback; Top-Any picks k per token
        check(noise == 0, "gate_noise", noise, "0 for the Top-Any gate (its thresholds decide, no noise)")
        router = {"kind": "top_any", "trainable_temperature": TOP_ANY_GATES[kind]}
    else:
        raise ConfigError("gate_type", kind, "'top', 'gated_multi_gate' or 'gated_multi_gate_t'")
    if gate:
        raise ConfigError("gate_type", sorted(gate), "only type, k, capacity_factor, gate_noise and fp32_gate")
    return router, capacity


def our_capacity(factor: float) -> float | None:
    return None if factor == 0 else abs(factor)


class MOELayer(DropInLayer):
    """Tutel's moe_layer, running on dynmoe_dist (dropless all-to-all, dynamic experts, any gate)."""

    GATE_KEY = GATE_KEY

    def __init__(
        self,
        gate_type,
        model_dim: int,
        experts: dict | None = None,
        scan_expert_func=None,
        result_func=None,
        group=None,
        seeds=None,
        a2a_ffn_overlap_degree: int = 1,
        is_postscore: bool = True,
        batch_prioritized_routing: bool = False,
        normalize_gate: bool = True,
        is_gshard_loss: bool = True,
        parallel_type: str = "adaptive:1",
        use_2dh: bool = False,
        *,
        router: str | dict | RouterConfig | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        check(is_postscore, "is_postscore", is_postscore, "True (scores applied after the experts)")
        check(is_gshard_loss, "is_gshard_loss", is_gshard_loss, "True (the GShard balance loss)")
        if isinstance(gate_type, str):  # Tutel's deprecated 'Top2Gate' form
            check(gate_type.startswith("Top") and gate_type.endswith("Gate"), "gate_type", gate_type, "'TopKGate'")
            gate_type = {"type": "top", "k": int(gate_type[3:-4])}
        if isinstance(gate_type, list):
            check(len(gate_type) == 1, "gate_type", gate_type, "one gate (a list of several gates is not supported)")
            gate_type = gate_type[0]
        experts = dict(experts or {})
        check(experts.pop("type", None) == "ffn", "experts.type", "not ffn", "'ffn' (custom experts are refused)")
        local = experts.pop("count_per_node", experts.pop("num_experts_per_device", 1))
        check(isinstance(local, int) and local >= 1, "experts.count_per_node", local, "an integer >= 1 (no sharding)")
        d_ff = experts.pop("hidden_size_per_expert")
        out_dim = experts.pop("output_dim", None)
        check(out_dim in (None, model_dim), "experts.output_dim", out_dim, f"model_dim={model_dim}")
        activation = identify_activation(experts.pop("activation_fn", None))
        bias = bool(experts.pop("has_fc1_bias", True)) | bool(experts.pop("has_fc2_bias", True))
        if experts:
            raise ConfigError("experts", sorted(experts), "type, count_per_node, hidden_size_per_expert, ...")
        tutel_gate, capacity = tutel_router(gate_type, normalize_gate)
        self.ep_size = ep_size_of(group)
        self.model_dim, self.num_local_experts = model_dim, local
        self.result_func = result_func
        self.capacity_factor = capacity
        seed = seeds[1] if seeds is not None and len(seeds) > 1 and seeds[1] is not None else None
        self.moe = MoELayer(
            model_dim,
            d_ff,
            local * self.ep_size,
            router if router is not None else tutel_gate,
            activation=activation,
            expert_bias=bias,
            capacity_factor=our_capacity(capacity),
            groups=groups_for(self.ep_size, timeout_s),
            seed=seed,
        )
        if scan_expert_func is not None:
            for name, p in self.moe.experts.named_parameters():
                scan_expert_func(name, p)
        self.l_aux: torch.Tensor | None = None
        self.last_aux: MoEAux | None = None

    @property
    def num_global_experts(self) -> int:
        return self.moe.num_experts

    def forward(
        self,
        input: torch.Tensor,
        gate_index: int = 0,
        capacity_factor=None,
        top_k=None,
        a2a_ffn_overlap_degree=None,
        reserve_dims: int = 1,
        inequivalent_tokens: bool = False,
        adaptive_r=None,
        megablocks_size: int = 0,
    ):
        """``y`` with ``y.l_aux``, as Tutel returns it. ``capacity_factor`` overrides the gate's for this call.

        The kernel options (overlap degree, adaptive_r, megablocks_size) have no effect; uneven token counts across
        ranks always work here, so ``inequivalent_tokens`` is not needed.
        """
        check(gate_index == 0, "gate_index", gate_index, "0 (one gate per layer)")
        check(reserve_dims == 1, "reserve_dims", reserve_dims, "1 (the last dimension is the model dimension)")
        cfg = self.moe.router.cfg
        check(top_k in (None, getattr(cfg, "k", None)), "top_k", top_k, "the gate's own k")
        self.moe.capacity_factor = our_capacity(self.capacity_factor if capacity_factor is None else capacity_factor)
        y, aux = self.moe(input.reshape(-1, self.model_dim))
        y = y.view(input.shape)
        self.last_aux = aux
        self.l_aux = y.l_aux = aux.loss
        return self.result_func(y) if self.result_func is not None else y

    # weights from Tutel ---------------------------------------------------------------------------------------------

    def peer_weights(self, state_dicts, prefix: str = "") -> PeerWeights:
        """Merge Tutel state dicts: one holding every expert, or the ranks' dicts of one group in rank order."""
        gate, experts = None, {}
        offset = 0
        for sd in as_rank_list(state_dicts):
            if prefix + GATE_KEY not in sd:
                raise ConfigError("state dict", f"no {prefix}{GATE_KEY}", "a state dict of Tutel's moe_layer")
            gate = sd[prefix + GATE_KEY]
            fc1 = sd[prefix + "experts.batched_fc1_w"]  # [n, f, d]
            fc2 = sd[prefix + "experts.batched_fc2_w"]  # [n, f, d]
            b1 = sd.get(prefix + "experts.batched_fc1_bias")
            b2 = sd.get(prefix + "experts.batched_fc2_bias")
            for i in range(fc1.shape[0]):
                rows = {"w_in": fc1[i].t().contiguous(), "w_out": fc2[i].contiguous()}
                if self.moe.experts.bias:
                    rows["b_in"] = b1[i] if b1 is not None else fc1.new_zeros(fc1.shape[1])
                    rows["b_out"] = b2[i] if b2 is not None else fc1.new_zeros(fc1.shape[2])
                experts[offset + i] = rows
            offset += fc1.shape[0]
        return PeerWeights(gate, experts, "Tutel moe_layer state dict")

    def peer_keys(self, state_dict: dict, prefix: str) -> list[str]:
        return [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "moe.")]

    # Tutel weights saved at any number of ranks (per-rank dicts in rank order)
    load_tutel_state_dicts = DropInLayer.load_peer_state_dicts


moe_layer = MOELayer
__all__ = ["MOELayer", "moe_layer"]
