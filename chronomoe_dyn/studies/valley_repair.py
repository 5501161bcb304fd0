"""Study `valley-repair`: when a valley expert collapses, how long until its valley fills?

Question. The seed claims bad valleys fill in by themselves ("the reliability → T_fast → T̄
feedback may be slow ... self-correction should eventually fill in bad valleys"). We collapse an
expert's quality (``Event("collapse")``, quality → ``collapse_quality`` on every domain, in every
layer) at tick ``collapse_tick`` under a constant κ, and measure, for every (system, layer) in
which that expert was a valley of the layer's T̄_local just before the collapse, the ticks until
it stops being a valley (T̄_local ≥ mean − 0.5·std of its layer): the repair time. We repeat
this over a grid of β_reliability (gain of unreliability in T_fast) × η_local
(``eta_structural_T_local``), ``num_systems`` seeds per cell, and report the median and
quartiles, and how many valleys did not fill before the run ended (censored). (Law version 2
has no global landscape: T̄_global is a scalar, the landscape is per layer.)

Geometric-EMA estimate. T̄_local moves once per micro tick (every ``micro_period`` = 5 ticks)
by T̄ ← (1 − η)T̄ + η·T_fast. If T_fast of the collapsed expert jumps to a plateau T_hot and the
valley threshold θ = mean − 0.5·std stays put, the gap closes geometrically and the valley fills
after
    n = micro_period · ln((T_hot − T̄₀) / (T_hot − θ)) / (−ln(1 − η))  ticks,
with T̄₀ the expert's T̄ at the collapse. We evaluate it per sample with the measured T_hot
(mean T_fast of the expert from the collapse to the fill) and θ at the fill, and compare it
with the measured time (``estimate_vs_measured.png``). It predicts repair ∝ 1/η and shrinking
with β_reliability only through the size of the T_fast jump.

Claims (``summary.json["claims"]``, tolerances in ``tolerances``): the seed's self-correction
(``bad_valleys_fill``: ≥ 95 % of the valleys fill within the run), the estimate
(``ema_estimate_agrees``: median estimate/measured within ±0.25), repair faster with either
knob (``faster_with_eta``, ``faster_with_beta``) and the pure EMA scaling
(``repair_scales_as_inverse_eta``: log-log slope vs η_local within −1 ± 0.3).

Run:  chronomoe-dyn study valley-repair [--quick] [--seed N] [--out DIR] [--set KEY=VALUE]
      python studies/valley_repair.py
Outputs (studies/out/valley-repair/): valley-repair.zarr (every cell's trajectory),
repair_vs_beta.png, repair_vs_eta.png, estimate_vs_measured.png, repair_example.png,
summary.json, config.json.

Length: a straight script (question, config, plan, analysis and figures in one file, as
STYLE.md §11 asks of studies), hence over 400 lines.
"""

from __future__ import annotations

import math

import numpy as np

from ..gridstore import GridSpec
from ..landscape import landscape_masks
from ..plot import new_figure, save_figure
from .common import claim, claims_line
from .runner import (make_plan, run_study, sim_sections, simulate_cell, system_blocks,
                     validate_simulate)

NAME = "valley-repair"

CONFIG = {
    "beta_reliability": [0.1, 0.2, 0.4, 0.8],        # default 0.8 (seed 0.2)
    "eta_structural_T_local": [0.005, 0.01, 0.02, 0.04],  # seed default 0.01
    "num_systems": 8,               # seeds per (β, η)
    "systems_per_cell": None,       # systems per cell (one simulate call); None = num_systems
    "collapse_expert": 0,
    "collapse_quality": 0.0,
    "collapse_tick": 2001,          # the landscape has formed by then (T̄_local: 500 ticks/e-fold)
    "ticks": 6000,
    "record_every": 5,              # = micro_period: T̄ moves only on micro ticks (exact timing);
                                    # collapse_tick − 1 must be a multiple (the pre-collapse record)
    "kappa": -0.3,                  # constant κ (the seed's exploitation value)
    "controller": {},               # other ControllerConfig changes (not the two axes)
    "env": {},
    "default_cell": [0.8, 0.01],    # (β_reliability, η_local) of the example figure:
                                    # the ControllerConfig defaults
    # claim tolerances: filled = the share of valleys that fill within the run; estimate = the
    # allowed |median(estimate/measured) − 1|; eta_slope = the allowed distance of the log-log
    # slope of repair time vs η_local from −1 (the pure EMA picture)
    "tolerances": {"filled": 0.95, "estimate": 0.25, "eta_slope": 0.3},
}

