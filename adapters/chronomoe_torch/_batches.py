"""Loader batches for ``ChronoMoETrainer``: validation on the host, and the resumable train stream.

Validation (``prepare_batch``): a loader batch is a dict with ``input_ids`` [B, S] (optional
``labels``, ``attention_mask``), a plain [B, S] tensor, or an (input_ids[, labels]) tuple. Shapes,
integer dtype and token ids in [0, V) (labels may also be -100 = ignore) are checked on the
loader's host copy before the transfer: a CPU min/max, no device sync; a batch that is already on
an accelerator costs one sync. A bad batch raises ``BadBatchError`` naming it.

Data order and exact resume (``TrainStream``): at each epoch start the train loader's sampler
generator (and the loader's own, which seeds workers) is given a seeded generator if it has none,
and its state is recorded; ``state_dict()`` stores (epoch, micro-batches consumed, that state).
``load_state_dict`` restores the state, re-creates the epoch's iterator and skips the consumed
micro-batches, so the batch sequence is the one of an uninterrupted run. A ``DataLoader`` over a
map-style dataset is re-created around a ``ShardedBatchSampler`` (same dataset, collate, workers,
generators), which skips consumed batches as index lists, without fetching them; other loaders
(any iterable) are read and the consumed batches dropped.

Data parallel (``rank``/``world``): global batch i of the loader's order goes to rank i mod W,
in whole groups of W (a last incomplete group is dropped from training, so every rank takes the
same number of steps), and each rank fetches only its own batches when the loader is re-created
as above. The union over the ranks of step n's micro-batches is then the set a single process
with W times the gradient accumulation takes at its step n. Eval batches are sharded the same
way without dropping any (``shard_batches``).

(torchdata's ``StatefulDataLoader`` does the same skipping for its own loader class; it is not
used: the trainer takes the user's ``DataLoader``, which would have to be re-created as another
class anyway, and its state alone does not restore the generator of later epochs.)

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

__all__ = ["BadBatchError", "Batch", "batch_name", "prepare_batch", "TrainStream",
           "ShardedBatchSampler", "shard_batches"]

IGNORE_INDEX = -100


class BadBatchError(ValueError):
    """A batch from the loader has the wrong type, shape, dtype or token ids outside the
    vocabulary; the message names the split, the batch index and the epoch."""


@dataclass
class Batch:
    """One validated micro-batch on the training device."""
    input_ids: torch.Tensor
    """[B, S] int64."""
    labels: torch.Tensor
    """[B, S] int64, aligned with ``input_ids`` (``input_ids`` itself when the loader gave none)."""
    attention_mask: torch.Tensor | None
    """[B, S] (1 = token, 0 = padding) or None."""
    tokens: int
    """B·S, a host int (no sync)."""


def batch_name(split: str, index: int, epoch: int | None = None) -> str:
    """How errors name a batch: ``train batch 3 (epoch 0)``, ``eval batch 1``."""
    return f"{split} batch {index}" + ("" if epoch is None else f" (epoch {epoch})")


def prepare_batch(batch: Any, where: str, device: torch.device, vocab_size: int | None = None,
                  max_seq_length: int | None = None) -> Batch:
    """Validate one loader batch on the host and move it to ``device``; ``where`` names it in
    errors (``batch_name``). ``vocab_size``/``max_seq_length`` None skip those checks."""
    ids, labels, mask = _unpack(batch, where)
    _check_ids(ids, "input_ids", where, vocab_size, allow_ignore=False)
    if ids.shape[1] < 2:
        raise BadBatchError(f"{where}: input_ids has sequence length {ids.shape[1]}; causal "
                            f"LM training needs at least 2 tokens")
    if max_seq_length is not None and ids.shape[1] > max_seq_length:
        raise BadBatchError(f"{where}: sequence length {ids.shape[1]} exceeds the model's "
                            f"max_seq_length={max_seq_length}")
    if labels is not None:
        _check_ids(labels, "labels", where, vocab_size, allow_ignore=True, shape=ids.shape)
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise BadBatchError(f"{where}: attention_mask must be a tensor of shape "
                            f"{list(ids.shape)}, got "
                            f"{list(getattr(mask, 'shape', [])) or type(mask).__name__}")
    nb = device.type == "cuda"
    ids = ids.to(device, torch.int64, non_blocking=nb)
    labels = ids if labels is None else labels.to(device, torch.int64, non_blocking=nb)
    mask = None if mask is None else mask.to(device, non_blocking=nb)
    return Batch(ids, labels, mask, int(ids.numel()))


def _unpack(batch: Any, where: str) -> tuple[Any, Any, Any]:
    """(input_ids, labels or None, attention_mask or None) of any accepted batch kind."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise BadBatchError(f"{where}: dict batch has no 'input_ids' (keys: "
                                f"{sorted(map(str, batch))})")
        return batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
    if isinstance(batch, Sequence) and 1 <= len(batch) <= 2 \
            and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], (batch[1] if len(batch) == 2 else None), None
    raise BadBatchError(f"{where}: expected a dict with 'input_ids', a [B, S] tensor or "
                        f"an (input_ids[, labels]) tuple, got {type(batch).__name__}")


