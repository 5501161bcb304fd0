"""Study `phases`: do the seed's three training phases and healthy ranges appear, and when?

Question. The seed (training-infrastructure.md, "The Training Dynamics") claims that under the
cosine κ schedule (0.5 → −0.3) training goes through
  1. exploration (until the end of the κ warm-up): high κ, flat T̄ landscape, low R;
  2. landscape formation (warm-up → 70 % of the run): valleys and ridges appear, R rises;
  3. exploitation (70 % → end): low κ, formed landscape, high R, healthy valleys;
and that the healthy ranges are R 0.3–0.8, T̄ variance 0.01–0.1, gate 0.5–1.0, 1–3 valleys and
1–3 ridges. We simulate ``num_systems`` controllers (seeds seed … seed+B−1) in the simulator's
default environment under its default schedule (``simulate.default_schedule``: cosine 0.5 → −0.3,
warm-up a quarter of the run) and measure, per phase window: κ, R, the mean over layers of the
variance of T̄_local (law version 2: the landscape is per layer; T̄_global is a scalar), valley
and ridge counts per layer, the gate, valley health (share of valleys whose reliability is
≥ 0.3), the explored share of routed slots, MaxVio, the tick at which the landscape forms
(variance > 0.01 for ``formed_min_records`` records in a row) and the fraction of records inside
each healthy range. Each claim gets a verdict in ``summary.json["claims"]``.

Note: valleys/ridges are defined relative to the spread (mean ∓ 0.5·std), so their count is
non-zero even on a "flat" landscape whose variance is 1e-6; a count means something only when
the landscape is formed, so we also report counts restricted to formed records.

Run:  chronomoe-dyn study phases [--quick] [--seed N] [--out DIR] [--set KEY=VALUE]
      python studies/phases.py
Outputs (studies/out/phases/): phases.zarr (every cell's trajectory), phases.png (the six metrics
over time with the phase windows and healthy bands, median and 10–90 % band over systems),
healthy_fractions.png, run/*.png (system 0 through ``chronomoe_dyn.plot``: T̄ layer × expert
heatmaps over time, load, curves), summary.json, config.json.

Length: a straight script (question, config, plan, analysis and figures in one file, as
STYLE.md §11 asks of studies), hence over 400 lines.
"""

from __future__ import annotations

import numpy as np

from ..gridstore import GridSpec
from ..plot import new_figure, plot_run, save_figure, shade_band
from .common import HEALTHY_RANGES, first_sustained, in_range_fraction
from .runner import (make_plan, run_study, sim_sections, simulate_cell, system_blocks,
                     validate_simulate)

NAME = "phases"

CONFIG = {
    "num_systems": 16,
    "systems_per_cell": None,      # systems per cell (one simulate call); None = num_systems
    "ticks": 4000,                 # simulate.DEFAULT_TICKS
    "record_every": 10,
    "controller": {},              # ControllerConfig changes (none: the defaults)
    "env": {},                     # EnvConfig changes (none: the default environment)
    "schedule": {},                # changes to simulate.default_schedule(ticks) (KnobSchedule
                                   # fields: kind, initial_kappa, ..., rule.rate)
    "exploitation_from": 0.7,      # the seed's "70 % – end"
    "formed_min_records": 10,      # consecutive records above the variance threshold
    "unhealthy_reliability": 0.3,  # valley health threshold (ControllerConfig default)
    "control_kappas": [0.5, -0.3],  # controls: the same systems under a constant κ (same seeds)
    "kappa_effect_tolerance": 0.05,  # |ΔR| below which the schedule "does not matter"
}

QUICK = {"num_systems": 2, "ticks": 800, "record_every": 10, "formed_min_records": 3}

SECTIONS = sim_sections()
ANALYSIS_KEYS = ("exploitation_from", "formed_min_records", "unhealthy_reliability",
                 "kappa_effect_tolerance")
KERNELS = ("simulate_batch", "simulate_serial")

PHASES = ("exploration", "formation", "exploitation")


