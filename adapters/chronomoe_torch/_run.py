"""A run directory belongs to one run (``ChronoMoETrainer``, ``chronomoe-train``).

What a run writes: ``run_dir/`` ``metrics.jsonl``, ``config.json`` (its ``run_id``),
``summary.json`` and ``plots/`` (``chronomoe-train``), ``tensorboard/``; ``checkpoint_dir/``
checkpoint directories and their pointer files (often ``run_dir/checkpoints``).

``claim`` runs before a run writes anything (rank 0 only):
  * a fresh run (no checkpoint loaded): both directories must be empty (hidden files aside);
    otherwise ``RunDirError`` says how to proceed, unless ``overwrite``, which deletes the
    earlier run's outputs first (the files above only; anything else is left and named);
  * a resumed run: its own directory (``config.json``'s ``run_id`` is the checkpoint's, or the
    directory is new) continues, and ``metrics.jsonl`` records after the resume point are
    dropped (the run writes them again); a directory of another run is refused as above.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import checkpoint as ckpt

__all__ = ["RunDirError", "claim", "truncate_metrics"]

RUN_FILES = ("metrics.jsonl", "config.json", "summary.json")
RUN_SUBDIRS = ("plots", "tensorboard")


class RunDirError(ValueError):
    """A run directory holds another run; the message says how to proceed."""


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def _run_id_of(run_dir: Path | None) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _refuse(d: Path, what: str) -> RunDirError:
    return RunDirError(
        f"run directory {d} {what}; a run directory belongs to one run. Resume that run "
        f"(chronomoe-train --resume NAME, or trainer.load_checkpoint(NAME) before train()), "
        f"start over deleting its outputs (chronomoe-train --overwrite, or "
        f"TrainingConfig(overwrite=True)), or choose a new --run-dir (run_dir/checkpoint_dir)")


def claim(run_dir: str | None, checkpoint_dir: str, *, run_id: str, resumed_step: int | None,
          overwrite: bool) -> list[str]:
    """Check (and with ``overwrite`` clear) the run's directories; returns lines to log."""
    rdir = None if run_dir is None else Path(run_dir)
    cdir = Path(checkpoint_dir)
    if resumed_step is not None:
        other = _run_id_of(rdir)
        if other is None or other == run_id:
            dropped = 0 if rdir is None else truncate_metrics(rdir / "metrics.jsonl",
                                                               resumed_step)
            return [f"resume: {rdir / 'metrics.jsonl'}: dropped {dropped} record(s) after step "
                    f"{resumed_step} (this run writes them again)"] if dropped else []
        if not overwrite:
            raise _refuse(rdir, f"holds another run (run_id {other}; the checkpoint being "
                                f"resumed belongs to run {run_id})")
    else:
        busy = [(d, _visible(d)) for d in (rdir, cdir) if d is not None and _visible(d)]
        if not busy:
            return []
        if not overwrite:
            d, names = busy[0]
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise _refuse(d, f"is not empty ({shown}): it holds an earlier run")
    return clear(rdir, cdir)


def clear(run_dir: Path | None, checkpoint_dir: Path) -> list[str]:
    """Delete an earlier run's outputs (see the module docstring); returns lines to log."""
    removed: list[str] = []
    named = ckpt.pointers(checkpoint_dir)
    for p in ckpt.list_checkpoints(checkpoint_dir):
        ckpt.remove_dir(p)
        removed.append(str(p))
    for name in named:
        (checkpoint_dir / name).unlink()
        removed.append(str(checkpoint_dir / name))
    removed += [str(p) for p in ckpt.remove_leftovers(checkpoint_dir)]
    if run_dir is not None:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                (run_dir / name).unlink()
                removed.append(str(run_dir / name))
        for name in RUN_SUBDIRS:
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
                removed.append(str(run_dir / name) + "/")
        if checkpoint_dir.is_dir() and checkpoint_dir.parent == run_dir \
                and not any(checkpoint_dir.iterdir()):
            checkpoint_dir.rmdir()
    left = [str(d / n) for d in (run_dir, checkpoint_dir) if d is not None for n in _visible(d)
            if not (d == run_dir and (d / n) == checkpoint_dir)]
    lines = [f"overwrite: deleted the earlier run's outputs ({len(removed)}: "
             f"{', '.join(removed[:8])}{', ...' if len(removed) > 8 else ''})"]
    if left:
        lines.append(f"overwrite: left files that are not a run's outputs: {', '.join(left)}")
    return lines


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` (metrics.jsonl) whose step is after ``step``, atomically
    (temporary file + replace); returns how many were dropped. Unreadable lines stay."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):
            s = None
        if isinstance(s, int) and s > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
