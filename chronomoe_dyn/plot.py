"""Figures of controller runs: training metrics (JSONL) and simulator trajectories (.npz).

``plot_run(run)`` renders PNGs for one run, where ``run`` is

* a run directory holding ``metrics.jsonl`` (written by the torch trainer or the Hugging Face
  callback) or ``trajectory.npz`` (``Trajectory.to_npz``), or any single ``*.jsonl`` / ``*.npz``;
* a path to such a file;
* a ``Trajectory`` object (then ``out_dir`` is required).

PNGs go to ``<run_dir>/plots/`` unless ``out_dir`` is given:
``curves.png`` (R, κ, gate), ``landscape.png`` (T̄ variance, valley/ridge counts),
``tbar_snapshots.png`` (T̄ as a layer × expert heatmap at several times), ``tbar_time.png``
(T̄ relative to its layer mean, every (layer, expert) over time), ``load.png`` (per-expert load per
layer over time, MaxVio), ``routing.png`` (exploration rate, routing and load entropy, logit scale
σ per layer, MaxVio with the eval set's MaxVio_global) and ``loss.png`` (loss and its components). A figure whose data the run
does not have is skipped. Shaded bands are the seed's healthy ranges (``HEALTHY_RANGES``).

Run metrics (JSONL) — the schema the torch side writes, one JSON object per line
---------------------------------------------------------------------------------
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
  Run metrics v2 (docs/CONTRACTS.md):
  routing_entropy  float      mean over layers and tokens of the entropy (nats) of the selection
                              softmax (noiseless score s with the controller's fields, raw z
                              without)
  load_entropy     float      mean over layers of the entropy (nats) of the step's slot shares
  exploration_rate float      explored slots / routed slots (slots not in the noiseless top-k)
  logit_scale_L    [float]    [L] the step's σ: mean per-token std across experts of the raw logits
  tbar_global      float      scalar T̄_global (v2; ``tbar_global_E`` is v1's [E] vector)
  valleys, ridges  may also be a (mean) count per layer (v2's per-layer landscapes)
  Eval records (split "eval") may carry: perplexity, maxvio_global (mean over layers of
  max/mean − 1 of the slot counts summed over the whole evaluation), maxvio_global_L [L],
  routing_entropy, exploration_rate.

Shapes of ``load_LE``, ``tbar_local_LE``, ``tbar_global_E`` and ``maxvio_L`` must not change
within a file.
Records are sorted by step; when a step appears twice (a resumed run re-logging it), the later
line wins. A line that is not a JSON object, lacks ``step`` or has a field of the wrong type or
shape raises ``MetricsFormatError`` naming the file, the line number and the field.
``write_metrics_record`` validates one record and appends it in this format.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["HEALTHY_RANGES", "MetricsFormatError", "RunSeries", "read_metrics_jsonl",
           "series_from_trajectory", "load_run", "plot_run", "plot_series",
           "validate_metrics_record", "write_metrics_record", "new_figure", "save_figure",
           "shade_band"]

HEALTHY_RANGES: dict[str, tuple[float, float]] = {
    "R": (0.3, 0.8), "tbar_variance": (0.01, 0.1), "gate": (0.5, 1.0),
    "valleys": (1, 3), "ridges": (1, 3),
}
"""The seed's healthy ranges of the monitored metrics (inclusive)."""

METRICS_FILE = "metrics.jsonl"
TRAJECTORY_FILE = "trajectory.npz"

_SCALARS = ("loss", "lr", "R", "dR", "kappa", "gate", "tbar_variance", "tbar_variance_local",
            "maxvio", "routing_entropy", "load_entropy", "exploration_rate", "tbar_global",
            "maxvio_global", "perplexity")
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
        what = "[L][E] list of lists" if ndim == 2 else "[E] list"
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