def _phase_masks(tick_T: np.ndarray, warmup: int, total: int, exploit_from: float):
    expl = tick_T <= warmup
    exploit = tick_T > exploit_from * total
    return {"exploration": expl, "formation": ~expl & ~exploit, "exploitation": exploit}


def _valley_health(valley_BT_: np.ndarray, rel_BT_: np.ndarray, thr: float) -> np.ndarray:
    """[B, T] share of valleys with reliability ≥ thr (NaN where there is no valley); the
    trailing axes ([E] or [L, E]) are pooled."""
    axes = tuple(range(2, valley_BT_.ndim))
    n = valley_BT_.sum(axis=axes)
    good = (valley_BT_ & (rel_BT_ >= thr)).sum(axis=axes)
    return np.divide(good, n, out=np.full(n.shape, np.nan), where=n > 0)


def _formation_tick(var_BT: np.ndarray, tick_T: np.ndarray, thr: float, run: int) -> list:
    out = []
    for v in var_BT:
        i = first_sustained(v > thr, run)
        out.append(None if i is None else int(tick_T[i]))
    return out


def _median_tick(ticks: list) -> float | None:
    got = [t for t in ticks if t is not None]
    return float(np.median(got)) if got else None


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None, execution=None) -> dict:
    """Run the study (``runner.run_study``); return the summary."""
    import sys
    return run_study(sys.modules[__name__], out_dir, quick, seed, progress, overrides, execution)


def _schedule(cfg: dict):
    from dataclasses import asdict

    from ..schedule import KnobSchedule
    from ..simulate import default_schedule
    from ..store import from_plain
    base = asdict(default_schedule(cfg["ticks"]))
    changes = cfg["schedule"]
    base.update({k: v for k, v in changes.items() if k != "rule"})
    base["rule"].update(changes.get("rule", {}))
    return from_plain(KnobSchedule, base)


