"""Byte-level dataset: windows, the deterministic split, errors, unigram entropy, the loader,
and the default standard-library corpus."""

from __future__ import annotations

import math

import pytest
import torch

from chronomoe_torch.data import (ByteDataset, byte_dataloader, stdlib_source_files,
                                  unigram_entropy)


@pytest.fixture
def corpus(tmp_path):
    """40 small files with distinct contents, under tmp_path/src."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    paths = []
    for i in range(40):
        p = root / ("pkg" if i % 2 else ".") / f"mod_{i:02d}.py"
        p.write_bytes(f"# module {i}\nvalue_{i} = {i * i}\n".encode() * (i % 3 + 1))
        paths.append(p)
    return root, paths


def test_windows_cover_the_stream_with_one_shared_byte(tmp_path):
    p = tmp_path / "a.txt"
    data = bytes(range(200)) + b"hello world" * 10
    p.write_bytes(data)
    ds = ByteDataset([p], seq_len=16, split="train", split_by="position", eval_fraction=0.25)
    train = data[: len(data) - round(0.25 * len(data))]
    assert ds.num_bytes == len(train)
    assert len(ds) == (len(train) - 1) // 16
    for i in (0, 1, len(ds) - 1):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].tolist() == list(train[i * 16: i * 16 + 17])
        assert torch.equal(item["labels"], item["input_ids"])
    assert ds.window_length == 17
    with pytest.raises(IndexError):
        ds[len(ds)]
    ev = ByteDataset([p], seq_len=16, split="eval", split_by="position", eval_fraction=0.25)
    assert ev.data.tolist() == list(data[len(train):])


def test_file_split_is_deterministic_disjoint_and_complete(corpus):
    root, paths = corpus
    a = ByteDataset(paths, seq_len=8, split="train")
    b = ByteDataset(list(reversed(paths)), seq_len=8, split="train")
    ev = ByteDataset(paths, seq_len=8, split="eval", eval_fraction=0.1)
    assert a.files == b.files and torch.equal(a.data, b.data)
    assert set(a.files).isdisjoint(ev.files)
    assert set(a.files) | set(ev.files) == set(paths)
    assert 1 <= len(ev.files) < len(a.files)
    # The split keys are paths relative to the root: moving the tree keeps the split.
    assert a.root == root.resolve()
    assert list(a.files) == sorted(a.files)
    assert a.data.tolist() == list(b"".join(p.read_bytes() for p in a.files))
    # A larger eval fraction only moves files into eval (the hash threshold rises).
    ev2 = ByteDataset(paths, seq_len=8, split="eval", eval_fraction=0.5)
    assert set(ev.files) <= set(ev2.files)


def test_errors_are_clear(tmp_path, corpus):
    _, paths = corpus
    with pytest.raises(FileNotFoundError, match="nope.py"):
        ByteDataset([tmp_path / "nope.py"])
    empty = tmp_path / "empty.py"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        ByteDataset([empty, *paths], split="train", eval_fraction=0.01, root=tmp_path)
    with pytest.raises(ValueError, match="no files"):
        ByteDataset([])
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="seq_len"):
        ByteDataset([short], seq_len=8, split_by="position")
    with pytest.raises(ValueError, match="split"):
        ByteDataset([short], split="test")
    with pytest.raises(ValueError, match="eval_fraction"):
        ByteDataset([short], eval_fraction=1.0)
    with pytest.raises(ValueError, match="seq_len"):
        ByteDataset([short], seq_len=0)
    with pytest.raises(ValueError, match="split has no files"):
        ByteDataset([short], split="eval", eval_fraction=1e-9)


def test_unigram_entropy_known_answers():
    assert unigram_entropy(b"aabb") == pytest.approx(math.log(2), abs=1e-12)
    assert unigram_entropy(bytes(range(256)) * 3) == pytest.approx(math.log(256), abs=1e-12)
    assert unigram_entropy(b"aaaa") == 0.0
    p = [0.5, 0.25, 0.25]
    assert unigram_entropy(b"aabc" * 5) == pytest.approx(-sum(q * math.log(q) for q in p))
    with pytest.raises(ValueError):
        unigram_entropy(b"")


def test_loader_order_is_seeded(corpus):
    _, paths = corpus
    ds = ByteDataset(paths, seq_len=8)

    def order(seed):
        return [b["input_ids"] for b in byte_dataloader(ds, 4, seed=seed)]

    torch.manual_seed(0)
    a = order(1)
    torch.manual_seed(99)                    # the global RNG plays no part
    b = order(1)
    c = order(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert a[0].shape == (4, 9)
    with pytest.raises(ValueError, match="batch_size"):
        byte_dataloader(ds, 0)


def test_default_corpus_is_the_standard_library():
    root, files = stdlib_source_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.relative_to(root).parts[:-1])
                   for f in files)
    train = ByteDataset(seq_len=256, split="train")
    ev = ByteDataset(seq_len=256, split="eval")
    assert set(train.files).isdisjoint(ev.files)
    assert train.num_bytes > 5 * ev.num_bytes > 0
    assert int(train.data.max()) < 256
    h = ev.unigram_entropy()
    # Python source: a few bits per byte, far from both 0 and uniform (ln 256 ≈ 5.55 nats).
    assert 2.5 < h < 4.5
