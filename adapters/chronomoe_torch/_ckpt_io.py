"""Writing and reading one checkpoint directory: ``save_state``, ``load_state`` (public through
``chronomoe_torch.checkpoint``). The on-disk layout is ``_ckpt_format``'s; pointer files and the
atomic directory write are ``_atomic``'s; the tree encoding is ``_tree``'s.

Checkpoints are never overwritten. ``save_state`` writes a new directory (an existing name is
refused with ``CheckpointExistsError``): everything is encoded in memory first (a bad tree raises
before the disk is touched), written and fsynced in a hidden temporary sibling, read back and
compared bit for bit (``verify=True``), and made visible with one ``rename``; then ``latest`` is
pointed at it. A replaceable name is a pointer (``write_pointer``), moved atomically after the
checkpoint it names is complete. A crash therefore leaves at most hidden leftovers, which later
saves delete (``_atomic``).

Trees: nested dict / list / tuple of torch tensors, numpy arrays and scalars, Python scalars,
str, bytes, None, torch.Size and torch.dtype (the encoding is ``_tree``'s).

Reading (``load_state``) never runs code from the file: JSON through ``json`` and tensors
through ``safetensors``; nothing is unpickled. The manifest must list exactly the two files;
each file's size and sha256 are checked before it is parsed; any failure raises a
``CheckpointError`` (a ``ValueError``) naming the file. A checkpoint of another format version
raises ``CheckpointVersionError`` naming both versions. Directories are immutable, so a reader
cannot mix two checkpoints; a read through a pointer that a concurrent writer moves (and whose
old target it prunes) meanwhile is retried on the new target.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import safetensors.torch

from ._atomic import read_pointer, resolve, write_dir, write_pointer
from ._ckpt_format import (
    _FILES, _KIND_RE, _MAX_JSON_BYTES, FORMAT_NAME, FORMAT_VERSION, LATEST_POINTER,
    MANIFEST_FILE, META_FILE, TENSORS_FILE, CheckpointCorruptError, CheckpointError,
    CheckpointExistsError, CheckpointMismatchError, CheckpointNotFoundError, _check_name,
    _parse_manifest, _sha256,
)
from ._tree import _Decoder, _Encoder, trees_equal

__all__ = ["save_state", "load_state", "read_manifest", "verify_checkpoint"]


def save_state(path: str | os.PathLike, tree: Any, *, kind: str = "trainer",
               format_version: int = FORMAT_VERSION, update_latest: bool = True,
               verify: bool = True) -> Path:
    """Write ``tree`` as the new checkpoint directory ``path`` (never overwriting: an existing
    ``path`` raises ``CheckpointExistsError``); returns ``path``.

    kind: a label checked by ``load_state(kind=...)`` ("trainer", "chronovisor", ...).
    format_version: the version written in meta.json and manifest.json (other values only to
        test version checks; the layout is always this module's).
    update_latest: afterwards point ``<parent>/latest`` at this checkpoint.
    verify: before the commit, read the written files back and require them to decode to a
        tree bit-identical to ``tree``; raises ``CheckpointError`` (nothing visible) if not.
    """
    path = Path(path)
    _check_name(path)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"save_state: kind={kind!r}: expected a short name of letters, digits, "
                         f"'_', '.', '-'")
    if isinstance(format_version, bool) or not isinstance(format_version, int) \
            or format_version < 1:
        raise ValueError(f"save_state: format_version={format_version!r}: expected an int >= 1")
    if os.path.lexists(path):
        raise CheckpointExistsError(f"save_state: {path} already exists; checkpoints are never "
                                    f"overwritten (choose a new name, e.g. unique_name())")

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

    write_dir(path, files, check if verify else None)
    if update_latest:
        write_pointer(path.parent, LATEST_POINTER, path.name)
    return path


def _read_file(file: Path, want: int | None, limit: int | None = None) -> bytes | None:
    """The bytes of ``file`` (None when missing); its size is checked before it is read."""
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        return None
    with f:
        size = os.fstat(f.fileno()).st_size
        if want is not None and size != want:
            raise CheckpointCorruptError(f"checkpoint file {file} has {size} bytes, the manifest "
                                         f"says {want} (truncated or altered)")
        if limit is not None and size > limit:
            raise CheckpointCorruptError(f"checkpoint file {file}: {size} bytes, more than any "
                                         f"checkpoint JSON file can be")
        return f.read()


def _read_dir(path: Path, expect_version: int) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {file: bytes}) of the checkpoint directory ``path``, sizes and checksums
    checked."""
    manifest = _parse_manifest(_read_file(path / MANIFEST_FILE, None, _MAX_JSON_BYTES), path,
                               expect_version)
    out = {}
    for name in _FILES:
        entry = manifest["files"][name]
        data = _read_file(path / name, entry["size"])
        if data is None:
            raise CheckpointCorruptError(f"checkpoint file {path / name} is missing")
        if len(data) != entry["size"]:  # shrank while being read
            raise CheckpointCorruptError(
                f"checkpoint file {path / name} has {len(data)} bytes, the manifest says "
                f"{entry['size']} (truncated or altered)")
        digest = _sha256(data)
        if digest != entry["sha256"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path / name} fails its checksum: sha256 {digest}, the "
                f"manifest says {entry['sha256']} (altered)")
        out[name] = data
    return manifest, out


