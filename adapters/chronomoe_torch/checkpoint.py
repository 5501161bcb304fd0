"""Checkpoint IO: atomic, versioned, checksummed, never unpickles; and the geological
``ChronovisorCheckpoint`` of the P×T controller.

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
OrderedDict with its ``_metadata`` (module versions that ``load_state_dict`` reads).

Writing (``save_state``) is atomic:
  1. everything is encoded in memory first (a bad tree raises before the disk is touched);
  2. files are written into a hidden sibling ``.<name>.tmp-<pid>-<token>/``, each fsynced, then
     the directory is fsynced; with ``verify=True`` it is read back and compared bit for bit;
  3. commit: a new name is one ``rename``. An existing checkpoint of the same name is swapped
     in one step with ``renameat2(RENAME_EXCHANGE)`` (Linux); where that is unavailable the old
     one is renamed aside to ``.<name>.old-<pid>-<token>/`` first, the new one renamed in, the
     old one deleted. The parent directory is fsynced after each rename;
  4. the pointer file ``latest`` in the parent directory is replaced atomically (write a hidden
     temporary, fsync, ``os.replace``) to name the checkpoint just committed.
A visible name therefore only ever holds a complete checkpoint, and the ``latest`` pointer only
ever names one that was complete when it was written. A crash leaves at most hidden leftovers:
``.tmp-`` directories (ignored, deleted by later saves and by ``prune_checkpoints`` once their
writer is dead) and, only in the fallback protocol between its two renames, an ``.old-``
directory whose visible name is missing; every function here that opens or lists checkpoints
first renames such an orphan back into place (``recover_checkpoints``).

Reading (``load_state``) never runs code from the file: JSON through ``json`` and tensors
through ``safetensors``; nothing is unpickled. The manifest must list exactly the two files;
each file's size and sha256 are checked before it is parsed; any failure raises a
``CheckpointError`` (a ``ValueError``) naming the file. A checkpoint of another format version
raises ``CheckpointVersionError`` naming both versions. All files are read through one handle
on the directory, and a read that fails because a concurrent ``save_state`` replaced the
checkpoint meanwhile is retried, so a reader never mixes two checkpoints nor reports a good one
as corrupt.

Leftovers are named ``.<name>.<tmp|old|trash>-<host tag>-<pid>-<token>``: a leftover of this
host whose pid is gone is a dead writer's; another host's (shared filesystem) counts as dead
after an hour.

``ChronovisorCheckpoint`` (second half of the module) is the controller's geological state with
the seed's field names, mapped one to one onto the ``PxTController``'s persistent buffers and
saved with ``save_state`` (kind "chronovisor"); it refuses stale snapshots and states that
break the law's invariants, and checks a checksum of the state at load and after restore.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

import safetensors
import safetensors.torch

__all__ = [
    "FORMAT_VERSION", "FORMAT_NAME", "LATEST_POINTER",
    "CheckpointError", "CheckpointNotFoundError", "CheckpointCorruptError",
    "CheckpointVersionError", "CheckpointMismatchError",
    "save_state", "load_state", "verify_checkpoint", "read_manifest",
    "list_checkpoints", "latest_checkpoint", "prune_checkpoints", "recover_checkpoints",
    "trees_equal", "capture_rng_state", "restore_rng_state",
    "ChronovisorCheckpoint", "LensState",
]

FORMAT_NAME = "chronomoe-checkpoint"
FORMAT_VERSION = 1
LATEST_POINTER = "latest"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
_FILES = (TENSORS_FILE, META_FILE)
_MAX_JSON_BYTES = 256 * 1024 * 1024  # a bound against absurd files, far above real metadata
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_KIND_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_HIDDEN_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|trash)"
                        r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)$")
_FOREIGN_LEFTOVER_S = 3600.0  # another host's leftover counts as abandoned after this long
_ORPHAN_WAIT_S = 2.0  # how long a reader waits for a live writer between its two renames
_SAFE_DTYPES = frozenset(safetensors.torch._TYPES.values())  # dtypes safetensors stores natively
_JSON_SAFE_INT = 2 ** 53  # larger ints are written as decimal strings (exact in every reader)

# Tests flip this to exercise the rename-aside protocol that non-Linux systems use.
_USE_RENAME_EXCHANGE = True


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (and no recoverable one beside it)."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, altered, or not what its manifest says."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint has another format version (or format) than this code reads."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but does not fit (other kind, other layer/expert counts...)."""


# ----------------------------------------------------------------------------------------
# tree <-> (JSON skeleton, flat tensor dict)
# ----------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fmt_path(parts: tuple) -> str:
    return "tree" + "".join(f"[{p!r}]" for p in parts)


