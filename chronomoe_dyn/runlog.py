"""Run metrics: the JSONL schema that training runs write and ``chronomoe-dyn plot`` reads.

This module owns the schema (its validation, writing and reading) and the seed's healthy ranges
(``HEALTHY_RANGES``), so writers (the torch trainer, the Hugging Face callback, ``compare``)
need not import the plotting code. ``chronomoe_dyn.plot`` re-exports these names.

Run metrics (JSONL) — one JSON object per line
----------------------------------------------
File: ``<run_dir>/metrics.jsonl``, UTF-8, appended one line per logging step. Blank lines are
ignored. Every key but ``step`` is optional: the plots draw what is present. Unknown keys are
ignored (so writers may add fields). Numbers may be ``null`` (missing); ``NaN`` is read as missing.

  step             int >= 0   optimizer step of the record (required)
  split            str        "train" (default) or "eval"; eval records are drawn as eval loss only
  loss             float      total loss L
  loss_lm, loss_balance, loss_coherence, loss_valley, loss_z
                   float      loss components, unweighted (any other ``loss_*`` key is drawn too)
  lr               float      learning rate
  R, dR            float      Kuramoto coherence R in [0, 1] after the tick, and its change ΔR
  kappa            float      meta-knob κ in effect, in [-1, 1]
  phase            str        κ schedule phase label (warmup_explore, cosine_anneal, ...)
  gate             float      coherence gate in [0, 1] applied to this step's update
  tbar_variance    float      var(T̄_global) over experts
  tbar_variance_local  float  mean over layers of var(T̄_local[l])
  valleys, ridges  list[int]  expert indices of the global landscape's valleys / ridges
                              (an int is read as a count)
  load_LE          [[float]]  [L][E] share of each layer's routed top-k slots that went to each
                              expert over the logged step (each row sums to 1; raw counts are
                              accepted and normalised per row)
  tbar_local_LE    [[float]]  [L][E] per-layer structural temperature T̄_local
  tbar_global_E    [float]    [E] global structural temperature T̄_global
  maxvio           float      mean over layers of (max_e load − mean load) / mean load
                              (computed from ``load_LE`` when absent)
  maxvio_L         [float]    [L] the same per layer (computed from ``load_LE`` when absent)

Version 2 keys (docs/CONTRACTS.md, "Run metrics v2"), validated the same way:

  routing_entropy  float      mean over layers and tokens of the entropy (nats) of the selection
                              softmax (noiseless score with fields on, raw logits otherwise)
  load_entropy     float      mean over layers of the entropy (nats) of the step's slot shares
  exploration_rate float      explored slots / routed slots over the step (0 without noise)
  logit_scale_L    [float]    [L] the step's observed σ (mean per-token std of raw logits)
  tbar_global      float      scalar T̄_global (v2)
  eval records (split "eval"): loss, perplexity, maxvio_global (float), maxvio_global_L ([L]),
                   routing_entropy, exploration_rate

Shapes of the array fields (``load_LE``, ``tbar_local_LE``, ``tbar_global_E``, ``maxvio_L``,
``logit_scale_L``, ``maxvio_global_L``) must not change within a file.
Records are sorted by step; when a step appears twice (a resumed run re-logging it), the later
line wins. A line that is not a JSON object, lacks ``step`` or has a field of the wrong type or
shape raises ``MetricsFormatError`` naming the file, the line number and the field; so does a
file that is not UTF-8 text. ``write_metrics_record`` validates one record and appends it in this
format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["HEALTHY_RANGES", "METRICS_FILE", "MetricsFormatError", "RunSeries",
           "read_metrics_jsonl", "read_records", "validate_metrics_record", "write_metrics_record"]

HEALTHY_RANGES: dict[str, tuple[float, float]] = {
    "R": (0.3, 0.8), "tbar_variance": (0.01, 0.1), "gate": (0.5, 1.0),
    "valleys": (1, 3), "ridges": (1, 3),
}
"""The seed's healthy ranges of the monitored metrics (inclusive)."""

METRICS_FILE = "metrics.jsonl"

_SCALARS = ("loss", "lr", "R", "dR", "kappa", "gate", "tbar_variance", "tbar_variance_local",
            "maxvio",
            # v2 (docs/CONTRACTS.md, "Run metrics v2")
            "routing_entropy", "load_entropy", "exploration_rate", "tbar_global", "perplexity",
            "maxvio_global")
_STRINGS = ("split", "phase")
_MATRICES = {"load_LE": 2, "tbar_local_LE": 2, "tbar_global_E": 1, "maxvio_L": 1,
             "logit_scale_L": 1, "maxvio_global_L": 1}
_INDEX_LISTS = ("valleys", "ridges")