def read_metrics_jsonl(path: str | Path) -> RunSeries:
    """Read a metrics JSONL file into a RunSeries (see the module docstring for the schema)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    train: dict[int, tuple[int, dict]] = {}
    evals: dict[int, float] = {}
    evals_mv: dict[int, float] = {}
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            try:
                raw = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise MetricsFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})"
                                         ) from None
            rec = validate_metrics_record(raw, where)
            if rec.get("split", "train") == "eval":
                if "loss" in rec:
                    evals[rec["step"]] = rec["loss"]
                    evals_mv[rec["step"]] = rec.get("maxvio_global", math.nan)
                continue
            train[rec["step"]] = (lineno, rec)  # later line wins on a repeated step
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


# ------------------------------------------------------------------------------------------
# Trajectories
# ------------------------------------------------------------------------------------------
def _get(traj: Any, name: str) -> np.ndarray | None:
    v = getattr(traj, name, None) if not isinstance(traj, dict) else traj.get(name)
    return None if v is None else np.asarray(v)


def series_from_trajectory(traj: Any, system: int = 0, source: str = "trajectory") -> RunSeries:
    """RunSeries of one system of a simulator ``Trajectory`` v2 (or a dict of its arrays).

    Scalar curves carry a 10–90 % band over all systems when the batch has more than one.
    The landscape is per layer: valley/ridge counts are means over layers; MaxVio is that of
    each tick's slot counts (``maxvio_BTL``), the load figure shows the usage EMA."""
    R = _get(traj, "R_BT")
    tick = _get(traj, "tick_T")
    if R is None or tick is None:
        raise ValueError(f"{source}: not a simulator trajectory (needs tick_T and R_BT)")
    if R.ndim != 2:
        raise ValueError(f"{source}: R_BT must be [B, T], got shape {R.shape}")
    B = R.shape[0]
    if not 0 <= system < B:
        raise ValueError(f"system={system}: the trajectory has {B} system(s), allowed 0..{B - 1}")
    scalars: dict[str, np.ndarray] = {}
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def put(name: str, a_BT: np.ndarray | None) -> None:
        if a_BT is None:
            return
        a_BT = np.asarray(a_BT, dtype=np.float64)
        scalars[name] = a_BT[system]
        if B > 1:
            bands[name] = (np.quantile(a_BT, 0.1, axis=0), np.quantile(a_BT, 0.9, axis=0))

    put("R", R)
    for name, key in (("dR", "dR_BT"), ("kappa", "kappa_BT"), ("gate", "gate_BT"),
                      ("loss", "loss_BT"), ("tbar_global", "Tbar_global_BT"),
                      ("exploration_rate", "exploration_BT")):
        put(name, _get(traj, key))
    vl = _get(traj, "variance_local_BTL")
    if vl is not None:
        put("tbar_variance_local", vl.mean(axis=-1))
    for name, key in (("valleys", "valley_local_BTLE"), ("ridges", "ridge_local_BTLE")):
        m = _get(traj, key)
        if m is not None:
            put(name, m.sum(axis=-1).mean(axis=-1))
    usage = _get(traj, "usage_BTLE")
    load = None if usage is None else usage[system].astype(np.float64)
    mv = _get(traj, "maxvio_BTL")
    maxvio_L = None
    if mv is not None:
        put("maxvio", mv.mean(axis=-1))
        maxvio_L = mv[system].astype(np.float64)
    tl = _get(traj, "Tbar_local_BTLE")
    return RunSeries(source=source, step_T=tick.astype(np.int64), scalars=scalars, bands=bands,
                     load_TLE=load, load_label="usage EMA u", maxvio_TL=maxvio_L,
                     tbar_local_TLE=None if tl is None else tl[system].astype(np.float64),
                     step_label="tick")


