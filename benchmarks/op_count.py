"""What a piece of code dispatches: every aten op, and the ops that would make the host wait for a GPU.

Why count on the CPU: on a GPU every aten op is at least one kernel launch, and an op whose result size or value is
computed on the device (``item``, ``nonzero``, a boolean index, ``bincount``, ...) blocks the host until the device
has caught up, so the launch queue drains and the GPU idles. A dispatch mode sees the same ops on the CPU, where the
tests run, so both counts can be checked there; ``torch.cuda.set_sync_debug_mode`` checks the syncs on a GPU.

On the CPU every tensor is a host tensor, so the counter tells apart the ones that would stay on the host on a GPU:
tensors made from host data (``torch.tensor(list)``) or by a factory given no device, and everything computed from
those alone. Ops on them never wait for a device and are not flagged. (A host tensor moved ``.to(device)`` stays one
to the counter: on the CPU that move dispatches nothing. The GPU test checks what this cannot.)

``.tolist()`` and ``.numpy()`` read a tensor's memory without dispatching anything: ``host_reads`` counts them
(and can forbid them) separately.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# ops that read a device value back to the host, or size their output from one, whatever their arguments
ALWAYS_SYNC = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero_numpy.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount (sizes its result by the largest value)",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "is_nonzero",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
}
# ops made from host data: on a GPU, a copy to the device (a sync unless it is non-blocking)
HOST_DATA = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


def _is_bool_index(indices: object) -> bool:
    return isinstance(indices, (list, tuple)) and any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices
    )


def sync_reason(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> str | None:
    """Why this op would wait for the device on a GPU, or None when it would not."""
    if func in ALWAYS_SYNC:
        return ALWAYS_SYNC[func]
    packet = func.overloadpacket
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _is_bool_index(args[1]):
        return f"{packet.__name__} with a boolean mask"
    if packet is aten.repeat_interleave and isinstance(args[0] if args else None, torch.Tensor):
        repeats = args[0] if func is aten.repeat_interleave.Tensor else (args[1] if len(args) > 1 else None)
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
    if packet in (aten.masked_fill, aten.masked_fill_) and isinstance(args[2] if len(args) > 2 else None, torch.Tensor):
        return "masked_fill with a tensor value"
    return None


class OpCounter(TorchDispatchMode):
    """Within: ``ops`` counts every aten op by name; ``syncs`` lists (op, reason) of the ops ``sync_reason`` flags
    on device tensors; ``host_tensors`` counts tensors made from host data (a copy to the device on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: list[tuple[str, str]] = []
        self.host_tensors = 0
        self._host = WeakIdKeyDictionary()  # tensors that would live on the host on a GPU (module docstring)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        self.ops[name] += 1
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = all(t in self._host for t in inputs) if inputs else kwargs.get("device") is None
        if func in HOST_DATA:
            self.host_tensors += 1
            on_host = True
        reason = None if on_host else sync_reason(func, args, kwargs)
        if reason is not None:
            self.syncs.append((name, reason))
        out = func(*args, **kwargs)
        if on_host:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._host[t] = True
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class HostRead(RuntimeError):
    """A tensor's values were read on the host where nothing may be."""


@contextlib.contextmanager
def host_reads(forbid: bool = False) -> Iterator[list[str]]:
    """Within: every ``Tensor.tolist()`` / ``Tensor.numpy()`` is appended to the yielded list (``forbid``: raises
    ``HostRead`` instead). ``item()``, ``int()``, ``float()`` and ``bool()`` dispatch ``_local_scalar_dense``, which
    ``OpCounter`` sees."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def watch(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            if forbid:
                raise HostRead(f"Tensor.{name}() of a {tuple(self.shape)} tensor in code that must not read the host")
            seen.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in originals:
        setattr(torch.Tensor, name, watch(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