def _key_part(k: Any) -> str:
    # JSON-pointer escaping keeps keys unique when dict keys themselves contain "/".
    return str(k).replace("~", "~0").replace("/", "~1")


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._alias: dict[tuple, str] = {}
        self._storages: set[tuple] = set()

    def _new_key(self, parts: tuple) -> str:
        base = "/".join(_key_part(p) for p in parts) or "<root>"
        key, n = base, 1
        while key in self.tensors:  # int key 1 and str key "1" would otherwise collide
            n += 1
            key = f"{base}~{n}"
        return key

    def tensor(self, t: torch.Tensor, parts: tuple) -> dict:
        where = _fmt_path(parts)
        if t.layout != torch.strided:
            raise TypeError(f"save_state: {where} is a {t.layout} tensor; only dense (strided) "
                            f"tensors can be saved; convert it with .to_dense() first")
        if t.is_quantized or t.is_nested or t.device.type == "meta":
            raise TypeError(f"save_state: {where} is a quantized, nested or meta tensor, which "
                            f"cannot be saved")
        t = t.detach()
        alias = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if alias is not None and alias in self._alias:
            key = self._alias[alias]
            return {"t": "tensor", "key": key, "dtype": _dtype_name(t.dtype),
                    "shape": list(t.shape), "raw": self.tensors[key].dtype != t.dtype}
        c = t.to("cpu").contiguous()
        storage = c.untyped_storage().data_ptr()
        if c.numel() and storage in self._storages:
            c = c.clone()  # safetensors refuses tensors that share memory
        if c.numel():
            self._storages.add(c.untyped_storage().data_ptr())
        raw = t.dtype not in _SAFE_DTYPES
        if raw:  # e.g. complex128, float8_e8m0: store the bytes, keep the dtype in meta.json
            c = c.reshape(-1).view(torch.uint8) if c.numel() else torch.empty(0, dtype=torch.uint8)
        key = self._new_key(parts)
        self.tensors[key] = c
        if alias is not None:
            self._alias[alias] = key
        return {"t": "tensor", "key": key, "dtype": _dtype_name(t.dtype),
                "shape": list(t.shape), "raw": raw}

    def ndarray(self, a: np.ndarray, parts: tuple, tag: str) -> dict:
        where = _fmt_path(parts)
        if a.dtype.kind not in "biufcSUmM" or a.dtype.fields is not None:
            raise TypeError(f"save_state: {where} is a numpy array of dtype {a.dtype}; only "
                            f"numeric, bool, bytes/str and datetime arrays can be saved "
                            f"(object arrays would need pickle)")
        data = np.frombuffer(np.ascontiguousarray(a).tobytes(), dtype=np.uint8).copy()
        key = self._new_key(parts)
        self.tensors[key] = torch.from_numpy(data)
        return {"t": tag, "key": key, "dtype": a.dtype.str, "shape": list(a.shape)}

    def encode(self, obj: Any, parts: tuple = ()) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            obj = int(obj)  # int subclasses (IntEnum) are written as plain ints
            return obj if abs(obj) < _JSON_SAFE_INT else {"t": "int", "v": str(obj)}
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)  # repr round-trips every finite double exactly (incl. -0.0)
            return {"t": "float", "v": repr(float(obj))}  # 'nan', 'inf', '-inf'
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, parts)
        if isinstance(obj, np.ndarray):
            return self.ndarray(obj, parts, "ndarray")
        if isinstance(obj, np.generic):
            return self.ndarray(np.asarray(obj), parts, "npscalar")
        if isinstance(obj, (bytes, bytearray)):
            return {"t": "bytes", "v": base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, torch.dtype):
            return {"t": "dtype", "v": _dtype_name(obj)}
        if isinstance(obj, torch.Size):
            return {"t": "size", "v": [int(d) for d in obj]}
        if isinstance(obj, dict):
            items = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(f"save_state: {_fmt_path(parts)} has a key {k!r} of type "
                                    f"{type(k).__name__}; dict keys must be str or int")
                items.append([k if isinstance(k, str) else int(k), self.encode(v, parts + (k,))])
            node: dict[str, Any] = {"t": "odict" if isinstance(obj, OrderedDict) else "dict",
                                    "items": items}
            md = getattr(obj, "_metadata", None)
            if md is not None:  # nn.Module.state_dict() version info
                node["metadata"] = self.encode(dict(md), parts + ("<_metadata>",))
            return node
        if type(obj) is list or type(obj) is tuple:
            return {"t": "list" if type(obj) is list else "tuple",
                    "items": [self.encode(v, parts + (i,)) for i, v in enumerate(obj)]}
        raise TypeError(f"save_state: {_fmt_path(parts)} is a {type(obj).__module__}."
                        f"{type(obj).__qualname__}; a tree holds only dict/list/tuple, torch "
                        f"tensors, numpy arrays/scalars, int, float, bool, str, bytes, None, "
                        f"torch.Size and torch.dtype (convert dataclasses and namedtuples to "
                        f"dicts)")


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], file: Path, device: Any) -> None:
        self.tensors, self.file, self.device = tensors, file, device
        self.used: set[str] = set()
        self._cache: dict[str, torch.Tensor] = {}

    def fail(self, what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"checkpoint file {self.file}: {what}")

    def _stored(self, node: dict) -> torch.Tensor:
        key = node.get("key")
        if not isinstance(key, str) or key not in self.tensors:
            raise self.fail(f"references tensor {key!r}, which is not in {TENSORS_FILE}")
        self.used.add(key)
        return self.tensors[key]

    def _shape(self, node: dict) -> tuple[int, ...]:
        shape = node.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self.fail(f"bad shape {shape!r} for tensor {node.get('key')!r}")
        return tuple(shape)

    def tensor(self, node: dict) -> torch.Tensor:
        key = node.get("key")
        if key in self._cache:  # an alias: the same tensor object, as when it was saved
            return self._cache[key]
        stored, shape = self._stored(node), self._shape(node)
        dtype = getattr(torch, str(node.get("dtype")), None)
        if not isinstance(dtype, torch.dtype):
            raise self.fail(f"unknown dtype {node.get('dtype')!r} for tensor {key!r}")
        if node.get("raw"):
            nbytes = math.prod(shape) * dtype.itemsize
            if stored.dtype != torch.uint8 or stored.numel() != nbytes:
                raise self.fail(f"tensor {key!r}: {stored.numel()} raw bytes, expected {nbytes} "
                                f"for {dtype} of shape {list(shape)}")
            t = stored.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
        else:
            if stored.dtype != dtype or tuple(stored.shape) != shape:
                raise self.fail(f"tensor {key!r} is {_dtype_name(stored.dtype)} "
                                f"{list(stored.shape)} in {TENSORS_FILE} but "
                                f"{_dtype_name(dtype)} {list(shape)} in {META_FILE}")
            t = stored
        if self.device is not None and t.device != torch.device(self.device):
            t = t.to(self.device)
        self._cache[key] = t
        return t

    def ndarray(self, node: dict) -> np.ndarray:
        stored, shape = self._stored(node), self._shape(node)
        try:
            dtype = np.dtype(str(node.get("dtype")))
        except TypeError as e:
            raise self.fail(f"bad numpy dtype {node.get('dtype')!r}: {e}") from None
        if dtype.kind not in "biufcSUmM" or dtype.fields is not None:
            raise self.fail(f"numpy dtype {dtype} is not allowed")
        nbytes = math.prod(shape) * dtype.itemsize
        if stored.dtype != torch.uint8 or stored.numel() != nbytes:
            raise self.fail(f"array {node.get('key')!r}: {stored.numel()} bytes, expected "
                            f"{nbytes} for {dtype} of shape {list(shape)}")
        return np.frombuffer(stored.numpy().tobytes(), dtype=dtype).reshape(shape).copy()

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, str, int, float)):
            return node
        if not isinstance(node, dict):
            raise self.fail(f"unexpected JSON value of type {type(node).__name__} in the tree")
        tag = node.get("t")
        try:
            if tag == "tensor":
                return self.tensor(node)
            if tag == "ndarray":
                return self.ndarray(node)
            if tag == "npscalar":
                return self.ndarray(node)[()]
            if tag == "int":
                return int(node["v"])
            if tag == "float":
                if node["v"] not in ("nan", "inf", "-inf"):
                    raise ValueError(f"non-finite float {node['v']!r}")
                return float(node["v"])
            if tag == "bytes":
                return base64.b64decode(node["v"], validate=True)
            if tag == "dtype":
                dt = getattr(torch, node["v"], None)
                if not isinstance(dt, torch.dtype):
                    raise ValueError(f"unknown torch dtype {node['v']!r}")
                return dt
            if tag == "size":
                return torch.Size([int(d) for d in node["v"]])
            if tag in ("list", "tuple"):
                items = [self.decode(v) for v in node["items"]]
                return items if tag == "list" else tuple(items)
            if tag in ("dict", "odict"):
                out: dict = OrderedDict() if tag == "odict" else {}
                for k, v in node["items"]:
                    if isinstance(k, bool) or not isinstance(k, (str, int)):
                        raise ValueError(f"bad dict key {k!r}")
                    out[k] = self.decode(v)
                if "metadata" in node:
                    out._metadata = self.decode(node["metadata"])  # type: ignore[attr-defined]
                return out
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise self.fail(f"malformed {tag!r} node in the tree "
                            f"({type(e).__name__}: {e})") from None
        raise self.fail(f"unknown node type {tag!r} in the tree (only data types are allowed; "
                        f"nothing is ever unpickled or imported)")


