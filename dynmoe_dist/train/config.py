"""The training application's configuration: typed dataclasses registered in hydra's ConfigStore, plus the checks
of combinations that cannot work.

The YAML files in the top-level ``configs/`` are presets merged into these dataclasses, so hydra rejects an unknown key
or a wrong type itself, naming the key (``Key 'foo' not in 'ModelConfig'``, ``Value 'x' could not be converted to
Integer ... full_key: model.d_model``). ``check_config`` then rejects what each value allows on its own but the
combination does not (an expert-parallel size that does not divide the world, a gate option given to another gate,
...), before any process group starts: a bad combination found later would cost every rank a timeout.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..adapt import AdaptConfig, PolicyConfig
from ..dispatch.shadow import SHADOW_MIN_ROWS
from ..errors import ConfigError, check
from ..experts.grouped import GEMMS
from ..routing.config import CONFIGS, router_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the top-level configs/ of the checkout

# Optional[...] rather than "X | None": OmegaConf reads the annotations at runtime and wants typing's form.
# ruff: noqa: UP007, UP045


def _router_options() -> type:
    """One dataclass with every gate's options, each optional (None: that gate's default), and ``kind``.

    Built from ``routing/config.py``, so a new gate option is accepted here without a second list. Hydra checks each
    option's type; ``check_config`` checks that every option given belongs to the gate ``kind`` names.
    """
    found: dict[str, type] = {}
    for cls in CONFIGS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            found.setdefault(f.name, hint)
    found.pop("kind")
    specs = [("kind", str, "top_any")] + [(n, Optional[t], None) for n, t in sorted(found.items())]
    cls = dataclasses.make_dataclass("RouterOptions", specs)
    cls.__module__ = __name__
    cls.__doc__ = "Gate options: `kind` picks the gate; every other field belongs to some gate and defaults to None."
    return cls


RouterOptions = _router_options()


# moe=family: a converted model=hf keeps its family's own routing rule (hf.families.family_router)
FAMILY = "family"


def gates_with(option: str) -> list[str]:
    return sorted(kind for kind, cls in CONFIGS.items() if option in {f.name for f in dataclasses.fields(cls)})


@dataclass
class UpcycleSettings:
    """``model=hf``: a dense Llama, Mistral, Qwen2 or Qwen3 MLP copied into experts (``dynmoe_dist.hf.upcycle``)."""

    num_experts: Optional[int] = None  # experts per upcycled layer; None: no upcycling
    layers: Optional[list[int]] = None  # decoder layer indices to upcycle; None: every layer
    noise: float = 0.0  # each copy's weights times (1 + noise * N(0, 1))
    drop: float = 0.0  # Drop-Upcycling: this fraction of each copy's units re-initialised


@dataclass
class ModelConfig:
    """Decoder-only transformer: pre-norm blocks, tied embeddings; every ``moe_every``-th block has an MoE layer.
    ``kind=hf`` (``model=hf``) trains a transformers model from a local folder instead (train/hf_model.py); the demo's
    shape keys are then unused, which is why they may be null."""

    vocab_size: int = 256  # byte-level tokens by default (model=hf: the model's own)
    d_model: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    d_ff: Optional[int] = None  # hidden size of the dense blocks' MLP
    max_seq_len: Optional[int] = None
    moe_every: int = 2  # blocks 2, 4, ... (1-based) hold an MoE layer; 1: every block
    positions: str = "rotary"  # rotary | learned
    norm: str = "layernorm"  # layernorm | rmsnorm
    dropout: float = 0.0
    kind: str = "demo"  # demo (the transformer of train/model.py) | hf (a transformers model folder)
    path: Optional[str] = None  # hf: the local model folder (config.json, weights, tokenizer)
    convert: bool = False  # hf: convert its MoE blocks; moe=family keeps its routing, any other gate replaces it
    upcycle: UpcycleSettings = field(default_factory=UpcycleSettings)


@dataclass
class MoESettings:
    num_experts: int = 8  # at start; adaptation changes it between adapt.min_experts and adapt.max_experts
    d_ff: Optional[int] = None  # expert hidden size; None: model.d_ff
    activation: str = "gelu"  # gelu | swiglu
    capacity_factor: Optional[float] = None  # None: dropless
    # the experts' matrix products: auto (CUDA grouped GEMM where it serves, oneDNN for float32 on CPU, else loop) |
    # loop (aten's mm) | onednn | grouped_mm (experts/grouped.py)
    gemm: str = "auto"
    num_shared_experts: int = 0  # DeepSeekMoE's always-on experts, dense parameters (never adapted)
    shared_d_ff: Optional[int] = None  # hidden size of each shared expert; None: the routed experts' d_ff
    check_finite: bool = False
    # per step, copy up to this many of the busiest rank's hottest experts to the ranks that send them rows, which
    # then compute some of those rows themselves (FasterMoE's shadowing; 0: off); only shadows that move at least
    # shadow_min_rows rows in all are made (dispatch/shadow.py)
    shadow_experts: int = 0
    shadow_min_rows: int = SHADOW_MIN_ROWS
    router: RouterOptions = field(default_factory=RouterOptions)  # type: ignore[valid-type]


@dataclass
class AdaptSettings:
    """DynMoE's adaptation schedule and rule (docs/ALGORITHMS.md section 5), counted in optimizer steps."""

    enabled: bool = True
    record_steps: int = 300
    idle_steps: int = 600
    min_experts: int = 1
    max_experts: int = 64
    max_add: int = 1
    init: str = "copy"  # copy | random (init=dense needs FFN weights: library API only)
    direction: str = "centered"  # a new expert's gate row: centered (unrouted mean less the routed mean) | mean
    add_min_share: float = 0.01  # add only when more than this share of the window's tokens went unrouted (0: any)
    rebalance_threshold: Optional[float] = 1.25  # max/mean rank load that triggers a rebalance; None: never
    max_experts_per_rank: Optional[int] = None
    tolerance: float = 0.05
    # no event in the run's last idle_steps (at least 1) steps, where it could not settle; false: every window acts
    # (the reference code), also at the last step
    skip_near_end: bool = True


