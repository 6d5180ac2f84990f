"""``deepspeed.moe.layer.MoE`` as a drop-in: DeepSpeed's constructor and return value, our runtime underneath.

    from dynmoe_dist.compat.deepspeed_moe import MoE      # was: from deepspeed.moe.layer import MoE
    moe = MoE(hidden_size, expert, num_experts=8, ep_size=2, k=2, drop_tokens=False)
    out, l_aux, exp_counts = moe(x)

What maps (DeepSpeed 0.19, moe/layer.py and moe/sharded_moe.py):

* ``expert`` is copied per expert as DeepSpeed does (every expert starts from the module's weights); a
  Linear-activation-Linear Sequential or a gated MLP maps onto our expert bank (compat.expert_module), anything else
  is refused with the forms accepted.
* ``k``: top-k softmax; the raw probability at k=1, renormalised over the k chosen for k>1; ``l_aux`` is DeepSpeed's
  balance loss (first choices counted for k<=2, all k for k>2), unweighted, as DeepSpeed returns it.
* ``drop_tokens=False``: dropless, our native mode, no capacity at all (DeepSpeed pads every expert to the largest
  count instead). ``drop_tokens=True``: each expert keeps ``max(ceil(capacity_factor * k * S / E), min_capacity)``
  assignments (``eval_capacity_factor`` in eval mode); which ones it drops differs: the lowest-weight first,
  deterministically, where DeepSpeed drops by position (``use_rts=False``) or at random (``use_rts=True``), so
  ``use_rts`` has no effect.
* ``noisy_gate_policy``: 'Jitter' (gate input times U(1 - 0.01, 1 + 0.01)), 'RSample' (Gumbel noise on the
  selection, k=1); ``top2_2nd_expert_sampling`` (Gumbel noise on the second choice, k=2). All in training only:
  DeepSpeed 0.19 also samples the second expert in eval mode, which makes its evaluation non-deterministic.
* ``use_residual``: PR-MoE (arXiv 2201.05596), the dense ``expert`` mixed in by a learned 2-way coefficient.
* ``use_tutel``: accepted and ignored (a DeepSpeed kernel choice). ``enable_expert_tensor_parallelism``: refused;
  there is no tensor parallelism here.
* ``router=``: any of our gates instead of DeepSpeed's ("top_any", {"kind": "importance_k", ...}); the trained gate
  weight carries over as the new gate's expert rows.

Weights: ``load_state_dict`` accepts a state dict of DeepSpeed's layer that holds every expert (saved at ep_size 1,
or merged); ``load_deepspeed_state_dicts`` takes the per-rank dicts of a larger ep_size, and
``compat.deepspeed_checkpoint.load_deepspeed_checkpoint`` a checkpoint folder with its per-expert files.
"""

from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, check
from ..layer import MoEAux, MoELayer
from ..routing import RouterConfig
from .drop_in import DropInLayer
from .expert_module import read_expert
from .groups import groups_for
from .weights import PeerWeights, as_rank_list

GATE_KEY = "deepspeed_moe.gate.wg.weight"
EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."
EXPERT_KEY = re.compile(re.escape(EXPERT_PREFIX) + r"(\d+)\.(.+)")


def deepspeed_router(k: int, noisy_gate_policy: str | None, top2_2nd_expert_sampling: bool) -> dict:
    noise = "none"
    if noisy_gate_policy == "RSample" and k == 1:
        noise = "gumbel"
    elif top2_2nd_expert_sampling and k == 2:
        noise = "gumbel_second"
    return {
        "kind": "top_k",
        "k": k,
        "renormalize": k > 1,
        "balance_weight": 1.0,
        "balance_counts": "first" if k <= 2 else "all",
        "input_jitter": 0.01 if noisy_gate_policy == "Jitter" else 0.0,
        "selection_noise": noise,
    }