QUICK = {"beta_reliability": [0.2, 0.8], "eta_structural_T_local": [0.01, 0.04],
         "num_systems": 2, "collapse_tick": 401, "ticks": 1200, "default_cell": [0.8, 0.01]}
SECTIONS = sim_sections()
ANALYSIS_KEYS = ("default_cell", "tolerances")
KERNELS = ("simulate_batch", "simulate_serial")
AXES = {"beta_reliability": "beta_reliability", "eta_structural_T_local": "eta_local"}
"""ControllerConfig field -> the store's axis name."""


def ema_estimate(T_hot: float, tbar0: float, threshold: float, eta: float,
                 micro_period: int) -> float:
    """Ticks for an EMA at tbar0 driven by a constant T_hot (every micro tick, rate η) to reach
    ``threshold``; inf when T_hot does not exceed the threshold, 0 when already there."""
    if tbar0 >= threshold:
        return 0.0
    if T_hot <= threshold or eta <= 0.0:
        return math.inf
    return micro_period * math.log((T_hot - tbar0) / (T_hot - threshold)) / -math.log1p(-eta)


def _cell(traj, e: int, t_col: int, eta: float, beta_s: float, micro: int, c: float) -> dict:
    """Repair times of every (system, layer) where expert e was a local valley before t_col."""
    tick_T = traj.tick_T
    pre = int(np.searchsorted(tick_T, t_col - 1))
    if pre >= len(tick_T) or tick_T[pre] != t_col - 1:
        raise ValueError(f"collapse_tick − 1 = {t_col - 1} is not a recorded tick; make it a "
                         f"multiple of record_every")
    tl = traj.Tbar_local_BTLE                        # [B, T, L, E]
    valley = traj.valley_local_BTLE[:, :, :, e]      # [B, T, L]
    B, T, L = valley.shape
    samples = []
    for b in range(B):
        for l in range(L):
            if not valley[b, pre, l]:
                continue
            after = np.flatnonzero(~valley[b, pre + 1:, l])
            filled = after.size > 0
            i_fill = pre + 1 + int(after[0]) if filled else T - 1
            row = tl[b, :, l]                         # [T, E]
            lm = landscape_masks(row, c)
            thr_T = lm.mean - c * lm.std             # the valley threshold per record
            T_hot = float(traj.T_fast_BTLE[b, pre + 1:i_fill + 1, l, e].mean())
            est = ema_estimate(T_hot, float(row[pre, e]), float(thr_T[i_fill]), eta, micro)
            s0 = float(traj.reliability_BTLE[b, pre, l, e])
            s1 = float(traj.reliability_BTLE[b, pre + 1:i_fill + 1, l, e].mean())
            std0 = float(row[pre].std())
            samples.append({
                "system": b, "layer": l, "filled": bool(filled),
                "ticks": float(tick_T[i_fill] - (t_col - 1)) if filled else math.inf,
                "estimate": est, "T_hot": T_hot, "tbar0": float(row[pre, e]),
                "threshold_fill": float(thr_T[i_fill]),
                "T_fast_before": float(traj.T_fast_BTLE[b, pre, l, e]),
                # valley depth at the collapse, in layer standard deviations below the mean
                "depth_std": float((row[pre].mean() - row[pre, e]) / std0) if std0 > 0 else 0.0,
                # part of the T_fast jump that the reliability term explains: the factor
                # (1 + β_s(1 − s)) after over before (the rest: drift d̂ and R)
                "jump_from_reliability": (1 + beta_s * (1 - s1)) / (1 + beta_s * (1 - s0)),
                "reliability_before": s0,
                "reliability_after": float(traj.reliability_BTLE[b, i_fill, l, e]),
                "usage_before": float(traj.usage_BTLE[b, pre, l, e]),
                "usage_after": float(traj.usage_BTLE[b, i_fill, l, e]),
            })
    return {"samples": samples,
            "valleys_before": int(valley[:, pre].sum()), "pairs": B * L}


