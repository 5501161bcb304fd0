"""Study `sweep`: a κ × coupling phase diagram of the closed loop.

Question. How do the meta-knob κ (held constant) and the Kuramoto coupling K shape the
controller's late-time state in the default environment: coherence R, the T̄ landscape (mean
variance of T̄_local over layers, valleys per layer), the explored share of routed slots, MaxVio
and the environment's loss? Where in the (κ, K) plane are the seed's healthy ranges (R 0.3–0.8,
T̄ variance 0.01–0.1, 1–3 valleys)?

Method. For every cell, ``num_systems`` systems (seeds seed … seed+B−1, batched in one
``simulate`` call) run ``ticks`` ticks under a constant κ schedule with ``coupling = K``; every
metric is averaged over the last ``late_fraction`` of the records and then over the systems.
The same seeds are used in every cell (common random numbers), so differences between cells
are not seed noise.

Run:  chronomoe-dyn study sweep [--quick] [--seed N] [--out DIR] [--set KEY=VALUE]
      python studies/sweep.py
Outputs (studies/out/sweep/): sweep_heatmaps.png (late R, var T̄_local, valleys per layer,
explored share, MaxVio, loss), sweep_healthy.png (fraction of late records with R, var T̄_local,
local valleys, and all three, inside the healthy ranges), summary.json (every cell's numbers),
config.json.
"""

from __future__ import annotations

import time

import numpy as np

from ..plot import new_figure, save_figure
from .common import (HEALTHY_RANGES, controller_config, env_config, finish, out_dir_for,
                     progress_bar, resolve_config)

NAME = "sweep"

CONFIG = {
    "kappa": [-1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0],
    "coupling": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0],
    "num_systems": 8,               # seeds per cell
    "ticks": 4000,                  # the default run length: the router settles by ~3000 ticks
                                    # and T̄_local (500 ticks per e-fold) has formed
    "record_every": 20,
    "late_fraction": 0.25,
    "controller": {},               # other ControllerConfig changes
    "env": {},
}

QUICK = {"kappa": [-0.6, 0.0, 0.6], "coupling": [0.0, 2.0], "num_systems": 2, "ticks": 400}

HEALTHY = {
    "healthy_R": "R in 0.3–0.8",
    "healthy_var_local": "var T̄_local in 0.01–0.1",
    "healthy_valleys_local": "valleys per layer in 1–3",
    "healthy": "all three at once",
}
"""Fractions of late records inside the seed's healthy ranges."""

METRICS = {
    "R": "late R",
    "var_local": "var T̄_local (layer mean)",
    "valleys_local": "valleys per layer",
    "exploration": "explored share of slots",
    "maxvio": "MaxVio (layer mean)",
    "loss": "mean token loss",
}