def _load_npz(path: Path, system: int) -> RunSeries:
    """The arrays of a saved trajectory. Only arrays are read (no unpickling): a file from
    ``Trajectory.to_npz`` and a plain ``np.savez`` of the same array names both work."""
    try:
        with np.load(path, allow_pickle=False) as z:
            traj = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: cannot read simulator trajectory ({e})") from None
    if "meta_json" in traj:
        from .trajectory import check_format
        check_format(json.loads(str(traj["meta_json"])).get("format"), path)
    return series_from_trajectory(traj, system=system, source=str(path))


def _resolve_run(run: str | Path) -> Path:
    p = Path(run)
    if not p.exists():
        raise FileNotFoundError(f"run not found: {p} (expected a run directory, a metrics "
                                f".jsonl file or a trajectory .npz)")
    if p.is_file():
        if p.suffix not in (".jsonl", ".npz"):
            raise ValueError(f"{p}: unsupported file type {p.suffix!r} (expected .jsonl or .npz)")
        return p
    for name in (METRICS_FILE, TRAJECTORY_FILE):
        if (p / name).is_file():
            return p / name
    for ext in ("*.jsonl", "*.npz"):
        found = sorted(p.glob(ext))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"{p}: several {ext} files ({names}); pass the one to plot")
    raise FileNotFoundError(f"{p}: no {METRICS_FILE}, {TRAJECTORY_FILE}, *.jsonl or *.npz in this "
                            f"directory")


def load_run(run: str | Path, system: int = 0) -> RunSeries:
    """Read a run directory, a metrics JSONL file or a trajectory .npz into a RunSeries."""
    p = _resolve_run(run)
    return read_metrics_jsonl(p) if p.suffix == ".jsonl" else _load_npz(p, system)


