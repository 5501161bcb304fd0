"""The filesystem protocol of checkpoint IO: write-once checkpoint directories and pointer files.

A checkpoint directory is never overwritten. Writing one (``write_dir``):
  1. the files are written into a hidden sibling ``.<name>.tmp-<host>-<pid>-<token>/``, each
     fsynced, then the directory is fsynced; the caller's check (``save_state``'s read-back
     verification) runs before anything is visible;
  2. one ``rename`` to the new name, which must not exist (``CheckpointExistsError``), then an
     fsync of the parent.
A name is a pointer when it is a small file (``write_pointer``): it holds the name of a sibling
checkpoint directory and is replaced atomically (hidden temporary file, fsync, ``os.replace``,
fsync of the parent). ``latest``, ``best``, ``final`` are pointers: moving one never touches a
checkpoint, and a checkpoint that a pointer names was complete when the pointer was written.

A crash leaves at most hidden leftovers (``.tmp-`` of a save, ``.trash-`` of a deletion, which
renames first so that no visible name ever holds half a checkpoint). They are never read, and
``remove_leftovers`` deletes those of dead writers (this host: the pid is gone; another host on
a shared filesystem: after an hour).

Every mutating filesystem operation of checkpoint IO goes through this module's ``os``,
``shutil`` and ``_write_file`` (the SIGKILL tests count them here).
"""

from __future__ import annotations

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
    _NAME_RE, MANIFEST_FILE, CheckpointCorruptError, CheckpointExistsError,
    CheckpointNotFoundError,
)

_HIDDEN_RE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|trash)"
                        r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<tok>[0-9a-f]+)$")
_FOREIGN_LEFTOVER_S = 3600.0  # another host's leftover counts as abandoned after this long
_MAX_POINTER_BYTES = 256


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


def _host_tag() -> str:
    import socket
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _hidden(parent: Path, name: str, what: str) -> Path:
    """A hidden sibling named after its writer (host tag, pid), so that leftovers of dead
    writers can be told from work in progress."""
    return parent / f".{name}.{what}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def _writer_alive(host: str, pid: int, p: Path) -> bool:
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


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete the hidden leftovers of dead writers in ``directory``; returns what was removed.
    Leftovers of live writers are not touched."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        m = _HIDDEN_RE.match(p.name)
        if not m or _writer_alive(m["host"], int(m["pid"]), p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                continue
        removed.append(p)
    return removed


def write_dir(path: Path, files: dict[str, bytes],
              check: Callable[[Path], None] | None = None) -> None:
    """Write ``files`` (name -> bytes, in this order) as the new directory ``path``, atomically.

    check: called with the fsynced temporary directory before the commit; whatever it raises
        aborts the save. On any failure the temporary is deleted and nothing is visible."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent)
    if os.path.lexists(path):
        raise _exists(path)
    tmp = _hidden(parent, path.name, "tmp")
    os.mkdir(tmp)
    try:
        for n, b in files.items():
            _write_file(tmp / n, b)
        _fsync_dir(tmp)
        if check is not None:
            check(tmp)
        if os.path.lexists(path):  # appeared meanwhile (rename would replace an empty dir)
            raise _exists(path)
        os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exists(path: Path) -> CheckpointExistsError:
    return CheckpointExistsError(f"{path} already exists; checkpoints are never overwritten: "
                                 f"save under a new name (a pointer file such as 'latest' can "
                                 f"be moved to it with write_pointer)")


def write_pointer(directory: Path, name: str, target: str) -> None:
    """Point ``<directory>/<name>`` at the checkpoint directory ``<directory>/<target>``,
    replacing any earlier pointer of that name atomically."""
    if not _NAME_RE.match(name) or not _NAME_RE.match(target):
        raise ValueError(f"write_pointer: {name!r} -> {target!r}: names are letters, digits, "
                         f"'_', '.', '-', not starting with '.' or '-'")
    where = directory / name
    if where.is_dir() and not where.is_symlink():
        raise CheckpointExistsError(f"write_pointer: {where} is a checkpoint directory, not a "
                                    f"pointer; pointers never replace checkpoints")
    if not (directory / target / MANIFEST_FILE).is_file():
        raise CheckpointNotFoundError(f"write_pointer: no checkpoint at {directory / target}")
    tmp = _hidden(directory, name, "tmp")
    try:
        _write_file(tmp, (target + "\n").encode())
        os.replace(tmp, where)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def read_pointer(path: Path) -> Path:
    """The checkpoint directory the pointer file ``path`` names (not checked to exist)."""
    with open(path, "rb") as f:
        data = f.read(_MAX_POINTER_BYTES + 1)
    text = data.decode("utf-8", errors="replace").strip()
    if len(data) > _MAX_POINTER_BYTES or not _NAME_RE.match(text):
        raise CheckpointCorruptError(
            f"{path} is not a checkpoint directory, and not a pointer file naming one (it holds "
            f"{text[:40]!r}..., not a checkpoint name); nothing was read from it, and files such "
            f"as pickles or .pt files are never loaded")
    return path.parent / text


def resolve(path: Path) -> Path:
    """``path`` itself when it is a directory; the directory it names when it is a pointer."""
    if path.is_dir():
        return path
    if path.is_file():
        target = read_pointer(path)
        if target.is_dir():
            return target
        raise CheckpointNotFoundError(f"checkpoint pointer {path} names {target.name!r}, and "
                                      f"there is no checkpoint at {target}")
    raise CheckpointNotFoundError(f"no checkpoint at {path}")


def remove_dir(d: Path) -> None:
    """Delete a checkpoint so that no visible name ever holds half of it: rename it to a hidden
    name first, then delete that."""
    trash = _hidden(d.parent, d.name, "trash")
    os.rename(d, trash)
    _fsync_dir(d.parent)
    shutil.rmtree(trash, ignore_errors=True)