@dataclass
class ParallelConfig:
    world_size: Optional[int] = None  # the ranks this run expects; a launch with another count stops at once
    ep_size: Optional[int] = None  # expert-parallel size; None: the world size
    timeout_s: float = 600.0  # bound on every collective: a dead rank becomes an error, not a hang
    device: str = "auto"  # auto (cuda when present) | cpu | cuda


@dataclass
class EngineConfig:
    name: str = "deepspeed"  # deepspeed | torch
    zero_stage: int = 0  # DeepSpeed ZeRO stage for the dense parameters: 0, 1 or 2
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp64 (oracle tests)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra ds_config keys (e.g. zero bucket sizes)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    moe_lr: Optional[float] = None  # None: lr
    threshold_lr_scale: float = 1.0  # Top-Any's thresholds train at moe_lr times this (docs/ALGORITHMS.md section 6)
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # dense matrices only; norms, embeddings' bias-free rows and MoE parameters: none
    grad_clip: float = 1.0  # on one global norm over dense and MoE gradients; 0: off
    # a step whose loss or gradient norm is NaN/Inf on any rank is skipped on every rank; this many in a row stop it
    max_skipped: int = 5


@dataclass
class DataConfig:
    source: str = "stdlib"  # stdlib | text | jsonl | bin
    path: Optional[str] = None  # text: a file or folder; jsonl: a file; bin: a file of tokens
    pattern: str = "*"  # text folders: files matching this glob, recursively
    text_field: str = "text"  # jsonl
    dtype: str = "uint16"  # bin: uint16 | uint32
    val_fraction: float = 0.02
    seq_len: int = 128
    batch_size: int = 16  # sequences per rank and micro-batch
    # sequences per optimizer step over the whole world: batch_size x ranks x micro-batches (gradient accumulation);
    # None: batch_size x ranks (one micro-batch). Kept fixed, a run sees the same batches on any number of ranks.
    global_batch: Optional[int] = None
    val_sequences: int = 64  # validation sequences (over the world), the same set whatever the world size
    seed: int = 1234
    # auto (model=hf: the model folder's own, else bytes) | bytes | model (the model folder's tokenizer; text, jsonl and
    # stdlib sources are tokenised once into a memory-mapped file under <out_dir>/tokenized, train/tokens.py)
    tokenizer: str = "auto"