# ----------------------------------------------------------------------------------------
# filesystem primitives
# ----------------------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


_renameat2 = None


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False when unsupported."""
    global _renameat2
    if not _USE_RENAME_EXCHANGE or not hasattr(os, "fork"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def _host_tag() -> str:
    import socket
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _hidden(parent: Path, name: str, what: str) -> Path:
    """A hidden sibling named after its writer (host tag, pid), so that leftovers of dead
    writers can be told from work in progress."""
    return parent / f".{name}.{what}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def _writer_alive(host: str, pid: int, p: Path) -> bool:
    """Is the writer of the hidden entry ``p`` possibly still at work? On this host: its pid
    exists (a SIGKILLed writer must have been reaped). Another host's (a shared filesystem):
    assumed alive until the entry is ``_FOREIGN_LEFTOVER_S`` old."""
    if host != _host_tag():
        try:
            return time.time() - p.lstat().st_mtime < _FOREIGN_LEFTOVER_S
        except OSError:
            return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: exists, owned by someone else
        return True
    return True


def _remove_tree(d: Path) -> None:
    """Delete a directory so that no visible name ever holds a half-deleted checkpoint."""
    if not d.name.startswith("."):
        trash = _hidden(d.parent, d.name, "trash")
        os.rename(d, trash)
        _fsync_dir(d.parent)
        d = trash
    shutil.rmtree(d, ignore_errors=True)


def recover_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Finish what crashed writers left in ``directory``; returns the checkpoints put back.

    An ``.<name>.old-<host>-<pid>-*`` directory whose writer is dead and whose visible ``<name>`` is
    missing is the previous checkpoint of a save that crashed between its two renames: it is
    renamed back into place. Leftover ``.tmp-``, ``.trash-`` and superseded ``.old-``
    directories of dead writers are deleted. Leftovers of live writers are not touched."""
    directory = Path(directory)
    restored: list[Path] = []
    if not directory.is_dir():
        return restored
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        m = _HIDDEN_RE.match(p.name)
        if not m or _writer_alive(m["host"], int(m["pid"]), p):
            continue
        if not p.is_dir() or p.is_symlink():  # e.g. a `latest` pointer being written
            try:
                p.unlink()
            except OSError:
                pass
            continue
        target = directory / m["name"]
        if m["what"] == "old" and not target.exists() and (p / MANIFEST_FILE).is_file():
            try:
                os.rename(p, target)
            except OSError:
                continue  # keep the only copy; a later call tries again
            _fsync_dir(directory)
            restored.append(target)
            continue
        shutil.rmtree(p, ignore_errors=True)
    return restored


def _write_latest(parent: Path, name: str) -> None:
    tmp = _hidden(parent, LATEST_POINTER, "tmp")
    _write_file(tmp, (name + "\n").encode())
    os.replace(tmp, parent / LATEST_POINTER)
    _fsync_dir(parent)


