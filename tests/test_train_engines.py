"""The two engines on real ranks (gloo): DeepSpeed at ZeRO 0/1/2 gives the torch engine's losses through adaptation
events, DeepSpeed never reduces, broadcasts, flattens or overwrites an MoE parameter, and the global gradient norm is
the norm of the whole model's gradient."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from dynmoe_dist.adapt import AdaptController
from dynmoe_dist.optim import MoEAdam
from dynmoe_dist.parallel.grads import moe_parameter_kinds
from dynmoe_dist.train.config import adapt_config
from dynmoe_dist.train.data import SequenceStream
from dynmoe_dist.train.engines import DeepSpeedEngine, TorchEngine, deepspeed_config
from dynmoe_dist.train.model import Transformer
from dynmoe_dist.train.trainer import Trainer

import dist_pool
from train_support import EVENTS, config, deepspeed_env, seed_events, small_corpus

STEPS = 20


def case_train(engine: list[str]) -> dict:
    deepspeed_env()
    cfg = config(*EVENTS, f"steps={STEPS}", *engine)
    trainer = Trainer(cfg, small_corpus(), dist_pool.groups(dist.get_world_size()), torch.device("cpu"))
    seed_events(trainer.model)
    shared = [p for layer in trainer.model.moe_layers() if layer.shared is not None for p in layer.shared.parameters()]
    if trainer.engine.name == "deepspeed":  # shared experts are dense: DeepSpeed owns them
        owned = {id(p) for p in trainer.engine.engine.module.parameters()}
        assert all(id(p) in owned for p in shared)
    losses, norms, events = [], [], []
    for _ in range(STEPS):
        result = trainer.train_step()
        losses.append(result.loss)
        norms.append(result.grad_norm)
        events += [(e.step, e.layer, e.kind, e.added, e.removed, e.moved) for e in result.events if e.committed]
    return {"losses": losses, "norms": norms, "events": events, "shared": len(shared)}


@pytest.fixture(scope="module")
def torch_run() -> list[dict]:
    return dist_pool.pool(2).run(case_train, ["engine=torch"])


def test_reference_run_has_adds_removes_and_rebalances(torch_run: list[dict]) -> None:
    events = torch_run[0]["events"]
    assert any(e[3] for e in events), events  # added
    assert any(e[4] for e in events), events  # removed
    assert any(e[2] == "rebalance" and e[5] for e in events), events  # experts moved with no add or remove
    assert torch_run[0]["events"] == torch_run[1]["events"]  # every rank applied the same events
    assert max(torch_run[0]["norms"]) > 1.0  # clipping (optim.grad_clip=1) was active: the norm matters


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_equals_torch_engine(torch_run: list[dict], stage: int) -> None:
    ds = dist_pool.pool(2).run(case_train, ["engine=deepspeed", f"engine.zero_stage={stage}"])
    for rank in range(2):
        assert ds[rank]["events"] == torch_run[rank]["events"]
        for step, (a, b) in enumerate(zip(ds[rank]["losses"], torch_run[rank]["losses"])):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5), f"rank {rank} step {step + 1}: {a} vs {b}"
        for a, b in zip(ds[rank]["norms"], torch_run[rank]["norms"]):
            assert a == pytest.approx(b, rel=1e-5)


SHARED = ["moe.num_shared_experts=2", "moe.shared_d_ff=16"]


@pytest.fixture(scope="module")
def torch_shared_run() -> list[dict]:
    return dist_pool.pool(2).run(case_train, ["engine=torch", *SHARED])


@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_equals_torch_engine_with_shared_experts(torch_shared_run: list[dict], stage: int) -> None:
    """Shared experts are dense: DeepSpeed reduces and steps them, the torch engine does; the losses agree."""
    ref = torch_shared_run
    ds = dist_pool.pool(2).run(case_train, ["engine=deepspeed", f"engine.zero_stage={stage}", *SHARED])
    assert ds[0]["shared"] == ref[0]["shared"] == 2 * 1  # w_in, w_out in the tiny model's one MoE block
    assert any(e[3] or e[4] for e in ref[0]["events"])  # experts were added or removed around the shared ones
    for rank in range(2):
        assert ds[rank]["events"] == ref[rank]["events"]
        for step, (a, b) in enumerate(zip(ds[rank]["losses"], ref[rank]["losses"])):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-5), f"rank {rank} step {step + 1}: {a} vs {b}"


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed keeps its hands off the MoE side


class CollectiveSpy:
    """Wraps torch.distributed's collectives (the real ones still run) and records the storages they touch."""

    NAMES = (
        "all_reduce",
        "broadcast",
        "reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "all_to_all_single",
        "all_reduce_coalesced",
    )

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.saved = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    def __enter__(self) -> CollectiveSpy:
        for name, fn in self.saved.items():
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            for t in list(args) + list(kwargs.values()):
                for x in t if isinstance(t, (list, tuple)) else [t]:
                    if isinstance(x, torch.Tensor):
                        self.seen.append((name, x.untyped_storage().data_ptr()))
            return fn(*args, **kwargs)

        return spy