class MetricsFormatError(ValueError):
    """A metrics JSONL file or record does not follow the schema (names file, line, field)."""


# ------------------------------------------------------------------------------------------
# The data the figures draw
# ------------------------------------------------------------------------------------------
@dataclass
class RunSeries:
    """One run's metrics as arrays over logged steps (T of them). Missing values are NaN."""
    source: str
    """Where it came from (a path, or "trajectory")."""
    step_T: np.ndarray
    """[T] step (training step or simulator tick) of each record, increasing."""
    scalars: dict[str, np.ndarray] = field(default_factory=dict)
    """name -> [T] float (R, dR, kappa, gate, loss, loss_*, tbar_variance, valleys, ...)."""
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """name -> ([T] low, [T] high): spread over systems of a batched trajectory (10–90 %)."""
    load_TLE: np.ndarray | None = None
    """[T, L, E] per-expert load share per layer (rows sum to 1)."""
    load_label: str = "load share"
    tbar_local_TLE: np.ndarray | None = None
    """[T, L, E] per-layer structural temperature."""
    tbar_global_TE: np.ndarray | None = None
    """[T, E] global structural temperature."""
    maxvio_TL: np.ndarray | None = None
    """[T, L] MaxVio of each layer."""
    logit_scale_TL: np.ndarray | None = None
    """[T, L] observed router-logit scale σ of each layer."""
    eval_step: np.ndarray | None = None
    eval_loss: np.ndarray | None = None
    eval_maxvio_global: np.ndarray | None = None
    """MaxVio_global of each evaluation (aligned with ``eval_step``; NaN where missing)."""
    step_label: str = "step"

    def scalar(self, name: str) -> np.ndarray | None:
        v = self.scalars.get(name)
        return None if v is None or not np.any(np.isfinite(v)) else v


# ------------------------------------------------------------------------------------------
# JSONL: validation, writing, reading
# ------------------------------------------------------------------------------------------
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _to_float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _matrix(name: str, v: Any, ndim: int, where: str) -> np.ndarray:
    try:
        a = np.array(v, dtype=np.float64) if v is not None else None
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != ndim or a.size == 0:
        what = "[L][E] list of lists" if ndim == 2 else f"[{name.rsplit('_', 1)[-1]}] list"
        raise MetricsFormatError(f"{where}: field {name!r} must be a non-empty rectangular {what} "
                                 f"of numbers, got {_short(v)}")
    if np.any(a[np.isfinite(a)] < 0) and name == "load_LE":
        raise MetricsFormatError(f"{where}: field 'load_LE' has a negative value")
    return a


def _short(v: Any, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def validate_metrics_record(rec: Any, where: str = "record") -> dict:
    """Check one record against the schema; return it with arrays as NumPy and counts as ints.

    Raises MetricsFormatError naming ``where`` (e.g. "run/metrics.jsonl line 7") and the field."""
    if not isinstance(rec, dict):
        raise MetricsFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    step = rec.get("step")
    if step is None:
        raise MetricsFormatError(f"{where}: missing required field 'step'")
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise MetricsFormatError(f"{where}: field 'step' must be an integer >= 0, got "
                                 f"{_short(step)}")
    out: dict[str, Any] = {"step": int(step)}
    for key, v in rec.items():
        if key == "step":
            continue
        if key in _STRINGS:
            if not isinstance(v, str):
                raise MetricsFormatError(f"{where}: field {key!r} must be a string, got "
                                         f"{_short(v)}")
            if key == "split" and v not in ("train", "eval"):
                raise MetricsFormatError(f"{where}: field 'split' must be 'train' or 'eval', "
                                         f"got {v!r}")
            out[key] = v
        elif key in _SCALARS or key.startswith("loss_"):
            if v is not None and not _is_number(v):
                raise MetricsFormatError(f"{where}: field {key!r} must be a number or null, got "
                                         f"{_short(v)}")
            out[key] = _to_float(v)
        elif key in _MATRICES:
            out[key] = _matrix(key, v, _MATRICES[key], where)
        elif key in _INDEX_LISTS:
            # a count, or (v2's per-layer landscapes) a mean count per layer
            if _is_number(v) and float(v) >= 0 and math.isfinite(float(v)):
                out[key] = int(v) if float(v).is_integer() else float(v)
            elif isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                             and i >= 0 for i in v):
                out[key] = len(v)
            else:
                raise MetricsFormatError(f"{where}: field {key!r} must be a list of expert "
                                         f"indices (or a count), got {_short(v)}")
        # unknown keys: ignored on purpose (forward compatible)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return _jsonable(v.item())  # 0-d arrays / tensors already moved to the host
    return v


