"""The single-GPU layer against its own grouped expert GEMMs and against the GPU peers (issue 29, point 4).

One command on one CUDA device, bf16, forward+backward, 16384 tokens, d=1024, top-2, at 8 experts (d_ff 4096) and
64 experts (d_ff 512), SwiGLU experts (Mixtral's):

* ``layer_over_experts``: our ``MoELayer`` (``gemm="grouped_mm"``, one process) over its expert FFN alone, the grouped
  GEMMs of ``experts/grouped_gemm.py`` on the same routed rows in the same order (everything above 1.0 is routing,
  permutation and combine). Target <= 1.15 for top-2, <= 1.25 for Top-Any (its own routing, avg_k reported; its
  thresholds set so that each expert takes top-2's load on the timed batch: ``calibrate_top_any``);
* ``ours_over_mixtral``: against transformers' ``MixtralSparseMoeBlock`` with its ``grouped_mm`` experts
  implementation (``experts_implementation`` in the config); target <= 0.8;
* ``ours_over_ds`` and ``ours_over_ds_cf1``: against ``deepspeed.moe.layer.MoE`` at expert-parallel size 1, dropless
  (``drop_tokens=False``) and with capacity factor 1.0 (routes past the capacity dropped: ``ds_cf1_dropped``); target
  <= 0.8 of each.

Same routing and weights everywhere: the router rows and experts of our layer are copied into the peers, and all three
route by softmax top-2 renormalised over the pair (Mixtral's rule; DeepSpeed's with its second-expert sampling off).
Before anything is timed the outputs and input gradients are compared, in float32 on the same device at
``--check-tokens`` tokens, against a tolerance: a peer that computes something else is not timed, and the command
exits with status 1 once the document is written.

Timed modules hold their parameters in the timed dtype (``--dtype``), as a bf16 model does; each gate routes the way
it does in such a model: ours and DeepSpeed's in float32 (ours as ``dynmoe_dist.hf.convert`` leaves it), Mixtral's in
its parameters' dtype. Ours and DeepSpeed's backward include their balance loss; Mixtral's block has none.

Timing: on CUDA each call runs on an idle device (synchronised before), between two CUDA events, so a call's time
includes any wait for its own kernel launches; the cases run interleaved round by round (rotating who goes first) after
a warm-up, and each figure is the median over the rounds. A ratio is the ratio of medians, with the 95% interval of
its per-round ratios where scipy is installed (``timing.ratio_interval``) and a verdict against its target.

Host syncs: on CUDA one forward+backward of each module runs under ``torch.cuda.set_sync_debug_mode("warn")`` and
the warnings are counted (target for ours: none for top-2, at most one for Top-Any, whose count of assignments varies).
Elsewhere ``op_count.OpCounter`` counts the ops that would sync on a GPU.

``--device cpu`` (with small ``--tokens``, ``--d-model``, ``--shapes`` and ``--dtype float32``) runs the same harness
on the CPU, timed by the wall clock: the smoke test of the command, whose figures mean nothing. Without CUDA and
without ``--device cpu`` the command stops at once. It needs only torch (>= 2.10, for ``grouped_mm``) and this
repository; transformers and DeepSpeed are optional (their columns are then left empty and ``meta["skipped"]`` says
why, as for a peer whose version cannot be built or run here), so is scipy (the intervals).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dynmoe_dist.experts.grouped_gemm import grouped_gemm_ffn
from dynmoe_dist.layer import MoELayer
from dynmoe_dist.routing import TopAnyConfig, TopKConfig

from .machine import package_version
from .op_count import OpCounter
from .report import emit

SHAPES = ((8, 4096), (64, 512))  # (experts, d_ff)
K = 2
TARGETS = {"top2": 1.15, "top_any": 1.25, "peer": 0.8}
# host syncs per forward+backward at expert-parallel size 1: none for top-2, one for a gate whose number of
# assignments varies (Top-Any reads it once)
SYNC_TARGETS = {"top2": 0, "top_any": 1}
# float32 on one device: the three compute the same sums in different orders; a wrong weight or route shows as O(1).
# A token whose second and third experts score within rounding of each other may route differently in a peer: up to
# one token in a thousand may differ (a wrong expert's weights move far more: every expert has ~k/E of the tokens).
CHECK_TOLERANCE = 1e-4
NEAR_TIES = 1e-3
PEERS = ("mixtral", "deepspeed")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------------------- device


def pick_device(name: str) -> torch.device:
    """The device asked for, or a clear stop: no CUDA without ``--device cpu``, no grouped GEMM before torch 2.10."""
    if not hasattr(F, "grouped_mm"):
        raise SystemExit(
            f"bench gpu: torch {torch.__version__} has no torch.nn.functional.grouped_mm (torch >= 2.10 has it); "
            "the layer's grouped GEMMs and Mixtral's grouped_mm experts need it"
        )
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench gpu: no CUDA device here (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU machine, or pass "
            "--device cpu --tokens 256 --d-model 64 --shapes 4:128,8:64 --dtype float32 for a CPU smoke run"
        )
    device = torch.device(name)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.get_device_capability(device) < (8, 0):
        raise SystemExit(
            f"bench gpu: {torch.cuda.get_device_name(device)} is below compute capability 8.0; the bf16 grouped "
            "GEMM needs an A100 or newer"
        )
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call: between CUDA events on an idle device, or by the wall clock on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def interleaved_rounds(
    fns: dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, one call each per round; the first to go rotates from round to round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            samples[name].append(time_call(fns[name], device))
    return samples


def ratio_stats(num: list[float], den: list[float], target: float | None) -> dict:
    """Ratio of medians, the per-round ratios' geometric mean and 95% interval (scipy present), the verdict."""
    value = statistics.median(num) / statistics.median(den)
    interval = None
    if importlib.util.find_spec("scipy") is not None:
        from .timing import ratio_interval

        interval = ratio_interval([a / b for a, b in zip(num, den, strict=True)])
    if target is None:
        verdict = "-"
    elif interval is not None:
        _, lo, hi = interval
        verdict = "met" if hi <= target else "missed" if lo > target else "noise"
    else:
        verdict = "met" if value <= target else "missed"
    return {
        "value": value,
        "geomean": interval[0] if interval else None,
        "ci95": [interval[1], interval[2]] if interval else None,
        "target": target,
        "verdict": verdict,
    }