# ----------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(path: Path) -> None:
    name = path.name
    if not _NAME_RE.match(name) or name == LATEST_POINTER:
        raise ValueError(f"save_state: checkpoint name {name!r} (from {path}) is not allowed: "
                         f"use letters, digits, '_', '.', '-', not starting with '.' or '-', "
                         f"and not {LATEST_POINTER!r} (reserved for the pointer file)")


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

    parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(parent)
    tmp = _hidden(parent, path.name, "tmp")
    os.mkdir(tmp)
    try:
        for n, b in files.items():
            _write_file(tmp / n, b)
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        _write_file(tmp / MANIFEST_FILE, manifest_bytes)
        _fsync_dir(tmp)
        if verify:  # the disk returns what was written, and it decodes to the tree given
            read = {n: (tmp / n).read_bytes() for n in (*files, MANIFEST_FILE)}
            for n, b in {**files, MANIFEST_FILE: manifest_bytes}.items():
                if read[n] != b:
                    raise CheckpointError(f"save_state: {tmp / n} reads back other bytes than "
                                          f"were written; not committed")
            back = _decode(tmp, manifest, read, kind, None)
            if not trees_equal(back, tree):
                raise CheckpointError(f"save_state: the files written to {tmp} do not read back "
                                      f"as the tree that was given; not committed")
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        _write_latest(parent, path.name)
    return path


def _commit(tmp: Path, path: Path) -> None:
    parent = path.parent
    if not path.exists():
        try:
            os.rename(tmp, path)
            _fsync_dir(parent)
            return
        except OSError as e:  # created meanwhile by someone else: fall through to replace
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _rename_exchange(tmp, path):
        _fsync_dir(parent)  # `path` now holds the new checkpoint, `tmp` the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _hidden(parent, path.name, "old")
    os.rename(path, old)
    _fsync_dir(parent)
    # A crash here leaves only `old` (complete, hidden); recover_checkpoints puts it back.
    os.rename(tmp, path)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _resolve(path: Path) -> Path:
    """Follow a ``latest`` pointer file; recover an orphaned checkpoint; else report."""
    if path.is_file() and path.name == LATEST_POINTER:
        target = path.read_text(encoding="utf-8", errors="replace").strip()
        if not _NAME_RE.match(target) or target == LATEST_POINTER:
            raise CheckpointCorruptError(f"checkpoint pointer {path} holds {target!r}, not a "
                                         f"checkpoint name")
        path = path.parent / target
    if path.exists():
        return path
    # Missing: an orphan of a crashed writer is put back; a live writer between the two renames
    # of the rename-aside protocol is waited for. "Missing" needs two listings in a row (10 ms
    # apart) that show neither the name nor an `.<name>.old-` entry.
    deadline, misses, prefix = time.monotonic() + _ORPHAN_WAIT_S, 0, f".{path.name}.old-"
    while path.parent.is_dir() and time.monotonic() < deadline:
        recover_checkpoints(path.parent)
        names = os.listdir(path.parent)
        if path.name in names and path.exists():
            return path
        misses = 0 if any(n.startswith(prefix) for n in names) else misses + 1
        if misses == 2:
            break
        time.sleep(0.01)
    raise CheckpointNotFoundError(f"no checkpoint at {path}")


def _not_a_dir(path: Path) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{path} is not a checkpoint directory (checkpoints are directories written by "
        f"save_state, holding {MANIFEST_FILE}, {META_FILE} and {TENSORS_FILE}); nothing was "
        f"read from it, and files such as pickles or .pt files are never loaded")


def _parse_manifest(data: bytes | None, path: Path, expect_version: int) -> dict:
    mfile = path / MANIFEST_FILE
    if data is None:
        raise CheckpointCorruptError(f"checkpoint file {mfile} is missing: {path} is not a "
                                     f"complete checkpoint")
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"checkpoint file {mfile} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointVersionError(f"checkpoint file {mfile}: format {got!r}, expected "
                                     f"{FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != expect_version:
        raise CheckpointVersionError(
            f"checkpoint {path} has format version {version!r} ({mfile}); this chronomoe_torch "
            f"reads format version {expect_version}")
    files = manifest.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(_FILES) or not all(
            isinstance(v, dict) and type(v.get("size")) is int and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CheckpointCorruptError(f"checkpoint file {mfile}: 'files' must list exactly "
                                     f"{list(_FILES)} with size and sha256, got {files!r}")
    return manifest


def _read_dir(path: Path, expect_version: int) -> tuple[dict, dict[str, bytes], tuple | None]:
    """(manifest, {file: bytes}, identity of the directory read). Every file is read through one
    handle on the directory (where the OS allows), so all of them come from the same checkpoint
    even if another process swaps a new one in under the same name meanwhile. Sizes are checked
    against the manifest before a file is read, checksums after."""
    if not path.is_dir():
        raise _not_a_dir(path)
    use_fd = hasattr(os, "O_DIRECTORY") and os.open in os.supports_dir_fd
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY) if use_fd else None
    try:
        ident = None
        if dfd is not None:
            st = os.fstat(dfd)
            ident = (st.st_dev, st.st_ino)

        def read(name: str, limit: int | None, want: int | None = None) -> bytes | None:
            file = path / name
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dfd) if dfd is not None \
                    else os.open(file, os.O_RDONLY)
            except FileNotFoundError:
                return None
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if want is not None and size != want:
                    raise CheckpointCorruptError(
                        f"checkpoint file {file} has {size} bytes, the manifest says {want} "
                        f"(truncated or altered)")
                if limit is not None and size > limit:
                    raise CheckpointCorruptError(f"checkpoint file {file}: {size} bytes, more "
                                                 f"than any checkpoint JSON file can be")
                return f.read()

        manifest = _parse_manifest(read(MANIFEST_FILE, _MAX_JSON_BYTES), path, expect_version)
        out = {}
        for name in _FILES:
            entry = manifest["files"][name]
            data = read(name, None, entry["size"])
            if data is None:
                raise CheckpointCorruptError(f"checkpoint file {path / name} is missing")
            if len(data) != entry["size"]:
                raise CheckpointCorruptError(
                    f"checkpoint file {path / name} has {len(data)} bytes, the manifest says "
                    f"{entry['size']} (truncated or altered)")
            digest = _sha256(data)
            if digest != entry["sha256"]:
                raise CheckpointCorruptError(
                    f"checkpoint file {path / name} fails its checksum: sha256 {digest}, the "
                    f"manifest says {entry['sha256']} (altered)")
            out[name] = data
        return manifest, out, ident
    finally:
        if dfd is not None:
            os.close(dfd)


