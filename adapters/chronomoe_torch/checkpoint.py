"""Checkpoint IO: atomic, versioned, checksummed, never unpickles; and (re-exported from
``chronovisor_checkpoint``) the geological ``ChronovisorCheckpoint`` of the P×T controller.

On-disk layout (format version 1). A checkpoint is a *directory*::

    <name>/
      tensors.safetensors   every tensor and numpy array of the tree, keyed by its path
      meta.json             the tree's skeleton (containers, scalars, references to tensors),
                            plus "format", "format_version" and "kind"
      manifest.json         "format", "format_version", "kind", "created_unix_ns" and, per file,
                            its size in bytes and sha256

Trees: nested dict / list / tuple of torch tensors (any dtype, any layout; non-contiguous and
storage-sharing tensors are written as their values; identical aliases, e.g. tied weights, are
written once and come back as one tensor), numpy arrays and scalars, Python int (any size),
float (inf/nan too), bool, str, bytes, None, torch.Size and torch.dtype. Dict keys are str or
int (torch optimizer state_dicts use int keys); tuples stay tuples; OrderedDict stays
OrderedDict with its ``_metadata`` (module versions that ``load_state_dict`` reads). The
encoding is ``_tree``'s.

Writing (``save_state``) is atomic: everything is encoded in memory first (a bad tree raises
before the disk is touched); the files are written and fsynced in a hidden temporary sibling,
read back and compared bit for bit (``verify=True``), committed with one rename (or an atomic
exchange with the checkpoint it replaces), and then the ``latest`` pointer file in the parent
directory is replaced atomically. A visible name therefore only ever holds a complete
checkpoint, and ``latest`` only ever names one that was complete when it was written; a crash
leaves at most hidden leftovers, which later calls recover or delete. The protocol, its
leftovers (``.<name>.<tmp|old|trash>-<host tag>-<pid>-<token>``) and ``recover_checkpoints``
are ``_atomic``'s.

Reading (``load_state``) never runs code from the file: JSON through ``json`` and tensors
through ``safetensors``; nothing is unpickled. The manifest must list exactly the two files;
each file's size and sha256 are checked before it is parsed; any failure raises a
``CheckpointError`` (a ``ValueError``) naming the file. A checkpoint of another format version
raises ``CheckpointVersionError`` naming both versions. All files are read through one handle
on the directory, and a read that fails because a concurrent ``save_state`` replaced the
checkpoint meanwhile is retried, so a reader never mixes two checkpoints nor reports a good one
as corrupt.

``ChronovisorCheckpoint`` is the controller's geological state with the seed's field names,
mapped one to one onto the ``PxTController``'s persistent buffers and saved with
``save_state`` (kind "chronovisor"); see ``chronovisor_checkpoint``.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import safetensors.torch

from ._atomic import (  # noqa: F401  (_HIDDEN_RE, _host_tag: read by the tests)
    _HIDDEN_RE, _host_tag, _read_consistent, _remove_tree, _write_dir, _write_latest,
    recover_checkpoints,
)
from ._ckpt_format import (
    _KIND_RE, _MAX_JSON_BYTES, _NAME_RE, FORMAT_NAME, FORMAT_VERSION, LATEST_POINTER,
    MANIFEST_FILE, META_FILE, TENSORS_FILE, CheckpointCorruptError, CheckpointError,
    CheckpointMismatchError, CheckpointNotFoundError, CheckpointVersionError, _check_name,
    _not_a_dir, _parse_manifest, _sha256,
)
from ._tree import _Decoder, _Encoder, trees_equal  # noqa: F401  (_Encoder: the benchmark's)
from .chronovisor_checkpoint import (  # noqa: F401  (the buffer tables: docs/CONTRACTS.md)
    _CORE_BUFFERS, _LENS_BUFFERS, CHRONOVISOR_KIND, ChronovisorCheckpoint, LensState,
)

__all__ = [
    "FORMAT_VERSION", "FORMAT_NAME", "LATEST_POINTER",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointCorruptError",
    "CheckpointVersionError", "CheckpointMismatchError",
    "save_state", "load_state", "verify_checkpoint", "read_manifest",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "recover_checkpoints",
    "trees_equal", "capture_rng_state", "restore_rng_state",
    "ChronovisorCheckpoint", "LensState",
]


# ----------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------
def save_state(path: str | os.PathLike, tree: Any, *, kind: str = "trainer",
               format_version: int = FORMAT_VERSION, update_latest: bool = True,
               verify: bool = True) -> Path:
    """Write ``tree`` atomically as the checkpoint directory ``path``; returns ``path``.

    kind: a label checked by ``load_state(kind=...)`` ("trainer", "chronovisor", ...).
    format_version: the version written in meta.json and manifest.json (other values only to
        test version checks; the layout is always this module's).
    update_latest: afterwards point ``<parent>/latest`` at this checkpoint.
    verify: before committing, read the written files back and require them to decode to a
        tree bit-identical to ``tree`` (guards against saving something other than the live
        state); raises ``CheckpointError`` and leaves any previous checkpoint in place if not.
    """
    path = Path(path)
    _check_name(path)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"save_state: kind={kind!r}: expected a short name of letters, digits, "
                         f"'_', '.', '-'")
    if isinstance(format_version, bool) or not isinstance(format_version, int) \
            or format_version < 1:
        raise ValueError(f"save_state: format_version={format_version!r}: expected an int >= 1")
    parent = path.parent
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise CheckpointError(f"save_state: {path} exists and is not a checkpoint directory; "
                              f"refusing to replace it")
    if path.is_dir() and not (path / MANIFEST_FILE).is_file() and any(path.iterdir()):
        raise CheckpointError(f"save_state: {path} is a non-empty directory that is not a "
                              f"checkpoint (no {MANIFEST_FILE}); refusing to replace it")

    enc = _Encoder()
    skeleton = enc.encode(tree)
    header = {"format": FORMAT_NAME, "format_version": format_version, "kind": kind}
    tensor_bytes = safetensors.torch.save(enc.tensors, metadata={"format": "pt"})
    meta_bytes = json.dumps({**header, "tree": skeleton}, allow_nan=False,
                            separators=(",", ":")).encode()
    files = {TENSORS_FILE: tensor_bytes, META_FILE: meta_bytes}
    manifest = {**header, "created_unix_ns": time.time_ns(),
                "files": {n: {"size": len(b), "sha256": _sha256(b)} for n, b in files.items()}}
    files = {**files, MANIFEST_FILE: json.dumps(manifest, indent=1).encode()}

    def check(tmp: Path) -> None:  # the disk returns what was written, and it decodes to the tree
        read = {n: (tmp / n).read_bytes() for n in files}
        for n, b in files.items():
            if read[n] != b:
                raise CheckpointError(f"save_state: {tmp / n} reads back other bytes than "
                                      f"were written; not committed")
        back = _decode(tmp, manifest, read, kind, None)
        if not trees_equal(back, tree):
            raise CheckpointError(f"save_state: the files written to {tmp} do not read back "
                                  f"as the tree that was given; not committed")

    _write_dir(path, files, check if verify else None)
    if update_latest:
        _write_latest(parent, path.name)
    return path


def read_manifest(path: str | os.PathLike, *, _expect_version: int = FORMAT_VERSION) -> dict:
    """The validated manifest of the checkpoint directory ``path`` (files are not hashed)."""
    path = Path(path)
    if not path.is_dir():
        raise _not_a_dir(path)
    mfile = path / MANIFEST_FILE
    try:
        size = mfile.stat().st_size
        if size > _MAX_JSON_BYTES:
            raise CheckpointCorruptError(f"checkpoint file {mfile}: {size} bytes, more than "
                                         f"any checkpoint JSON file can be")
        data = mfile.read_bytes()
    except FileNotFoundError:
        data = None
    return _parse_manifest(data, path, _expect_version)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check manifest, sizes and checksums of a checkpoint without decoding it; returns the
    manifest or raises ``CheckpointError`` naming the file."""
    return _read_consistent(Path(path), FORMAT_VERSION)[1]


def load_state(path: str | os.PathLike, *, kind: str | None = None,
               map_location: Any = "cpu", _expect_version: int = FORMAT_VERSION) -> Any:
    """Read a checkpoint written by ``save_state`` and return its tree.

    path: the checkpoint directory, or a ``latest`` pointer file (its target is loaded).
    kind: if given, the checkpoint's kind must equal it (``CheckpointMismatchError``).
    map_location: device for the tensors (None keeps them on the CPU).
    Never unpickles. Raises ``CheckpointNotFoundError``, ``CheckpointCorruptError``,
    ``CheckpointVersionError`` or ``CheckpointMismatchError``, each naming the file.
    Peak memory is about twice the tensor data (file bytes + tensors).
    """
    path, manifest, files = _read_consistent(Path(path), _expect_version)
    return _decode(path, manifest, files, kind, map_location)


def _decode(path: Path, manifest: dict, files: dict[str, bytes], kind: str | None,
            map_location: Any) -> Any:
    """The tree of a checkpoint whose files have passed their size and checksum checks."""
    if kind is not None and manifest.get("kind") != kind:
        raise CheckpointMismatchError(f"checkpoint {path} is of kind {manifest.get('kind')!r}, "
                                      f"expected kind {kind!r}")
    meta_file = path / META_FILE
    try:
        meta = json.loads(files[META_FILE])
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"checkpoint file {meta_file} is not valid JSON: "
                                     f"{e}") from None
    if not isinstance(meta, dict) or "tree" not in meta:
        raise CheckpointCorruptError(f"checkpoint file {meta_file} has no 'tree'")
    for key in ("format", "format_version", "kind"):
        if meta.get(key) != manifest.get(key):
            raise CheckpointCorruptError(f"checkpoint file {meta_file}: {key}={meta.get(key)!r} "
                                         f"but {MANIFEST_FILE} says {manifest.get(key)!r}")
    tfile = path / TENSORS_FILE
    try:
        tensors = safetensors.torch.load(files.pop(TENSORS_FILE))
    except Exception as e:  # safetensors raises its own SafetensorError and others
        raise CheckpointCorruptError(f"checkpoint file {tfile} is not a valid safetensors "
                                     f"file: {type(e).__name__}: {e}") from None
    dec = _Decoder(tensors, meta_file, None if map_location is None else map_location)
    tree = dec.decode(meta["tree"])
    extra = sorted(set(tensors) - dec.used)
    if extra:
        raise CheckpointCorruptError(f"checkpoint file {tfile} holds tensors that "
                                     f"{META_FILE} does not reference: {extra[:5]}")
    return tree


