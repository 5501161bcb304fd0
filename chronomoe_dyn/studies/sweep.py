"""Study `sweep`: a κ × coupling phase diagram of the closed loop.

Question. How do the meta-knob κ (held constant) and the Kuramoto coupling K shape the
controller's late-time state in the default environment: coherence R, the T̄ landscape (mean
variance of T̄_local over layers, valleys per layer), the explored share of routed slots, MaxVio
and the environment's loss? Where in
the (κ, K) plane are the seed's healthy ranges (R 0.3–0.8, T̄ variance 0.01–0.1, 1–3 valleys)?

Method. For every (K, κ), ``num_systems`` systems (seeds seed … seed+B−1) run ``ticks`` ticks
under a constant κ schedule with ``coupling = K``; every metric is averaged over the last
``late_fraction`` of the records and then over the systems. The same seeds are used at every
(K, κ) (common random numbers), so differences between them are not seed noise. A cell is one
``simulate`` call of ``systems_per_cell`` of those systems (None = all); system b uses seed + b
whichever cell runs it, so the split does not change a bit of the result.

Claims (``summary.json["claims"]``, tolerances in ``tolerances``), from the grids: exploration
strictly rises with κ at every K and by ≥ 3× from the lowest to the highest κ (issue 9's κ
lever), balance (MaxVio) no worse at the highest κ, κ moves R by more than the tolerance
(version 1: ≤ 0.009), K raises R at every κ, and the landscape forms (var T̄_local > 0.01)
somewhere.

Run:  chronomoe-dyn study sweep [--quick] [--seed N] [--out DIR] [--set KEY=VALUE]
      python studies/sweep.py
Outputs (studies/out/sweep/): sweep.zarr (every cell's trajectory: dims coupling, kappa_const,
system, tick, layer, expert), sweep_heatmaps.png (late R, var T̄_local, valleys per layer,
explored share, MaxVio, loss), sweep_healthy.png (fraction of late records with R, var T̄_local,
local valleys, and all three, inside the healthy ranges), summary.json (every cell's numbers),
config.json.
"""

from __future__ import annotations

import numpy as np

from ..gridstore import GridSpec
from ..plot import new_figure, save_figure
from .common import HEALTHY_RANGES, KAPPA_LEVER_RATIO, claim, claims_line, lever_ratio
from .runner import (check_late_window, make_plan, run_study, sim_sections, simulate_cell,
                     system_blocks, validate_simulate)

NAME = "sweep"

CONFIG = {
    "kappa": [-1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0],
    "coupling": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0],
    "num_systems": 8,               # seeds per (K, κ)
    "systems_per_cell": None,       # systems per cell (one simulate call); None = num_systems
    "ticks": 4000,                  # the default run length: the router settles by ~3000 ticks
                                    # and T̄_local (500 ticks per e-fold) has formed
    "record_every": 20,
    "late_fraction": 0.25,
    "store_dtype": "float64",       # float32 halves the store (the summary then differs in the
                                    # last digits)
    "controller": {},               # other ControllerConfig changes (not coupling: an axis)
    "env": {},                      # EnvConfig changes
    # claim tolerances: R and MaxVio differences (late means over 8 systems: seed-to-seed
    # standard errors ≈ 0.01), the κ lever on exploration (issue 9: ≥ 3× from κ = −1 to +1)
    "tolerances": {"R": 0.05, "maxvio": 0.02, "exploration_ratio": KAPPA_LEVER_RATIO},
}

QUICK = {"kappa": [-0.6, 0.0, 0.6], "coupling": [0.0, 2.0], "num_systems": 2, "ticks": 400}
SECTIONS = sim_sections()
ANALYSIS_KEYS = ("late_fraction", "tolerances")
KERNELS = ("simulate_batch", "simulate_serial")
AXES = ("coupling", "kappa_const")
"""The grid's axes in the store (``kappa_const``: the trajectories have a ``kappa`` variable)."""

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


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None, execution=None) -> dict:
    """Run the study (``runner.run_study``); return the summary."""
    import sys
    return run_study(sys.modules[__name__], out_dir, quick, seed, progress, overrides, execution)


