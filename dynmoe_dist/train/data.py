"""Training data: token sources, a deterministic train/validation split, a sharded stream with a restorable position.

Sources (``data.source``):

- ``stdlib``: the embedded default corpus, the Python standard library's own ``.py`` files (found through
  ``sysconfig``, ``site-packages`` left out), read as bytes: nothing to download.
- ``text``: one text file, or every file under a folder matching ``data.pattern``, read as bytes.
- ``jsonl``: one document per line, its ``data.text_field`` string encoded as UTF-8.
- ``bin``: pre-tokenised ``uint16``/``uint32`` tokens, read by memory map (nanoGPT's format: a bare array).

Byte-level tokens by default (vocabulary 256, one token per byte, so bits per byte = loss / ln 2). Documents are
joined with a newline. Split: a document goes to validation when a hash of its name falls in ``val_fraction``, so the
split does not depend on file order or the machine; a source that is one document (a single file, a ``.bin``) gives
its last ``val_fraction`` to validation.

The stream cuts the training tokens into sequences of ``seq_len + 1`` tokens (stride ``seq_len``), visits them in a
seeded permutation per epoch, and gives rank ``r`` the ``r``-th slice of each micro-batch of a global batch. Its
position is two integers (epoch, global cursor), independent of the world size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DynMoEError
from .config import DataConfig

SEPARATOR = b"\n"
BYTE_VOCAB = 256


class DataError(DynMoEError, ValueError):
    """The data source is missing, unreadable, empty or too short."""


@dataclass
class Corpus:
    train: np.ndarray  # 1-D token array (uint8 for bytes, uint16/uint32 memory map for .bin)
    val: np.ndarray
    byte_level: bool  # one token per byte: bits per byte is defined
    description: str

    @property
    def max_token(self) -> int | None:
        return BYTE_VOCAB - 1 if self.byte_level else None


@functools.cache
def stdlib_files() -> tuple[Path, tuple[Path, ...]]:
    """(root, every .py file under it but site-packages), sorted. Walked once per process and pruned at
    site-packages (a glob walks the installed packages too: about a second per call on a slow disk, in every rank)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, tuple(sorted(files))


def in_validation(name: str, fraction: float) -> bool:
    """A stable choice per document name: the same on every machine, rank and run."""
    h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read {what} {path}: {exc.strerror or exc}; check the path and its permissions"
        ) from None


def split_documents(
    docs: list[tuple[str, bytes]], fraction: float, what: str
) -> tuple[list[bytes], list[bytes]] | None:
    """(training documents, validation documents) by a hash of each name; None for a single document (which is split
    by position instead, by whoever holds its tokens)."""
    docs = [(n, b) for n, b in docs if b]
    if not docs:
        raise DataError(f"{what} holds no text (every document is empty); point data.path at non-empty files")
    if len(docs) == 1:
        return None
    train = [b for n, b in docs if not in_validation(n, fraction)]
    val = [b for n, b in docs if in_validation(n, fraction)]
    if not val:  # few documents: the hash chose none; take the last one so validation exists
        train, val = train[:-1], train[-1:]
    if not train:
        train, val = val[:-1], val[-1:]
    return train, val