def _f(v, fmt: str = "{:.3g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _stats(x: list[float]) -> dict:
    a = np.asarray(x, dtype=np.float64)
    fin = a[np.isfinite(a)]
    n = int(a.size)
    out = {"n": n, "filled": int(fin.size), "censored": n - int(fin.size)}
    if n:
        # censored samples count as +inf: the quantiles stay honest (inf when > half censored)
        q = np.quantile(np.sort(a), [0.25, 0.5, 0.75], method="lower") if fin.size \
            else [math.inf] * 3
        out.update(q25=float(q[0]), median=float(q[1]), q75=float(q[2]))
    else:
        out.update(q25=None, median=None, q75=None)
    return out


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None, execution=None) -> dict:
    """Run the study (``runner.run_study``); return the summary."""
    import sys
    return run_study(sys.modules[__name__], out_dir, quick, seed, progress, overrides, execution)


def _setup(cfg: dict):
    """(event, constant schedule, env) of the study."""
    from ..env import EnvConfig, Event
    from ..schedule import KnobSchedule
    ticks, t_col, every = cfg["ticks"], cfg["collapse_tick"], cfg["record_every"]
    if not 1 < t_col <= ticks - every or (t_col - 1) % every:
        raise ValueError(f"collapse_tick={t_col}: need collapse_tick − 1 to be a multiple of "
                         f"record_every={every} and collapse_tick <= ticks − record_every")
    event = Event("collapse", t_col, expert=cfg["collapse_expert"], layer=None,
                  quality=cfg["collapse_quality"])
    sched = KnobSchedule(kind="constant", initial_kappa=cfg["kappa"], final_kappa=cfg["kappa"],
                         warmup_steps=0, total_steps=ticks)
    return event, sched, EnvConfig(**cfg["env"])


def _controller(cfg: dict, beta: float, eta: float):
    from ..config import ControllerConfig
    return ControllerConfig(**{**cfg["controller"], "beta_reliability": beta,
                               "eta_structural_T_local": eta})


def plan(cfg: dict):
    """One grid beta_reliability × eta_local, systems in blocks."""
    for field, axis in AXES.items():
        if field in cfg["controller"]:
            raise ValueError(f"config key 'controller.{field}': the study sets it from its axis; "
                             f"use --set {field}=[...]")
    event, sched, ec = _setup(cfg)
    grid = GridSpec("", {"beta_reliability": cfg["beta_reliability"],
                         "eta_local": cfg["eta_structural_T_local"]},
                    {"system": system_blocks(cfg["num_systems"], cfg["systems_per_cell"])})

    def arg(g, cell):
        r = g.region(cell)["system"]
        cc = _controller(cfg, g.value(cell, "beta_reliability"), g.value(cell, "eta_local"))
        kw = dict(config=cc, env=ec, schedule=sched, num_systems=r.stop - r.start,
                  ticks=cfg["ticks"], seed=cfg["seed"] + r.start,
                  record_every=cfg["record_every"], events=(event,))
        validate_simulate(kw)
        return {"simulate": kw}

    return make_plan([grid], arg)


run_cell = simulate_cell


def _claims(summary: dict, tol: dict) -> dict:
    """The seed's self-correction claim and the EMA picture's predictions, with tolerances."""
    n, cens = summary["samples_total"], summary["censored_total"]
    out = {"bad_valleys_fill": claim(
        None if n == 0 else (n - cens) / n >= tol["filled"],
        f"{n - cens}/{n} valleys of the collapsed expert filled within "
        f"{summary['post_collapse_ticks']} ticks (need ≥ {tol['filled']:.0%})")}
    r = summary["estimate_over_measured"]["median"]
    out["ema_estimate_agrees"] = claim(
        None if r is None else abs(r - 1.0) <= tol["estimate"],
        f"median geometric-EMA estimate / measured {r if r is None else round(r, 3)} "
        f"(tolerance ±{tol['estimate']:g}; over {summary['estimate_over_measured']['n']} valleys)")
    se, sb = summary["loglog_slope_vs_eta"], summary["loglog_slope_vs_beta"]
    if se:
        out["faster_with_eta"] = claim(all(v < 0 for v in se.values()),
                                       "log-log slopes vs η_local: " + ", ".join(
                                           f"β={k}: {v:.2f}" for k, v in se.items()))
        out["repair_scales_as_inverse_eta"] = claim(
            all(abs(v + 1.0) <= tol["eta_slope"] for v in se.values()),
            f"the pure EMA picture: slope −1 ± {tol['eta_slope']:g}; measured "
            + ", ".join(f"β={k}: {v:.2f}" for k, v in se.items()))
    if sb:
        out["faster_with_beta"] = claim(all(v < 0 for v in sb.values()),
                                        "log-log slopes vs β_reliability: " + ", ".join(
                                            f"η={k}: {v:.2f}" for k, v in sb.items()))
    return out