# ------------------------------------------------------------------------------------------
# Figure helpers (also used by the studies)
# ------------------------------------------------------------------------------------------
def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 7.0, height: float = 2.4,
               sharex: bool | str = False, squeeze: bool = False, **kw: Any):
    """A (Figure, axes[nrows, ncols]) pair on the Agg canvas, independent of pyplot's state
    (no global backend switch, safe in threads and notebooks)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols if ncols > 1 else width, height * nrows),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=sharex, squeeze=squeeze, **kw)
    return fig, axes


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG (Agg) and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, dpi=dpi)
    return p


def shade_band(ax: Any, lo: float, hi: float, label: str | None = "healthy range",
               color: str = "tab:green") -> None:
    """Shade a horizontal band (a healthy range) behind the data."""
    ax.axhspan(lo, hi, color=color, alpha=0.12, lw=0, label=label, zorder=0)


def _line(ax: Any, s: RunSeries, name: str, label: str | None = None, **kw: Any) -> bool:
    y = s.scalar(name)
    if y is None:
        return False
    line, = ax.plot(s.step_T, y, lw=1.2, label=label or name, **kw)
    if name in s.bands:
        lo, hi = s.bands[name]
        ax.fill_between(s.step_T, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    return True


# ------------------------------------------------------------------------------------------
# The run figures
# ------------------------------------------------------------------------------------------
def _fig_curves(s: RunSeries, out: Path) -> Path | None:
    rows = [n for n in ("R", "kappa", "gate", "dR") if s.scalar(n) is not None]
    if not rows:
        return None
    fig, axes = new_figure(len(rows), 1, sharex=True, height=1.9)
    titles = {"R": "Kuramoto coherence R", "kappa": "meta-knob κ", "gate": "coherence gate",
              "dR": "ΔR per tick"}
    for ax, n in zip(axes[:, 0], rows):
        _line(ax, s, n)
        if n in HEALTHY_RANGES:
            shade_band(ax, *HEALTHY_RANGES[n])
            ax.legend(loc="lower right", fontsize=7)
        if n in ("R", "gate"):
            ax.set_ylim(-0.02, 1.02)
        if n == "kappa":
            ax.axhline(0.0, color="0.6", lw=0.6)
        ax.set_ylabel(n)
        ax.set_title(titles[n], fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(s.step_label)
    fig.suptitle(f"coherence and knob — {Path(s.source).name}", fontsize=10)
    return save_figure(fig, out / "curves.png")


def _fig_landscape(s: RunSeries, out: Path) -> Path | None:
    has_var = any(s.scalar(n) is not None for n in ("tbar_variance", "tbar_variance_local"))
    has_cnt = any(s.scalar(n) is not None for n in ("valleys", "ridges"))
    if not (has_var or has_cnt):
        return None
    fig, axes = new_figure(2, 1, sharex=True, height=2.2)
    ax = axes[0, 0]
    if has_var:
        _line(ax, s, "tbar_variance", "var T̄ global")
        _line(ax, s, "tbar_variance_local", "var T̄ local (layer mean)")
        shade_band(ax, *HEALTHY_RANGES["tbar_variance"])
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("T̄ variance")
    ax.set_title("landscape differentiation", fontsize=9, loc="left")
    ax = axes[1, 0]
    if has_cnt:
        _line(ax, s, "valleys", "valleys")
        _line(ax, s, "ridges", "ridges")
        shade_band(ax, *HEALTHY_RANGES["valleys"])
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("count")
    ax.set_title("valleys and ridges (per layer: mean over layers for a trajectory)", fontsize=9,
                 loc="left")
    ax.set_xlabel(s.step_label)
    return save_figure(fig, out / "landscape.png")


def _tbar_LE(s: RunSeries) -> tuple[np.ndarray | None, str]:
    if s.tbar_local_TLE is not None:
        return s.tbar_local_TLE, "T̄ local"
    if s.tbar_global_TE is not None:
        return s.tbar_global_TE[:, None, :], "T̄ global"
    return None, ""


def _snapshot_index(T: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, T - 1, num=min(n, T)).round().astype(int).tolist()))


def _fig_tbar_snapshots(s: RunSeries, out: Path, n: int = 6) -> Path | None:
    tb, label = _tbar_LE(s)
    if tb is None:
        return None
    idx = _snapshot_index(tb.shape[0], n)
    finite = tb[idx][np.isfinite(tb[idx])]
    if finite.size == 0:
        return None
    L, E = tb.shape[1:]
    fig, axes = new_figure(1, len(idx), width=2.2, height=max(1.6, 0.28 * L + 1.0))
    vmin, vmax = float(finite.min()), float(finite.max())
    if vmax - vmin < 1e-12:
        vmin, vmax = vmin - 1e-3, vmax + 1e-3
    im = None
    for j, (ax, t) in enumerate(zip(axes[0], idx)):
        im = ax.imshow(tb[t], aspect="auto", cmap="coolwarm", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"{s.step_label} {int(s.step_T[t])}", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        if j == 0:
            ax.set_ylabel("layer", fontsize=8)
        else:
            ax.set_yticks([])
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=label)
    fig.suptitle(f"{label} landscape (blue = valley, red = ridge)", fontsize=10)
    return save_figure(fig, out / "tbar_snapshots.png")


def _rows_image(ax: Any, s: RunSeries, a_TLE: np.ndarray, cmap: str, norm: Any) -> Any:
    T, L, E = a_TLE.shape
    img = a_TLE.reshape(T, L * E).T  # rows: (layer, expert), columns: time
    x0, x1 = float(s.step_T[0]), float(s.step_T[-1])
    half = 0.5 * (x1 - x0) / (T - 1) if T > 1 else 0.5   # each column centred on its step
    im = ax.imshow(img, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest",
                   extent=(x0 - half, x1 + half, L * E - 0.5, -0.5))
    for l in range(1, L):
        ax.axhline(l * E - 0.5, color="k", lw=0.4)
    if L > 1:
        ax.set_yticks([l * E + (E - 1) / 2 for l in range(L)], [f"L{l}" for l in range(L)],
                      fontsize=7 if L <= 16 else 5)
        ax.set_ylabel("layer (experts within)")
    else:
        ax.set_ylabel("expert")
    return im


def _fig_tbar_time(s: RunSeries, out: Path) -> Path | None:
    from matplotlib.colors import TwoSlopeNorm
    tb, label = _tbar_LE(s)
    if tb is None or not np.any(np.isfinite(tb)):
        return None
    rel = tb - np.nanmean(tb, axis=-1, keepdims=True)  # relative landscape: valleys < 0 < ridges
    lim = float(np.nanmax(np.abs(rel))) or 1e-6
    L = tb.shape[1]
    fig, axes = new_figure(1, 1, width=8.0, height=min(9.0, 1.5 + 0.12 * tb.shape[1] * tb.shape[2]))
    ax = axes[0, 0]
    im = _rows_image(ax, s, rel, "coolwarm", TwoSlopeNorm(0.0, -lim, lim))
    ax.set_xlabel(s.step_label)
    fig.colorbar(im, ax=ax, label=f"{label} − layer mean")
    fig.suptitle(f"{label} relative to its layer mean over time"
                 + (f" ({L} layers)" if L > 1 else ""), fontsize=10)
    return save_figure(fig, out / "tbar_time.png")


def _fig_load(s: RunSeries, out: Path) -> Path | None:
    from matplotlib.colors import TwoSlopeNorm
    if s.load_TLE is None or not np.any(np.isfinite(s.load_TLE)):
        return None
    T, L, E = s.load_TLE.shape
    rel = s.load_TLE * E  # 1 = a uniform share
    hi = max(float(np.nanmax(rel)), 1.0 + 1e-6)
    fig = None
    has_mv = s.scalar("maxvio") is not None
    fig, axes = new_figure(2 if has_mv else 1, 1, sharex=True, width=8.0,
                           height=min(7.0, 1.5 + 0.1 * L * E), gridspec_kw=(
                               {"height_ratios": [3, 1]} if has_mv else None))
    ax = axes[0, 0]
    im = _rows_image(ax, s, rel, "coolwarm", TwoSlopeNorm(1.0, 0.0, hi))
    fig.colorbar(im, ax=ax, label=f"{s.load_label} × E (1 = uniform)")
    ax.set_title(f"per-expert {s.load_label} per layer", fontsize=9, loc="left")
    if has_mv:
        ax = axes[1, 0]
        if s.maxvio_TL is not None and s.maxvio_TL.shape[1] > 1:
            for l in range(s.maxvio_TL.shape[1]):
                ax.plot(s.step_T, s.maxvio_TL[:, l], lw=0.6, alpha=0.5, color="0.5",
                        label="per layer" if l == 0 else None)
        _line(ax, s, "maxvio", "MaxVio (layer mean)", color="tab:red")
        ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel("MaxVio")
        ax.set_title("(max − mean)/mean load, mean over layers", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(s.step_label)
    return save_figure(fig, out / "load.png")


def _fig_loss(s: RunSeries, out: Path) -> Path | None:
    comps = sorted(k for k in s.scalars if k.startswith("loss_") and s.scalar(k) is not None)
    has_total = s.scalar("loss") is not None
    if not has_total and not comps and s.eval_loss is None:
        return None
    fig, axes = new_figure(2 if comps else 1, 1, sharex=True, height=2.4)
    ax = axes[0, 0]
    _line(ax, s, "loss", "train loss")
    if s.eval_loss is not None:
        ax.plot(s.eval_step, s.eval_loss, "o-", ms=3, lw=1, label="eval loss")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("total loss", fontsize=9, loc="left")
    if comps:
        ax = axes[1, 0]
        for k in comps:
            y = np.abs(s.scalars[k])
            ax.plot(s.step_T, np.where(y > 0, y, np.nan), lw=1, label=k)
        ax.set_yscale("log")
        ax.set_ylabel("|component|")
        ax.legend(fontsize=7, ncol=min(len(comps), 3))
        ax.set_title("loss components (unweighted)", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(s.step_label)
    return save_figure(fig, out / "loss.png")


def _fig_routing(s: RunSeries, out: Path) -> Path | None:
    """Run metrics v2: exploration, entropies, logit scale, MaxVio (train and eval)."""
    has = {n: s.scalar(n) is not None for n in ("exploration_rate", "routing_entropy",
                                                 "load_entropy", "maxvio")}
    mv_eval = s.eval_maxvio_global is not None and np.any(np.isfinite(s.eval_maxvio_global))
    has_scale = s.logit_scale_TL is not None and np.any(np.isfinite(s.logit_scale_TL))
    if not (has["exploration_rate"] or has["routing_entropy"] or has_scale or mv_eval):
        return None
    fig, axes = new_figure(4, 1, sharex=True, height=1.9)
    ax = axes[0, 0]
    _line(ax, s, "exploration_rate", "exploration rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("fraction of slots")
    ax.set_title("slots routed outside the noiseless top-k", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1, 0]
    _line(ax, s, "routing_entropy", "routing entropy (per token)")
    _line(ax, s, "load_entropy", "load entropy (slot shares)")
    ax.set_ylabel("entropy [nats]")
    ax.set_title("entropy of the routing", fontsize=9, loc="left")
    if has["routing_entropy"] or has["load_entropy"]:
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2, 0]
    if has_scale:
        for l in range(s.logit_scale_TL.shape[1]):
            ax.plot(s.step_T, s.logit_scale_TL[:, l], lw=1, label=f"layer {l}")
        ax.legend(fontsize=6, ncol=min(4, s.logit_scale_TL.shape[1]), loc="upper left")
    ax.set_ylabel("σ [logit units]")
    ax.set_title("router logit scale σ (mean per-token std across experts)", fontsize=9,
                 loc="left")
    ax = axes[3, 0]
    _line(ax, s, "maxvio", "MaxVio (batch, layer mean)", color="tab:red")
    if mv_eval:
        ax.plot(s.eval_step, s.eval_maxvio_global, "o", ms=4, color="k",
                label="MaxVio_global (eval set)")
    ax.set_ylabel("max/mean − 1")
    ax.set_title("load imbalance", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel(s.step_label)
    fig.suptitle(f"routing — {Path(s.source).name}", fontsize=10)
    return save_figure(fig, out / "routing.png")


_FIGURES = (_fig_curves, _fig_landscape, _fig_tbar_snapshots, _fig_tbar_time, _fig_load,
            _fig_routing, _fig_loss)


def plot_series(series: RunSeries, out_dir: str | Path) -> list[Path]:
    """Render every figure the series has data for into ``out_dir``; return the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [f(series, out) for f in _FIGURES]
    return [p for p in paths if p is not None]


def plot_run(run: Any, out_dir: str | Path | None = None, system: int = 0) -> list[Path]:
    """Render the PNGs of a run (directory, .jsonl, .npz or Trajectory); return their paths.

    Default output: ``<run dir>/plots`` (the directory holding the file for a file path)."""
    if isinstance(run, (str, Path)):
        p = _resolve_run(run)
        series = read_metrics_jsonl(p) if p.suffix == ".jsonl" else _load_npz(p, system)
        out = Path(out_dir) if out_dir is not None else p.parent / "plots"
    else:
        if out_dir is None:
            raise ValueError("plot_run: out_dir is required when plotting a Trajectory object")
        series = series_from_trajectory(run, system=system)
        out = Path(out_dir)
    paths = plot_series(series, out)
    if not paths:
        raise ValueError(f"{series.source}: nothing to plot (no R, κ, gate, landscape, load or "
                         f"loss fields)")
    return paths


def iter_paths(paths: Iterable[Path]) -> str:
    """Lines for printing a list of written files."""
    return "\n".join(f"  {p}" for p in paths)