def count_syncs(step: Callable[[], object], device: torch.device) -> int:
    """Host syncs of one call: on CUDA the warnings of ``set_sync_debug_mode("warn")`` (backward's are replayed on
    this thread), elsewhere the ops ``OpCounter`` flags."""
    if device.type != "cuda":
        with OpCounter() as counter:
            step()
        return len(counter.syncs)
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matmuls as float32 (no TF32) while the outputs are compared."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# -------------------------------------------------------------------------------------------------------------- peers


class SwiGLUExpert(nn.Module):
    """Mixtral's expert, for DeepSpeed's MoE: ``down(silu(gate(x)) * up(x))``, bias-free Linear layers."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mixtral_unavailable() -> str | None:
    """Why transformers' Mixtral block with grouped_mm experts cannot run here, or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except ImportError as exc:
        return f"transformers {package_version('transformers')} has no Mixtral block with pluggable experts ({exc})"
    if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
        return f"transformers {package_version('transformers')} has no grouped_mm experts implementation"
    return None


def build_mixtral(ours: MoELayer) -> nn.Module:
    """A ``MixtralSparseMoeBlock`` (grouped_mm experts) with our layer's router rows and experts: transformers keeps
    expert e as ``gate_up_proj[e]`` = [w_gate^T; w_in^T] and ``down_proj[e]`` = w_out^T (``dynmoe_dist.hf.weights``)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    bank = ours.experts
    config = MixtralConfig(
        hidden_size=bank.d_model,
        intermediate_size=bank.d_ff,
        num_local_experts=bank.num_experts,
        num_experts_per_tok=K,
        hidden_act="silu",
        router_jitter_noise=0.0,
        experts_implementation="grouped_mm",
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat([bank.w_gate.transpose(1, 2), bank.w_in.transpose(1, 2)], 1))
        block.experts.down_proj.copy_(bank.w_out.transpose(1, 2))
    return block.to(bank.w_in.device)


def deepspeed_unavailable() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_world(device: torch.device) -> Iterator[None]:
    """A one-process torch.distributed world for DeepSpeed's MoE (ep size 1), unless one is running already; it goes
    when the block ends, and with it DeepSpeed's expert groups made in it. gloo on either device: at ep size 1
    DeepSpeed's MoE runs no collective (its all-to-alls and the dropless capacity's all-reduce need a group of 2+)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        with contextlib.suppress(ImportError, AttributeError):
            from deepspeed.utils import groups

            for table in (groups._get_expert_parallel_group_dict(), groups._get_expert_data_parallel_group_dict()):
                table.clear()
        dist.destroy_process_group()