def _read(path: Path, expect_version: int) -> tuple[Path, dict, dict[str, bytes]]:
    """Resolve ``path`` (directory or pointer) and read it. A failure is retried only when
    ``path`` is a pointer that moved meanwhile (a concurrent writer moved it and pruned its old
    target); anything else is a real fault and raises."""
    for attempt in range(5):
        named = _pointed(path)
        try:
            target = resolve(path)
            return (target, *_read_dir(target, expect_version))
        except (CheckpointNotFoundError, CheckpointCorruptError, OSError):
            if attempt == 4 or named is None or _pointed(path) == named:
                raise
    raise AssertionError("unreachable")


def _pointed(path: Path) -> Path | None:
    """What the pointer file ``path`` names now (None: not a readable pointer)."""
    try:
        return read_pointer(path) if path.is_file() else None
    except (CheckpointError, OSError):
        return None


def read_manifest(path: str | os.PathLike, *, _expect_version: int = FORMAT_VERSION) -> dict:
    """The validated manifest of a checkpoint (directory or pointer; files are not hashed)."""
    path = resolve(Path(path))
    return _parse_manifest(_read_file(path / MANIFEST_FILE, None, _MAX_JSON_BYTES), path,
                           _expect_version)


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check manifest, sizes and checksums of a checkpoint without decoding it; returns the
    manifest or raises ``CheckpointError`` naming the file."""
    return _read(Path(path), FORMAT_VERSION)[1]


def load_state(path: str | os.PathLike, *, kind: str | None = None,
               map_location: Any = "cpu", _expect_version: int = FORMAT_VERSION) -> Any:
    """Read a checkpoint written by ``save_state`` and return its tree.

    path: the checkpoint directory, or a pointer file (``latest``, ``final``, ...) naming one.
    kind: if given, the checkpoint's kind must equal it (``CheckpointMismatchError``).
    map_location: device for the tensors (None keeps them on the CPU).
    Never unpickles. Raises ``CheckpointNotFoundError``, ``CheckpointCorruptError``,
    ``CheckpointVersionError`` or ``CheckpointMismatchError``, each naming the file.
    Peak memory is about twice the tensor data (file bytes + tensors).
    """
    return _load(path, kind, map_location, _expect_version)[1]


def _load(path: str | os.PathLike, kind: str | None, map_location: Any,
          expect_version: int = FORMAT_VERSION) -> tuple[dict, Any]:
    """(manifest, tree) of a checkpoint."""
    target, manifest, files = _read(Path(path), expect_version)
    return manifest, _decode(target, manifest, files, kind, map_location)


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
