"""Checkpoint folders on disk: written aside, published by one rename, found through a ``latest`` pointer.

    <root>/
      step_000300/          a published checkpoint (manifest.json + safetensors shards)
      step_000200/
      latest                "step_000300": replaced (write + rename) only after the folder is published
      .partial-step_000400-<id>/   a save in progress, or one a crash interrupted: never read, removed by the next save

A reader follows ``latest`` (or names a folder); a folder only exists under its final name once every rank's shard
and the manifest with their checksums are on disk, so a rank killed mid-save leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

LATEST = "latest"
PARTIAL = ".partial-"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def partial_dir(root: Path, step: int, token: str) -> Path:
    return root / f"{PARTIAL}{step_name(step)}-{token}"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old content or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(partial: Path, root: Path, step: int) -> Path:
    """Rename a complete partial folder to its final name, then point ``latest`` at it (in that order)."""
    final = root / step_name(step)
    if final.exists():  # a re-save of the same step (resumed and saved again): replace it whole
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    return root / name if name else None


def published(root: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints (never the one ``latest`` names) and stale partial folders."""
    removed = []
    current = latest(root)
    for path in published(root)[: max(0, len(published(root)) - keep)]:
        if current is None or path.resolve() != current.resolve():
            shutil.rmtree(path)
            removed.append(path)
    for path in root.glob(f"{PARTIAL}*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