def analyse(cfg: dict, store, out) -> tuple[dict, list]:
    """Repair times per (β, η), the EMA estimate and the figures, from the store."""
    from types import SimpleNamespace

    from ..store import trajectory_arrays
    _, _, ec = _setup(cfg)
    ticks, t_col = cfg["ticks"], cfg["collapse_tick"]
    e = cfg["collapse_expert"]
    betas, etas = list(cfg["beta_reliability"]), list(cfg["eta_structural_T_local"])
    ds = store.dataset("")
    cells: dict = {}
    example = None
    for i, beta in enumerate(betas):
        for j, eta in enumerate(etas):
            cc = _controller(cfg, beta, eta)
            traj = SimpleNamespace(**trajectory_arrays(ds.isel(beta_reliability=i, eta_local=j)),
                                   config=cc, env=ec)
            res = _cell(traj, e, t_col, eta, beta, cc.micro_period, cc.landscape_threshold_std)
            cells[(beta, eta)] = res
            if [beta, eta] == [float(x) for x in cfg["default_cell"]] and res["samples"]:
                example = (traj, res["samples"][0], beta, eta)

    # ---- numbers ------------------------------------------------------------------------------
    table = []
    for (beta, eta), res in cells.items():
        meas = [s["ticks"] for s in res["samples"]]
        est = [s["estimate"] for s in res["samples"]]
        st = _stats(meas)
        both = [(m, x) for m, x in zip(meas, est) if math.isfinite(m) and math.isfinite(x)
                and m > 0 and x > 0]
        smp = res["samples"]

        def med(key, rows=smp):
            return float(np.median([r[key] for r in rows])) if rows else None

        deep = [r for r in smp if r["depth_std"] >= 1.0]
        table.append({
            "beta_reliability": beta, "eta_local": eta, **st,
            "depth_std_median": med("depth_std"),
            "deep_valleys": _stats([r["ticks"] for r in deep]),
            "jump_from_reliability_median": med("jump_from_reliability"),
            # over the samples the EMA picture applies to (not 0/inf: threshold moved)
            "estimate_median": float(np.median([x for x in est if 0 < x < math.inf]))
            if any(0 < x < math.inf for x in est) else None,
            "estimate_over_measured_median": float(np.median([x / m for m, x in both]))
            if both else None,
            "valleys_before": res["valleys_before"], "pairs": res["pairs"],
            "T_fast_jump_median": float(np.median([s["T_hot"] / s["T_fast_before"]
                                                   for s in res["samples"]]))
            if res["samples"] else None,
            "reliability_before_median": float(np.median([s["reliability_before"]
                                                          for s in res["samples"]]))
            if res["samples"] else None,
            "reliability_after_median": float(np.median([s["reliability_after"]
                                                         for s in res["samples"]]))
            if res["samples"] else None,
            "usage_share_after_median": float(np.median([s["usage_after"]
                                                         for s in res["samples"]]))
            if res["samples"] else None,
        })
    # estimate 0: the threshold at the fill had dropped below the expert's T̄ at the collapse,
    # i.e. the rest of the layer moved, not the collapsed expert (no EMA estimate applies)
    all_pairs = [(s["ticks"], s["estimate"]) for r in cells.values() for s in r["samples"]
                 if math.isfinite(s["ticks"]) and math.isfinite(s["estimate"]) and s["ticks"] > 0
                 and s["estimate"] > 0]
    # estimate inf: T_fast's plateau stayed below the threshold at the fill, so again the fill
    # came from the threshold moving down to the expert
    n_moved = sum(1 for r in cells.values() for s in r["samples"]
                  if math.isfinite(s["ticks"]) and (s["estimate"] == 0.0
                                                    or math.isinf(s["estimate"])))
    ratio = np.array([x / m for m, x in all_pairs]) if all_pairs else np.array([])
    # fitted exponents: median repair ∝ η^a (at each β), ∝ β^b (at each η)
    slopes_eta, slopes_beta = {}, {}
    for beta in betas:
        pts = [(eta, r["median"]) for r in table for eta in [r["eta_local"]]
               if r["beta_reliability"] == beta and r["median"] and math.isfinite(r["median"])]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slopes_eta[str(beta)] = float(np.polyfit(x, y, 1)[0])
    for eta in etas:
        pts = [(r["beta_reliability"], r["median"]) for r in table
               if r["eta_local"] == eta and r["median"] and math.isfinite(r["median"])]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slopes_beta[str(eta)] = float(np.polyfit(x, y, 1)[0])
    n_all = sum(r["n"] for r in table)
    n_cens = sum(r["censored"] for r in table)
    summary = {
        "cells": table,
        "samples_total": n_all, "censored_total": n_cens,
        "post_collapse_ticks": ticks - t_col + 1,
        "estimate_over_measured": {
            "median": float(np.median(ratio)) if ratio.size else None,
            "q10": float(np.quantile(ratio, 0.1)) if ratio.size else None,
            "q90": float(np.quantile(ratio, 0.9)) if ratio.size else None, "n": int(ratio.size)},
        "filled_by_threshold_moving": n_moved,
        "loglog_slope_vs_eta": slopes_eta, "loglog_slope_vs_beta": slopes_beta,
    }
    headline = []
    d = next((r for r in table if [r["beta_reliability"], r["eta_local"]]
              == [float(x) for x in cfg["default_cell"]]), None)
    if d is not None:
        dv, ush = d["deep_valleys"], d["usage_share_after_median"]
        headline.append(
            f"default (β_rel={d['beta_reliability']:g}, η_local={d['eta_local']:g}): median "
            f"repair {_f(d['median'])} ticks (IQR {_f(d['q25'])}–{_f(d['q75'])}), "
            f"{d['filled']}/{d['n']} valleys filled; valleys ≥ 1 std deep: median "
            f"{_f(dv['median'])} ticks (n={dv['n']})")
        headline.append(
            f"default: T_fast of the collapsed expert jumps ×{_f(d['T_fast_jump_median'])}, of "
            f"which the reliability term gives ×{_f(d['jump_from_reliability_median'])} "
            f"(s {_f(d['reliability_before_median'])} → {_f(d['reliability_after_median'])}); "
            f"the rest is mostly the drift term (the router starves the expert: usage share × E "
            f"{_f(None if ush is None else ush * ec.num_experts)} at the fill)")
    eom = summary["estimate_over_measured"]
    headline.append(f"all cells: {n_all - n_cens}/{n_all} valleys filled within "
                    f"{ticks - t_col + 1} ticks; geometric-EMA estimate / measured: median "
                    f"{_f(eom['median'])} (10–90 %: {_f(eom['q10'])}–{_f(eom['q90'])}, "
                    f"n={eom['n']}; "
                    f"{n_moved} filled because the layer's threshold moved instead)")
    if slopes_eta:
        headline.append("log-log slope of repair time vs η_local (−1 = ∝ 1/η): " + ", ".join(
            f"β={k}: {v:.2f}" for k, v in slopes_eta.items()))
    if slopes_beta:
        headline.append("log-log slope vs β_reliability: " + ", ".join(
            f"η={k}: {v:.2f}" for k, v in slopes_beta.items()))
    summary["claims"] = _claims(summary, cfg["tolerances"])
    headline.append(claims_line(summary["claims"]))
    summary["headline"] = headline

    # ---- figures ------------------------------------------------------------------------------
    figs = [_fig_vs(out, table, betas, etas, "beta_reliability", "eta_local",
                    "β_reliability", "η_local", "repair_vs_beta.png"),
            _fig_vs(out, table, etas, betas, "eta_local", "beta_reliability",
                    "η_local", "β_reliability", "repair_vs_eta.png"),
            _fig_scatter(out, cells)]
    if example is not None:
        figs.append(_fig_example(out, example, e, t_col))
    return summary, figs


