"""Checkpoint IO: write-once, versioned, checksummed, never unpickles; the public face of the
checkpoint modules, and (re-exported from ``chronovisor_checkpoint``) the geological
``ChronovisorCheckpoint`` of the P×T controller.

A checkpoint is a directory (layout: ``_ckpt_format``) beside pointer files: ``latest`` (moved by
every save), and whatever names a caller keeps (the trainer's ``best``, ``final``,
``last_good``), each holding one line, the name of a sibling checkpoint directory.
``load_state(dir / "final")`` follows it. ``save_state``/``load_state`` write and read one
directory (``_ckpt_io``: never overwriting, verified before the commit, checksums checked before
parsing, nothing unpickled); this module adds the directory of checkpoints (``list_checkpoints``,
``pointers``, ``latest_checkpoint``, ``unique_name`` for a free name, ``prune_checkpoints`` for
old checkpoints that no pointer names) and the RNG state a trainer checkpoint keeps.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ._atomic import (  # noqa: F401  (_HIDDEN_RE, _host_tag: read by the tests)
    _HIDDEN_RE, _host_tag, read_pointer, remove_dir, remove_leftovers, write_pointer,
)
from ._ckpt_format import (
    _NAME_RE, FORMAT_NAME, FORMAT_VERSION, LATEST_POINTER, MANIFEST_FILE, CheckpointCorruptError,
    CheckpointError, CheckpointExistsError, CheckpointMismatchError, CheckpointNotFoundError,
    CheckpointVersionError,
)
from ._ckpt_io import load_state, read_manifest, save_state, verify_checkpoint
from ._tree import _Encoder, trees_equal  # noqa: F401  (_Encoder: the benchmark's)
from .chronovisor_checkpoint import (  # noqa: F401  (the buffer tables: docs/CONTRACTS.md)
    _CORE_BUFFERS, _LENS_BUFFERS, CHRONOVISOR_KIND, ChronovisorCheckpoint, LensState,
)

__all__ = [
    "FORMAT_VERSION", "FORMAT_NAME", "LATEST_POINTER",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointExistsError",
    "CheckpointCorruptError", "CheckpointVersionError", "CheckpointMismatchError",
    "save_state", "load_state", "verify_checkpoint", "read_manifest",
    "write_pointer", "read_pointer", "pointers", "unique_name",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "remove_leftovers",
    "trees_equal", "capture_rng_state", "restore_rng_state",
    "ChronovisorCheckpoint", "LensState",
]


# ----------------------------------------------------------------------------------------
# a directory of checkpoints: list, pointers, names, prune
# ----------------------------------------------------------------------------------------
def _created(p: Path) -> int:
    try:
        return int(read_manifest(p)["created_unix_ns"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return (p / MANIFEST_FILE).stat().st_mtime_ns


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint directories in ``directory`` (visible, holding a manifest), oldest first by
    the time they were written. Pointers and hidden leftovers are never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if not p.name.startswith(".") and p.is_dir()
             and not p.is_symlink() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: (_created(p), p.name))


def pointers(directory: str | os.PathLike) -> dict[str, str]:
    """{pointer name: checkpoint name} of the pointer files in ``directory`` (unreadable or
    dangling ones are left out)."""
    directory = Path(directory)
    out: dict[str, str] = {}
    if not directory.is_dir():
        return out
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or not p.is_file() or not _NAME_RE.match(p.name):
            continue
        try:
            target = read_pointer(p)
        except (CheckpointError, OSError):
            continue
        if (target / MANIFEST_FILE).is_file():
            out[p.name] = target.name
    return out


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint ``<directory>/latest`` names when it exists; else the most recently
    written one; None when there is none."""
    directory = Path(directory)
    name = pointers(directory).get(LATEST_POINTER)
    if name is not None:
        return directory / name
    found = list_checkpoints(directory)
    return found[-1] if found else None


def unique_name(directory: str | os.PathLike, base: str) -> str:
    """``base`` when nothing in ``directory`` has that name, else ``base.1``, ``base.2``, ..."""
    directory = Path(directory)
    name, k = base, 0
    while os.path.lexists(directory / name):
        k += 1
        name = f"{base}.{k}"
    return name


def prune_checkpoints(directory: str | os.PathLike, keep: int,
                      match: str | re.Pattern | None = None) -> list[Path]:
    """Delete old checkpoints of ``directory``; returns what was deleted.

    Rule: of the checkpoints (only names matching ``match``, when given), the ``keep`` newest
    are kept, and so is every one that a pointer (``latest``, ``best``, ``final``, ...) names;
    the others are deleted. Each deletion renames the directory to a hidden name first, so a
    crash never leaves half a checkpoint visible."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"prune_checkpoints: keep={keep!r}: expected an int >= 0")
    directory = Path(directory)
    named = set(pointers(directory).values())
    pattern = re.compile(match) if isinstance(match, str) else match
    candidates = [p for p in list_checkpoints(directory)
                  if pattern is None or pattern.match(p.name)]
    doomed = [p for p in candidates[:max(0, len(candidates) - keep)] if p.name not in named]
    for p in doomed:
        remove_dir(p)
    return doomed


# ----------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python, NumPy (global), torch CPU and every CUDA device's RNG state, as a tree."""
    import random
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch_cpu": torch.get_rng_state(), "torch_cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states are restored when devices are present)."""
    import random
    try:
        py = state["python"]
        random.setstate((int(py[0]), tuple(int(x) for x in py[1]),
                         None if py[2] is None else float(py[2])))
        np.random.set_state(tuple(state["numpy"]))
        torch.set_rng_state(state["torch_cpu"].cpu())
        cuda = state.get("torch_cuda") or []
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"restore_rng_state: malformed RNG state ({e})") from None
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available; "
                          "they were not restored", stacklevel=2)
        else:
            n = torch.cuda.device_count()
            if len(cuda) != n:
                warnings.warn(f"checkpoint holds {len(cuda)} CUDA RNG states, this machine has "
                              f"{n} devices; restoring the first {min(n, len(cuda))}",
                              stacklevel=2)
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.cpu(), i)
