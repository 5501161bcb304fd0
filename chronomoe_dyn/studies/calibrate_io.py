"""Inputs of the `calibrate` study: the candidates file and a real-text comparison's results.

Candidates file. The same TOML as ``chronomoe-train compare --arms-file``, read by the one
reader of the format, ``chronomoe_dyn.armsfile`` (compare's ``chronomoe_torch.arms`` uses it too):
one ``[arms."name"]`` table per candidate with the keys ``base``,
``description``, ``training``, ``model`` and ``controller``. The simulator uses only the
``controller`` table (``ControllerConfig`` fields, every value validated here); ``training`` and
``model`` changes act on real text only and are reported as such. A bad file raises ValueError
naming the file, the arm and the key.

Real-text results. A ``chronomoe-train compare`` run directory: ``results.csv`` (one row per
arm: ``<metric>_mean``, ``<metric>_sd``), or, without it, ``runs.csv`` (one row per run, the
finished ones averaged here). Arm names are candidate names.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Candidate", "load_candidates", "default_candidates_path", "load_real_text",
           "REAL_TEXT_METRICS"]


REAL_TEXT_METRICS = ("eval_loss", "maxvio_global", "maxvio_batch", "exploration_rate",
                     "routing_entropy", "R_mean", "R_p10", "R_p90", "gate_mean")
"""The compare metrics the calibrate table shows beside the simulator's."""


@dataclass(frozen=True)
class Candidate:
    """One arm of the file."""
    name: str
    description: str
    base: str
    controller: dict
    """ControllerConfig changes (the only part the simulator uses)."""
    real_text_only: tuple[str, ...]
    """Dotted ``training.*``/``model.*`` keys: real-text changes the simulator ignores."""


def default_candidates_path() -> Path:
    """``studies/calibration_candidates.toml`` of the repository this package lives in."""
    return Path(__file__).resolve().parents[2] / "studies" / "calibration_candidates.toml"


def load_candidates(path: str | Path) -> dict[str, Candidate]:
    """name -> Candidate, in file order; ValueError names the file, arm and key of a problem."""
    from ..armsfile import read_arms_file
    from ..config import ControllerConfig
    try:
        specs = read_arms_file(path)         # the one reader of the format (compare's too)
    except ValueError as e:
        msg = str(e).replace("arms file", "candidates file", 1)
        if "does not exist" in msg:
            msg += " (config key 'candidates')"
        raise ValueError(msg) from None
    out: dict[str, Candidate] = {}
    for name, a in specs.items():
        if a.base not in (None, "", "pxt"):
            # the simulator runs every candidate as pxt (schedule, fields on); another base
            # would change the arm on real text only, silently
            raise ValueError(f"candidates file {str(path)!r}, arm {name!r}: base {a.base!r}: "
                             f"a calibration candidate starts from 'pxt' (the simulator "
                             f"cannot run another base)")
        try:
            ControllerConfig.from_dict(a.controller)
        except (TypeError, ValueError) as e:
            raise ValueError(f"candidates file {str(path)!r}, arm {name!r}: controller: {e}"
                             ) from None
        out[name] = Candidate(
            name=name, description=a.description or "", base=a.base or "",
            controller=a.controller,
            real_text_only=tuple(f"{k}.{f}" for k in ("training", "model")
                                 for f in getattr(a, k)))
    return out


def _number(text: Any) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "arm" not in rows[0]:
        raise ValueError(f"real_text: {path} has no 'arm' column (not a compare results file)")
    return rows


def load_real_text(path: str | Path) -> dict[str, dict[str, Any]]:
    """arm -> {runs, <metric>_mean, <metric>_sd} from a compare run directory (or one of its
    CSV files). ValueError when there is none or it is not a compare output."""
    p = Path(path)
    if p.is_file():
        results, runs = (p, None) if p.name == "results.csv" else (None, p)
    elif p.is_dir():
        results = p / "results.csv" if (p / "results.csv").is_file() else None
        runs = p / "runs.csv" if (p / "runs.csv").is_file() else None
    else:
        raise ValueError(f"config key 'real_text': {str(p)!r} does not exist (expected a "
                         f"`chronomoe-train compare` run directory with results.csv or runs.csv)")
    if results is None and runs is None:
        raise ValueError(f"config key 'real_text': {str(p)!r} has neither results.csv nor "
                         f"runs.csv (expected a `chronomoe-train compare` run directory)")
    out: dict[str, dict[str, Any]] = {}
    if results is not None:
        for r in _read_csv(results):
            row: dict[str, Any] = {"runs": _number(r.get("runs_ok"))}
            for m in REAL_TEXT_METRICS:
                row[f"{m}_mean"] = _number(r.get(f"{m}_mean"))
                row[f"{m}_sd"] = _number(r.get(f"{m}_sd"))
            out[r["arm"]] = row
        return out
    by_arm: dict[str, list[dict[str, str]]] = {}
    for r in _read_csv(runs):
        if r.get("status", "ok") == "ok":
            by_arm.setdefault(r["arm"], []).append(r)
    for arm, rs in by_arm.items():
        row = {"runs": float(len(rs))}
        for m in REAL_TEXT_METRICS:
            v = [x for x in (_number(r.get(m)) for r in rs) if x is not None]
            row[f"{m}_mean"] = float(np.mean(v)) if v else None
            row[f"{m}_sd"] = float(np.std(v, ddof=1)) if len(v) > 1 else None
        out[arm] = row
    return out