def _identity(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _read_consistent(path: Path, expect_version: int) -> tuple[Path, dict, dict[str, bytes]]:
    """``_read_dir`` with retries: a checkpoint replaced under the same name while it was being
    read (a concurrent ``save_state``) is read again rather than reported as corrupt."""
    for attempt in range(5):
        p = _resolve(path)
        before = _identity(p)
        try:
            manifest, files, _ = _read_dir(p, expect_version)
            return p, manifest, files
        except (CheckpointCorruptError, OSError):
            if attempt == 4 or (before is not None and _identity(p) == before):
                # the same directory throughout: a real fault, not a concurrent replace
                raise
    raise AssertionError("unreachable")


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
# helpers
# ----------------------------------------------------------------------------------------
def trees_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two trees: same container types and keys, same tensor dtypes,
    shapes and bytes (NaN equals NaN with the same bits), same scalars."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.numel() == 0:
            return True
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        # compare the bytes (NaN payloads, -0.0), single-threaded (no intra-op pool)
        return np.array_equal(a.reshape(-1).view(torch.uint8).numpy(),
                              b.reshape(-1).view(torch.uint8).numpy())
    if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
        if type(a) is not type(b):
            return False
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (bytes, bytearray)) or isinstance(b, (bytes, bytearray)):
        return isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)) \
            and bytes(a) == bytes(b)
    if isinstance(a, dict):
        if not isinstance(b, dict) or isinstance(a, OrderedDict) != isinstance(b, OrderedDict):
            return False
        if list(a.keys()) != list(b.keys()) or any(type(k1) is not type(k2)
                                                   for k1, k2 in zip(a, b)):
            return False
        return all(trees_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        return all(trees_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    return a == b


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


# ----------------------------------------------------------------------------------------
# ChronovisorCheckpoint: the controller's geological state
# ----------------------------------------------------------------------------------------
# Controller buffer  <->  checkpoint field. Every persistent buffer of a PxTController must be
# here: from_controller and restore_to_controller refuse a controller with state they do not
# know, so a new buffer can never be silently left out of checkpoints.
_CORE_BUFFERS = {
    "tick_counter": "tick", "seed": "seed", "skipped_ticks": "skipped_ticks",
    "theta_LE": "phases_LE", "omega_disorder_LE": "frequencies_LE",
    "R": "R", "psi": "psi", "dR": "dR",
    "usage_LE": "usage_LE", "reliability_LE": "reliability_LE", "delta_LE": "delta_LE",
    "Tbar_global_E": "structural_T_global", "kappa": "kappa", "kappa_target": "kappa_target",
}
_LENS_BUFFERS = {"lens_LE": "lens_E", "pressure_LE": "pressure_E", "T_fast_LE": "T_fast_E",
                 "Tbar_local_LE": "Tbar_local_E", "T_eff_LE": "T_eff_E"}
_HISTORY_BUFFERS = ("coherence_history", "meta_knob_history")
_KNOWN_BUFFERS = frozenset(_CORE_BUFFERS).union(_LENS_BUFFERS, _HISTORY_BUFFERS)
CHRONOVISOR_KIND = "chronovisor"


@dataclass
class LensState:
    """One layer's lens and temperatures, each [E] (the seed's ``lens_states`` entry)."""
    lens_E: torch.Tensor
    """Lens position (integral of pressure), in [-lens_max, lens_max]."""
    pressure_E: torch.Tensor
    """Pressure P of the last micro tick, in [-1, 1]."""
    T_fast_E: torch.Tensor
    """Fast temperature, in [T_min, T_max]."""
    Tbar_local_E: torch.Tensor
    """Per-layer structural temperature T̄_local."""
    Tbar_hier_E: torch.Tensor
    """Hierarchical structural temperature T̄_global·T̄_local (derived; not restored)."""
    T_eff_E: torch.Tensor
    """Effective temperature T_fast·T̄_global·T̄_local."""


def _as_controller(obj: Any) -> Any:
    ctrl = getattr(obj, "controller", None) if not hasattr(obj, "tick_counter") else obj
    if ctrl is None or not hasattr(ctrl, "tick_counter") or not hasattr(ctrl, "state_dict"):
        none = " with controller=None" if hasattr(obj, "controller") else ""
        raise TypeError(f"expected a PxTController (or a model whose .controller is one), got "
                        f"{type(obj).__name__}{none}")
    return ctrl


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ordered_history(ring: torch.Tensor, ticks: int) -> torch.Tensor:
    """Ring buffer (tick t's entry at slot (t−1) mod H) → the last min(ticks, H), oldest first."""
    H = ring.shape[0]
    return ring[:ticks].clone() if ticks <= H else torch.roll(ring, -(ticks % H)).clone()


def _history_ring(hist: torch.Tensor, ticks: int, H: int) -> torch.Tensor:
    """Inverse of ``_ordered_history`` for a ring of length H (entries that do not fit are the
    oldest and are dropped; slots with no entry are 0, as in a fresh controller)."""
    ring = torch.zeros(H, dtype=hist.dtype)
    m = min(hist.shape[0], H, ticks)
    if m:
        t = torch.arange(ticks - m + 1, ticks + 1)
        ring[(t - 1) % H] = hist[hist.shape[0] - m:]
    return ring


@dataclass
class ChronovisorCheckpoint:
    """The P×T controller's full geological state (seed: "Geological Checkpointing").

    Shapes: L layers, E experts, n ≤ history length entries. Tensors keep the controller's
    buffer dtypes exactly (phase subsystem float64, the rest the controller's dtype), so a
    restore is bit-exact. ``state_checksum`` is the sha256 of the controller's persistent
    buffers (histories excluded) when captured; it is checked at load, at save (against the
    live controller: a snapshot the controller has moved past is refused as stale) and after
    restore (the controller must then hold exactly this state).
    """

    num_layers: int
    num_experts: int
    tick: int
    """Fast clock: ticks taken (micro/macro ticks are derived, see ``clocks``)."""
    seed: int
    """Key of the counter-based phase noise."""
    skipped_ticks: int
    """Ticks whose observation was rejected (non-finite or negative)."""
    structural_T_global: torch.Tensor
    """[E] global structural temperature T̄_global (slowest timescale)."""
    lens_states: list[LensState]
    """Per layer: lens, pressure, T_fast, T̄_local, T̄_hier, T_eff."""
    phases_LE: torch.Tensor
    """[L, E] Kuramoto phases θ in [0, 2π)."""
    frequencies_LE: torch.Tensor
    """[L, E] fixed frequency disorder ω_disorder of each oscillator."""
    R: torch.Tensor
    """0-d Kuramoto coherence after the last tick."""
    psi: torch.Tensor
    """0-d mean-field phase."""
    dR: torch.Tensor
    """0-d change of R at the last tick."""
    usage_LE: torch.Tensor
    """[L, E] usage EMA (rows sum to 1)."""
    reliability_LE: torch.Tensor
    """[L, E] reliability EMA in [0, 1]."""
    delta_LE: torch.Tensor
    """[L, E] signed routing drift of the last tick."""
    kappa: torch.Tensor
    """0-d κ in effect (the smoothed value)."""
    kappa_target: torch.Tensor
    """0-d target κ that the smoothing moves towards (the smoothing state)."""
    coherence_history: torch.Tensor
    """[n] R after each of the last n ticks, oldest first."""
    meta_knob_history: torch.Tensor
    """[n] κ after each of the last n ticks, oldest first."""
    history_length: int
    """Length H of the controller's history ring buffers when captured."""
    config: Any
    """The controller's ``chronomoe_dyn.ControllerConfig``."""
    state_checksum: str = ""
    """sha256 of the controller's persistent buffers, histories excluded (see class doc)."""
    _source: Any = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- derived views
    @property
    def clocks(self) -> dict[str, int]:
        """Fast ticks and the micro/macro ticks they imply."""
        return {"tick": self.tick, "micro_ticks": self.tick // self.config.micro_period,
                "macro_ticks": self.tick // self.config.macro_period}

    def stacked(self, name: str) -> torch.Tensor:
        """[L, E] stack of one ``LensState`` field over layers (e.g. ``"T_eff_E"``)."""
        return torch.stack([getattr(ls, name) for ls in self.lens_states])

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The controller's persistent buffers (histories excluded) as this checkpoint has them."""
        out = {}
        for buf, f in _CORE_BUFFERS.items():
            v = getattr(self, f)
            out[buf] = v if isinstance(v, torch.Tensor) else torch.tensor(int(v), dtype=torch.int64)
        for buf, f in _LENS_BUFFERS.items():
            out[buf] = self.stacked(f)
        return out

    # ---------------------------------------------------------------- capture
    @classmethod
    def from_controller(cls, controller: Any, history_length: int | None = None
                        ) -> "ChronovisorCheckpoint":
        """Snapshot a ``PxTController`` (or ``model.controller``).

        history_length: keep at most this many of the newest history entries (None: all the
            controller holds). Raises ``CheckpointError`` when the controller's state is
            inconsistent (host tick mirror ≠ tick buffer) or violates the law's invariants
            (e.g. zeroed or never-initialised buffers)."""
        ctrl = _as_controller(controller)
        if history_length is not None and (isinstance(history_length, bool) or not isinstance(
                history_length, int) or history_length < 0):
            raise ValueError(f"history_length={history_length!r}: expected an int >= 0 or None")
        sd = {k: v.detach().to("cpu").clone() for k, v in ctrl.state_dict().items()}
        unknown, missing = sorted(set(sd) - _KNOWN_BUFFERS), sorted(_KNOWN_BUFFERS - set(sd))
        if unknown or missing:
            raise CheckpointError(f"ChronovisorCheckpoint.from_controller: the controller's state "
                                  f"has buffers this checkpoint does not know {unknown} / lacks "
                                  f"{missing}; update checkpoint._CORE_BUFFERS")
        tick = int(sd["tick_counter"])
        host = getattr(ctrl, "_tick_host", tick)
        if host != tick:
            raise CheckpointError(f"ChronovisorCheckpoint.from_controller: the controller's host "
                                  f"tick mirror ({host}) disagrees with its tick_counter buffer "
                                  f"({tick}); its state is stale or half-loaded")
        return cls._from_buffers(sd, ctrl.config, history_length, source=ctrl)

    @classmethod
    def _from_buffers(cls, sd: dict[str, torch.Tensor], config: Any,
                      history_length: int | None, source: Any = None) -> "ChronovisorCheckpoint":
        tick = int(sd["tick_counter"])
        H = int(sd["coherence_history"].shape[0])
        hist = {k: _ordered_history(sd[k], tick) for k in _HISTORY_BUFFERS}
        if history_length is not None:
            hist = {k: v[max(0, v.shape[0] - history_length):].clone() for k, v in hist.items()}
        tg = sd["Tbar_global_E"]
        L, E = sd["theta_LE"].shape
        lens = [LensState(**{f: sd[b][i].clone() for b, f in _LENS_BUFFERS.items()},
                          Tbar_hier_E=tg * sd["Tbar_local_LE"][i]) for i in range(L)]
        scalars = {"tick": tick, "seed": int(sd["seed"]), "skipped_ticks": int(sd["skipped_ticks"])}
        tensors = {f: sd[b] for b, f in _CORE_BUFFERS.items() if f not in scalars}
        out = cls(num_layers=int(L), num_experts=int(E), lens_states=lens, history_length=H,
                  config=config, **scalars, **tensors, **hist)
        out.state_checksum = _digest(out._buffers())
        if source is not None:  # the snapshot equals the live buffers (nothing moved meanwhile)
            if not out.matches(source):
                raise CheckpointError("ChronovisorCheckpoint.from_controller: the controller "
                                      "changed while it was being captured")
            out._source = source
        out.validate()
        return out

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Shapes, dtypes and the law's invariants; ``CheckpointCorruptError`` naming the field."""
        L, E = self.num_layers, self.num_experts

        def bad(name: str, what: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(f"ChronovisorCheckpoint.{name}: {what}")

        if len(self.lens_states) != L:
            raise bad("lens_states", f"{len(self.lens_states)} layers, expected {L}")
        want = {"phases_LE": (L, E), "frequencies_LE": (L, E), "usage_LE": (L, E),
                "reliability_LE": (L, E), "delta_LE": (L, E), "structural_T_global": (E,),
                "R": (), "psi": (), "dR": (), "kappa": (), "kappa_target": ()}
        for name, shape in want.items():
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                raise bad(name, f"shape {tuple(getattr(v, 'shape', ()))}, expected {shape}")
            if not torch.isfinite(v).all():
                raise bad(name, "holds non-finite values")
        for i, ls in enumerate(self.lens_states):
            for f in ("lens_E", "pressure_E", "T_fast_E", "Tbar_local_E", "Tbar_hier_E", "T_eff_E"):
                v = getattr(ls, f)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != (E,) \
                        or not torch.isfinite(v).all():
                    raise bad(f"lens_states[{i}].{f}", f"expected a finite [{E}] tensor")
        for name in _HISTORY_BUFFERS:
            v = getattr(self, name)
            n = min(self.tick, self.history_length)
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] > n:
                raise bad(name, f"expected a 1-d tensor of at most min(tick, history_length)="
                                f"{n} entries")
        cfg = self.config
        T_fast, tol = self.stacked("T_fast_E"), 1 + 1e-6
        # Invariants a live controller always satisfies; zeroed or uninitialised buffers do not.
        checks = [
            ("usage_LE", (self.usage_LE.sum(-1) - 1).abs().max() < 1e-6, "rows must sum to 1"),
            ("reliability_LE", ((self.reliability_LE >= 0) & (self.reliability_LE <= 1)).all(),
             "must lie in [0, 1]"),
            ("phases_LE", ((self.phases_LE >= 0) & (self.phases_LE < 2 * math.pi)).all(),
             "must lie in [0, 2π)"),
            ("R", (self.R >= 0) & (self.R <= 1), "must lie in [0, 1]"),
            ("kappa", self.kappa.abs() <= 1, "must lie in [-1, 1]"),
            ("kappa_target", self.kappa_target.abs() <= 1, "must lie in [-1, 1]"),
            ("structural_T_global", (self.structural_T_global > 0).all(), "must be > 0"),
            ("lens_states[*].T_fast_E",
             ((T_fast >= cfg.T_min / tol) & (T_fast <= cfg.T_max * tol)).all(),
             f"must lie in [T_min, T_max] = [{cfg.T_min}, {cfg.T_max}]"),
            ("lens_states[*].Tbar_local_E", (self.stacked("Tbar_local_E") > 0).all(),
             "must be > 0"),
            ("lens_states[*].lens_E", (self.stacked("lens_E").abs() <= cfg.lens_max * tol).all(),
             f"must lie in [-lens_max, lens_max] = ±{cfg.lens_max}"),
        ]
        for name, ok, what in checks:
            if not bool(ok):
                raise bad(name, f"{what} (zeroed, uninitialised or corrupted state)")
        if self.tick < 0 or self.skipped_ticks < 0 or self.skipped_ticks > self.tick:
            raise bad("tick", f"tick={self.tick}, skipped_ticks={self.skipped_ticks}: need "
                              f"0 <= skipped_ticks <= tick")

    def matches(self, controller: Any) -> bool:
        """True when the controller's live state (histories excluded) is exactly this one."""
        ctrl = _as_controller(controller)
        live = {k: v for k, v in ctrl.state_dict().items() if k not in _HISTORY_BUFFERS}
        return _digest(live) == self.state_checksum

    # ---------------------------------------------------------------- restore
    def restore_to_controller(self, controller: Any) -> None:
        """Load this state into a ``PxTController`` (or ``model.controller``) through its
        ``load_state_dict`` (which re-syncs its host mirrors), then check the result.

        The controller must have the same (layers, experts) and buffer dtypes
        (``CheckpointMismatchError`` naming both). Histories are re-laid into the controller's
        ring buffers; with another ``history_length`` the newest entries that fit are kept.
        A controller built with another ``ControllerConfig`` gets the state with a warning
        naming the differing fields (its own constants stay in force)."""
        ctrl = _as_controller(controller)
        mine = (self.num_layers, self.num_experts)
        theirs = (int(ctrl.theta_LE.shape[0]), int(ctrl.theta_LE.shape[1]))
        if mine != theirs:
            raise CheckpointMismatchError(
                f"ChronovisorCheckpoint has (layers, experts) = {mine}; the controller has "
                f"(layers, experts) = {theirs}")
        target = ctrl.state_dict()
        unknown = sorted(set(target) - _KNOWN_BUFFERS)
        if unknown:
            raise CheckpointMismatchError(f"restore_to_controller: the controller has state this "
                                          f"checkpoint does not hold: {unknown}")
        sd = self._buffers()
        for name in _HISTORY_BUFFERS:
            sd[name] = _history_ring(getattr(self, name), self.tick, int(target[name].shape[0]))
        for name, v in sd.items():
            if name in target and v.dtype != target[name].dtype:
                raise CheckpointMismatchError(
                    f"restore_to_controller: {name} is {_dtype_name(v.dtype)} in the checkpoint, "
                    f"{_dtype_name(target[name].dtype)} in the controller (build the controller "
                    f"with the checkpoint's dtype)")
        if getattr(ctrl, "config", None) is not None and hasattr(self.config, "to_dict") \
                and ctrl.config != self.config:
            a, b = self.config.to_dict(), ctrl.config.to_dict()
            diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
            warnings.warn(f"restore_to_controller: the controller's ControllerConfig differs "
                          f"from the checkpoint's in {diff} (checkpoint, controller); the "
                          f"controller keeps its own constants", stacklevel=2)
        dev = ctrl.theta_LE.device
        ctrl.load_state_dict({k: v.to(dev) for k, v in sd.items()}, strict=True)
        if not self.matches(ctrl):
            raise CheckpointError("restore_to_controller: after loading, the controller's state "
                                  "differs from the checkpoint's (state_checksum)")

    # ---------------------------------------------------------------- (de)serialisation
    def to_tree(self) -> dict[str, Any]:
        """A ``save_state`` tree (plain data: tensors, numbers, the config as a dict)."""
        t = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("lens_states", "config", "_source")}
        t["lens_states"] = [{f.name: getattr(ls, f.name) for f in fields(ls)}
                            for ls in self.lens_states]
        t["config"] = self.config.to_dict()
        return t

    @classmethod
    def from_tree(cls, tree: dict[str, Any], where: str = "tree") -> "ChronovisorCheckpoint":
        """Inverse of ``to_tree``; checks the checksum and invariants."""
        from chronomoe_dyn import ControllerConfig
        try:
            kw = {f.name: tree[f.name] for f in fields(cls) if f.name != "_source"}
            kw["lens_states"] = [LensState(**ls) for ls in tree["lens_states"]]
            kw["config"] = ControllerConfig.from_dict(tree["config"])
            for k in ("num_layers", "num_experts", "tick", "seed", "skipped_ticks",
                      "history_length"):
                if isinstance(kw[k], bool) or not isinstance(kw[k], int):
                    raise TypeError(f"{k}={kw[k]!r} is not an int")
            out = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointCorruptError(f"ChronovisorCheckpoint in {where}: malformed "
                                         f"({type(e).__name__}: {e})") from None
        out.validate()
        got = _digest(out._buffers())
        if got != out.state_checksum:
            raise CheckpointCorruptError(f"ChronovisorCheckpoint in {where}: its state does not "
                                         f"match its state_checksum ({got} != "
                                         f"{out.state_checksum})")
        return out

    def save(self, path: str | os.PathLike, *, allow_stale: bool = False, **kwargs: Any) -> Path:
        """Write as a checkpoint directory (``save_state``, kind "chronovisor").

        When captured with ``from_controller``, the live controller must still hold this state:
        saving a snapshot the controller has moved past raises ``CheckpointError`` (stale)
        unless ``allow_stale``. The written files are read back and compared (``verify``)."""
        if self._source is not None and not allow_stale and not self.matches(self._source):
            raise CheckpointError(
                f"ChronovisorCheckpoint.save({path}): stale snapshot: captured at tick "
                f"{self.tick}, the controller is now at tick {int(self._source.tick_counter)} "
                f"(capture again, or pass allow_stale=True)")
        self.validate()
        return save_state(path, self.to_tree(), kind=CHRONOVISOR_KIND, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> "ChronovisorCheckpoint":
        """Read one written by ``save``, or extract the controller state from a trainer
        checkpoint (its model state dict's controller buffers and its configs)."""
        path = Path(path)
        tree = load_state(path, map_location=map_location)
        kind = read_manifest(_resolve(path))["kind"]
        if kind == CHRONOVISOR_KIND:
            return cls.from_tree(tree, where=str(path))
        if kind == "trainer" and isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            return cls._from_trainer_tree(tree, path)
        raise CheckpointMismatchError(f"checkpoint {path} is of kind {kind!r}; a "
                                      f"ChronovisorCheckpoint reads kind {CHRONOVISOR_KIND!r} or "
                                      f"a trainer checkpoint")

    @classmethod
    def _from_trainer_tree(cls, tree: dict, path: Path) -> "ChronovisorCheckpoint":
        from chronomoe_dyn import ControllerConfig
        model = tree["model"]
        prefixes = [k[: -len("tick_counter")] for k in model if k.endswith("tick_counter")]
        if len(prefixes) != 1:
            raise CheckpointMismatchError(f"trainer checkpoint {path} holds {len(prefixes)} "
                                          f"controllers' state (saved with "
                                          f"save_chronovisor_state=False?); expected one")
        p = prefixes[0]
        sd = {k[len(p):]: v for k, v in model.items()
              if k.startswith(p) and k[len(p):] in _KNOWN_BUFFERS}
        cfg = ((tree.get("configs") or {}).get("controller"))
        try:
            config = ControllerConfig.from_dict(cfg) if isinstance(cfg, dict) \
                else ControllerConfig()
            return cls._from_buffers(sd, config, None)
        except KeyError as e:
            raise CheckpointCorruptError(f"trainer checkpoint {path}: controller buffer {e} "
                                         f"missing") from None