def _check_ids(t: Any, name: str, where: str, vocab_size: int | None, allow_ignore: bool,
               shape: torch.Size | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise BadBatchError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.numel() == 0:
        raise BadBatchError(f"{where}: {name} must be a non-empty [B, S] tensor, got shape "
                            f"{list(t.shape)}")
    if shape is not None and t.shape != shape:
        raise BadBatchError(f"{where}: {name} shape {list(t.shape)} != input_ids shape "
                            f"{list(shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise BadBatchError(f"{where}: {name} must hold integer token ids, got {t.dtype}")
    if vocab_size is None:
        return
    # On the host copy (the loader's CPU tensor): no device sync.
    a = t.numpy() if t.device.type == "cpu" else t.detach().cpu().numpy()
    valid = a if not allow_ignore else a[a != IGNORE_INDEX]
    if valid.size and (valid.min() < 0 or valid.max() >= vocab_size):
        bad = int(valid.min()) if valid.min() < 0 else int(valid.max())
        raise BadBatchError(f"{where}: {name} holds token id {bad}, outside the vocabulary "
                            f"[0, {vocab_size})" + (" (-100 = ignore is allowed)"
                                                    if allow_ignore else ""))


def _shard(items: Iterable, rank: int, world: int, even: bool, skip: int = 0) -> Iterator:
    """Item i goes to rank i mod ``world``, in groups of ``world``; ``even`` drops a last
    incomplete group (every rank the same count). The first ``skip`` of this rank's items are
    passed over."""
    group: list = []
    taken = 0
    for x in items:
        group.append(x)
        if len(group) == world:
            if taken >= skip:
                yield group[rank]
            taken += 1
            group = []
    if not even and rank < len(group) and taken >= skip:
        yield group[rank]


class ShardedBatchSampler:
    """Rank ``rank``'s share of a batch sampler's batches (see ``_shard``); ``skip`` local
    batches are passed over at the next iteration only (a resume), as index lists."""

    def __init__(self, inner: Any, rank: int = 0, world: int = 1, even: bool = True) -> None:
        self.inner, self.rank, self.world, self.even = inner, rank, world, even
        self.skip = 0

    @property
    def sampler(self) -> Any:
        """The inner batch sampler's sampler (its shuffling generator is the stream's)."""
        return getattr(self.inner, "sampler", None)

    def __len__(self) -> int:
        n = len(self.inner)
        return n // self.world if self.even else (n - self.rank + self.world - 1) // self.world

    def __iter__(self) -> Iterator:
        skip, self.skip = self.skip, 0
        return _shard(self.inner, self.rank, self.world, self.even, skip)


def _resamplable(loader: Any) -> bool:
    """A plain DataLoader over a map-style dataset with automatic batching."""
    return (type(loader) is DataLoader and loader.batch_sampler is not None
            and not isinstance(loader.dataset, IterableDataset))


def _with_batch_sampler(loader: DataLoader, batch_sampler: Any) -> DataLoader:
    """The same loader (dataset, collate, workers, generator) drawing from ``batch_sampler``."""
    return DataLoader(
        loader.dataset, batch_sampler=batch_sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=getattr(loader, "in_order", True))


def shard_batches(loader: Any, rank: int, world: int, even: bool) -> Any:
    """``loader`` restricted to rank ``rank`` of ``world`` (itself when ``world`` is 1)."""
    if world == 1:
        return loader
    if _resamplable(loader):
        return _with_batch_sampler(loader, ShardedBatchSampler(loader.batch_sampler, rank,
                                                               world, even))
    return ShardedBatchSampler(loader, rank, world, even)      # any re-iterable of batches


class TrainStream:
    """The train loader as a resumable stream of optimizer-step groups of micro-batches.

    Args:
        loader: a ``DataLoader`` (shuffling made reproducible and resumable, see the module
            docstring) or any re-iterable of batches.
        group_size: micro-batches per optimizer step G; a partial group at an epoch's end is
            dropped.
        max_epochs: ``next_group`` returns None once this many epochs are done.
        seed: seeds the loader's generators where it has none (sampler: seed, loader: seed + 1).
        prepare: ``prepare(raw_batch, where) -> Batch`` (``prepare_batch`` with the trainer's
            device and model limits).
        rank, world: this process's share of the batches under data parallelism.
    """

    def __init__(self, loader: Any, group_size: int, max_epochs: int, seed: int,
                 prepare: Callable[[Any, str], Batch], rank: int = 0, world: int = 1) -> None:
        self._skipper = None
        self._source = loader         # the user's loader (its generators, when sharded below)
        if _resamplable(loader):      # consumed batches are skipped without fetching them
            self._skipper = ShardedBatchSampler(loader.batch_sampler, rank, world, even=True)
            loader = _with_batch_sampler(loader, self._skipper)
        elif world > 1:
            loader = ShardedBatchSampler(loader, rank, world, even=True)
        self.loader, self.group_size, self.max_epochs = loader, group_size, max_epochs
        self.seed, self.prepare = seed, prepare
        self.epoch = 0
        """Current epoch (0-based)."""
        self.batch_in_epoch = 0
        """Micro-batches of ``epoch`` consumed so far."""
        self._iter: Any = None
        self._epoch_gen_states: dict[str, torch.Tensor] = {}

    def generators(self) -> dict[str, torch.Generator]:
        """The loader's shuffling generators, created (seeded) where missing."""
        dl = self.loader if isinstance(self.loader, DataLoader) else self._source
        if not isinstance(dl, DataLoader):
            return {}
        gens: dict[str, torch.Generator] = {}
        samplers = [dl.sampler, getattr(dl.batch_sampler, "sampler", None)]
        for i, s in enumerate(samplers):
            if isinstance(s, RandomSampler):
                if s.generator is None:
                    s.generator = torch.Generator().manual_seed(self.seed)
                gens[f"sampler{i}"] = s.generator
        if dl.generator is None:
            dl.generator = torch.Generator().manual_seed(self.seed + 1)
        gens["loader"] = dl.generator
        return gens

    def batches_per_epoch(self) -> int | None:
        """Micro-batches per epoch of this rank's share, or None for a loader without a length
        (an iterable dataset, a generator-backed re-iterable)."""
        try:
            return len(self.loader)
        except TypeError:
            return None

    def _open_epoch(self, restore: dict[str, torch.Tensor] | None = None) -> None:
        gens = self.generators()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if restore is not None:
            for k, g in gens.items():
                if k in restore:
                    g.set_state(restore[k].cpu())
        self._epoch_gen_states = {k: g.get_state() for k, g in gens.items()}
        skip = self.batch_in_epoch                   # resume inside an epoch
        if self._skipper is not None:
            if skip > len(self._skipper):
                raise ValueError(f"resume: the train loader has only {len(self._skipper)} "
                                 f"batches in epoch {self.epoch}, the checkpoint consumed {skip}")
            self._skipper.skip, skip = skip, 0
        self._iter = iter(self.loader)
        for i in range(skip):
            if next(self._iter, None) is None:
                raise ValueError(f"resume: the train loader has only {i} batches in epoch "
                                 f"{self.epoch}, the checkpoint consumed {self.batch_in_epoch}")

    def next_group(self) -> list[Batch] | None:
        """The next G prepared micro-batches; None when ``max_epochs`` epochs are done."""
        while self.epoch < self.max_epochs:
            if self._iter is None:
                self._open_epoch()
            group = []
            while len(group) < self.group_size:
                raw = next(self._iter, None)
                if raw is None:
                    break
                group.append(self.prepare(raw, batch_name("train", self.batch_in_epoch,
                                                          self.epoch)))
                self.batch_in_epoch += 1
            if len(group) == self.group_size:
                return group
            self.epoch += 1
            self.batch_in_epoch = 0
            self._iter = None
        return None

    def state_dict(self) -> dict[str, Any]:
        """The trainer checkpoint's ``data`` entry: position and generator states."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "generator_states": dict(self._epoch_gen_states),
                "generators_now": {k: g.get_state() for k, g in self.generators().items()},
                "epoch_open": self._iter is not None}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; an open epoch is re-opened and its consumed micro-batches
        skipped, so the next group is the one an uninterrupted run would get."""
        self.epoch, self.batch_in_epoch = int(d["epoch"]), int(d["batch_in_epoch"])
        self._iter = None
        if d["epoch_open"]:
            self._open_epoch(restore=d["generator_states"])
        else:
            for k, g in self.generators().items():
                if k in d["generators_now"]:
                    g.set_state(d["generators_now"][k].cpu())