def moe_storages(model) -> dict[int, str]:
    kinds = moe_parameter_kinds(model)
    out = {}
    for p in kinds["gate"] + kinds["expert"]:
        out[p.untyped_storage().data_ptr()] = "parameter"
        if p.grad is not None:
            out[p.grad.untyped_storage().data_ptr()] = "gradient"
    return out


def check_untouched(model, engine: DeepSpeedEngine, spy: CollectiveSpy, where: str) -> None:
    kinds = moe_parameter_kinds(model)
    moe = kinds["gate"] + kinds["expert"]
    ds_params = {id(p) for p in engine.engine.module.parameters()}
    ds_params |= {id(p) for g in engine.client.param_groups for p in g["params"]}
    for p in moe:
        assert id(p) not in ds_params, f"{where}: DeepSpeed holds an MoE parameter"
        assert p.dtype == torch.float32, f"{where}: an MoE parameter was cast to {p.dtype}"
        own = p.untyped_storage().nbytes() == p.numel() * p.element_size()
        assert own, f"{where}: an MoE parameter is a view into a larger (flattened) buffer"
    touched = [(name, moe_storages(model)[ptr]) for name, ptr in spy.seen if ptr in moe_storages(model)]
    assert not touched, f"{where}: collectives on MoE storage: {touched}"