# ----------------------------------------------------------------------------------------
# checkpoint directories: list, latest, prune
# ----------------------------------------------------------------------------------------
def _created(p: Path) -> int:
    try:
        return int(read_manifest(p)["created_unix_ns"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return (p / MANIFEST_FILE).stat().st_mtime_ns


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory`` (visible subdirectories holding a manifest),
    oldest first by the time they were written. Hidden leftovers are never listed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    recover_checkpoints(directory)
    found = [p for p in directory.iterdir() if not p.name.startswith(".") and p.is_dir()
             and not p.is_symlink() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: (_created(p), p.name))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``<directory>/latest`` when it exists and is complete; else the
    most recently written complete checkpoint; None when there is none."""
    directory = Path(directory)
    recover_checkpoints(directory)
    pointer = directory / LATEST_POINTER
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        cand = directory / name
        if _NAME_RE.match(name) and name != LATEST_POINTER and cand.is_dir() \
                and (cand / MANIFEST_FILE).is_file():
            return cand
    found = list_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep: int,
                      protect: tuple[str, ...] = ("best", "final")) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``directory``; returns what was deleted.

    Never deletes the names in ``protect`` ('best', 'final') nor the checkpoint that ``latest``
    points at. Each deletion first renames the directory to a hidden name, so a crash during
    pruning never leaves a half-deleted checkpoint under a visible name."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"prune_checkpoints: keep={keep!r}: expected an int >= 0")
    directory = Path(directory)
    latest = latest_checkpoint(directory)
    candidates = [p for p in list_checkpoints(directory)
                  if p.name not in protect and (latest is None or p.name != latest.name)]
    # `latest` (when not protected) is one of the `keep` newest
    room = keep - 1 if keep and latest is not None and latest.name not in protect else keep
    doomed = candidates[:max(0, len(candidates) - room)]
    for p in doomed:
        _remove_tree(p)
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