def _late_metrics(traj, late_fraction: float) -> dict:
    T = traj.R_BT.shape[1]
    s = slice(max(0, T - max(1, int(round(late_fraction * T)))), T)
    per_sys = {
        "R": traj.R_BT[:, s].mean(1),
        "R_std_time": traj.R_BT[:, s].std(1),
        "var_local": traj.variance_local_BTL[:, s].mean((1, 2)),
        "valleys_local": traj.valley_local_BTLE[:, s].sum(-1).mean((1, 2)),
        "exploration": traj.exploration_BT[:, s].mean(1),
        "maxvio": traj.maxvio_BT[:, s].mean(1),
        "ridges_local": traj.ridge_local_BTLE[:, s].sum(-1).mean((1, 2)),
        "loss": traj.loss_BT[:, s].mean(1),
    }
    (rlo, rhi), (vlo, vhi) = HEALTHY_RANGES["R"], HEALTHY_RANGES["tbar_variance"]
    nlo, nhi = HEALTHY_RANGES["valleys"]
    R = traj.R_BT[:, s]
    vl = traj.variance_local_BTL[:, s].mean(-1)
    nv = traj.valley_local_BTLE[:, s].sum(-1).mean(-1)
    ok_R, ok_v, ok_n = (R >= rlo) & (R <= rhi), (vl >= vlo) & (vl <= vhi), (nv >= nlo) & (nv <= nhi)
    per_sys["healthy_R"] = ok_R.mean(1)
    per_sys["healthy_var_local"] = ok_v.mean(1)
    per_sys["healthy_valleys_local"] = ok_n.mean(1)
    per_sys["healthy"] = (ok_R & ok_v & ok_n).mean(1)
    out = {k: float(v.mean()) for k, v in per_sys.items()}
    out.update({f"{k}_sd": float(v.std()) for k, v in per_sys.items() if k in METRICS})
    return out


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None) -> dict:
    """Run the study; write figures, summary.json and config.json; return the summary."""
    from ..schedule import KnobSchedule
    from ..simulate import simulate
    t0 = time.perf_counter()
    cfg = resolve_config(CONFIG, QUICK, quick, overrides)
    cfg["seed"], cfg["quick"] = seed, quick
    out = out_dir_for(NAME, out_dir)
    kappas = [float(k) for k in cfg["kappa"]]
    Ks = [float(k) for k in cfg["coupling"]]
    ticks, B = int(cfg["ticks"]), int(cfg["num_systems"])
    ec = env_config(cfg["env"])
    grid = {}
    with progress_bar(len(kappas) * len(Ks), NAME, progress, unit="cell") as bar:
        for K in Ks:
            cc = controller_config({**cfg["controller"], "coupling": K})
            for kap in kappas:
                sched = KnobSchedule(kind="constant", initial_kappa=kap, final_kappa=kap,
                                     warmup_steps=0, total_steps=ticks)
                traj = simulate(config=cc, env=ec, schedule=sched, num_systems=B, ticks=ticks,
                                seed=seed, record_every=int(cfg["record_every"]))
                grid[(K, kap)] = _late_metrics(traj, float(cfg["late_fraction"]))
                bar.update(1)
                bar.set_postfix_str(f"K={K:g} κ={kap:+g}")

    # ---- numbers ------------------------------------------------------------------------------
    arrays = {k: np.array([[grid[(K, kap)][k] for kap in kappas] for K in Ks])
              for k in list(METRICS) + list(HEALTHY) + ["ridges_local", "R_std_time"]}
    cells = [{"coupling": K, "kappa": kap, **grid[(K, kap)]} for K in Ks for kap in kappas]
    dflt = controller_config({})

    def at(metric, K, kap):
        return grid.get((K, kap), {}).get(metric)

    best = max(cells, key=lambda c: c["healthy"])
    loss_best = min(cells, key=lambda c: c["loss"])
    k_effect = {m: float(np.max(np.abs(arrays[m][:, -1] - arrays[m][:, 0]))) for m in METRICS}
    headline = [
        f"late R spans {arrays['R'].min():.3f}–{arrays['R'].max():.3f}; var T̄_local "
        f"{arrays['var_local'].min():.4f}–{arrays['var_local'].max():.4f}; explored "
        f"{arrays['exploration'].min():.3f}–{arrays['exploration'].max():.3f}; MaxVio "
        f"{arrays['maxvio'].min():.3f}–{arrays['maxvio'].max():.3f}; valleys per layer "
        f"{arrays['valleys_local'].min():.2f}–{arrays['valleys_local'].max():.2f}; loss "
        f"{arrays['loss'].min():.3f}–{arrays['loss'].max():.3f}",
        f"κ from {kappas[0]:+g} to {kappas[-1]:+g} changes (largest over K): R by "
        f"{k_effect['R']:.3f}, var T̄_local by {k_effect['var_local']:.4f}, loss by "
        f"{k_effect['loss']:.4f}; K from {Ks[0]:g} to {Ks[-1]:g} changes R by "
        f"{float(np.max(np.abs(arrays['R'][-1] - arrays['R'][0]))):.3f}",
        "time in healthy ranges (best cell): " + ", ".join(
            f"{label} {float(arrays[k].max()):.2f}" for k, label in HEALTHY.items())
        + (f" at K={best['coupling']:g}, κ={best['kappa']:+g}" if best["healthy"] > 0 else ""),
        f"lowest loss: K={loss_best['coupling']:g}, κ={loss_best['kappa']:+g} "
        f"({loss_best['loss']:.3f})",
    ]
    if dflt.coupling in Ks:
        row = Ks.index(dflt.coupling)
        headline.append(f"at the default K={dflt.coupling:g}: R "
                        + ", ".join(f"κ={k:+g}: {arrays['R'][row, j]:.3f}"
                                    for j, k in enumerate(kappas)))
        headline.append(f"at the default K={dflt.coupling:g}: var T̄_local "
                        + ", ".join(f"κ={k:+g}: {arrays['var_local'][row, j]:.4f}"
                                    for j, k in enumerate(kappas)))
    # monotonicity along κ (at each K): sign of the κ-trend of each metric
    trends = {}
    for m in METRICS:
        slopes = [float(np.polyfit(kappas, arrays[m][i], 1)[0]) for i in range(len(Ks))] \
            if len(kappas) > 1 else []
        trends[m] = {"slope_per_unit_kappa_by_coupling": dict(zip(map(str, Ks), slopes))}
    summary = {"kappa": kappas, "coupling": Ks, "cells": cells,
               "grids": {k: v for k, v in arrays.items()}, "kappa_trends": trends,
               "best_healthy_cell": best, "lowest_loss_cell": loss_best, "headline": headline,
               "kappa_effect_max_abs": k_effect,
               "default_coupling": dflt.coupling,
               "R_at_default_coupling": {str(k): at("R", dflt.coupling, k) for k in kappas}
               if dflt.coupling in Ks else None}

    # ---- figures ------------------------------------------------------------------------------
    figs = [_fig_heatmaps(out, arrays, kappas, Ks, B, ticks, cfg["late_fraction"]),
            _fig_healthy(out, arrays, kappas, Ks)]
    return finish(out, NAME, cfg, summary, figs, t0)


