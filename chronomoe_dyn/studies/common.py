"""What the studies share: config resolution, output folders, JSON, statistics.

A study's config is a plain dict at the top of its module (JSON-serialisable). ``resolve_config``
applies the ``quick`` variant and user overrides: dotted keys reach nested dicts and, through
``sections``, every field of the dataclass behind an entry (``env.top_k``,
``schedule.rule.rate``); an unknown key raises ValueError naming it and the allowed keys, a value
of the wrong type names the key and the type. ``finish`` writes ``config.json`` and
``summary.json`` next to the figures. The prologue and execution that all studies share is in
``runner.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..runlog import HEALTHY_RANGES  # noqa: F401  (re-exported for the studies)

__all__ = ["HEALTHY_RANGES", "resolve_config", "out_dir_for", "to_jsonable", "write_json",
           "finish", "in_range_fraction", "first_sustained", "claim", "claims_line"]

DEFAULT_OUT_ROOT = Path("studies") / "out"
"""Default output root, relative to the working directory (git-ignored in the repository)."""


def _expected(v: Any) -> tuple[type | tuple[type, ...], str] | None:
    """(types, description) a value must have to replace the default ``v`` (None: anything)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return bool, "true or false"
    if isinstance(v, int):
        return int, "an integer"
    if isinstance(v, float):
        return (int, float), "a number"
    if isinstance(v, str):
        return str, "a string"
    if isinstance(v, (list, tuple)):
        return list, "a JSON list such as [1, 2]"
    if isinstance(v, dict):
        return dict, "a JSON object"
    return None


def _checked(key: str, value: Any, default: Any) -> Any:
    """``value`` if it has the type of ``default`` (ints widen to floats, list items are checked
    against the default's first item); ValueError naming the key and the type otherwise."""
    exp = _expected(default)
    if exp is None:
        return value
    types, what = exp
    if isinstance(value, bool) and types is not bool or not isinstance(value, types):
        raise ValueError(f"config key {key!r}: expected {what} (the study has {default!r}), "
                         f"got {value!r}")
    if isinstance(default, float):
        return float(value)
    if isinstance(default, (list, tuple)) and default:
        return [_checked(f"{key}[{i}]", x, default[0]) for i, x in enumerate(value)]
    return value


def _unknown(key: str, where: str, part: str, allowed) -> ValueError:
    return ValueError(f"unknown config key {key!r}: {where} has no entry {part!r} "
                      f"(allowed: {', '.join(sorted(allowed)) or 'none'})")


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def _set_section(cfg: dict, key: str, parts: list[str], cls: type, value: Any) -> None:
    """Set ``parts[1:]`` in ``cfg[parts[0]]``: a dict of changes to the dataclass ``cls``."""
    node, node_cls, where = cfg[parts[0]], cls, f"{parts[0]} ({cls.__name__})"
    for i, part in enumerate(parts[1:], start=1):
        defaults = _dataclass_defaults(node_cls)
        if part not in defaults:
            raise _unknown(key, where, part, defaults)
        default = defaults[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(default):
                raise ValueError(f"config key {key!r}: {'.'.join(parts[:i + 1])} is a value, "
                                 f"not a section")
            node = node.setdefault(part, {})
            node_cls, where = type(default), f"{'.'.join(parts[:i + 1])} ({type(default).__name__})"
        elif dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config key {key!r} is a section; set one of its entries "
                                 f"({', '.join(sorted(_dataclass_defaults(type(default))))})")
            for k, v in value.items():
                _set_section(cfg, f"{key}.{k}", parts + [k], cls, v)
        else:
            node[part] = _checked(key, value, default)


def _set_dotted(cfg: dict, key: str, value: Any, sections: dict[str, type]) -> None:
    parts = key.split(".")
    if parts[0] in sections and isinstance(cfg.get(parts[0]), dict):
        if len(parts) == 1:
            if not isinstance(value, dict):
                raise ValueError(f"config key {key!r} is a section of {sections[key].__name__} "
                                 f"changes; set one of its entries ({key}.NAME=VALUE)")
            for k, v in value.items():
                _set_section(cfg, f"{key}.{k}", [key, k], sections[key], v)
            return
        _set_section(cfg, key, parts, sections[parts[0]], value)
        return
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "config"
            raise _unknown(key, where, part, node if isinstance(node, dict) else [])
        if i == len(parts) - 1:
            old = node[part]
            if isinstance(old, dict) and not isinstance(value, dict):
                raise ValueError(f"config key {key!r} is a section; set one of its entries "
                                 f"({', '.join(sorted(old))})")
            node[part] = _checked(key, value, old)
        else:
            node = node[part]


def resolve_config(base: dict, quick_changes: dict | None = None, quick: bool = False,
                   overrides: dict | None = None, sections: dict[str, type] | None = None) -> dict:
    """Deep copy of ``base`` with the quick changes (when ``quick``) and then ``overrides``.

    sections: config entries that hold changes to a dataclass (``{"env": EnvConfig}``): their
    dotted keys must be fields of it (nested dataclasses too: ``schedule.rule.rate``). Every
    value must have the type of the entry it replaces; errors name the key and what is
    allowed."""
    cfg = copy.deepcopy(base)
    sections = sections or {}
    if quick and quick_changes:
        for k, v in quick_changes.items():
            _set_dotted(cfg, k, copy.deepcopy(v), sections)
    for k, v in (overrides or {}).items():
        _set_dotted(cfg, k, copy.deepcopy(v), sections)
    return cfg


def out_dir_for(name: str, out_dir: str | Path | None, quick: bool = False) -> Path:
    """The study's output folder (created): ``out_dir``, else ``studies/out/<name>`` (or
    ``studies/out/<name>-quick`` for a quick run, so it never replaces the full results)."""
    default = DEFAULT_OUT_ROOT / (f"{name}-quick" if quick else name)
    p = Path(out_dir) if out_dir is not None else default
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


KAPPA_LEVER_RATIO = 3.0
"""Issue 9's κ lever: exploration at the highest κ ≥ this × at the lowest (every study's claim)."""


def lever_ratio(hi, lo):
    """Exploration at the highest κ over the lowest, elementwise (floats or arrays): hi / lo,
    ∞ where lo = 0 < hi, and 0 where both are 0 (no exploration is no lever: the claim must not
    hold vacuously)."""
    hi_a, lo_a = np.asarray(hi, dtype=np.float64), np.asarray(lo, dtype=np.float64)
    safe = np.where(lo_a > 0, lo_a, 1.0)
    out = np.where(lo_a > 0, hi_a / safe, np.where(hi_a > 0, np.inf, 0.0))
    return float(out) if out.ndim == 0 else out


def claim(holds, evidence: str) -> dict:
    """One entry of a study's claim table: ``holds`` True/False (None: no data to decide) and
    the evidence, numbers and tolerance included, as text."""
    return {"holds": None if holds is None else bool(holds), "evidence": evidence}


def claims_line(claims: dict) -> str:
    """The headline line that counts a claim table."""
    held = [k for k, c in claims.items() if c["holds"]]
    failed = [k for k, c in claims.items() if c["holds"] is False]
    return (f"claims holding: {len(held)}/{len(claims)}; not holding: "
            f"{', '.join(failed) or 'none'}")