def _fig_vs(out, table, xs, groups, xkey, gkey, xlabel, glabel, fname):
    fig, axes = new_figure(1, 1, width=6.5, height=4.0)
    ax = axes[0, 0]
    for gv in groups:
        rows = sorted((r for r in table if r[gkey] == gv), key=lambda r: r[xkey])
        x = np.array([r[xkey] for r in rows])
        med = np.array([np.nan if r["median"] is None else r["median"] for r in rows], float)
        lo = np.array([np.nan if r["q25"] is None else r["q25"] for r in rows], float)
        hi = np.array([np.nan if r["q75"] is None else r["q75"] for r in rows], float)
        est = np.array([np.nan if r["estimate_median"] is None else r["estimate_median"]
                        for r in rows], float)
        fin = np.isfinite(med)
        line, = ax.plot(x[fin], med[fin], "o-", label=f"{glabel} = {gv:g}")
        hi_plot = np.where(np.isfinite(hi), hi, np.nan)
        ax.vlines(x[fin], lo[fin], hi_plot[fin], color=line.get_color(), lw=1)
        ax.plot(x, np.where(np.isfinite(est), est, np.nan), "--", color=line.get_color(),
                lw=0.9, alpha=0.8)
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ticks until the valley fills")
    ax.set_title(f"valley repair time vs {xlabel} (median, IQR; dashed: geometric-EMA estimate)",
                 fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out / fname)


