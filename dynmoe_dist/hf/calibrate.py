"""Top-Any thresholds for a converted model, set so that the average k starts at the model's own top-k.

Top-Any accepts expert e for token x when sigmoid(cos(x, W_e) * s) > sigmoid(G_e * s), that is when cos(x, W_e) >
G_e. After ``convert(model, router="top_any")`` the rows W_e are the model's router rows, and on the first batch a
block sees (or the batch given to ``calibrate``) each threshold G_e is placed between the n_e-th and (n_e+1)-th
largest similarity of expert e, where n_e is how many of those tokens the model's own top-k rule sent to e (at least
one). Every expert then keeps its load, and the number of (token, expert) pairs, hence the average k, equals the
top-k rule's exactly on that batch; which tokens an expert takes follows the cosine instead of the logit. Under
expert or data parallelism every rank computes its thresholds on its own tokens and the world averages them, so
every rank holds the same gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parallel.collectives import all_reduce
from ..routing import Router
from .block import MoEBlock, moe_blocks


@torch.no_grad()
def top_any_thresholds(x: torch.Tensor, weight: torch.Tensor, loads: torch.Tensor) -> torch.Tensor:
    """Per-expert cosine thresholds that accept exactly ``loads[e]`` (at least 1) of the tokens ``x`` [S, d]."""
    cos = F.normalize(x, dim=-1) @ F.normalize(weight, dim=-1).t()
    ranked = cos.sort(0, descending=True).values  # [S, E]
    tokens = ranked.shape[0]
    n = loads.clamp(1, tokens).to(torch.int64)
    above = ranked.gather(0, (n - 1)[None]).squeeze(0)
    below = torch.where(n < tokens, ranked.gather(0, n.clamp(max=tokens - 1)[None]).squeeze(0), above - 1.0)
    return (above + below) / 2


@torch.no_grad()
def calibrate_block(block: MoEBlock, hidden_states: torch.Tensor) -> None:
    """Set the block's Top-Any thresholds from these hidden states and its pending reference router."""
    (reference,) = block.pending_calibration
    router = block.moe.router
    x = hidden_states.detach().reshape(-1, hidden_states.shape[-1]).to(router.weight.dtype)
    reference = reference.to(device=x.device, dtype=x.dtype).eval()
    loads = torch.bincount(reference.route(x, None).expert, minlength=router.num_experts)
    thresholds = top_any_thresholds(x, router.weight.detach(), loads)
    groups = block.moe.groups
    if groups is not None and groups.world_size > 1:
        all_reduce(thresholds, groups.world_group, f"{block.moe.name}.calibrate")
        thresholds /= groups.world_size
    router.threshold.copy_(thresholds)
    block.pending_calibration.clear()


@torch.no_grad()
def calibrate(model: torch.nn.Module, *args, **kwargs) -> int:
    """Run one forward of ``model`` (e.g. ``calibrate(model, input_ids)``) so every block converted to Top-Any sets
    its thresholds from this batch; returns how many blocks were calibrated. Collective under parallelism: every
    rank calls it with its own batch."""
    pending = [b for _, b in moe_blocks(model) if b.pending_calibration]
    if pending:
        model(*args, **kwargs)
    return len(pending)


def pending_reference(block: MoEBlock, reference: Router) -> None:
    """Calibrate ``block`` on its first forward from ``reference``, the model's own top-k router."""
    block.pending_calibration[:] = [reference]