def _heat(ax, fig, a, kappas, Ks, title, fmt="{:.2f}", log=False, cmap="viridis",
          limits=None):
    from matplotlib.colors import LogNorm, Normalize
    norm = None if limits is None else Normalize(*limits)
    if log:
        pos = a[a > 0]
        if pos.size:
            norm = LogNorm(vmin=float(pos.min()), vmax=float(max(pos.max(), pos.min() * 1.001)))
    im = ax.imshow(np.where(a > 0, a, np.nan) if log else a, origin="lower", aspect="auto",
                   cmap=cmap, norm=norm)
    ax.set_xticks(range(len(kappas)), [f"{k:+g}" for k in kappas], fontsize=7)
    ax.set_yticks(range(len(Ks)), [f"{k:g}" for k in Ks], fontsize=7)
    ax.set_xlabel("κ (constant)", fontsize=8)
    ax.set_ylabel("coupling K", fontsize=8)
    ax.set_title(title, fontsize=9)
    if a.size <= 80:
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                v = a[i, j]
                if not np.isfinite(v) or (log and v <= 0):
                    continue
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5   # text readable on the cell
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                        color="w" if dark else "k")
    fig.colorbar(im, ax=ax, shrink=0.85)


def _fig_heatmaps(out, arrays, kappas, Ks, B, ticks, late):
    fig, axes = new_figure(2, 3, width=4.0, height=3.4)
    specs = [("R", "{:.2f}", False), ("var_local", "{:.3f}", True),
             ("valleys_local", "{:.2f}", False), ("exploration", "{:.3f}", False),
             ("maxvio", "{:.2f}", False), ("loss", "{:.3f}", False)]
    for ax, (k, fmt, log) in zip(axes.ravel(), specs):
        _heat(ax, fig, arrays[k], kappas, Ks, METRICS[k], fmt, log,
              cmap="magma" if k == "loss" else "viridis")
    fig.suptitle(f"κ × K phase diagram: means over the last {late:.0%} of {ticks} ticks and "
                 f"{B} systems per cell", fontsize=10)
    return save_figure(fig, out / "sweep_heatmaps.png")


def _fig_healthy(out, arrays, kappas, Ks):
    fig, axes = new_figure(1, len(HEALTHY), width=3.6, height=3.6)
    for ax, (k, label) in zip(axes[0], HEALTHY.items()):
        _heat(ax, fig, arrays[k], kappas, Ks, label, "{:.2f}", False, "Greens", (0.0, 1.0))
    fig.suptitle("fraction of late records inside the seed's healthy ranges", fontsize=10)
    return save_figure(fig, out / "sweep_healthy.png")
