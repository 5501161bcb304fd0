"""Byte-level language-modelling data over text files (real text, offline).

The default corpus is the Python standard library's own ``.py`` sources (the directory
``sysconfig.get_paths()["stdlib"]``; test suites, ``site-packages`` and empty files left out):
about 12 MB of real text on every machine, nothing to download. Tokens are raw bytes, so
``MixtralConfig(vocab_size=256)`` fits; any larger vocabulary works too (ids stay < 256).

Split (deterministic, documented):
  * ``split_by="file"`` (default): a file belongs to eval when the first 8 hex digits of
    sha1(its path relative to the corpus root, '/'-separated) / 2³² < ``eval_fraction``; same
    files → same split on every machine, and adding a file never moves another.
  * ``split_by="position"``: the concatenated stream's last ``eval_fraction`` is eval (for a
    single file).
The split's files are concatenated in sorted-path order (windows may cross file boundaries).

Samples: window i is the ``seq_len + 1`` bytes starting at i·seq_len (consecutive windows
share one byte), returned as ``input_ids`` = ``labels`` = the window [seq_len + 1], int64. The
model and ``ChronoMoELoss`` shift inside (position t predicts t + 1), so each window scores
exactly ``seq_len`` targets and every byte of the stream after the first is a target exactly
once per epoch. The model's ``max_seq_length`` must be at least ``seq_len + 1``.

Shape legend: W window length (seq_len + 1).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ByteDataset", "stdlib_source_files", "byte_dataloader", "unigram_entropy",
           "BYTE_VOCAB_SIZE"]

BYTE_VOCAB_SIZE = 256
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                            "__pycache__"})


@functools.lru_cache(maxsize=1)
def stdlib_source_files() -> tuple[Path, tuple[Path, ...]]:
    """The standard library's directory and its non-empty ``.py`` files (sorted), test
    suites and installed packages excluded. Cached: the walk takes about a second."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library directory {root} does not exist")
    files = tuple(sorted(p for p in root.rglob("*.py")
                         if not (_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
                         and p.is_file() and p.stat().st_size > 0))
    if not files:
        raise FileNotFoundError(f"no .py files found under the standard library at {root}")
    return root, files


def _is_eval_file(rel_path: str, eval_fraction: float) -> bool:
    h = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest()[:8], 16)
    return h / 2**32 < eval_fraction


def _check_file(p: Path) -> None:
    if not p.exists():
        raise FileNotFoundError(f"ByteDataset: no such file {p}")
    if not p.is_file():
        raise FileNotFoundError(f"ByteDataset: {p} is not a file (give text files, not "
                                f"directories)")


def _read(paths: Iterable[Path]) -> bytes:
    chunks = []
    for p in paths:
        _check_file(p)
        try:
            b = p.read_bytes()
        except OSError as e:
            raise OSError(f"ByteDataset: cannot read {p}: {e.strerror or e}") from None
        if not b:
            raise ValueError(f"ByteDataset: file {p} is empty")
        chunks.append(b)
    return b"".join(chunks)


class ByteDataset(Dataset):
    """Fixed windows of ``seq_len + 1`` bytes from one split of a set of text files."""

    def __init__(self, paths: Sequence[str | os.PathLike] | None = None, *, seq_len: int = 128,
                 split: str = "train", eval_fraction: float = 0.1, split_by: str = "file",
                 root: str | os.PathLike | None = None) -> None:
        """``paths``: text files (None: the standard library, see ``stdlib_source_files``);
        ``root``: the directory split hashes are relative to (default: the files' common
        parent). Raises FileNotFoundError for a missing file, ValueError for an empty file,
        an empty split or a split shorter than one window."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"ByteDataset.seq_len={seq_len!r}: expected an integer >= 1")
        if split not in ("train", "eval"):
            raise ValueError(f"ByteDataset.split={split!r}: allowed values are 'train', 'eval'")
        if split_by not in ("file", "position"):
            raise ValueError(f"ByteDataset.split_by={split_by!r}: allowed values are "
                             f"'file', 'position'")
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) \
                or not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"ByteDataset.eval_fraction={eval_fraction!r}: allowed range is "
                             f"(0, 1)")
        if paths is None:
            default_root, files = stdlib_source_files()
            root = default_root if root is None else root
        else:
            files = sorted(Path(p) for p in paths)
            if not files:
                raise ValueError("ByteDataset: no files given")
            for p in files:
                _check_file(p)
            if root is None:
                root = Path(os.path.commonpath([p.resolve().parent for p in files]))
        root = Path(root).resolve()

        if split_by == "file":
            want_eval = split == "eval"
            files = [p for p in files
                     if _is_eval_file(Path(os.path.relpath(p.resolve(), root)).as_posix(),
                                      eval_fraction) == want_eval]
            if not files:
                raise ValueError(f"ByteDataset: the {split!r} split has no files (eval_fraction="
                                 f"{eval_fraction}); give more files or use split_by='position'")
            data = _read(files)
        else:
            data = _read(files)
            cut = len(data) - int(round(eval_fraction * len(data)))
            data = data[:cut] if split == "train" else data[cut:]
        if len(data) < seq_len + 1:
            raise ValueError(f"ByteDataset: the {split!r} split has {len(data)} bytes, fewer "
                             f"than one window of seq_len + 1 = {seq_len + 1}")
        self.files = tuple(files)
        self.root = root
        self.split = split
        self.seq_len = seq_len
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [total bytes]

    @property
    def window_length(self) -> int:
        """Tokens per sample, seq_len + 1 (the model's max_seq_length must cover it)."""
        return self.seq_len + 1

    @property
    def num_bytes(self) -> int:
        return int(self.data.numel())

    def __len__(self) -> int:
        return (self.data.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"ByteDataset index {i} out of range [0, {len(self)})")
        i %= len(self)
        w_W = self.data[i * self.seq_len: i * self.seq_len + self.seq_len + 1].long()
        return {"input_ids": w_W, "labels": w_W.clone()}

    def unigram_entropy(self) -> float:
        """Entropy (nats/byte) of this split's byte distribution: the loss of the best model
        that ignores context. "Loss below the unigram baseline" compares the eval loss with
        this value of the eval split."""
        return unigram_entropy(self.data)


def unigram_entropy(data: torch.Tensor | bytes) -> float:
    """H = −Σ_b p_b ln p_b over the byte frequencies of ``data`` (nats per byte)."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes) else data
    if t.numel() == 0:
        raise ValueError("unigram_entropy: no data")
    counts = torch.bincount(t.reshape(-1).long(), minlength=BYTE_VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def byte_dataloader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                    drop_last: bool = True, num_workers: int = 0) -> DataLoader:
    """A DataLoader whose shuffling comes from its own generator seeded with ``seed``: the
    same seed gives the same batch order, independent of the global RNG."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                      drop_last=drop_last, num_workers=num_workers)
