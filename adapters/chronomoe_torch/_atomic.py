"""The filesystem protocol of checkpoint IO: atomic commit of a directory, the ``latest``
pointer, recovery of what crashed writers leave, and reads that never mix two checkpoints.

Writing (``_write_dir``, called by ``save_state`` after everything is encoded in memory):
  1. files are written into a hidden sibling ``.<name>.tmp-<host>-<pid>-<token>/``, each
     fsynced, then the directory is fsynced; a caller's check (``save_state``'s read-back
     verification) runs before anything is committed;
  2. commit: a new name is one ``rename``. An existing checkpoint of the same name is swapped
     in one step with ``renameat2(RENAME_EXCHANGE)`` (Linux); where that is unavailable the old
     one is renamed aside to ``.<name>.old-<host>-<pid>-<token>/`` first, the new one renamed
     in, the old one deleted. The parent directory is fsynced after each rename;
  3. the pointer file ``latest`` in the parent directory is replaced atomically (write a hidden
     temporary, fsync, ``os.replace``) to name the checkpoint just committed (``_write_latest``).
A visible name therefore only ever holds a complete checkpoint, and the ``latest`` pointer only
ever names one that was complete when it was written. A crash leaves at most hidden leftovers:
``.tmp-`` directories (ignored, deleted by later saves and by ``prune_checkpoints`` once their
writer is dead) and, only in the fallback protocol between its two renames, an ``.old-``
directory whose visible name is missing; every function that opens or lists checkpoints first
renames such an orphan back into place (``recover_checkpoints``).

Leftovers are named ``.<name>.<tmp|old|trash>-<host tag>-<pid>-<token>``: a leftover of this
host whose pid is gone is a dead writer's; another host's (shared filesystem) counts as dead
after an hour.

Reading (``_read_consistent``): all files of a checkpoint are read through one handle on its
directory, sizes checked against the manifest before a file is read and checksums after, and a
read that fails because a concurrent save replaced the checkpoint meanwhile is retried, so a
reader never mixes two checkpoints nor reports a good one as corrupt.

Every mutating filesystem operation of checkpoint IO goes through this module's ``os``,
``shutil``, ``_write_file`` and ``_rename_exchange`` (the SIGKILL tests count them here).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from ._ckpt_format import (
    _FILES, _MAX_JSON_BYTES, _NAME_RE, LATEST_POINTER, MANIFEST_FILE, CheckpointCorruptError,
    CheckpointNotFoundError, _not_a_dir, _parse_manifest, _sha256,
)

_HIDDEN_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old|trash)"
                        r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)$")
_FOREIGN_LEFTOVER_S = 3600.0  # another host's leftover counts as abandoned after this long
_ORPHAN_WAIT_S = 2.0  # how long a reader waits for a live writer between its two renames

# Tests flip this to exercise the rename-aside protocol that non-Linux systems use.
_USE_RENAME_EXCHANGE = True


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
# write and commit
# ----------------------------------------------------------------------------------------
def _write_dir(path: Path, files: dict[str, bytes],
               check: Callable[[Path], None] | None = None) -> None:
    """Write ``files`` (name -> bytes, in this order) as the directory ``path``, atomically.

    check: called with the fsynced temporary directory before the commit; whatever it raises
        aborts the save. On any failure the temporary is deleted and ``path`` is untouched."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(parent)
    tmp = _hidden(parent, path.name, "tmp")
    os.mkdir(tmp)
    try:
        for n, b in files.items():
            _write_file(tmp / n, b)
        _fsync_dir(tmp)
        if check is not None:
            check(tmp)
        _commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


# ----------------------------------------------------------------------------------------
# find and read
# ----------------------------------------------------------------------------------------
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