@dataclass
class LoggingConfig:
    every: int = 10  # steps per metrics line
    val_every: int = 50
    wandb: str = "offline"  # online | offline | disabled
    project: str = "dynmoe_dist"
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines | none


@dataclass(init=False, repr=False, eq=False)  # its own __init__: ``async`` is a Python keyword, so no class-body field
class CheckpointSettings:
    every: int = 0  # steps between checkpoints (and one at the end); 0: none
    keep: int = 3  # the newest checkpoints kept under <out_dir>/<name>/checkpoints
    # async: the state copied to host memory at the step, written by a background thread while training goes on,
    # published (renamed into place, ``latest``) at a later step boundary once every rank's shards are on disk
    __annotations__["async"] = bool
    locals()["async"] = False

    def __init__(self, every: int = 0, keep: int = 3, **options: bool) -> None:
        self.every, self.keep = every, keep
        setattr(self, "async", bool(options.pop("async", False)))
        if options:
            raise TypeError(f"CheckpointSettings: unknown option(s) {sorted(options)}")

    @property
    def in_background(self) -> bool:
        """``checkpoint.async`` (spelled so in the config; not an attribute name Python code can write)."""
        return getattr(self, "async")

    def __repr__(self) -> str:
        return f"CheckpointSettings(every={self.every}, keep={self.keep}, async={self.in_background})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckpointSettings) and repr(self) == repr(other)


@dataclass
class TrainConfig:
    name: str = "demo"
    out_dir: str = "runs"
    overwrite: bool = False  # replace an earlier run of the same name that has no checkpoint to resume
    resume: str = "auto"  # auto (the run's latest checkpoint, if any) | none | a checkpoint or run folder
    seed: int = 0
    steps: int = 300
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoESettings = field(default_factory=MoESettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)


def load_config(overrides: list[str] | tuple[str, ...] = (), config_dir: str | None = None) -> TrainConfig:
    """The ``TrainConfig`` the command line ``dynmoe-train <overrides>`` would run (for scripts, tests, benchmarks).

    Composes ``configs/`` (or ``config_dir``) with hydra's compose API, so presets, types and unknown keys behave
    exactly as on the command line. ``check_config`` is not applied: it needs the world size.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir or CONFIG_DIR)):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))  # type: ignore[return-value]


def register_configs() -> None:
    """The schema the YAML presets merge into; ``configs/config.yaml`` lists it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


# --------------------------------------------------------------------------------------------------------------------
# combinations