def plan(cfg: dict):
    """Grid ``scheduled`` (the run under the schedule) and grid ``controls`` (kappa_const: the
    same systems with κ held constant, without the [B, T, L, E] fields)."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    from ..schedule import KnobSchedule
    ticks = cfg["ticks"]
    cc, ec, sched = ControllerConfig(**cfg["controller"]), EnvConfig(**cfg["env"]), _schedule(cfg)
    cfg["resolved"] = {"controller": cc.to_dict(), "env": ec.to_dict(),
                       "schedule": {"kind": sched.kind, "initial_kappa": sched.initial_kappa,
                                    "final_kappa": sched.final_kappa,
                                    "warmup_steps": sched.warmup_steps,
                                    "total_steps": sched.total_steps}}
    blocks = {"system": system_blocks(cfg["num_systems"], cfg["systems_per_cell"])}
    grids = [GridSpec("scheduled", {}, blocks)]
    consts = {}
    if cfg["control_kappas"]:
        grids.append(GridSpec("controls", {"kappa_const": cfg["control_kappas"]}, blocks))
        consts = {k: KnobSchedule(kind="constant", initial_kappa=k, final_kappa=k,
                                  warmup_steps=0, total_steps=ticks)
                  for k in cfg["control_kappas"]}

    def arg(g, cell):
        r = g.region(cell)["system"]
        control = g.name == "controls"
        kw = dict(config=cc, env=ec,
                  schedule=consts[g.value(cell, "kappa_const")] if control else sched,
                  num_systems=r.stop - r.start, ticks=ticks, seed=cfg["seed"] + r.start,
                  record_every=cfg["record_every"], record_layers=not control)
        validate_simulate(kw)
        return {"simulate": kw}

    return make_plan(grids, arg)


run_cell = simulate_cell


def analyse(cfg: dict, store, out) -> tuple[dict, list]:
    """Per-phase numbers, formation ticks, the seed's claims and the figures, from the store."""
    from types import SimpleNamespace

    from ..config import ControllerConfig
    from ..store import trajectory_arrays
    cc, sched = ControllerConfig(**cfg["controller"]), _schedule(cfg)
    traj = SimpleNamespace(**trajectory_arrays(store.dataset("scheduled").load()))
    # Controls: is it κ that makes the phases? Same seeds, κ held at one value all along.
    controls = {}
    if cfg["control_kappas"]:
        cds = store.dataset("controls")
        for i, k in enumerate(cfg["control_kappas"]):
            ct = SimpleNamespace(**trajectory_arrays(cds.isel(kappa_const=i).load()))
            controls[float(k)] = {"R": ct.R_BT, "var_local": ct.variance_local_BTL.mean(-1),
                                  "exploration": ct.exploration_BT, "loss": ct.loss_BT}

    # ---- per-record metrics, [B, T] ---------------------------------------------------------
    tick_T = traj.tick_T
    thr_rel = float(cfg["unhealthy_reliability"])
    formed_var = cc.landscape_formed_variance
    m = {
        "kappa": traj.kappa_BT, "R": traj.R_BT, "gate": traj.gate_BT, "loss": traj.loss_BT,
        "var_local": traj.variance_local_BTL.mean(-1),
        "valleys_local": traj.valley_local_BTLE.sum(-1).mean(-1),
        "ridges_local": traj.ridge_local_BTLE.sum(-1).mean(-1),
        "health_local": _valley_health(traj.valley_local_BTLE, traj.reliability_BTLE, thr_rel),
        "exploration": traj.exploration_BT, "maxvio": traj.maxvio_BTL.mean(-1),
        "tbar_global": traj.Tbar_global_BT,
    }
    formed_l = traj.variance_local_BTL > formed_var               # [B, T, L]
    m["formed_layers"] = formed_l.mean(-1)
    # counts that mean something: only where the landscape is formed
    m["valleys_local_formed"] = np.where(
        formed_l.any(-1), np.nansum(np.where(formed_l, traj.valley_local_BTLE.sum(-1), 0), -1)
        / np.maximum(formed_l.sum(-1), 1), np.nan)

    masks = _phase_masks(tick_T, sched.warmup_steps, sched.total_steps,
                         float(cfg["exploitation_from"]))
    ranges = {"R": ("R", HEALTHY_RANGES["R"]), "var_local": ("var_local",
              HEALTHY_RANGES["tbar_variance"]), "gate": ("gate", HEALTHY_RANGES["gate"]),
              "valleys_local": ("valleys_local", HEALTHY_RANGES["valleys"]),
              "ridges_local": ("ridges_local", HEALTHY_RANGES["ridges"])}

    per_phase: dict = {}
    for ph, mk in masks.items():
        if not mk.any():
            per_phase[ph] = None
            continue
        d = {"ticks": [int(tick_T[mk][0]), int(tick_T[mk][-1])]}
        for k, a in m.items():
            sel = a[:, mk]
            d[f"{k}_mean"] = float(np.nanmean(sel)) if np.any(np.isfinite(sel)) else None
        healthy = {}
        all_ok = np.ones((traj.R_BT.shape[0], int(mk.sum())), dtype=bool)
        for label, (key, (lo, hi)) in ranges.items():
            healthy[label] = in_range_fraction(m[key][:, mk], lo, hi)
            if label in ("R", "var_local", "gate", "valleys_local", "ridges_local"):
                all_ok &= (m[key][:, mk] >= lo) & (m[key][:, mk] <= hi)
        healthy["all_local"] = float(all_ok.mean())
        d["healthy_fraction"] = healthy
        # R trend inside the phase: slope of the median R against tick, per 1000 ticks
        med_R = np.median(m["R"][:, mk], axis=0)
        d["R_slope_per_1000_ticks"] = float(np.polyfit(tick_T[mk], med_R, 1)[0] * 1000) \
            if mk.sum() > 1 else None
        per_phase[ph] = d

    run_min = int(cfg["formed_min_records"])
    form_l = _formation_tick(m["var_local"], tick_T, formed_var, run_min)
    # first tick where more than half the layers' local landscapes are formed
    form_half = _formation_tick(m["formed_layers"], tick_T, 0.5, run_min)
    formation = {
        "threshold_variance": formed_var, "min_consecutive_records": run_min,
        "tick_local_mean_per_system": form_l, "tick_half_layers_per_system": form_half,
        "tick_local_mean_median": _median_tick(form_l),
        "tick_half_layers_median": _median_tick(form_half),
        "systems_formed_local": sum(t is not None for t in form_l),
        "num_systems": len(form_l),
    }

    # ---- the seed's claims ------------------------------------------------------------------
    def g(ph, key):
        return None if per_phase.get(ph) is None else per_phase[ph].get(key)

    def hf(ph, key):
        return None if per_phase.get(ph) is None else per_phase[ph]["healthy_fraction"][key]

    def claim(holds, evidence):
        return {"holds": None if holds is None else bool(holds), "evidence": evidence}

    def both(a, b, f):
        return None if a is None or b is None else f(a, b)

    warm, exploit_start = sched.warmup_steps, float(cfg["exploitation_from"]) * sched.total_steps
    t_loc = formation["tick_local_mean_median"]
    claims = {
        "exploration_kappa_high": claim(
            both(g("exploration", "kappa_mean"), g("exploitation", "kappa_mean"),
                 lambda a, b: a > b + 0.2),
            f"mean κ {g('exploration', 'kappa_mean')} vs {g('exploitation', 'kappa_mean')} "
            f"in exploitation"),
        "exploration_landscape_flat": claim(
            None if g("exploration", "var_local_mean") is None
            else g("exploration", "var_local_mean") < formed_var,
            f"mean var T̄_local {g('exploration', 'var_local_mean')} (flat: < {formed_var})"),
        "exploration_R_low": claim(
            both(g("exploration", "R_mean"), None if g("exploitation", "R_mean") is None else 0,
                 lambda a, _: a < HEALTHY_RANGES["R"][0]),
            f"mean R {g('exploration', 'R_mean')} (low: < {HEALTHY_RANGES['R'][0]})"),
        "exploration_R_below_exploitation": claim(
            both(g("exploration", "R_mean"), g("exploitation", "R_mean"),
                 lambda a, b: a < b - 0.05),
            f"mean R {g('exploration', 'R_mean')} vs {g('exploitation', 'R_mean')}"),
        "formation_landscape_forms_in_window": claim(
            None if t_loc is None else (warm < t_loc <= exploit_start),
            f"median tick local landscape forms {t_loc} (window {warm}–{exploit_start:.0f})"),
        "formation_R_rises": claim(
            None if g("formation", "R_slope_per_1000_ticks") is None
            else g("formation", "R_slope_per_1000_ticks") > 0.01,
            f"slope of median R in formation {g('formation', 'R_slope_per_1000_ticks')} per "
            f"1000 ticks"),
        "exploitation_kappa_low": claim(
            None if g("exploitation", "kappa_mean") is None
            else g("exploitation", "kappa_mean") < 0,
            f"mean κ {g('exploitation', 'kappa_mean')}"),
        "exploitation_landscape_formed_local": claim(
            None if g("exploitation", "formed_layers_mean") is None
            else g("exploitation", "formed_layers_mean") > 0.5,
            f"share of (layer, record) with var T̄_local > {formed_var}: "
            f"{g('exploitation', 'formed_layers_mean')}"),
        "exploitation_R_high": claim(
            None if g("exploitation", "R_mean") is None
            else g("exploitation", "R_mean") >= HEALTHY_RANGES["R"][1],
            f"mean R {g('exploitation', 'R_mean')} (high: ≥ {HEALTHY_RANGES['R'][1]})"),
        "exploitation_valleys_healthy": claim(
            None if g("exploitation", "health_local_mean") is None
            else g("exploitation", "health_local_mean") >= 0.9,
            f"share of local valleys with reliability ≥ {thr_rel}: "
            f"{g('exploitation', 'health_local_mean')}"),
        "exploitation_in_healthy_ranges": claim(
            None if hf("exploitation", "all_local") is None
            else hf("exploitation", "all_local") >= 0.5,
            f"fraction of records with R, var T̄_local, gate, local valleys and ridges all in "
            f"range: {hf('exploitation', 'all_local')}"),
    }

    # Does the schedule cause the phases? Compare with the constant-κ controls per phase.
    control_summary = {}
    tol = float(cfg["kappa_effect_tolerance"])
    max_dR = 0.0
    for k, c in controls.items():
        d = {}
        for ph, mk in masks.items():
            if not mk.any():
                continue
            dR = float(np.mean(m["R"][:, mk]) - np.mean(c["R"][:, mk]))
            d[ph] = {"R_mean": float(np.mean(c["R"][:, mk])), "R_schedule_minus_control": dR,
                     "var_local_mean": float(np.mean(c["var_local"][:, mk])),
                     "var_local_schedule_minus_control":
                         float(np.mean(m["var_local"][:, mk]) - np.mean(c["var_local"][:, mk])),
                     "loss_mean": float(np.mean(c["loss"][:, mk]))}
            max_dR = max(max_dR, abs(dR))
        d["tick_local_forms_median"] = _median_tick(
            _formation_tick(c["var_local"], tick_T, formed_var, run_min))
        control_summary[str(k)] = d
    if controls:
        claims["phases_driven_by_kappa"] = claim(
            max_dR > tol,
            f"largest |mean R (schedule) − mean R (constant κ)| over phases and controls "
            f"{max_dR:.3f} (tolerance {tol}); controls: " + "; ".join(
                f"κ≡{k}: R " + ", ".join(f"{ph} {v['R_mean']:.3f}" for ph, v in d.items()
                                       if isinstance(v, dict))
                for k, d in control_summary.items()))

    headline = []
    for ph in PHASES:
        d = per_phase.get(ph)
        if d is None:
            continue
        headline.append(
            f"{ph:<12} ticks {d['ticks'][0]}–{d['ticks'][1]}: κ {d['kappa_mean']:+.2f}, "
            f"R {d['R_mean']:.3f}, var T̄_local {d['var_local_mean']:.4f}, valleys "
            f"{d['valleys_local_mean']:.1f} per layer, gate {d['gate_mean']:.2f}, explored "
            f"{d['exploration_mean']:.2f}, MaxVio {d['maxvio_mean']:.2f}, "
            f"all-healthy {d['healthy_fraction']['all_local']:.2f}")
    headline.append(f"landscape forms (median tick): local {formation['tick_local_mean_median']}"
                    f" ({formation['systems_formed_local']}/{formation['num_systems']} systems)")
    if control_summary:
        parts = []
        for ph in PHASES:
            vals = [f"κ≡{k} {d[ph]['R_mean']:.3f}" for k, d in control_summary.items() if ph in d]
            if per_phase.get(ph) is not None:
                parts.append(f"{ph} {per_phase[ph]['R_mean']:.3f} ({', '.join(vals)})")
        headline.append("mean R, schedule (constant-κ controls): " + "; ".join(parts))
    held = [k for k, c in claims.items() if c["holds"]]
    failed = [k for k, c in claims.items() if c["holds"] is False]
    headline.append(f"claims holding: {len(held)}/{len(claims)}; not holding: "
                    f"{', '.join(failed) or 'none'}")

    summary = {"phases": per_phase, "formation": formation, "claims": claims,
               "controls_constant_kappa": control_summary, "headline": headline,
               "final": {"R_median": float(np.median(traj.R_BT[:, -1])),
                         "var_local_median": float(np.median(m["var_local"][:, -1])),
                         "loss_mean": float(np.mean(traj.loss_BT[:, -1]))}}

    # ---- figures ------------------------------------------------------------------------------
    bounds = {"exploration": (0, sched.warmup_steps),
              "formation": (sched.warmup_steps, exploit_start),
              "exploitation": (exploit_start, int(tick_T[-1]))}
    figs = [_fig_phases(out, tick_T, m, bounds, formation, sched, controls),
            _fig_healthy(out, per_phase)]
    figs += plot_run(traj, out_dir=out / "run", system=0)
    return summary, figs