def split_tail(tokens: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One document: its last ``fraction`` (at least one token) is the validation split."""
    cut = len(tokens) - max(1, int(len(tokens) * fraction))
    return tokens[:cut], tokens[cut:]


def _split_documents(docs: list[tuple[str, bytes]], fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    parts = split_documents(docs, fraction, what)
    if parts is None:
        return split_tail(np.frombuffer(next(b for _, b in docs if b), dtype=np.uint8), fraction)

    def join(parts: list[bytes]) -> np.ndarray:
        return np.frombuffer(SEPARATOR.join(parts), dtype=np.uint8)

    return join(parts[0]), join(parts[1])


def source_files(cfg: DataConfig) -> tuple[Path, list[Path]]:
    """(root, files) of a stdlib, text or jsonl source, refusing a path that is missing or of the wrong kind."""
    if cfg.source == "stdlib":
        root, files = stdlib_files()
        if not files:
            raise DataError(f"no .py files under the standard library at {root}; use data.source=text with data.path")
        return root, list(files)
    path = Path(str(cfg.path)).expanduser()
    if not path.exists():
        raise DataError(f"data.path={cfg.path} does not exist (data.source={cfg.source}); give an existing path")
    if cfg.source == "jsonl" and path.is_dir():
        raise DataError(f"data.path={path} is a folder; data.source=jsonl reads one .jsonl file")
    if cfg.source == "text" and path.is_dir():
        files = sorted(p for p in path.rglob(cfg.pattern) if p.is_file())
        if not files:
            raise DataError(f"no files matching data.pattern={cfg.pattern!r} under {path}")
        return path, files
    return path.parent, [path]


def read_documents(cfg: DataConfig) -> tuple[list[tuple[str, bytes]], str]:
    """(named documents, description) of a stdlib, text or jsonl source."""
    root, files = source_files(cfg)
    if cfg.source == "stdlib":
        docs = [(p.relative_to(root).as_posix(), _read(p, "standard-library file")) for p in files]
        return docs, f"Python {sysconfig.get_python_version()} standard library, {len(files)} files"
    if cfg.source == "text":
        docs = [(p.relative_to(root).as_posix(), _read(p, "text file")) for p in files]
        return docs, f"text from {Path(str(cfg.path)).expanduser()} ({len(docs)} files)"
    (path,) = files
    docs = []
    for number, line in enumerate(_read(path, "JSON-lines file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}); one JSON object per line") from None
        text = record.get(cfg.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{number} has no string field {cfg.text_field!r}; set data.text_field to the field that "
                "holds the text"
            )
        docs.append((f"{path.name}:{number}", text.encode()))
    return docs, f"JSON lines from {path} ({len(docs)} documents)"


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the configured source and split it; every failure is a ``DataError`` saying what to fix."""
    if cfg.source == "bin":
        path = Path(str(cfg.path)).expanduser()
        if not path.exists():
            raise DataError(f"data.path={cfg.path} does not exist (data.source=bin); give an existing path")
        return _load_bin(path, cfg)
    docs, description = read_documents(cfg)
    where = f"the standard library at {stdlib_files()[0]}" if cfg.source == "stdlib" else str(cfg.path)
    train, val = _split_documents(docs, cfg.val_fraction, where)
    return Corpus(train, val, True, description)


def _load_bin(path: Path, cfg: DataConfig) -> Corpus:
    dtype = np.dtype(cfg.dtype)
    if path.is_dir():
        raise DataError(f"data.path={path} is a folder; data.source=bin reads one file of {cfg.dtype} tokens")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty; data.source=bin needs a file of {cfg.dtype} tokens")
    if size % dtype.itemsize:
        raise DataError(
            f"{path} holds {size} bytes, not a whole number of {cfg.dtype} tokens; check data.dtype "
            "(uint16 for vocabularies up to 65536, uint32 beyond)"
        )
    try:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as exc:
        raise DataError(f"cannot memory-map {path}: {exc}") from None
    cut = len(tokens) - max(1, int(len(tokens) * cfg.val_fraction))
    return Corpus(tokens[:cut], tokens[cut:], False, f"{cfg.dtype} tokens from {path} ({len(tokens)} tokens)")


# --------------------------------------------------------------------------------------------------------------------
# the stream


def sequence_count(tokens: np.ndarray, seq_len: int) -> int:
    """Sequences of ``seq_len + 1`` tokens at stride ``seq_len`` (inputs and their next-token targets)."""
    return (len(tokens) - 1) // seq_len if len(tokens) > seq_len else 0


def gather_sequences(
    tokens: np.ndarray, index: np.ndarray, seq_len: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each ``[len(index), seq_len]`` int64, for the sequences numbered ``index``."""
    rows = (
        np.stack([np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1]) for i in index]) if len(index) else None
    )
    if rows is None:
        empty = torch.zeros(0, seq_len, dtype=torch.int64)
        return empty, empty.clone()
    rows = torch.from_numpy(rows.astype(np.int64))
    if int(rows.max()) >= vocab_size:
        raise DataError(
            f"token id {int(rows.max())} in the data is outside model.vocab_size={vocab_size}; set model.vocab_size "
            "to the tokenizer's vocabulary size"
        )
    return rows[:, :-1], rows[:, 1:]


@dataclass
class StreamState:
    """Where the stream stands: (epoch, sequences of this epoch already handed out over the whole world)."""

    epoch: int = 0
    cursor: int = 0

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}


class SequenceStream:
    """Sharded micro-batches of ``[batch, seq_len]`` inputs and targets from one token array.

    A global batch of ``global_batch`` sequences (default ``batch_size x world``) is cut into micro-batches of
    ``batch_size x world``; rank ``r`` takes the ``r``-th slice of each. An epoch's tail that does not fill a global
    batch is skipped, so the sequences of every optimizer step are the same whatever the world size.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        vocab_size: int,
        what: str = "training data",
        global_batch: int | None = None,
    ) -> None:
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world, self.seed, self.vocab_size = rank, world, seed, vocab_size
        self.global_batch = global_batch if global_batch is not None else batch_size * world
        self.count = sequence_count(tokens, seq_len)
        if self.count < self.global_batch:
            raise DataError(
                f"the {what} has {len(tokens)} tokens: {self.count} sequences of {seq_len + 1} tokens, but one step "
                f"needs {self.global_batch} ({batch_size} per rank x {world} ranks"
                f"{'' if global_batch is None else ' x micro-batches'}); give more data or lower "
                "data.seq_len / data.batch_size / data.global_batch"
            )
        self.state = StreamState()
        self._order: tuple[int, np.ndarray] | None = None
        self._micro = 0  # micro-batches handed out of the current global batch

    def order(self, epoch: int) -> np.ndarray:
        """This epoch's permutation of the sequences (seeded, the same on every rank)."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order = (epoch, rng.permutation(self.count))
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next micro-batch; the stream moves on by one micro-batch over the world."""
        step = self.batch_size * self.world
        if self._micro == 0 and self.state.cursor + self.global_batch > self.count:  # the epoch's tail is skipped
            self.state = StreamState(self.state.epoch + 1, 0)
        start = self.state.cursor + self.rank * self.batch_size
        index = self.order(self.state.epoch)[start : start + self.batch_size]
        self.state = StreamState(self.state.epoch, self.state.cursor + step)
        self._micro = (self._micro + 1) % (self.global_batch // step)
        return gather_sequences(self.tokens, index, self.seq_len, self.vocab_size)

    def state_dict(self) -> dict:
        return self.state.as_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(int(state["epoch"]), int(state["cursor"]))
        self._micro = 0  # saved at an optimizer step's boundary


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, rank: int, world: int, sequences: int, vocab_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``sequences`` validation sequences (fewer if the split is shorter), dealt round-robin to the ranks.

    Every rank yields the same number of batches (the last may be smaller, even empty) because MoE layers are
    collective; the set does not depend on the world size, so validation losses compare across world sizes.
    """
    count = min(sequences, sequence_count(tokens, seq_len))
    if count == 0:
        raise DataError(
            f"the validation split has {len(tokens)} tokens, less than one sequence of {seq_len + 1}; raise "
            "data.val_fraction or give more data"
        )
    mine = np.arange(rank, count, world)
    per_rank = -(-count // world)
    for start in range(0, per_rank, batch_size):
        yield gather_sequences(tokens, mine[start : start + batch_size], seq_len, vocab_size)
