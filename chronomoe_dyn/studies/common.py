"""What the studies share: config resolution, output folders, JSON, progress bars, statistics.

A study's config is a plain dict at the top of its module (JSON-serialisable). ``resolve_config``
applies the ``quick`` variant and user overrides (dotted keys reach nested dicts; an unknown key
raises ValueError naming it and the allowed keys), and ``finish`` writes ``config.json`` and
``summary.json`` next to the figures.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..plot import HEALTHY_RANGES  # noqa: F401  (re-exported for the studies)

__all__ = ["HEALTHY_RANGES", "resolve_config", "out_dir_for", "to_jsonable", "write_json",
           "progress_bar", "finish", "in_range_fraction", "first_sustained", "controller_config",
           "env_config", "knob_schedule", "Timer"]

DEFAULT_OUT_ROOT = Path("studies") / "out"
"""Default output root, relative to the working directory (git-ignored in the repository)."""


def _set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            allowed = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"unknown config key {key!r}: {where} has no entry {part!r} "
                             f"(allowed: {', '.join(allowed)})")
        if i == len(parts) - 1:
            old = node[part]
            if isinstance(old, dict) and not isinstance(value, dict):
                raise ValueError(f"config key {key!r} is a section; set one of its entries "
                                 f"({', '.join(sorted(old))})")
            node[part] = value
        else:
            node = node[part]


def resolve_config(base: dict, quick_changes: dict | None = None, quick: bool = False,
                   overrides: dict | None = None) -> dict:
    """Deep copy of ``base`` with the quick changes (when ``quick``) and then ``overrides``."""
    cfg = copy.deepcopy(base)
    if quick and quick_changes:
        for k, v in quick_changes.items():
            _set_dotted(cfg, k, copy.deepcopy(v))
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, copy.deepcopy(v))
    return cfg


def out_dir_for(name: str, out_dir: str | Path | None) -> Path:
    """The study's output folder (created): ``out_dir`` or ``studies/out/<name>``."""
    p = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def to_jsonable(v: Any) -> Any:
    """NumPy scalars/arrays to Python; non-finite floats to None (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: str | Path, obj: Any) -> Path:
    p = Path(path)
    p.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return p


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar (disabled when ``enabled`` is False or the total is tiny)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total <= 1,
                leave=False, dynamic_ncols=True)


def finish(out: Path, name: str, config: dict, summary: dict, figures: Iterable[Path],
           started: float) -> dict:
    """Write config.json and summary.json; return the summary (with out_dir, figures, seconds)."""
    summary = dict(summary)
    summary["study"] = name
    summary["out_dir"] = str(out)
    summary["figures"] = [str(Path(f)) for f in figures]
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_json(out / "config.json", config)
    write_json(out / "summary.json", summary)
    return to_jsonable(summary)


def in_range_fraction(x: np.ndarray, lo: float, hi: float) -> float:
    """Fraction of the finite entries of ``x`` inside [lo, hi] (NaN when there are none)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if not np.any(ok):
        return math.nan
    return float(np.mean((x[ok] >= lo) & (x[ok] <= hi)))


def first_sustained(mask: np.ndarray, min_run: int = 1) -> int | None:
    """Index of the first entry from which ``mask`` stays True for ``min_run`` entries in a row
    (None when it never does)."""
    m = np.asarray(mask, dtype=bool)
    run = 0
    for i, v in enumerate(m):
        run = run + 1 if v else 0
        if run >= min_run:
            return i - min_run + 1
    return None


def controller_config(changes: dict | None = None):
    """``ControllerConfig()`` with ``changes`` (validated by the config itself)."""
    from ..config import ControllerConfig
    return ControllerConfig(**(changes or {}))


def env_config(changes: dict | None = None):
    """``EnvConfig()`` of the simulator with ``changes``."""
    from ..env import EnvConfig
    return EnvConfig(**(changes or {}))


def knob_schedule(spec: dict):
    """``KnobSchedule(**spec)``; ``spec`` may omit fields to keep their defaults."""
    from ..schedule import KnobSchedule
    return KnobSchedule(**spec)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