CHOICES = {
    "model.positions": ("rotary", "learned"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.kind": ("demo", "hf"),
    "data.tokenizer": ("auto", "bytes", "model"),
    "moe.activation": ("gelu", "swiglu"),
    "moe.gemm": GEMMS,
    "adapt.init": ("copy", "random"),
    "parallel.device": ("auto", "cpu", "cuda"),
    "engine.name": ("deepspeed", "torch"),
    "engine.precision": ("auto", "fp32", "bf16", "fp64"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.source": ("stdlib", "text", "jsonl", "bin"),
    "data.dtype": ("uint16", "uint32"),
    "logging.wandb": ("online", "offline", "disabled"),
    "logging.progress": ("auto", "bar", "lines", "none"),
}

# ds_config keys the application derives from the hydra config; setting them in engine.deepspeed would fork the truth
OWNED_DS_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "bf16",
    "fp16",
    "zero_optimization.stage",
)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def router_spec(moe: Any) -> dict[str, Any]:
    """The gate options that were given (None fields dropped), with ``kind``: what ``MoELayer(router=...)`` takes."""
    opts = moe.router
    names = [f.name for f in dataclasses.fields(RouterOptions)]
    return {n: _get(opts, n) for n in names if _get(opts, n) is not None}


def adapt_config(a: AdaptSettings, steps: int | None = None) -> AdaptConfig:
    """The library's adaptation settings; ``steps``: the run's length (``adapt.skip_near_end`` needs it)."""
    policy = PolicyConfig(
        min_experts=a.min_experts,
        max_experts=a.max_experts,
        max_add=a.max_add,
        init=a.init,
        direction=a.direction,
        add_min_share=a.add_min_share,
    )
    return AdaptConfig(
        record_steps=a.record_steps,
        idle_steps=a.idle_steps,
        policy=policy,
        rebalance_threshold=a.rebalance_threshold,
        max_experts_per_rank=a.max_experts_per_rank,
        tolerance=a.tolerance,
        end_step=steps if a.skip_near_end else None,
    )


def micro_batches(data: Any, world_size: int) -> int:
    """Micro-batches per optimizer step on ``world_size`` ranks (``check_config`` made sure they divide evenly)."""
    if data.global_batch is None:
        return 1
    return data.global_batch // (data.batch_size * world_size)


def global_batch_of(data: Any, world_size: int) -> int:
    return data.global_batch if data.global_batch is not None else data.batch_size * world_size


def _check_global_batch(d: Any, world_size: int) -> None:
    """A global batch must be a whole number of micro-batches of ``batch_size`` on every rank; refuse with the nearest
    values that work (another global batch, or another per-rank batch size for this one)."""
    g, b = d.global_batch, d.batch_size
    if g is None:
        return
    check(g > 0, "data.global_batch", g, "a number of sequences > 0, or null (data.batch_size x ranks)")
    per_micro = b * world_size
    if g % per_micro == 0:
        return
    lower, upper = (g // per_micro) * per_micro, (g // per_micro + 1) * per_micro
    near = " or ".join(str(v) for v in (lower, upper) if v > 0)
    sizes = ""
    if g % world_size == 0:
        fits = [s for s in range(1, g // world_size + 1) if (g // world_size) % s == 0]
        best = sorted(fits, key=lambda s: (abs(s - b), -s))[:2]
        sizes = f", or keep it with data.batch_size={' or '.join(str(s) for s in sorted(best))}"
    raise ConfigError(
        "data.global_batch",
        g,
        f"a multiple of data.batch_size x ranks = {b} x {world_size} = {per_micro} (one micro-batch on every rank): "
        f"data.global_batch={near}{sizes}",
    )


def ep_size_for(cfg: Any, world_size: int) -> int:
    return world_size if cfg.parallel.ep_size is None else cfg.parallel.ep_size


# where each launcher says how many ranks it started, for messages about a world size that does not fit
WORLD_VARIABLES = {
    "torchrun": "WORLD_SIZE",
    "deepspeed": "WORLD_SIZE",
    "slurm": "SLURM_NTASKS",
    "openmpi": "OMPI_COMM_WORLD_SIZE",
    "mpich": "PMI_SIZE",
    "mpi4py": "the MPI world size",
    "single": "a single process (no launcher)",
}


def check_config(cfg: Any, world_size: int, launcher: str = "single") -> None:
    """Raise ``ConfigError`` naming the setting when the configuration cannot work on ``world_size`` ranks."""
    expected = cfg.parallel.world_size
    if expected is not None and expected != world_size:
        started = WORLD_VARIABLES.get(launcher, "the launcher")
        raise ConfigError(
            "parallel.world_size",
            expected,
            f"the number of ranks the launcher started: {world_size} ({started}={world_size}, {launcher}); start "
            f"{expected} ranks (Slurm: --nodes x --ntasks-per-node; torchrun: --nnodes x --nproc_per_node) or set "
            f"parallel.world_size={world_size}",
        )
    for key, allowed in CHOICES.items():
        check(_get(cfg, key) in allowed, key, _get(cfg, key), " | ".join(allowed))
    m, moe, a, d = cfg.model, cfg.moe, cfg.adapt, cfg.data
    if m.kind == "hf":
        _check_hf_model(cfg)
    else:
        _check_demo_model(cfg)
    positive = {
        "steps": cfg.steps,
        "moe.num_experts": moe.num_experts,
        "data.seq_len": d.seq_len,
        "data.batch_size": d.batch_size,
        "data.val_sequences": d.val_sequences,
        "logging.every": cfg.logging.every,
        "logging.val_every": cfg.logging.val_every,
        "parallel.timeout_s": cfg.parallel.timeout_s,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        check(value > 0, key, value, "a number > 0")
    check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "a fraction in (0, 1)")
    check(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "steps between checkpoints, 0 for none")
    check(bool(cfg.resume), "resume", cfg.resume, "auto, none, or the path of a checkpoint or run folder")
    if d.source in ("text", "jsonl", "bin"):
        check(d.path is not None, "data.path", None, f"a path to the {d.source} data (data.source={d.source})")
    if moe.d_ff is not None:
        check(moe.d_ff > 0, "moe.d_ff", moe.d_ff, "an integer > 0 or null (model.d_ff)")
    check(moe.num_shared_experts >= 0, "moe.num_shared_experts", moe.num_shared_experts, "an integer >= 0")
    if moe.shared_d_ff is not None:
        check(moe.shared_d_ff > 0, "moe.shared_d_ff", moe.shared_d_ff, "an integer > 0 or null (the experts' d_ff)")
    check(moe.shadow_experts >= 0, "moe.shadow_experts", moe.shadow_experts, "an integer >= 0 (0: no shadows)")
    check(moe.shadow_min_rows >= 1, "moe.shadow_min_rows", moe.shadow_min_rows, "an integer >= 1")
    if moe.capacity_factor is not None:
        check(moe.capacity_factor > 0, "moe.capacity_factor", moe.capacity_factor, "null (dropless) or > 0")

    _check_global_batch(d, world_size)
    _check_router(moe, a)
    _check_adapt(cfg, a, world_size)
    _check_engine(cfg)
    ep = ep_size_for(cfg, world_size)
    check(
        isinstance(ep, int) and ep >= 1 and world_size % ep == 0,
        "parallel.ep_size",
        ep,
        f"a divisor of the world size {world_size} (the number of ranks the launcher started)",
    )
    check(math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "a learning rate > 0")
    check(
        cfg.optim.max_skipped >= 1,
        "optim.max_skipped",
        cfg.optim.max_skipped,
        "an integer >= 1 (consecutive non-finite steps skipped before the run stops)",
    )
    check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "an integer >= 0")
    check(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "a ratio in [0, 1]")


def _check_demo_model(cfg: Any) -> None:
    m, d = cfg.model, cfg.data
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
        value = getattr(m, key)
        check(value is not None, f"model.{key}", value, "a value: model=demo, small or tiny sets every model key")
        check(value > 0, f"model.{key}", value, "a number > 0")
    check(m.vocab_size > 0, "model.vocab_size", m.vocab_size, "a number > 0")
    check(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads, f"a divisor of model.d_model={m.d_model}")
    if m.positions == "rotary":
        head = m.d_model // m.n_heads
        check(
            head % 2 == 0,
            "model.n_heads",
            m.n_heads,
            f"a head size d_model/n_heads that is even for rotary, not {head}",
        )
    check(1 <= m.moe_every <= m.n_layers, "model.moe_every", m.moe_every, f"1..model.n_layers={m.n_layers}")
    check(0 <= m.dropout < 1, "model.dropout", m.dropout, "a probability in [0, 1)")
    check(
        d.seq_len <= m.max_seq_len,
        "data.seq_len",
        d.seq_len,
        f"at most model.max_seq_len={m.max_seq_len} (the longest sequence the model's positions cover)",
    )
    check(d.tokenizer != "model", "data.tokenizer", d.tokenizer, "auto or bytes (model: with model=hf, its tokenizer)")
    check(cfg.moe.router.kind != FAMILY, "moe", FAMILY, "a gate preset (moe=family: a converted model=hf only)")


def _check_hf_model(cfg: Any) -> None:
    """What the config alone says about ``model=hf``; the folder itself is read by ``hf_model.inspect_folder``."""
    m, u = cfg.model, cfg.model.upcycle
    check(m.path is not None, "model.path", None, "the local folder of a transformers model (model=hf)")
    if u.num_experts is not None:
        check(u.num_experts >= 1, "model.upcycle.num_experts", u.num_experts, "an integer >= 1, or null (no upcycle)")
        check(
            not m.convert, "model.convert", True, "false with model.upcycle.num_experts: convert or upcycle, not both"
        )
        check(
            cfg.moe.router.kind != FAMILY,
            "moe",
            FAMILY,
            "a gate for the upcycled experts (e.g. moe=top_any): moe=family keeps a converted MoE model's own routing",
        )
    check(u.noise >= 0, "model.upcycle.noise", u.noise, "a scale >= 0 (0: exact copies)")
    check(0 <= u.drop <= 1, "model.upcycle.drop", u.drop, "a fraction in [0, 1]")


def _check_router(moe: Any, a: AdaptSettings) -> None:
    spec = router_spec(moe)
    kind = spec["kind"]
    if kind == FAMILY:  # a converted model's own top-k rule (model=hf): no options, the model's config sets them
        extra = sorted(set(spec) - {"kind"})
        check(not extra, f"moe.router.{extra[0]}" if extra else "moe.router", "set", "unset with moe=family")
        return
    check(kind in CONFIGS, "moe.router.kind", kind, " | ".join(sorted(CONFIGS)))
    own = {f.name for f in dataclasses.fields(CONFIGS[kind])}
    for option in sorted(set(spec) - own):
        raise ConfigError(
            f"moe.router.{option}",
            spec[option],
            f"options of the {kind} gate only ({', '.join(sorted(own - {'kind'}))}); {option} belongs to "
            f"{', '.join(gates_with(option))}: pick that gate with moe=<gate>, or drop moe.router.{option}",
        )
    try:
        gate = router_config(spec)
    except ConfigError as exc:
        raise ConfigError(f"moe.router.{exc.setting.removeprefix('router.')}", exc.value, exc.allowed) from None
    fewest = min(moe.num_experts, a.min_experts) if a.enabled else moe.num_experts
    for option in ("k", "k_max"):
        value = getattr(gate, option, None)
        if value is not None and value > fewest:
            why = "adapt.min_experts, the fewest experts adaptation may leave" if a.enabled else "moe.num_experts"
            raise ConfigError(f"moe.router.{option}", value, f"at most {why} ({fewest})")


def _check_adapt(cfg: Any, a: AdaptSettings, world_size: int) -> None:
    if not a.enabled:
        return
    adapt_config(a)  # its own checks: windows, min <= max, init rule
    n = cfg.moe.num_experts
    check(
        cfg.model.kind == "hf" or a.min_experts <= n <= a.max_experts,  # hf: the model's counts (hf_model.py)
        "moe.num_experts",
        n,
        f"between adapt.min_experts={a.min_experts} and adapt.max_experts={a.max_experts}",
    )
    if a.max_experts_per_rank is not None:
        ep = ep_size_for(cfg, world_size)
        check(
            a.max_experts_per_rank * ep >= a.max_experts,
            "adapt.max_experts_per_rank",
            a.max_experts_per_rank,
            f">= adapt.max_experts / ep_size = {math.ceil(a.max_experts / ep)} so that {a.max_experts} experts fit",
        )


def _check_engine(cfg: Any) -> None:
    e = cfg.engine
    check(e.zero_stage in (0, 1, 2), "engine.zero_stage", e.zero_stage, "0, 1 or 2")
    if e.name == "torch":
        check(e.zero_stage == 0, "engine.zero_stage", e.zero_stage, "0 with engine=torch (ZeRO is DeepSpeed's)")
        check(not e.deepspeed, "engine.deepspeed", dict(e.deepspeed), "empty with engine=torch")
    else:
        check(e.precision != "fp64", "engine.precision", e.precision, "auto, fp32 or bf16 with DeepSpeed (fp64: torch)")
    for key in OWNED_DS_KEYS:
        head, _, tail = key.partition(".")
        if head in e.deepspeed and (not tail or tail in (e.deepspeed[head] or {})):
            raise ConfigError(
                f"engine.deepspeed.{key}",
                e.deepspeed[head][tail] if tail else e.deepspeed[head],
                "unset: the application derives it (batch sizes from data.batch_size, clipping from optim.grad_clip, "
                "precision from engine.precision, the stage from engine.zero_stage)",
            )
