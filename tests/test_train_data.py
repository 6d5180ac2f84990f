"""Data sources, the split, sharding and the exact position: real files of every kind, every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dynmoe_dist.train.config import DataConfig
from dynmoe_dist.train.data import (
    DataError,
    SequenceStream,
    in_validation,
    load_corpus,
    stdlib_files,
    validation_batches,
)


def text_docs(n: int = 40) -> dict[str, bytes]:
    return {f"doc{i:02d}.txt": f"document {i}: ".encode() + bytes(range(65, 91)) * (i + 3) for i in range(n)}


def test_stdlib_corpus_is_every_stdlib_source_split_by_file() -> None:
    corpus = load_corpus(DataConfig(source="stdlib"))
    root, files = stdlib_files()
    assert len(files) > 500 and all("site-packages" not in p.parts for p in files)
    sizes = [len(p.read_bytes()) for p in files]
    total, documents = sum(sizes), sum(1 for n in sizes if n)  # empty files (many __init__.py) are no documents
    # every byte lands in one split; each split adds one separator between two documents
    assert len(corpus.train) + len(corpus.val) == total + documents - 2
    assert 0.005 < len(corpus.val) / total < 0.06 and corpus.byte_level
    again = load_corpus(DataConfig(source="stdlib"))
    assert np.array_equal(corpus.val, again.val)  # deterministic


def test_text_folder_splits_by_document_name(tmp_path: Path) -> None:
    docs = text_docs()
    for name, data in docs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "skip.md").write_text("not matched")
    corpus = load_corpus(DataConfig(source="text", path=str(tmp_path), pattern="*.txt", val_fraction=0.25))
    val_names = [n for n in sorted(docs) if in_validation(n, 0.25)]
    assert val_names  # the hash picked some
    assert bytes(corpus.val) == b"\n".join(docs[n] for n in val_names)
    assert bytes(corpus.train) == b"\n".join(docs[n] for n in sorted(docs) if n not in val_names)


def test_single_text_file_gives_its_tail_to_validation(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_bytes(bytes(range(256)) * 40)
    corpus = load_corpus(DataConfig(source="text", path=str(path), val_fraction=0.1))
    assert bytes(corpus.train) + bytes(corpus.val) == path.read_bytes()
    assert len(corpus.val) == 1024


def test_jsonl_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"text": f"línea {i} " * 20, "id": i} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus(DataConfig(source="jsonl", path=str(path), val_fraction=0.2))
    joined = bytes(corpus.train) + bytes(corpus.val)
    assert sorted(joined.replace(b"\n", b"")) == sorted(b"".join(r["text"].encode() for r in rows))


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_is_memory_mapped_tokens(tmp_path: Path, dtype: str) -> None:
    tokens = (np.arange(50_000) * 7919 % 60_000).astype(dtype)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    corpus = load_corpus(DataConfig(source="bin", path=str(path), dtype=dtype, val_fraction=0.1))
    assert isinstance(corpus.train.base, np.memmap) or isinstance(corpus.train, np.memmap)
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), tokens) and not corpus.byte_level
    stream = SequenceStream(corpus.train, 16, 2, 0, 1, 0, vocab_size=60_000)
    x, y = stream.next_batch()
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    small_vocab = SequenceStream(corpus.train, 16, 2, 0, 1, 0, vocab_size=1000)
    with pytest.raises(DataError, match="outside model.vocab_size=1000"):
        small_vocab.next_batch()


@pytest.mark.parametrize(
    ("make", "cfg", "message"),
    [
        (None, {"source": "text", "path": "missing.txt"}, "does not exist"),
        ("empty.txt", {"source": "text"}, "holds no text"),
        ("empty.bin", {"source": "bin"}, "is empty"),
        ("odd.bin", {"source": "bin", "dtype": "uint16"}, "not a whole number of uint16 tokens"),
        ("bad.jsonl", {"source": "jsonl"}, "is not valid JSON"),
        ("nofield.jsonl", {"source": "jsonl", "text_field": "body"}, "no string field 'body'"),
        ("dir/", {"source": "jsonl"}, "is a folder"),
        ("dir/", {"source": "text", "pattern": "*.txt"}, "no files matching"),
    ],
)
def test_bad_sources_are_refused_with_the_fix(tmp_path: Path, make, cfg, message) -> None:
    path = tmp_path / (make or cfg["path"])
    contents = {"odd.bin": b"\x01\x02\x03", "bad.jsonl": b'{"text": "a"}\n{oops\n', "nofield.jsonl": b'{"text": "a"}\n'}
    if make == "dir/":
        path.mkdir()
    elif make:
        path.write_bytes(contents.get(make, b""))
    with pytest.raises(DataError, match=message):
        load_corpus(DataConfig(**{"path": str(path), **cfg}))


def test_unreadable_file_is_refused() -> None:
    # /proc/self/mem exists but reading it from the start fails, even as root: a real unreadable file
    with pytest.raises(DataError, match="cannot read text file /proc/self/mem"):
        load_corpus(DataConfig(source="text", path="/proc/self/mem"))


def test_source_shorter_than_one_step_is_refused() -> None:
    with pytest.raises(DataError, match=r"one step needs 8 \(4 per rank x 2 ranks\)"):
        SequenceStream(np.zeros(100, dtype=np.uint8), 16, 4, 0, 2, 0, 256)
    with pytest.raises(DataError, match="less than one sequence"):
        next(validation_batches(np.zeros(10, dtype=np.uint8), 16, 4, 0, 1, 8, 256))


def corpus_tokens(n: int = 20_000) -> np.ndarray:
    """Random bytes: no two sequences are alike, so a sequence read twice would show."""
    return np.random.default_rng(0).integers(0, 256, n).astype(np.uint8)


def test_ranks_read_disjoint_shards_of_one_global_order() -> None:
    tokens, seq, batch = corpus_tokens(), 16, 3
    for step in range(5):
        ranks = [SequenceStream(tokens, seq, batch, r, 4, 7, 256) for r in range(4)]
        single = SequenceStream(tokens, seq, batch * 4, 0, 1, 7, 256)  # the same global batch on one rank
        for s in [*ranks, single]:
            for _ in range(step):
                s.next_batch()
        xs = [s.next_batch()[0] for s in ranks]
        assert torch.equal(torch.cat(xs), single.next_batch()[0])
        rows = {tuple(r.tolist()) for x in xs for r in x}
        assert len(rows) == 4 * batch  # no sequence twice in one step


def test_position_restores_exactly_across_epochs() -> None:
    tokens = corpus_tokens(3000)  # 187 sequences of 16: an epoch is 31 steps of 6
    stream = SequenceStream(tokens, 16, 3, 1, 2, 5, 256)
    for _ in range(29):
        stream.next_batch()
    state = json.loads(json.dumps(stream.state_dict()))  # survives a round trip through a file
    expected = [stream.next_batch() for _ in range(8)]  # crosses into the next epoch
    assert stream.state.epoch == 1
    resumed = SequenceStream(tokens, 16, 3, 1, 2, 5, 256)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(8))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    # the next epoch visits the sequences in another order
    fresh = SequenceStream(tokens, 16, 3, 1, 2, 5, 256)
    assert not np.array_equal(fresh.order(0), fresh.order(1))


def test_validation_set_does_not_depend_on_the_world_size() -> None:
    tokens = corpus_tokens(5000)
    one = torch.cat([x for x, _ in validation_batches(tokens, 16, 4, 0, 1, 21, 256)])
    for world in (2, 3):
        per_rank = [list(validation_batches(tokens, 16, 4, r, world, 21, 256)) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of batches on every rank (MoE is collective)
        rows = torch.cat([x for batches in per_rank for x, _ in batches])
        assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, one.tolist()))