def _fig_scatter(out, cells):
    fig, axes = new_figure(1, 2, width=4.8, height=4.3)
    ax, ax2 = axes[0, 0], axes[0, 1]
    lim = [math.inf, 0.0]
    for (beta, eta), res in cells.items():
        pts = [(s["ticks"], s["estimate"], s["depth_std"]) for s in res["samples"]
               if math.isfinite(s["ticks"]) and math.isfinite(s["estimate"]) and s["ticks"] > 0
               and s["estimate"] > 0]
        if not pts:
            continue
        m, x, dep = np.array(pts).T
        sc = ax.scatter(m, x, s=10, alpha=0.7, label=f"β={beta:g}, η={eta:g}")
        ax2.scatter(dep, m, s=10, alpha=0.7, color=sc.get_facecolor()[0])
        lim = [min(lim[0], m.min(), x.min()), max(lim[1], m.max(), x.max())]
    if lim[1] > 0:
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax2.set_yscale("log")
    ax.set_xlabel("measured repair ticks")
    ax.set_ylabel("geometric-EMA estimate (ticks)")
    ax.set_title("estimate vs measurement, every valley", fontsize=9)
    ax.legend(fontsize=5, ncol=2)
    ax2.set_xlabel("valley depth at the collapse (layer std below the mean)")
    ax2.set_ylabel("measured repair ticks")
    ax2.axvline(0.5, color="0.5", lw=0.8, ls=":")
    ax2.set_title("deeper valleys take longer (dotted: the valley threshold)", fontsize=9)
    return save_figure(fig, out / "estimate_vs_measured.png")


def _fig_example(out, example, e, t_col):
    traj, s, beta, eta = example
    b, l = s["system"], s["layer"]
    t = traj.tick_T
    tl = traj.Tbar_local_BTLE[b, :, l]                      # [T, E]
    c = traj.config.landscape_threshold_std
    fig, axes = new_figure(3, 1, sharex=True, width=7.5, height=2.1)
    ax = axes[0, 0]
    ax.plot(t, tl[:, e], label=f"T̄_local of expert {e}")
    lm = landscape_masks(tl, c)
    ax.plot(t, lm.mean - c * lm.std, "k--", lw=0.9, label="valley threshold mean − 0.5·std")
    ax.plot(t, tl.mean(-1), color="0.6", lw=0.8, label="layer mean")
    ax.set_title(f"system {b}, layer {l}: β_rel = {beta:g}, η_local = {eta:g}", fontsize=9,
                 loc="left")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    ax.plot(t, traj.T_fast_BTLE[b, :, l, e], label=f"T_fast of expert {e}")
    ax.plot(t, traj.T_fast_BTLE[b, :, l].mean(-1), color="0.6", lw=0.8, label="layer mean")
    ax.legend(fontsize=7)
    ax = axes[2, 0]
    ax.plot(t, traj.reliability_BTLE[b, :, l, e], label="reliability s")
    ax.plot(t, traj.usage_BTLE[b, :, l, e] * traj.env.num_experts, label="usage share × E")
    ax.axhline(traj.config.unhealthy_reliability, color="tab:red", lw=0.7, ls=":")
    ax.legend(fontsize=7)
    ax.set_xlabel("tick")
    for a in axes[:, 0]:
        a.axvline(t_col, color="tab:red", lw=0.9)
        if math.isfinite(s["ticks"]):
            a.axvline(t_col - 1 + s["ticks"], color="tab:green", lw=0.9)
    fig.suptitle("collapse (red) and valley filled (green)", fontsize=9)
    return save_figure(fig, out / "repair_example.png")