def write_metrics_record(path: str | Path, record: dict) -> None:
    """Validate ``record`` and append it as one line to the JSONL file at ``path``.

    NumPy arrays become lists and non-finite floats become ``null``."""
    rec = _jsonable(record)
    validate_metrics_record(rec, where=f"write_metrics_record({str(path)!r})")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _stack(rows: list[np.ndarray | None], name: str, path: Path,
           lines: list[int]) -> np.ndarray | None:
    shape = next((r.shape for r in rows if r is not None), None)
    if shape is None:
        return None
    out = np.full((len(rows),) + shape, np.nan)
    for i, r in enumerate(rows):
        if r is None:
            continue
        if r.shape != shape:
            raise MetricsFormatError(f"{path} line {lines[i]}: field {name!r} has shape "
                                     f"{list(r.shape)}, but earlier lines have {list(shape)}")
        out[i] = r
    return out


def read_records(path: str | Path, keep_unknown: bool = True
                 ) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(train, eval) records of a metrics JSONL file as (line number, record) pairs sorted by
    step; a step logged twice keeps the later line (a resumed run). Known fields are validated
    and converted (arrays as NumPy); unknown keys are kept as written (``keep_unknown``) or
    dropped. Raises MetricsFormatError naming the file, the line and the field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    train: dict[int, tuple[int, dict]] = {}
    evals: dict[int, tuple[int, dict]] = {}
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise MetricsFormatError(f"{p} line {line}: not UTF-8 text (a binary or corrupt file?)"
                                 ) from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{p} line {lineno}"
        try:
            raw = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            raise MetricsFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                                     ) from None
        rec = validate_metrics_record(raw, where)
        if keep_unknown:
            rec = {**raw, **rec}
        (evals if rec.get("split", "train") == "eval" else train)[rec["step"]] = (lineno, rec)
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def read_metrics_jsonl(path: str | Path) -> RunSeries:
    """Read a metrics JSONL file into a RunSeries (see the module docstring for the schema)."""
    p = Path(path)
    train_recs, eval_recs = read_records(p, keep_unknown=False)
    evals = {r["step"]: r["loss"] for _, r in eval_recs if "loss" in r}
    evals_mv = {r["step"]: r.get("maxvio_global", math.nan) for _, r in eval_recs if "loss" in r}
    train = {r["step"]: (lineno, r) for lineno, r in train_recs}
    if not train:
        raise MetricsFormatError(f"{p}: no training records (lines with 'step'); nothing to plot")
    steps = sorted(train)
    lines = [train[s][0] for s in steps]
    recs = [train[s][1] for s in steps]
    keys = sorted({k for r in recs for k in r if k in _SCALARS or k.startswith("loss_")
                   or k in _INDEX_LISTS})
    scalars = {k: np.array([float(r.get(k, math.nan)) for r in recs]) for k in keys}
    load = _stack([r.get("load_LE") for r in recs], "load_LE", p, lines)
    maxvio_L = _stack([r.get("maxvio_L") for r in recs], "maxvio_L", p, lines)
    if load is not None:
        tot = load.sum(axis=-1, keepdims=True)
        load = np.divide(load, tot, out=np.full_like(load, np.nan), where=tot > 0)
        if "maxvio" not in scalars or not np.any(np.isfinite(scalars["maxvio"])):
            scalars["maxvio"] = _maxvio(load)
        if maxvio_L is None:
            maxvio_L = _maxvio_L(load)
    es = sorted(evals)
    return RunSeries(
        source=str(p), step_T=np.array(steps, dtype=np.int64), scalars=scalars, load_TLE=load,
        tbar_local_TLE=_stack([r.get("tbar_local_LE") for r in recs], "tbar_local_LE", p, lines),
        tbar_global_TE=_stack([r.get("tbar_global_E") for r in recs], "tbar_global_E", p, lines),
        maxvio_TL=maxvio_L, eval_step=np.array(es, dtype=np.int64) if es else None,
        eval_loss=np.array([evals[s] for s in es]) if es else None,
        logit_scale_TL=_stack([r.get("logit_scale_L") for r in recs], "logit_scale_L", p, lines),
        eval_maxvio_global=np.array([evals_mv[s] for s in es]) if es else None,
    )


def _maxvio_L(load_TLE: np.ndarray) -> np.ndarray:
    """[T, L] (max − mean)/mean of each layer's load (NaN for a layer without load)."""
    mean = load_TLE.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = (load_TLE.max(axis=-1) - mean) / mean
    return np.where(np.isfinite(v), v, np.nan)


def _maxvio(load_TLE: np.ndarray) -> np.ndarray:
    """[T] mean over layers of (max − mean)/mean of each layer's load."""
    v = _maxvio_L(load_TLE)
    out = np.full(v.shape[0], np.nan)
    ok = np.isfinite(v).any(axis=-1)
    out[ok] = np.nanmean(v[ok], axis=-1)
    return out

