"""Figures of controller runs: training metrics (JSONL) and simulator trajectories (.npz, .zarr).

``plot_run(run)`` renders PNGs for one run, where ``run`` is

* a run directory holding ``metrics.jsonl`` (written by the torch trainer or the Hugging Face
  callback), ``trajectory.npz`` (``Trajectory.to_npz``) or ``trajectory.zarr``
  (``Trajectory.to_zarr``), or any single ``*.jsonl`` / ``*.npz`` / ``*.zarr``;
* a path to such a file;
* a ``Trajectory`` object (then ``out_dir`` is required).

PNGs go to ``<run_dir>/plots/`` unless ``out_dir`` is given:
``curves.png`` (R, κ, gate), ``landscape.png`` (T̄ variance, valley/ridge counts),
``tbar_snapshots.png`` (T̄ relative to its layer mean as a layer × expert heatmap at several
times), ``tbar_time.png``
(T̄ relative to its layer mean, every (layer, expert) over time), ``load.png`` (per-expert load per
layer over time, MaxVio), ``routing.png`` (exploration rate, routing and load entropy, logit
scale σ per layer, MaxVio with the eval set's MaxVio_global) and ``loss.png`` (loss and its
components). A figure whose data the run
does not have is skipped. Shaded bands are the seed's healthy ranges (``HEALTHY_RANGES``).

Reading a run (``load_run``, ``series_from_trajectory``) is ``chronomoe_dyn.runload``; the
run-metrics JSONL schema, its reader/writer and ``HEALTHY_RANGES`` live in ``chronomoe_dyn.runlog``
(all re-exported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .runload import (TRAJECTORY_FILE, ZARR_STORE, load_run, resolve_run,  # noqa: F401
                      series_from_trajectory)
from .runlog import (HEALTHY_RANGES, METRICS_FILE, MetricsFormatError, RunSeries,  # noqa: F401
                     read_metrics_jsonl, validate_metrics_record, write_metrics_record)

__all__ = ["HEALTHY_RANGES", "MetricsFormatError", "RunSeries", "read_metrics_jsonl",
           "series_from_trajectory", "load_run", "plot_run", "plot_series",
           "validate_metrics_record", "write_metrics_record", "new_figure", "save_figure",
           "shade_band"]


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
    """T̄ minus its layer mean at ``n`` times, on one diverging scale centred at 0, so that
    blue cells are below their layer's mean (valleys) and red cells above it (ridges)."""
    from matplotlib.colors import TwoSlopeNorm
    tb, label = _tbar_LE(s)
    if tb is None:
        return None
    idx = _snapshot_index(tb.shape[0], n)
    snap = tb[idx]
    if not np.any(np.isfinite(snap)):
        return None
    with np.errstate(all="ignore"):
        rel = snap - np.nanmean(snap, axis=-1, keepdims=True)
    lim = max(float(np.nanmax(np.abs(rel))), 1e-6)
    L, E = tb.shape[1:]
    fig, axes = new_figure(1, len(idx), width=2.2, height=max(1.6, 0.28 * L + 1.0))
    im = None
    for j, (ax, t) in enumerate(zip(axes[0], idx)):
        im = ax.imshow(rel[j], aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -lim, lim),
                       interpolation="nearest")
        ax.set_title(f"{s.step_label} {int(s.step_T[t])}", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
        if j == 0:
            ax.set_ylabel("layer", fontsize=8)
        else:
            ax.set_yticks([])
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label=f"{label} − layer mean")
    fig.suptitle(f"{label} relative to its layer mean (blue = valley, red = ridge)", fontsize=10)
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
        p = resolve_run(run)
        series = load_run(p, system)
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
