"""The on-disk format of a checkpoint (version 2: controller law v2; the layout is version 1's,
the controller state in it is not): its file names, its manifest, and the errors
that checkpoint IO raises. Everything here is public through ``chronomoe_torch.checkpoint``.

A checkpoint is a *directory*::

    <name>/
      tensors.safetensors   every tensor and numpy array of the tree, keyed by its path
      meta.json             the tree's skeleton (containers, scalars, references to tensors),
                            plus "format", "format_version" and "kind"
      manifest.json         "format", "format_version", "kind", "created_unix_ns" and, per file,
                            its size in bytes and sha256

The manifest must list exactly the two data files. Beside the checkpoint directories, small
pointer files (``latest``, ``best``, ``final``, ...) each hold the name of one of them (see
``_atomic``); ``latest`` is reserved for the pointer that follows every save.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

FORMAT_NAME = "chronomoe-checkpoint"
FORMAT_VERSION = 2
"""2: controller law v2 (DESIGN.md §3 v2). Version 1 holds law-v1 controller state, which has no
v2 meaning (T̄_global per expert, drift in other units), so it is refused, never converted."""
LATEST_POINTER = "latest"
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
_FILES = (TENSORS_FILE, META_FILE)
_MAX_JSON_BYTES = 256 * 1024 * 1024  # a bound against absurd files, far above real metadata
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_KIND_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message names the file and the cause."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path (and no recoverable one beside it)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The name is taken: checkpoints are never overwritten (save under a new name)."""


class CheckpointCorruptError(CheckpointError):
    """A file is missing, truncated, altered, or not what its manifest says."""


class CheckpointVersionError(CheckpointError):
    """The checkpoint has another format version (or format) than this code reads."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but does not fit (other kind, other layer/expert counts...)."""


# Their public home: tracebacks and pickles name chronomoe_torch.checkpoint, which re-exports them.
for _cls in (CheckpointError, CheckpointNotFoundError, CheckpointExistsError,
             CheckpointCorruptError, CheckpointVersionError, CheckpointMismatchError):
    _cls.__module__ = "chronomoe_torch.checkpoint"
del _cls


# ----------------------------------------------------------------------------------------
# names and the manifest
# ----------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(path: Path) -> None:
    name = path.name
    if not _NAME_RE.match(name) or name == LATEST_POINTER:
        raise ValueError(f"save_state: checkpoint name {name!r} (from {path}) is not allowed: "
                         f"use letters, digits, '_', '.', '-', not starting with '.' or '-', "
                         f"and not {LATEST_POINTER!r} (reserved for the pointer file)")


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
    if version == 1 and expect_version == 2:
        raise CheckpointVersionError(
            f"checkpoint {path} has format version 1 (controller law v1); this chronomoe_torch "
            f"reads format version 2 (controller law v2): v1 controller state cannot be "
            f"converted: start a new run (or read it with a law-v1 checkout of chronomoe_torch)")
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