def plan(cfg: dict):
    """One grid (coupling × kappa_const, systems in blocks); every cell's arguments checked."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    from ..schedule import KnobSchedule
    if "coupling" in cfg["controller"]:
        raise ValueError("config key 'controller.coupling': the sweep sets the coupling from its "
                         "axis; use --set coupling=[...]")
    check_late_window(cfg)
    ticks, B = cfg["ticks"], cfg["num_systems"]
    env = EnvConfig(**cfg["env"])
    configs = {K: ControllerConfig(**{**cfg["controller"], "coupling": K})
               for K in cfg["coupling"]}
    scheds = {k: KnobSchedule(kind="constant", initial_kappa=k, final_kappa=k, warmup_steps=0,
                              total_steps=ticks) for k in cfg["kappa"]}
    grid = GridSpec("", {"coupling": cfg["coupling"], "kappa_const": cfg["kappa"]},
                    {"system": system_blocks(B, cfg["systems_per_cell"])})

    def arg(g, cell):
        r = g.region(cell)["system"]
        kw = dict(config=configs[g.value(cell, "coupling")], env=env,
                  schedule=scheds[g.value(cell, "kappa_const")], num_systems=r.stop - r.start,
                  ticks=ticks, seed=cfg["seed"] + r.start, record_every=cfg["record_every"])
        validate_simulate(kw)
        return {"simulate": kw, "dtype": cfg["store_dtype"]}

    return make_plan([grid], arg)


run_cell = simulate_cell


_FIELDS = ("R_BT", "variance_local_BTL", "valley_local_BTLE", "ridge_local_BTLE",
           "exploration_BT", "maxvio_BTL", "loss_BT")
"""The trajectory fields the analysis reads."""


def _late_per_system(traj, late: slice) -> dict:
    """[b] late-window metrics of each system of ``traj`` (arrays of one block of systems)."""
    s = late
    per_sys = {
        "R": traj.R_BT[:, s].mean(1),
        "R_std_time": traj.R_BT[:, s].std(1),
        "var_local": traj.variance_local_BTL[:, s].mean((1, 2)),
        "valleys_local": traj.valley_local_BTLE[:, s].sum(-1).mean((1, 2)),
        "exploration": traj.exploration_BT[:, s].mean(1),
        "maxvio": traj.maxvio_BTL[:, s].mean((1, 2)),
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
    return per_sys


def _late_metrics(ds, late_fraction: float, block: int) -> dict:
    """Late-window means (and spreads over systems) of one (K, κ) of the store, read one block
    of systems at a time (the parent's memory stays at one block)."""
    from types import SimpleNamespace

    from ..store import trajectory_arrays
    T = ds.sizes["tick"]
    late = slice(max(0, T - max(1, int(round(late_fraction * T)))), T)
    parts: dict[str, list] = {}
    for b0 in range(0, ds.sizes["system"], block):
        sel = ds.isel(system=slice(b0, b0 + block), tick=late)
        traj = SimpleNamespace(**trajectory_arrays(sel, _FIELDS))
        for k, v in _late_per_system(traj, slice(None)).items():
            parts.setdefault(k, []).append(v)
    per_sys = {k: np.concatenate(v) for k, v in parts.items()}
    out = {k: float(v.mean()) for k, v in per_sys.items()}
    out.update({f"{k}_sd": float(v.std()) for k, v in per_sys.items() if k in METRICS})
    return out


def _claims(a: dict, kappas: list, Ks: list, tol: dict) -> dict:
    """Claims about κ and K, from the grids (rows: K ascending as given; columns: κ)."""
    ik = np.argsort(kappas)
    k_lo, k_hi = kappas[ik[0]], kappas[ik[-1]]
    ex, vio, R = a["exploration"][:, ik], a["maxvio"][:, ik], a["R"][:, ik]
    ratio = lever_ratio(ex[:, -1], ex[:, 0])

    def per_K(v, f):
        return ", ".join(f"K={K:g}: {f.format(x)}" for K, x in zip(Ks, v))

    out = {
        "exploration_rises_with_kappa": claim(
            len(kappas) > 1 and bool(np.all(np.diff(ex, axis=1) > 0)),
            "explored share strictly increasing in κ at every K; at κ = "
            f"{k_lo:+g} → {k_hi:+g}: " + ", ".join(
                f"K={K:g}: {x0:.3f} → {x1:.3f}" for K, x0, x1 in zip(Ks, ex[:, 0], ex[:, -1]))),
        "kappa_lever_3x": claim(
            bool(np.all(ratio >= tol["exploration_ratio"])),
            f"exploration at κ={k_hi:+g} / at κ={k_lo:+g} (need ≥ "
            f"{tol['exploration_ratio']:g}×): " + per_K(ratio, "{:.1f}×")),
        "balance_no_worse_as_kappa_rises": claim(
            bool(np.all(vio[:, -1] <= vio[:, 0] + tol["maxvio"])),
            f"late MaxVio at κ={k_hi:+g} − at κ={k_lo:+g} (tolerance {tol['maxvio']:g}): "
            + per_K(vio[:, -1] - vio[:, 0], "{:+.3f}")),
        "kappa_moves_R": claim(
            float(np.max(np.abs(R[:, -1] - R[:, 0]))) > tol["R"],
            f"late R at κ={k_hi:+g} − at κ={k_lo:+g} (tolerance {tol['R']:g}; version 1: "
            f"≤ 0.009): " + per_K(R[:, -1] - R[:, 0], "{:+.3f}")),
        "landscape_forms_somewhere": claim(
            bool(np.any(a["var_local"] > HEALTHY_RANGES["tbar_variance"][0])),
            f"largest late var T̄_local {float(np.max(a['var_local'])):.4f} (formed: > "
            f"{HEALTHY_RANGES['tbar_variance'][0]:g})"),
    }
    if len(Ks) > 1:
        iK = np.argsort(Ks)
        dR = a["R"][iK[-1]] - a["R"][iK[0]]
        out["coupling_raises_R"] = claim(
            bool(np.all(dR > tol["R"])),
            f"late R at K={Ks[iK[-1]]:g} − at K={Ks[iK[0]]:g} at every κ (need > {tol['R']:g}): "
            + ", ".join(f"κ={k:+g}: {d:+.3f}" for k, d in zip(kappas, dR)))
    return out


def analyse(cfg: dict, store, out) -> tuple[dict, list]:
    """The phase diagram's numbers and figures, from the store."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    ds = store.dataset("")
    kappas, Ks = list(cfg["kappa"]), list(cfg["coupling"])
    ticks, B = cfg["ticks"], cfg["num_systems"]
    block = store.grids[""].blocks["system"][1]
    grid = {(K, kap): _late_metrics(ds.isel(coupling=i, kappa_const=j), cfg["late_fraction"],
                                    block)
            for i, K in enumerate(Ks) for j, kap in enumerate(kappas)}

    # ---- numbers ------------------------------------------------------------------------------
    arrays = {k: np.array([[grid[(K, kap)][k] for kap in kappas] for K in Ks])
              for k in list(METRICS) + list(HEALTHY) + ["ridges_local", "R_std_time"]}
    cells = [{"coupling": K, "kappa": kap, **grid[(K, kap)]} for K in Ks for kap in kappas]
    dflt = ControllerConfig()

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
    claims = _claims(arrays, kappas, Ks, cfg["tolerances"])
    headline.append(claims_line(claims))
    summary = {"kappa": kappas, "coupling": Ks, "cells": cells, "claims": claims,
               "grids": {k: v for k, v in arrays.items()}, "kappa_trends": trends,
               "best_healthy_cell": best, "lowest_loss_cell": loss_best, "headline": headline,
               "kappa_effect_max_abs": k_effect,
               "default_coupling": dflt.coupling,
               "R_at_default_coupling": {str(k): at("R", dflt.coupling, k) for k in kappas}
               if dflt.coupling in Ks else None}

    # ---- figures ------------------------------------------------------------------------------
    env = EnvConfig(**cfg["env"])
    figs = [_fig_heatmaps(out, arrays, kappas, Ks, B, ticks, cfg["late_fraction"], env),
            _fig_healthy(out, arrays, kappas, Ks)]
    return summary, figs


def _heat(ax, fig, a, kappas, Ks, title, fmt="{:.2f}", log=False, cmap="viridis",
          limits=(0.0, 1.0), band=None):
    """One heat map on a fixed colour range ``limits`` (log: LogNorm), so that small
    differences look small; the colour bar names the data's own span and marks ``band`` (a
    healthy range)."""
    from matplotlib.colors import LogNorm, Normalize
    norm = LogNorm(*limits) if log else Normalize(*limits)
    shown = np.where(a > 0, a, np.nan) if log else a
    im = ax.imshow(shown, origin="lower", aspect="auto", cmap=cmap, norm=norm)
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
    fin = a[np.isfinite(a)]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (np.nan, np.nan)
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max",
              (True, True): "both"}[(bool(lo < limits[0]), bool(hi > limits[1]))]
    cb = fig.colorbar(im, ax=ax, shrink=0.85, extend=extend)
    cb.set_label(f"data {fmt.format(lo)}–{fmt.format(hi)}", fontsize=7)
    if band is not None:
        for y in band:
            if limits[0] <= y <= limits[1]:
                cb.ax.axhline(y, color="tab:green", lw=1.2)
    return im


def _fig_heatmaps(out, arrays, kappas, Ks, B, ticks, late, env):
    """Fixed colour ranges: R, explored share [0, 1]; T̄ variance 1e-4–1 (log); valley counts
    0–E; MaxVio 0–2; loss over
    the environment's range [loss_floor, loss_floor + loss_range]. Green ticks on the colour
    bars: the healthy ranges."""
    E = env.num_experts
    fig, axes = new_figure(2, 3, width=4.0, height=3.4)
    var_band = HEALTHY_RANGES["tbar_variance"]
    specs = [("R", "{:.2f}", False, (0.0, 1.0), HEALTHY_RANGES["R"]),
             ("var_local", "{:.3f}", True, (1e-4, 1.0), var_band),
             ("exploration", "{:.3f}", False, (0.0, 1.0), None),
             ("valleys_local", "{:.2f}", False, (0.0, float(E)), HEALTHY_RANGES["valleys"]),
             ("maxvio", "{:.2f}", False, (0.0, 2.0), None),
             ("loss", "{:.3f}", False, (env.loss_floor, env.loss_floor + env.loss_range), None)]
    for ax, (k, fmt, log, limits, band) in zip(axes.ravel(), specs):
        _heat(ax, fig, arrays[k], kappas, Ks, METRICS[k], fmt, log,
              "magma" if k == "loss" else "viridis", limits, band)
    fig.suptitle(f"κ × K phase diagram: means over the last {late:.0%} of {ticks} ticks and "
                 f"{B} systems per cell (fixed colour ranges; green: healthy range)",
                 fontsize=10)
    return save_figure(fig, out / "sweep_heatmaps.png")


def _fig_healthy(out, arrays, kappas, Ks):
    fig, axes = new_figure(1, len(HEALTHY), width=3.6, height=3.6)
    for ax, (k, label) in zip(axes[0], HEALTHY.items()):
        _heat(ax, fig, arrays[k], kappas, Ks, label, "{:.2f}", False, "Greens")
    fig.suptitle("fraction of late records inside the seed's healthy ranges", fontsize=10)
    return save_figure(fig, out / "sweep_healthy.png")
