"""Checkpoints that survive everything: sharded by expert id, atomic, verified, loadable on any world and ep size."""

from .dense import DenseState, UnfusedMasters, ZeroPartitions
from .files import latest, published
from .io import AsyncSave, load, read_rank_tensors, resolve, save, save_async, verify
from .manifest import CheckpointError, LayerRecord, Manifest

__all__ = [
    "AsyncSave",
    "CheckpointError",
    "DenseState",
    "LayerRecord",
    "Manifest",
    "UnfusedMasters",
    "ZeroPartitions",
    "latest",
    "load",
    "published",
    "read_rank_tensors",
    "resolve",
    "save",
    "save_async",
    "verify",
]