def case_hands_off(stage: int, precision: str) -> dict:
    deepspeed_env()
    rank = dist.get_rank()
    cfg = config(*EVENTS, "engine=deepspeed", f"engine.zero_stage={stage}", f"engine.precision={precision}")
    groups = dist_pool.groups(2)
    model = Transformer(cfg.model, cfg.moe, groups, seed=0)
    seed_events(model)
    with torch.no_grad():  # gate rows are replicated by construction: make them differ, so a broadcast would show
        for p in moe_parameter_kinds(model)["gate"]:
            p.add_(0.001 * (rank + 1))
    moe_opt = MoEAdam.for_moe(model, lr=1e-3)
    before = {id(p): (p, p.detach().clone(), p.data_ptr()) for p in moe_opt.param_groups[0]["params"]}
    ds = deepspeed_config(cfg.data.batch_size, 2, stage, precision, {})
    with CollectiveSpy() as spy:
        engine = DeepSpeedEngine(model, groups, moe_opt, cfg.optim, ds, torch.device("cpu"))
    for p, value, ptr in before.values():  # not broadcast from rank 0, not flattened, not cast
        assert torch.equal(p.detach(), value) and p.data_ptr() == ptr
    check_untouched(model, engine, spy, "after deepspeed.initialize")

    adapt = AdaptController(model, moe_opt, groups, adapt_config(cfg.adapt))
    stream = SequenceStream(small_corpus().train, 32, 4, rank, 2, 0, 256)
    snapshots = []
    original_step_moe = engine.step_moe

    def step_moe(coef, moe_lr):  # DeepSpeed's step has run: the MoE parameters must be as they were before it
        snapshots.append(all(torch.equal(p.detach(), v) for p, v in pre_step))
        original_step_moe(coef, moe_lr)

    engine.step_moe = step_moe
    events = 0
    for step in range(1, 13):
        tokens, targets = stream.next_batch()
        with CollectiveSpy() as spy:
            loss, _ = engine.forward(tokens, targets)
            engine.backward(loss)
            kinds = moe_parameter_kinds(model)
            pre_step = [(p, p.detach().clone()) for p in kinds["gate"] + kinds["expert"]]
            engine.step(1e-3, 1e-3, step)
        check_untouched(model, engine, spy, f"step {step}")
        events += sum(e.committed for e in adapt.step())
    check_untouched(model, engine, CollectiveSpy(), "after the events")
    return {"events": events, "unchanged_by_deepspeed_step": all(snapshots), "steps": len(snapshots)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_never_touches_moe_parameters(stage: int, precision: str) -> None:
    for result in dist_pool.pool(2).run(case_hands_off, stage, precision):
        assert result["events"] >= 2  # parameters were replaced by new objects in between, and checked again
        assert result["steps"] == 12 and result["unchanged_by_deepspeed_step"]


# ----------------------------------------------------------------------------------------------------------------------
# the global norm


def case_global_norm(ep_size: int) -> dict:
    """The engine's norm equals the norm of every gradient in the model, each parameter counted once."""
    cfg = config("moe=top_k", "moe.num_experts=4", f"parallel.ep_size={ep_size}", "optim.grad_clip=0")
    groups = dist_pool.groups(ep_size)
    model = Transformer(cfg.model, cfg.moe, groups, seed=0)
    engine = TorchEngine(model, groups, MoEAdam.for_moe(model, lr=0.0), cfg.optim, "fp32", torch.device("cpu"))
    stream = SequenceStream(small_corpus().train, 32, 4, dist.get_rank(), dist.get_world_size(), 0, 256)
    loss, _ = engine.forward(*stream.next_batch())
    engine.backward(loss)
    kinds = moe_parameter_kinds(model)
    replicated = sum(float(p.grad.double().square().sum()) for p in kinds["dense"] + kinds["gate"])
    # every expert's gradient, gathered from its owner in the first expert-parallel group
    expert = torch.tensor([sum(float(p.grad.double().square().sum()) for p in kinds["expert"])], dtype=torch.float64)
    everyone = [torch.zeros_like(expert) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, expert)
    truth = math.sqrt(replicated + sum(float(t) for t in everyone[:ep_size]))
    norm = engine.step(0.0, 0.0, 1)
    return {"norm": norm, "truth": truth}


@pytest.mark.parametrize("ep_size", [1, 2])
def test_global_norm_counts_every_gradient_once(ep_size: int) -> None:
    for result in dist_pool.pool(2).run(case_global_norm, ep_size):
        assert result["norm"] == pytest.approx(result["truth"], rel=1e-9)


@pytest.mark.parametrize(
    ("cuda", "device", "expected"), [(True, "cpu", "cpu"), (True, "cuda", None), (False, None, "cpu")]
)
def test_deepspeed_takes_the_cpu_accelerator_for_a_cpu_run(monkeypatch, cuda: bool, device, expected) -> None:
    """On a GPU host a CPU run (parallel.device=cpu, CPU benchmarks) must not get DeepSpeed's CUDA accelerator, which
    would move the model to a GPU; a GPU run leaves DeepSpeed to pick, and a user's own DS_ACCELERATOR always wins."""
    from dynmoe_dist.train.engines.deepspeed_engine import import_deepspeed

    # imported for real first, on the suite's CPU accelerator: DeepSpeed fixes its accelerator at its first import,
    # which must not happen below with CUDA faked and the variable cleared (later tests in this process would get CUDA)
    import_deepspeed(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    import_deepspeed(None if device is None else torch.device(device))
    assert os.environ.get("DS_ACCELERATOR") == expected
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    import_deepspeed(torch.device("cpu"))
    assert os.environ["DS_ACCELERATOR"] == "xpu"


# ----------------------------------------------------------------------------------------------------------------------
# bf16


def case_precision(engine: str, precision: str) -> dict:
    """16 steps of the application's tiny run (adaptation on), validation at steps 0, 8 and 16."""
    deepspeed_env()
    overrides = ("adapt.record_steps=3", "adapt.idle_steps=1", "adapt.min_experts=2", "adapt.rebalance_threshold=1.01")
    cfg = config(*overrides, f"engine={engine}", f"engine.precision={precision}", "steps=16")
    trainer = Trainer(cfg, small_corpus(), dist_pool.groups(dist.get_world_size()), torch.device("cpu"))
    val, norms = [trainer.evaluate()["loss"]], []
    for step in range(1, 17):
        norms.append(trainer.train_step().grad_norm)
        if step % 8 == 0:
            val.append(trainer.evaluate()["loss"])
    return {"precision": trainer.precision, "val": val, "norms": norms}


@pytest.mark.parametrize("engine", ["deepspeed", "torch"])
def test_bf16_tracks_the_fp32_run(engine: str) -> None:
    """bf16 (DeepSpeed's bf16 engine; autocast under the torch engine, where the routed rows travel and compute in
    bf16 with autocast off inside the layer) trains the same run as fp32 within bf16's rounding."""
    pool = dist_pool.pool(2)
    fp32, bf16 = (pool.run(case_precision, engine, precision)[0] for precision in ("fp32", "bf16"))
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert all(math.isfinite(n) for n in bf16["norms"])
    assert bf16["val"] != fp32["val"]  # the run really computed in bf16
    assert bf16["val"] == pytest.approx(fp32["val"], rel=0.03) and bf16["val"][-1] < bf16["val"][0]