_PHASE_COLORS = {"exploration": "tab:orange", "formation": "tab:purple",
                 "exploitation": "tab:blue"}


def _band(ax, x, a_BT, label, color=None):
    with np.errstate(all="ignore"):
        med = np.nanmedian(a_BT, axis=0)
        lo, hi = np.nanquantile(a_BT, 0.1, axis=0), np.nanquantile(a_BT, 0.9, axis=0)
    line, = ax.plot(x, med, lw=1.3, label=label, color=color)
    if a_BT.shape[0] > 1:
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)


def _fig_phases(out, tick_T, m, bounds, formation, sched, controls):
    fig, axes = new_figure(7, 1, sharex=True, width=8.0, height=1.75)
    panels = [
        ("κ", [("kappa", "κ")], None, False),
        ("Kuramoto R", [("R", "R")], HEALTHY_RANGES["R"], False),
        ("T̄_local variance (layer mean)", [("var_local", "local, layer mean")],
         HEALTHY_RANGES["tbar_variance"], True),
        ("valleys / ridges", [("valleys_local", "valleys per layer"),
                              ("ridges_local", "ridges per layer")], HEALTHY_RANGES["valleys"],
         False),
        ("gate", [("gate", "gate")], HEALTHY_RANGES["gate"], False),
        ("exploration", [("exploration", "explored share of slots")], None, False),
        ("valley health", [("health_local", "local valleys with s ≥ 0.3")], None, False),
    ]
    for ax, (title, series, band, logy) in zip(axes[:, 0], panels):
        for ph, (a, b) in bounds.items():
            if b > a:
                ax.axvspan(a, b, color=_PHASE_COLORS[ph], alpha=0.07, lw=0)
        if band is not None:
            shade_band(ax, *band, label=None)
        for key, label in series:
            _band(ax, tick_T, m[key], label)
        for (k, c), ls in zip(controls.items(), ("--", ":", "-.")):
            for key, label in series:
                if key in c:
                    ax.plot(tick_T, np.median(c[key], axis=0), ls=ls, lw=0.9, color="0.35",
                            label=f"{label}, κ ≡ {k:+g}")
        if logy:
            ax.set_yscale("log")
        if title == "valley health":
            ax.set_ylim(-0.03, 1.03)
        t_form = formation["tick_local_mean_median"]
        if t_form is not None:
            ax.axvline(t_form, color="k", ls=":", lw=0.9)
        ax.set_title(title, fontsize=9, loc="left")
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=6, loc="best", ncol=2)
    ax0 = axes[0, 0]
    for ph, (a, b) in bounds.items():
        if b > a:
            ax0.text(0.5 * (a + b), 0.5, ph, ha="center", va="center", fontsize=8,
                     color=_PHASE_COLORS[ph], transform=ax0.get_xaxis_transform())
    axes[-1, 0].set_xlabel("tick")
    fig.suptitle(f"phases under the {sched.kind} κ schedule ({sched.initial_kappa:+g} → "
                 f"{sched.final_kappa:+g}, warm-up {sched.warmup_steps} ticks)\nmedian, "
                 f"10–90 % of {m['R'].shape[0]} systems; green: healthy range; dotted: local "
                 f"landscape forms; grey: κ held constant", fontsize=9)
    return save_figure(fig, out / "phases.png")


def _fig_healthy(out, per_phase):
    labels = ["R", "var_local", "gate", "valleys_local", "ridges_local", "all_local"]
    fig, axes = new_figure(1, 1, width=8.0, height=3.2)
    ax = axes[0, 0]
    x = np.arange(len(labels))
    w = 0.27
    for i, ph in enumerate(PHASES):
        d = per_phase.get(ph)
        if d is None:
            continue
        vals = [d["healthy_fraction"][k] for k in labels]
        bars = ax.bar(x + (i - 1) * w, [np.nan if v is None else v for v in vals], w, label=ph,
                      color=_PHASE_COLORS[ph])
        ax.bar_label(bars, labels=["–" if v is None else f"{v:.2f}" for v in vals], fontsize=5,
                     padding=1)
    ax.set_xticks(x, [lbl.replace("_", "\n") for lbl in labels], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of records in range")
    ax.set_title("time in the seed's healthy ranges, per phase (all systems)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "healthy_fractions.png")