def build_deepspeed(ours: MoELayer, drop_tokens: bool, device: torch.device) -> nn.Module:
    """``deepspeed.moe.layer.MoE`` at ep size 1 with our router rows and experts, noise off (plain softmax top-2
    renormalised over the pair); ``drop_tokens=False`` is dropless, else capacity factor 1.0. Needs
    ``one_rank_world``."""
    from dynmoe_dist.train.engines.deepspeed_engine import import_deepspeed

    from .deepspeed_peer import init_deepspeed_groups

    import_deepspeed(device)
    from deepspeed.moe.layer import MoE

    init_deepspeed_groups(1)
    bank = ours.experts
    moe = MoE(
        hidden_size=bank.d_model,
        expert=SwiGLUExpert(bank.d_model, bank.d_ff),
        num_experts=bank.num_experts,
        ep_size=1,
        k=K,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        noisy_gate_policy=None,
        drop_tokens=drop_tokens,
        use_rts=False,
        use_tutel=False,
        top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_proj.weight.copy_(bank.w_gate[e].t())
            expert.up_proj.weight.copy_(bank.w_in[e].t())
            expert.down_proj.weight.copy_(bank.w_out[e].t())
    return moe.to(device)


def dropped_share(moe: nn.Module, x: torch.Tensor) -> float | None:
    """The share of routes DeepSpeed's gate drops at its capacity, read off the gate's output: sparse routes flag a
    dropped route with expert -1 (DeepSpeed >= 0.19), dense ones leave it out of the dispatch mask [S, E, C]."""
    seen: dict = {}
    hook = moe.deepspeed_moe.gate.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    try:
        with torch.no_grad():
            moe(x)
    finally:
        hook.remove()
    out = seen.get("out")
    if isinstance(out, tuple) and len(out) == 7:
        return float((out[3] < 0).float().mean())
    if isinstance(out, tuple) and len(out) == 4:
        return 1.0 - float(out[2].sum()) / (x.shape[0] * K)
    return None


# ------------------------------------------------------------------------------------------------------ forward+back


def run_ours(layer: MoELayer) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    def run(x: torch.Tensor):
        y, aux = layer(x)
        return y, aux.loss

    return run


def run_mixtral(block: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    def run(x: torch.Tensor):
        return block(x.view(1, *x.shape)).view(x.shape), None

    return run


def run_deepspeed(moe: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    def run(x: torch.Tensor):
        y, l_aux, _ = moe(x)
        return y, l_aux

    return run


def train_step(run, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """forward+backward from no gradients (as after ``zero_grad(set_to_none=True)``), the balance loss included."""
    one = torch.ones((), device=x.device)

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        y, loss = run(x)
        outputs, grads = [y], [grad]
        if loss is not None and loss.requires_grad:
            outputs.append(loss)
            grads.append(one.to(loss.dtype))
        torch.autograd.backward(outputs, grads)

    return step


def output_and_input_grad(run, module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """(output, input gradient of <output, grad>) of one training forward, the balance loss left out."""
    x = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y, _ = run(x)
    y.backward(grad)
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad.detach()


def row_diffs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's largest difference, relative to the largest entry of ``b``."""
    return (a.float() - b.float()).abs().amax(-1) / b.float().abs().max().clamp_min(1e-30)


def compare(y: torch.Tensor, dx: torch.Tensor, ref_y: torch.Tensor, ref_dx: torch.Tensor) -> dict:
    """A peer's output and input gradient against ours: the largest relative difference over the tokens within the
    tolerance, how many tokens are not, and whether that passes (``CHECK_TOLERANCE``, ``NEAR_TIES``)."""
    diffs = torch.maximum(row_diffs(y, ref_y), row_diffs(dx, ref_dx))
    off = diffs > CHECK_TOLERANCE
    tokens = y.shape[0]
    within = diffs[~off]
    return {
        "output": float(row_diffs(y, ref_y)[~off].max()) if within.numel() else None,
        "input_grad": float(row_diffs(dx, ref_dx)[~off].max()) if within.numel() else None,
        "tokens": tokens,
        "tokens_off": int(off.sum()),
        "largest": float(diffs.max()),
        "agrees": int(off.sum()) <= int(NEAR_TIES * tokens),
    }


def experts_floor(layer: MoELayer, x: torch.Tensor) -> tuple[Callable[[], None], int]:
    """forward+backward of the layer's grouped expert FFN alone on the rows the layer routes from ``x``, in the order
    it computes them, from no gradients; and the number of rows."""
    with torch.no_grad():
        plan = layer.route(x, None)
        rows, _, perm = layer.dispatcher.segments(x, plan)
    counts = perm.counts
    rows = rows.detach().requires_grad_(True)
    grad = torch.randn_like(rows)
    bank = layer.experts

    def step() -> None:
        rows.grad = None
        bank.zero_grad(set_to_none=True)
        y = grouped_gemm_ffn(rows, counts, bank.activation, bank.w_in, bank.w_out, bank.w_gate)
        y.backward(grad)

    return step, rows.shape[0]


# ------------------------------------------------------------------------------------------------------------ a shape


def build_ours(gate: str, d: int, d_ff: int, experts: int, device: torch.device, seed: int) -> MoELayer:
    router = TopKConfig(k=K, renormalize=True) if gate == "top2" else TopAnyConfig()
    layer = MoELayer(d, d_ff, experts, router=router, activation="swiglu", gemm="grouped_mm", seed=seed)
    return layer.to(device).train()


@torch.no_grad()
def calibrate_top_any(top_any: MoELayer, top2: MoELayer, x: torch.Tensor) -> None:
    """Top-Any with top-2's router rows, each threshold between the n_e-th and (n_e+1)-th largest cosine similarity of
    expert e over ``x``, n_e being how many of these tokens top-2 sends to e: every expert takes top-2's load, and the
    layer routes as many rows (avg k 2, plus the tokens it leaves unrouted and sends to their best expert). As
    ``dynmoe_dist.hf.calibrate`` starts a converted model; a fresh Top-Any gate would route a third of the experts."""
    router = top_any.router
    router.weight.copy_(top2.router.weight)
    plan = top2.route(x, None)
    loads = torch.bincount(plan.expert, minlength=router.num_experts)
    cos = F.normalize(x.to(router.weight.dtype), dim=-1) @ F.normalize(router.weight, dim=-1).t()
    ranked = cos.sort(0, descending=True).values  # [tokens, experts]
    tokens = ranked.shape[0]
    n = loads.clamp(1, tokens)
    above = ranked.gather(0, (n - 1)[None])[0]
    below = torch.where(n < tokens, ranked.gather(0, n.clamp(max=tokens - 1)[None])[0], above - 1.0)
    router.threshold.copy_((above + below) / 2)


def to_timed_dtype(layer: MoELayer, dtype: torch.dtype) -> MoELayer:
    """Parameters in the timed dtype, the gate's in float32 (as ``dynmoe_dist.hf.convert`` leaves a bf16 model)."""
    layer.to(dtype)
    layer.router.float()
    return layer


def drop_peer(name: str, peers: dict, runs: dict) -> None:
    """Leave a peer out of the timing (DeepSpeed dropless failing takes capacity 1.0 with it: the same module)."""
    for gone in (name, "ds_cf1") if name == "ds" else (name,):
        peers.pop(gone, None)
        runs.pop(gone, None)


def measure_shape(
    a: argparse.Namespace, device: torch.device, experts: int, d_ff: int, skipped: dict, failures: list[str]
) -> list[dict]:
    """The two rows (top-2 with the peers, Top-Any) of one shape. A peer that cannot be built goes to ``skipped``; one
    whose outputs differ from ours is not timed and goes to ``failures``."""
    d, tokens, dtype = a.d_model, a.tokens, DTYPES[a.dtype]
    g = torch.Generator().manual_seed(a.seed)
    x32 = torch.randn(tokens, d, generator=g).to(device)
    grad32 = torch.randn(tokens, d, generator=g).to(device)
    check = min(a.check_tokens, tokens)

    ours = build_ours("top2", d, d_ff, experts, device, a.seed)
    peers: dict[str, nn.Module] = {}
    runs: dict[str, Callable] = {"ours": run_ours(ours)}
    if "mixtral" in a.peers and "mixtral" not in skipped:
        try:
            peers["mixtral"] = build_mixtral(ours).train()
            runs["mixtral"] = run_mixtral(peers["mixtral"])
        except Exception as exc:  # another transformers' API: report it, keep the other columns
            skipped["mixtral"] = f"building MixtralSparseMoeBlock failed: {type(exc).__name__}: {exc}"
    if "deepspeed" in a.peers and "deepspeed" not in skipped:
        try:
            peers["ds"] = build_deepspeed(ours, drop_tokens=False, device=device).train()
            peers["ds_cf1"] = build_deepspeed(ours, drop_tokens=True, device=device).train()
            runs["ds"] = run_deepspeed(peers["ds"])
            runs["ds_cf1"] = run_deepspeed(peers["ds_cf1"])
        except Exception as exc:  # another DeepSpeed's API
            skipped["deepspeed"] = f"building deepspeed.moe.layer.MoE failed: {type(exc).__name__}: {exc}"
            for name in ("ds", "ds_cf1"):
                peers.pop(name, None)
                runs.pop(name, None)

    # the same function first: float32 on this device, outputs and input gradients
    checks: dict[str, dict] = {}
    with exact_float32():
        ref_y, ref_dx = output_and_input_grad(runs["ours"], ours, x32[:check], grad32[:check])
        for name in ("mixtral", "ds"):
            if name in peers:
                try:
                    y, dx = output_and_input_grad(runs[name], peers[name], x32[:check], grad32[:check])
                except Exception as exc:  # a peer's kernel refusing float32 here: its columns go, the rest stays
                    drop_peer(name, peers, runs)
                    skipped[name] = (
                        f"{experts} experts: its float32 forward+backward failed: {type(exc).__name__}: {exc}"
                    )
                    continue
                checks[name] = compare(y, dx, ref_y, ref_dx)
    for name, c in checks.items():
        if not c["agrees"]:
            failures.append(
                f"{name} at {experts} experts: {c['tokens_off']} of {c['tokens']} tokens differ from ours by more than "
                f"{CHECK_TOLERANCE:g} (largest relative difference {c['largest']:.3g}, float32), so it was not timed"
            )
            drop_peer(name, peers, runs)
    modules = {"ours": ours, **peers}

    # timed: every module in the timed dtype
    to_timed_dtype(ours, dtype)
    for name, module in peers.items():
        module.to(dtype)
        if name.startswith("ds"):
            module.deepspeed_moe.gate.wg.float()  # DeepSpeed routes in float32 (it casts its gate on every call)
    x = x32.to(dtype).requires_grad_(True)
    grad = grad32.to(dtype)
    steps = {name: train_step(runs[name], modules[name], x, grad) for name in runs}
    floor, rows = experts_floor(ours, x.detach())
    steps["experts"] = floor

    top_any = to_timed_dtype(build_ours("top_any", d, d_ff, experts, device, a.seed), dtype)
    calibrate_top_any(top_any, ours, x.detach())
    steps["top_any"] = train_step(run_ours(top_any), top_any, x, grad)
    any_floor, any_rows = experts_floor(top_any, x.detach())
    steps["top_any_experts"] = any_floor

    print(f"bench gpu: {experts} experts, d_ff {d_ff}: timing {', '.join(steps)}", flush=True)
    for name, step in list(steps.items()):  # the first call compiles, allocates and picks kernels: out of the syncs
        try:
            step()
        except Exception as exc:  # a peer failing in the timed dtype loses its column, not the run
            if name not in peers:
                raise
            skipped[name] = f"{experts} experts: its {a.dtype} forward+backward failed: {type(exc).__name__}: {exc}"
            del steps[name]
            runs.pop(name)
    dropped = dropped_share(peers["ds_cf1"], x) if "ds_cf1" in runs else None
    syncs = {name: count_syncs(steps[name], device) for name in dict.fromkeys(("ours", "top_any", *runs))}
    times = interleaved_rounds(steps, a.rounds, a.warmup, device)
    med = {name: statistics.median(s) for name, s in times.items()}

    top2 = {
        "gate": "top2",
        "experts": experts,
        "d_model": d,
        "d_ff": d_ff,
        "tokens": tokens,
        "rows": rows,
        "avg_k": rows / tokens,
        "layer_ms": med["ours"],
        "experts_ms": med["experts"],
        "syncs": syncs["ours"],
        "syncs_target": SYNC_TARGETS["top2"],
        "peer_syncs": {name: n for name, n in syncs.items() if name not in ("ours", "top_any")},
        "checks": checks,
        "ds_cf1_dropped": dropped,
    }
    put_ratio(top2, "layer_over_experts", ratio_stats(times["ours"], times["experts"], TARGETS["top2"]))
    for name in ("mixtral", "ds", "ds_cf1"):
        top2[f"{name}_ms"] = med.get(name)
        ratio = ratio_stats(times["ours"], times[name], TARGETS["peer"]) if name in times else None
        put_ratio(top2, f"ours_over_{name}", ratio)
    top2["verdicts"] = verdicts(top2)
    any_row = {
        "gate": "top_any",
        "experts": experts,
        "d_model": d,
        "d_ff": d_ff,
        "tokens": tokens,
        "rows": any_rows,
        "avg_k": any_rows / tokens,
        "layer_ms": med["top_any"],
        "experts_ms": med["top_any_experts"],
        "syncs": syncs["top_any"],
        "syncs_target": SYNC_TARGETS["top_any"],
    }
    put_ratio(
        any_row, "layer_over_experts", ratio_stats(times["top_any"], times["top_any_experts"], TARGETS["top_any"])
    )
    any_row["verdicts"] = verdicts(any_row)
    return [top2, any_row]


def put_ratio(row: dict, key: str, stats: dict | None) -> None:
    """``key`` (the ratio of medians), ``key_geomean``, ``key_ci95``, ``key_target``, ``key_verdict`` into ``row``;
    None for a peer that did not run."""
    stats = stats or dict.fromkeys(("value", "geomean", "ci95", "target", "verdict"))
    row[key] = stats["value"]
    for field in ("geomean", "ci95", "target", "verdict"):
        row[f"{key}_{field}"] = stats[field]


def verdicts(row: dict) -> str:
    """One cell: each ratio's verdict (met, missed, noise), by ratio, and whether the host syncs are within theirs."""
    names = {"layer_over_experts": "layer", "ours_over_mixtral": "mixtral", "ours_over_ds": "ds"}
    names["ours_over_ds_cf1"] = "ds_cf1"
    cells = [f"{short} {row[f'{key}_verdict']}" for key, short in names.items() if row.get(key) is not None]
    return ", ".join([*cells, f"syncs {'met' if row['syncs'] <= row['syncs_target'] else 'missed'}"])


COLUMNS = [
    "gate",
    "experts",
    "d_ff",
    "avg_k",
    "layer_ms",
    "experts_ms",
    "layer_over_experts",
    "mixtral_ms",
    "ours_over_mixtral",
    "ds_ms",
    "ours_over_ds",
    "ds_cf1_ms",
    "ours_over_ds_cf1",
    "syncs",
    "verdicts",
]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"8:4096,64:512"`` -> [(8, 4096), (64, 512)]: experts and d_ff per shape."""
    try:
        shapes = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"bench gpu: --shapes takes EXPERTS:D_FF[,EXPERTS:D_FF...], got {text!r}")
    return shapes  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default; cuda:N for another GPU) or cpu for a smoke run")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--shapes", default=",".join(f"{e}:{f}" for e, f in SHAPES), help="EXPERTS:D_FF,...")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="the timed dtype (the check is float32)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--check-tokens", type=int, default=4096, help="tokens of the float32 output comparison")
    p.add_argument("--peers", default=",".join(PEERS), help="which peers to run (mixtral, deepspeed; '' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the JSON document here")
    a = p.parse_args(argv)
    a.peers = [name for name in a.peers.split(",") if name]
    if unknown := set(a.peers) - set(PEERS):
        raise SystemExit(f"bench gpu: unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    device = pick_device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shapes = parse_shapes(a.shapes)
    skipped = {
        name: why
        for name, why in (("mixtral", mixtral_unavailable()), ("deepspeed", deepspeed_unavailable()))
        if name in a.peers and why is not None
    }
    for name, why in skipped.items():
        print(f"bench gpu: {name} column skipped: {why}")
    world = (
        one_rank_world(device) if "deepspeed" in a.peers and "deepspeed" not in skipped else contextlib.nullcontext()
    )
    failures: list[str] = []
    with world:
        rows = [row for e, d_ff in shapes for row in measure_shape(a, device, e, d_ff, skipped, failures)]
    meta = {
        "device": str(device),
        "dtype": a.dtype,
        "tokens": a.tokens,
        "d_model": a.d_model,
        "k": K,
        "activation": "swiglu",
        "rounds": a.rounds,
        "warmup": a.warmup,
        "check_tolerance": CHECK_TOLERANCE,
        "check_near_ties": NEAR_TIES,
        "targets": {
            "layer_over_experts": {"top2": TARGETS["top2"], "top_any": TARGETS["top_any"]},
            "ours_over_peer": TARGETS["peer"],
            "syncs": SYNC_TARGETS,
        },
        "timing": ("CUDA events around each call on an idle device" if device.type == "cuda" else "wall clock (CPU)")
        + ", medians over interleaved rounds after a warm-up",
        "syncs": "torch.cuda.set_sync_debug_mode('warn')" if device.type == "cuda" else "op_count.OpCounter",
        "peers": a.peers,
        "skipped": skipped,
        "transformers": package_version("transformers"),
        "threads": torch.get_num_threads(),
    }
    meta["check_failures"] = failures
    emit("gpu", rows, COLUMNS, meta, a.json)
    if failures:
        raise SystemExit("bench gpu: outputs differ, not timed: " + "; ".join(failures))