class MoE(DropInLayer):
    """DeepSpeed-MoE's layer, running on dynmoe_dist (dropless all-to-all, dynamic experts, any gate)."""

    GATE_KEY = GATE_KEY

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module,
        num_experts: int = 1,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        use_residual: bool = False,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        use_tutel: bool = False,
        enable_expert_tensor_parallelism: bool = False,
        top2_2nd_expert_sampling: bool = True,
        *,
        router: str | dict | RouterConfig | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        check(num_experts >= 1 and num_experts % ep_size == 0, "num_experts", num_experts, f"a multiple of {ep_size=}")
        check(
            noisy_gate_policy in (None, "None", "Jitter", "RSample"),
            "noisy_gate_policy",
            noisy_gate_policy,
            "None, 'Jitter' or 'RSample'",
        )
        if enable_expert_tensor_parallelism:
            raise ConfigError(
                "enable_expert_tensor_parallelism", True, "False: dynmoe_dist has no tensor parallelism inside experts"
            )
        check(capacity_factor > 0 and eval_capacity_factor > 0, "capacity_factor", capacity_factor, "a number > 0")
        policy = None if noisy_gate_policy == "None" else noisy_gate_policy
        spec = read_expert(expert, hidden_size)
        self.hidden_size, self.num_experts, self.ep_size, self.k = hidden_size, num_experts, ep_size, k
        self.drop_tokens = drop_tokens
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.use_residual = use_residual
        # to read DeepSpeed's per-expert state dicts back; in a tuple so that it is not a submodule (no parameters)
        self.expert_template = (copy.deepcopy(expert),)
        self.moe = MoELayer(
            hidden_size,
            spec.d_ff,
            num_experts,
            router if router is not None else deepspeed_router(k, policy, top2_2nd_expert_sampling),
            activation=spec.activation,
            expert_bias=spec.bias,
            capacity_factor=capacity_factor if drop_tokens else None,
            min_capacity=min_capacity,
            groups=groups_for(ep_size, timeout_s),
            seed=seed,
        )
        with torch.no_grad():  # every expert starts as a copy of ``expert``, as in DeepSpeed
            for name, p in self.moe.experts.weights().items():
                p.copy_(spec.rows[name].to(p.dtype).expand_as(p))
        if use_residual:
            self.mlp = expert
            self.coefficient = nn.Linear(hidden_size, 2)
        self.last_aux: MoEAux | None = None

    @property
    def num_local_experts(self) -> int:
        return self.moe.experts.num_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's engine calls this on its own MoE layers; ours built its groups at construction."""

    def forward(
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, l_aux, exp_counts) as DeepSpeed returns them; ``self.last_aux`` holds our routing statistics."""
        if self.drop_tokens:
            self.moe.capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        x = hidden_states.reshape(-1, self.hidden_size)
        if used_token is not None:  # tokens outside the mask take no expert and come out as zeros
            used = used_token.reshape(-1).bool()
            picked, aux = self.moe(x[used])
            out = x.new_zeros(x.shape).index_put((used.nonzero().flatten(),), picked)
        else:
            out, aux = self.moe(x)
        out = out.view(hidden_states.shape)
        if self.use_residual:
            dense = self.mlp(hidden_states)
            dense = dense[0] if isinstance(dense, tuple) else dense
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            out = out * coef[..., 0:1] + dense * coef[..., 1:]
        self.last_aux = aux
        return out, aux.loss, aux.stats.tokens_per_expert.detach()

    # weights from DeepSpeed ---------------------------------------------------------------------------------------

    def peer_weights(self, state_dicts, prefix: str = "") -> PeerWeights:
        """Merge DeepSpeed state dicts by global expert id: one dict (all experts, or one per-expert file's keys
        already renamed to global ids) or a list of the ep ranks' dicts in rank order."""
        ranks = as_rank_list(state_dicts)
        gate, experts = None, {}
        for rank, sd in enumerate(ranks):
            local: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in sd.items():
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix) :]
                if rest == GATE_KEY:
                    gate = value
                elif m := EXPERT_KEY.fullmatch(rest):
                    local.setdefault(int(m.group(1)), {})[m.group(2)] = value
            offset = rank * len(local) if len(ranks) > 1 else 0
            for i, sub in local.items():
                experts[offset + i] = self.expert_rows(sub, offset + i)
        if gate is None:
            raise ConfigError("state dict", f"no {prefix}{GATE_KEY}", "a state dict of deepspeed.moe.layer.MoE")
        return PeerWeights(gate, experts, "DeepSpeed-MoE state dict")

    def expert_rows(self, sub: dict[str, torch.Tensor], expert_id: int) -> dict[str, torch.Tensor]:
        module = copy.deepcopy(self.expert_template[0])
        try:
            module.load_state_dict(sub)
        except RuntimeError as e:
            raise ConfigError(f"expert {expert_id}", "a state dict that does not fit the expert module", str(e)) from e
        return read_expert(module, self.hidden_size).rows

    def peer_keys(self, state_dict: dict, prefix: str) -> list[str]:
        return [k for k in state_dict if k.startswith(prefix + "deepspeed_moe.")]

    def load_deepspeed_state_dicts(self, state_dicts, prefix: str = "") -> None:
        """Load DeepSpeed-MoE weights saved at any ep_size (list of per-rank dicts in rank order) at ours, with the
        residual MLP and its coefficient (which a plain ``load_state_dict`` loads by name)."""
        self.load_peer_state_dicts(state_dicts, prefix)
        if self.use_residual:
            for name in ("mlp", "coefficient"):
                head = prefix + name + "."
                items = [kv for sd in as_rank_list(state_dicts) for kv in sd.items()]
                own = {k[len(head) :]: v for k, v in items if k.startswith(head)}
                getattr(self, name).load_state_dict(own)
