"""DeepSpeed engine for the dense parameters (ZeRO stage 0, 1 or 2; fp32 or bf16); the MoE side stays dynmoe_dist's.

DeepSpeed gets a ``DenseView`` of the model (dense modules only) and a client ``torch.optim.AdamW`` over them. Its
own gradient clipping is off: it would clip the dense side by the dense norm alone. Instead a wrapper of the client
optimizer's step scales the dense gradients by the coefficient of one global norm, sqrt(dense^2 + MoE^2), as a chained
optimizer does; the MoE half is measured just before ``engine.step()``. The dense half is DeepSpeed's own number where
it computes one before calling the client (ZeRO 1/2, whose client is called once per parameter group with that group's
fp32 partition, and the bf16 wrapper); with plain fp32 stage 0 the client sees the replicated reduced gradients and the
wrapper measures them. A non-finite global norm skips the client's update (and the MoE side's). The ds_config is
built from the hydra config; ``engine.deepspeed`` adds keys the application does not own (bucket sizes, offload, ...).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch

from ...optim import dense_adamw
from ...optim.clip import scale_gradients, squared_norm
from ...parallel.grads import sync_gradients
from .base import Engine, dense_param_groups
from .dense_view import DenseView


def deepspeed_config(
    batch_size: int, world_size: int, zero_stage: int, precision: str, extra: dict, micro_batches: int = 1
) -> dict:
    """The ds_config for one run, derived from the hydra config (never a second hand-written JSON)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": batch_size * world_size * micro_batches,
        "gradient_clipping": 0.0,  # one global norm over dense + MoE is applied in the client optimizer's step
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # dynmoe_dist reports progress itself
        "wall_clock_breakdown": False,
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def import_deepspeed(device: torch.device | None = None):
    """Import DeepSpeed quietly: its CPU accelerator named up front on a host without CUDA or for a run on the CPU
    (``device``), its INFO lines off.

    DeepSpeed picks its accelerator once, at import, from ``DS_ACCELERATOR`` or else from what the host has: on a GPU
    host a CPU run (``parallel.device=cpu``, the test suite, the CPU benchmarks) would otherwise get the CUDA
    accelerator, which moves the model to a GPU and talks NCCL. A value the user set wins.
    """
    if not torch.cuda.is_available() or (device is not None and device.type == "cpu"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def init_deepspeed_comm(backend: str | None = None, device: torch.device | None = None):
    """``deepspeed.init_distributed`` (wrapping a running ``torch.distributed``, or starting one on ``backend``), then
    unlink the shared-memory segments DeepSpeed's CPU all-reduce leaves behind; returns the deepspeed module.

    Why: where every rank is on one host (``LOCAL_SIZE`` equals the world size), DeepSpeed's SHM comm op creates one
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` segment per rank (about 69 MB each) and never
    unlinks it, so every run on a CPU host leaves its world's segments in ``/dev/shm`` until it fills. Each rank maps
    every peer's segment inside ``init_distributed``; after a barrier no rank opens one again, so each rank removes its
    own name and the mappings live on until the process exits.
    """
    deepspeed = import_deepspeed(device)
    dist = torch.distributed
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else (backend or "gloo"))
    if "nccl" in str(dist.get_backend()):
        return deepspeed  # GPU ranks: the SHM op belongs to DeepSpeed's CPU accelerator
    dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.get_rank()
    )
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(os.path.join("/dev/shm", name))
    return deepspeed


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model, groups, moe_opt, optim_cfg, ds_config: dict, device: torch.device) -> None:
        super().__init__(model, groups, moe_opt, optim_cfg.grad_clip, device)
        deepspeed = init_deepspeed_comm(device=device)
        self.view = DenseView(model)
        # lr 0 until the first step sets it: DeepSpeed's bf16 wrapper takes one zero-gradient step while it sets up,
        # which with a real rate would already apply weight decay
        self.client = dense_adamw(
            dense_param_groups(self.view.parameters(), optim_cfg.weight_decay),
            lr=0.0,
            betas=(optim_cfg.beta1, optim_cfg.beta2),
            eps=optim_cfg.eps,
        )
        self.engine, *_ = deepspeed.initialize(model=self.view, optimizer=self.client, config=ds_config)
        self._step = 0
        self._coef: float | None = None
        self._skip = False
        # DeepSpeed calls the client's step (ZeRO: once per parameter group) with the dense gradients reduced and fp32:
        # there the global norm is formed, the gradients clipped, and a non-finite step skipped (the client's update
        # left out, which DeepSpeed then copies back unchanged, whatever the stage or precision). An instance
        # attribute, not a subclass: DeepSpeed's ZeRO accepts only the optimizer classes it knows.
        adamw_step = self.client.step

        def client_step(*args, **kwargs):
            self._clip_dense(self.client)
            return None if self._skip else adamw_step(*args, **kwargs)

        self.client.step = client_step

    def forward(self, tokens, targets):
        return self.engine(tokens, targets)

    def backward(self, loss, micro_batches=1, last=True):
        self.engine.backward(loss)  # DeepSpeed divides by its gradient_accumulation_steps (= micro_batches) itself
        if last:
            sync_gradients(self.model, self.groups, average=True, dense=False)
        else:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-batch (it must see every one)

    def step(self, lr, moe_lr, step, skip=False):
        self.measure_moe(step)
        self._step, self._coef, self._skip = step, None, skip
        for group in self.client.param_groups:  # under ZeRO these are the flat fp32 partitions' groups
            group["lr"] = lr
        self.engine.step()
        if self._coef is None:  # DeepSpeed skipped its optimizer: its own check found a non-finite dense norm
            self.last_norm, self.skipped = math.nan, True
        else:
            self.skipped = self._skip
        if self.skipped:
            self.skip_moe()
        else:
            self.step_moe(self._coef, moe_lr)
        return self.last_norm

    def _dense_squared_norm(self, params: list[torch.Tensor]) -> float:
        wrapper = self.engine.optimizer
        if wrapper is self.client:  # fp32, stage 0: reduced, replicated gradients in the client's parameters
            return float(squared_norm(params, self.device))
        norm = getattr(wrapper, "_global_grad_norm", None)
        if norm is not None and not math.isfinite(float(norm)):
            return math.nan
        if norm is None:
            raise RuntimeError(
                f"DeepSpeed's {type(wrapper).__name__} computed no gradient norm this step; dynmoe_dist needs it for "
                "the global norm: leave zero_optimization.compute_grad_norm at its default (true)"
            )
        return float(norm) ** 2

    def _clip_dense(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs inside DeepSpeed's step before each client AdamW call: the dense gradients are reduced and fp32."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._coef is None:  # first call of this step (ZeRO calls once per parameter group)
            self._coef = self.combine(self._dense_squared_norm(params), self._step)
            self._skip = self._skip or not math.isfinite(self.last_norm)
        if not self._skip:
            scale_gradients(params, self._coef)
