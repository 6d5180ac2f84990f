"""``data.tokenizer=model``: a text, JSON-lines or stdlib source tokenised once by the model folder's own tokenizer
into memory-mapped token files, cached under ``<out_dir>/tokenized/<key>/`` so that a rerun, another run on the same
data, or another rank never tokenises again.

The key is a hash of the tokenizer's files and of the source (kind, path, pattern, text field, validation fraction,
every file's name, size and modification time): change any of them and the corpus is tokenised afresh. Rank 0 reads
and tokenises, writing into a temporary folder renamed into place when complete (a crash leaves no half cache); the
other ranks wait for its verdict (one collective, which is the barrier) and map the same files. The split is the
byte-level one (documents by a hash of their name, a single document by its tail); documents are joined by the
tokenizer's end-of-sequence token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DynMoEError
from .data import Corpus, DataError, read_documents, source_files, split_documents, split_tail

FORMAT = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "vocab.txt", "special_tokens_map.json", "added_tokens.json")
CHUNK = 512  # documents per tokenizer call


def uses_model_tokenizer(cfg: Any) -> bool:
    """Whether the run's text is tokenised by the model folder's tokenizer (``data.tokenizer``, ``auto`` resolved)."""
    d = cfg.data
    if d.source == "bin":  # tokens already
        return False
    return d.tokenizer == "model" or (d.tokenizer == "auto" and cfg.model.kind == "hf")


def load_tokenizer(folder: Path):
    """The folder's own tokenizer (``AutoTokenizer``, local files only), or a ``ConfigError`` saying what to add."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            "data.tokenizer",
            "model",
            f"a tokenizer in {folder} (tokenizer.json, or the family's tokenizer files): none loads ({exc}); add the "
            "model's tokenizer files, or set data.tokenizer=bytes",
        ) from None


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of the files that define the folder's tokenizer."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.name.startswith("tokenizer") or path.name in TOKENIZER_FILES):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def source_fingerprint(cfg: Any) -> dict:
    """What the source is made of, cheaply (names, sizes, modification times): refuses a missing path first."""
    d = cfg.data
    root, files = source_files(d)
    listing = []
    for p in files:
        st = p.stat()
        listing.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return {
        "source": d.source,
        "root": str(root.resolve()),
        "pattern": d.pattern if d.source == "text" else None,
        "text_field": d.text_field if d.source == "jsonl" else None,
        "val_fraction": d.val_fraction,
        "files": listing,
    }


def cache_key(cfg: Any) -> str:
    """The cache folder's name for this tokenizer and this source."""
    folder = Path(str(cfg.model.path)).expanduser()
    blob = json.dumps(
        {"format": FORMAT, "tokenizer": tokenizer_fingerprint(folder), "source": source_fingerprint(cfg)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_folder(cfg: Any) -> Path:
    return Path(cfg.out_dir) / "tokenized" / cache_key(cfg)


def encode(tokenizer, docs: list[bytes], dtype: np.dtype) -> np.ndarray:
    """Documents as one token array, each followed by the end-of-sequence token (when the tokenizer has one)."""
    eos = tokenizer.eos_token_id
    parts = []
    for start in range(0, len(docs), CHUNK):
        texts = [b.decode("utf-8", errors="replace") for b in docs[start : start + CHUNK]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            parts.append(np.asarray(ids + ([eos] if eos is not None else []), dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def write_cache(cfg: Any, folder: Path) -> None:
    """Read, split and tokenise the source into ``folder`` (train.bin, val.bin, info.json), atomically."""
    tokenizer = load_tokenizer(Path(str(cfg.model.path)).expanduser())
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    docs, description = read_documents(cfg.data)
    parts = split_documents(docs, cfg.data.val_fraction, description)
    if parts is None:
        train, val = split_tail(encode(tokenizer, [b for _, b in docs if b], dtype), cfg.data.val_fraction)
    else:
        train, val = (encode(tokenizer, p, dtype) for p in parts)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.tofile(tmp / "train.bin")
    val.tofile(tmp / "val.bin")
    info = {
        "dtype": dtype.name,
        "train_tokens": len(train),
        "val_tokens": len(val),
        "tokenizer": str(Path(str(cfg.model.path)).expanduser().resolve()),
        "description": description,
    }
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another run wrote the same cache first: theirs is the same tokens
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "info.json").exists():
            raise


def open_cache(folder: Path) -> Corpus:
    info = json.loads((folder / "info.json").read_text())
    dtype = np.dtype(info["dtype"])
    arrays = []
    for split in ("train", "val"):
        if info[f"{split}_tokens"] == 0:
            raise DataError(f"the {split} split of {info['description']} holds no tokens; give more data")
        arrays.append(np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r"))
    total = info["train_tokens"] + info["val_tokens"]
    what = f"{info['description']}, {total} tokens by the model's tokenizer (cached in {folder})"
    return Corpus(arrays[0], arrays[1], False, what)


def tokenized_corpus(cfg: Any, rank: int, groups) -> Corpus:
    """The run's corpus in the model's tokens (collective): rank 0 finds or writes the cache, every rank maps it.

    A failure on rank 0 (an unreadable document, a JSON line without the text field) is raised on every rank, with
    rank 0's message, so all stop together.
    """
    import torch.distributed as dist

    folder = cache_folder(cfg)
    verdict = ""
    if rank == 0 and not (folder / "info.json").exists():
        try:
            write_cache(cfg, folder)
        except DynMoEError as exc:
            verdict = str(exc)
    everyone = [verdict] * groups.world_size
    if groups.world_group is not None:
        dist.all_gather_object(everyone, verdict, group=groups.world_group)
    if everyone[0]:
        raise DataError(everyone[0])
    return open_cache(folder)
