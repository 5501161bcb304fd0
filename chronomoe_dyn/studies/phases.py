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

Controls (DESIGN.md §5: a claim about the controller holds only against its ablation). The
same systems (seeds) run with κ held constant at each of ``control_kappas`` (0.5 and −0.3, the
schedule's ends; ±1, the extremes) and, with ``ablation``, under the schedule with
``controller_fields=False`` (plain top-k routing; the controller observes and ticks). Per phase
window the mean R, explored share, MaxVio and loss of each control are compared with the
scheduled run; a control "differs" when one of them differs by more than its tolerance
(``tolerances``). Version 1 found that constant κ = 0.5 or −0.3 changed R by ≤ 0.004: κ did not
cause the phases. The claims ``kappa_controls_differ``, ``phases_driven_by_kappa``,
``exploration_rises_with_kappa``, ``kappa_lever_3x``, ``balance_no_worse_as_kappa_rises``,
``high_kappa_lowers_R`` (the seed's "exploration phase: low R" as a κ effect),
``fields_change_routing`` and ``fields_lower_maxvio`` are computed from these numbers.

Note: valleys/ridges are defined relative to the spread (mean ∓ 0.5·std), so their count is
non-zero even on a "flat" landscape whose variance is 1e-6; a count means something only when
the landscape is formed, so we also report counts restricted to formed records.

Run:  chronomoe-dyn study phases [--quick] [--seed N] [--out DIR] [--set KEY=VALUE]
      python studies/phases.py
Outputs (studies/out/phases/): phases.zarr (every cell's trajectory), phases.png (eight metrics
over time with the phase windows and healthy bands, median and 10–90 % band over systems, and
the controls' medians),
healthy_fractions.png, run/*.png (system 0 through ``chronomoe_dyn.plot``: T̄ layer × expert
heatmaps over time, load, curves), summary.json, config.json.

Length: a straight script (question, config, plan, analysis and figures in one file, as
STYLE.md §11 asks of studies), hence over 400 lines.
"""

from __future__ import annotations

import numpy as np

from ..gridstore import GridSpec
from ..plot import new_figure, plot_run, save_figure, shade_band
from .common import (HEALTHY_RANGES, KAPPA_LEVER_RATIO, claim, claims_line, first_sustained,
                     in_range_fraction, lever_ratio)
from .runner import (constant_schedule, default_schedule_with, make_plan, run_study,
                     sim_sections, simulate_cell, system_blocks, validate_simulate)

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
    "control_kappas": [0.5, -0.3, 1.0, -1.0],  # controls: the same systems, κ held constant
    "ablation": True,              # control: the same systems and schedule, controller_fields off
    # A control "differs" from the scheduled run when, in some phase window, the mean over
    # systems of one of these differs by more than its tolerance (v1: |ΔR| ≤ 0.004 everywhere).
    # Each is several times the seed-to-seed standard error of a phase mean at 16 systems.
    "tolerances": {"R": 0.05, "exploration": 0.02, "maxvio": 0.05, "loss": 0.01},
}

QUICK = {"num_systems": 2, "ticks": 800, "record_every": 10, "formed_min_records": 3}

SECTIONS = sim_sections()
ANALYSIS_KEYS = ("exploitation_from", "formed_min_records", "unhealthy_reliability",
                 "tolerances")
KERNELS = ("simulate_batch", "simulate_serial")

PHASES = ("exploration", "formation", "exploitation")
_TOL_METRICS = ("R", "exploration", "maxvio", "loss")
"""The metrics a control is compared on (``tolerances``)."""


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


def _control_series(ds) -> dict:
    """[B, T] series of one control (a dataset of the store) that are compared."""
    from ..store import trajectory_arrays
    t = trajectory_arrays(ds, ("R_BT", "variance_local_BTL", "exploration_BT", "maxvio_BTL",
                               "loss_BT"))
    return {"R": t["R_BT"], "var_local": t["variance_local_BTL"].mean(-1),
            "exploration": t["exploration_BT"], "maxvio": t["maxvio_BTL"].mean(-1),
            "loss": t["loss_BT"]}


def _compare_controls(m: dict, controls: dict, masks: dict, tol: dict, tick_T, formed_var,
                      run_min) -> dict:
    """Per control: per-phase means and schedule − control differences of ``_TOL_METRICS``
    (means over systems and the phase's records), run means, and the largest difference
    relative to its tolerance (``differs``: some |difference| > its tolerance)."""
    out = {}
    for name, c in controls.items():
        d: dict = {"phases": {},
                   "run": {k: float(np.mean(c[k])) for k in _TOL_METRICS},
                   "schedule_run": {k: float(np.mean(m[k])) for k in _TOL_METRICS}}
        worst = None
        for ph, mk in masks.items():
            if not mk.any():
                continue
            e = {"var_local_mean": float(np.mean(c["var_local"][:, mk]))}
            for k in _TOL_METRICS:
                cm, sm = float(np.mean(c[k][:, mk])), float(np.mean(m[k][:, mk]))
                e[f"{k}_mean"], e[f"{k}_schedule_minus_control"] = cm, sm - cm
                t = float(tol[k])
                score = abs(sm - cm) / t if t > 0 else (np.inf if sm != cm else 0.0)
                if worst is None or score > worst["score"]:
                    worst = {"metric": k, "phase": ph, "delta": sm - cm, "tolerance": t,
                             "score": float(score)}
            d["phases"][ph] = e
        d["largest"] = worst
        d["differs"] = worst is not None and worst["score"] > 1.0
        d["tick_local_forms_median"] = _median_tick(
            _formation_tick(c["var_local"], tick_T, formed_var, run_min))
        out[name] = d
    return out


def _control_claims(cs: dict, kappas: list, tol: dict) -> dict:
    """Claims about the controls, computed from ``_compare_controls``."""
    claims = {}
    kap = {float(k): cs[f"κ≡{float(k):+g}"] for k in kappas}

    def largest(d):
        w = d["largest"]
        return f"{w['metric']} {w['delta']:+.3f} in {w['phase']} (tolerance {w['tolerance']:g})"

    if kap:
        max_dR = max(abs(e["R_schedule_minus_control"]) for d in kap.values()
                     for e in d["phases"].values())
        claims["phases_driven_by_kappa"] = claim(
            max_dR > tol["R"], f"largest |mean R (schedule) − mean R (constant κ)| over phases "
            f"and κ controls {max_dR:.3f} (tolerance {tol['R']:g}; version 1: ≤ 0.004)")
        claims["kappa_controls_differ"] = claim(
            all(d["differs"] for d in kap.values()),
            "every constant-κ control differs from the scheduled run by more than a tolerance "
            "in some phase; largest differences (schedule − control): "
            + "; ".join(f"κ≡{k:+g}: {largest(d)}" for k, d in kap.items()))
    if len(kap) >= 2:
        ks = sorted(kap)
        lo, hi = kap[ks[0]]["run"], kap[ks[-1]]["run"]
        ex = [kap[k]["run"]["exploration"] for k in ks]
        claims["exploration_rises_with_kappa"] = claim(
            bool(np.all(np.diff(ex) > 0)), "explored share over the run, κ ascending: "
            + ", ".join(f"κ≡{k:+g} {v:.3f}" for k, v in zip(ks, ex)))
        ratio = lever_ratio(hi["exploration"], lo["exploration"])
        claims["kappa_lever_3x"] = claim(
            ratio >= KAPPA_LEVER_RATIO, f"exploration at κ≡{ks[-1]:+g} / at κ≡{ks[0]:+g} = "
            f"{hi['exploration']:.3f}/{lo['exploration']:.3f} = {ratio:.1f}× (issue 9: ≥ "
            f"{KAPPA_LEVER_RATIO:g}×)")
        claims["balance_no_worse_as_kappa_rises"] = claim(
            hi["maxvio"] <= lo["maxvio"] + tol["maxvio"],
            f"MaxVio over the run at κ≡{ks[-1]:+g} {hi['maxvio']:.3f} vs κ≡{ks[0]:+g} "
            f"{lo['maxvio']:.3f} (tolerance {tol['maxvio']:g})")
        claims["high_kappa_lowers_R"] = claim(
            hi["R"] < lo["R"] - tol["R"],
            f"the seed: exploration (high κ) has low R. R over the run at κ≡{ks[-1]:+g} "
            f"{hi['R']:.3f} vs κ≡{ks[0]:+g} {lo['R']:.3f} (tolerance {tol['R']:g})")
    if CONTROL_ABLATION in cs:
        d = cs[CONTROL_ABLATION]
        claims["fields_change_routing"] = claim(
            d["differs"], f"the schedule with controller_fields=False: largest difference "
            f"(schedule − ablation) {largest(d)}")
        claims["fields_lower_maxvio"] = claim(
            d["schedule_run"]["maxvio"] < d["run"]["maxvio"] - tol["maxvio"],
            f"MaxVio over the run {d['schedule_run']['maxvio']:.3f} with fields vs "
            f"{d['run']['maxvio']:.3f} without (tolerance {tol['maxvio']:g}); loss "
            f"{d['schedule_run']['loss']:.3f} vs {d['run']['loss']:.3f}")
    return claims


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None, execution=None) -> dict:
    """Run the study (``runner.run_study``); return the summary."""
    import sys
    return run_study(sys.modules[__name__], out_dir, quick, seed, progress, overrides, execution)


def _schedule(cfg: dict):
    return default_schedule_with(cfg["ticks"], cfg["schedule"])


CONTROL_ABLATION = "fields off"
"""The name of the ``controller_fields=False`` control in the summary."""


def plan(cfg: dict):
    """Grid ``scheduled`` (the run under the schedule), grid ``controls`` (kappa_const: the
    same systems with κ held constant) and grid ``ablation`` (the same systems and schedule with
    ``controller_fields=False``); the controls without the [B, T, L, E] fields."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    ticks = cfg["ticks"]
    cc, ec, sched = ControllerConfig(**cfg["controller"]), EnvConfig(**cfg["env"]), _schedule(cfg)
    unknown = sorted(set(cfg["tolerances"]) - set(_TOL_METRICS))
    if unknown or not all(isinstance(v, (int, float)) and v >= 0
                          for v in cfg["tolerances"].values()):
        raise ValueError(f"config key 'tolerances': expected non-negative numbers for "
                         f"{', '.join(_TOL_METRICS)}, got {cfg['tolerances']!r}")
    cfg["resolved"] = {"controller": cc.to_dict(), "env": ec.to_dict(),
                       "schedule": {"kind": sched.kind, "initial_kappa": sched.initial_kappa,
                                    "final_kappa": sched.final_kappa,
                                    "warmup_steps": sched.warmup_steps,
                                    "total_steps": sched.total_steps}}
    blocks = {"system": system_blocks(cfg["num_systems"], cfg["systems_per_cell"])}
    grids = [GridSpec("scheduled", {}, blocks)]
    if cfg["control_kappas"]:
        grids.append(GridSpec("controls", {"kappa_const": cfg["control_kappas"]}, blocks))
    if cfg["ablation"]:
        grids.append(GridSpec("ablation", {}, blocks))

    def arg(g, cell):
        r = g.region(cell)["system"]
        kw = dict(config=cc, env=ec, schedule=sched, num_systems=r.stop - r.start, ticks=ticks,
                  seed=cfg["seed"] + r.start, record_every=cfg["record_every"],
                  record_layers=g.name == "scheduled", controller_fields=g.name != "ablation")
        if g.name == "controls":
            kw["schedule"] = constant_schedule(g.value(cell, "kappa_const"), ticks)
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
    # Controls: is it κ (and the fields) that makes the phases? Same seeds throughout.
    controls = {}
    if cfg["control_kappas"]:
        cds = store.dataset("controls")
        for i, k in enumerate(cfg["control_kappas"]):
            controls[f"κ≡{float(k):+g}"] = _control_series(cds.isel(kappa_const=i).load())
    if cfg["ablation"]:
        controls[CONTROL_ABLATION] = _control_series(store.dataset("ablation").load())

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
        # issue 9's valley health: token loss better than the layer mean (reliability > 0.5)
        "health_mean": _valley_health(traj.valley_local_BTLE, traj.reliability_BTLE,
                                      float(np.nextafter(0.5, 1.0))),
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
        "exploitation_valleys_beat_layer_mean": claim(
            None if g("exploitation", "health_mean_mean") is None
            else g("exploitation", "health_mean_mean") >= 0.7,
            f"share of local valleys with reliability > 0.5 (token loss better than the layer "
            f"mean; issue 9 asks ≥ 0.7): {g('exploitation', 'health_mean_mean')}"),
        "exploitation_in_healthy_ranges": claim(
            None if hf("exploitation", "all_local") is None
            else hf("exploitation", "all_local") >= 0.5,
            f"fraction of records with R, var T̄_local, gate, local valleys and ridges all in "
            f"range: {hf('exploitation', 'all_local')}"),
    }

    # Does the schedule cause the phases? Compare with the controls per phase.
    control_summary = _compare_controls(m, controls, masks, cfg["tolerances"], tick_T,
                                        formed_var, run_min)
    claims.update(_control_claims(control_summary, cfg["control_kappas"], cfg["tolerances"]))

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
    for name, d in control_summary.items():
        w = d["largest"]
        headline.append(
            f"{name}: R {d['run']['R']:.3f}, explored {d['run']['exploration']:.3f}, MaxVio "
            f"{d['run']['maxvio']:.3f}, loss {d['run']['loss']:.3f} over the run (schedule: "
            f"{d['schedule_run']['R']:.3f}, {d['schedule_run']['exploration']:.3f}, "
            f"{d['schedule_run']['maxvio']:.3f}, {d['schedule_run']['loss']:.3f}); largest "
            f"difference {w['metric']} {w['delta']:+.3f} in {w['phase']} (tolerance "
            f"{w['tolerance']:g}): {'differs' if d['differs'] else 'within tolerance'}")
    headline.append(claims_line(claims))

    summary = {"phases": per_phase, "formation": formation, "claims": claims,
               "controls": control_summary, "headline": headline,
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


def _control_style(name: str) -> dict:
    """Line style of a control: κ ≡ +1 red … κ ≡ −1 blue (by κ), the ablation black."""
    if name == CONTROL_ABLATION:
        return {"color": "k", "ls": ":"}
    from matplotlib import colormaps
    k = float(name.replace("κ≡", ""))
    return {"color": colormaps["coolwarm"](0.5 + 0.5 * np.clip(k, -1, 1)), "ls": "--"}


def _fig_phases(out, tick_T, m, bounds, formation, sched, controls):
    """The scheduled run's metrics over time with the controls (median over systems)."""
    panels = [
        ("κ", "", [("kappa", "κ")], None, False),
        ("Kuramoto R", "R", [("R", "R")], HEALTHY_RANGES["R"], False),
        ("T̄_local variance (layer mean)", "var T̄", [("var_local", "local, layer mean")],
         HEALTHY_RANGES["tbar_variance"], True),
        ("valleys / ridges", "per layer", [("valleys_local", "valleys per layer"),
                                           ("ridges_local", "ridges per layer")],
         HEALTHY_RANGES["valleys"], False),
        ("gate", "gate", [("gate", "gate")], HEALTHY_RANGES["gate"], False),
        ("exploration", "share", [("exploration", "explored share of slots")], None, False),
        ("MaxVio (max/mean load − 1, layer mean)", "MaxVio", [("maxvio", "MaxVio")], None,
         False),
        ("valley health", "share", [("health_local", "valleys with s ≥ 0.3 (seed)"),
                                    ("health_mean", "valleys with s > 0.5 (loss < layer mean)")],
         None,
         False),
    ]
    fig, axes = new_figure(len(panels), 1, sharex=True, width=8.0, height=1.75)
    for ax, (title, ylabel, series, band, logy) in zip(axes[:, 0], panels):
        for ph, (a, b) in bounds.items():
            if b > a:
                ax.axvspan(a, b, color=_PHASE_COLORS[ph], alpha=0.07, lw=0)
        if band is not None:
            shade_band(ax, *band, label=None)
        for key, label in series:
            _band(ax, tick_T, m[key], label)
        for name, c in controls.items():
            for key, label in series:
                if key in c:
                    ax.plot(tick_T, np.median(c[key], axis=0), lw=0.9, label=name,
                            **_control_style(name))
        if logy:
            ax.set_yscale("log")
        if title == "valley health":
            ax.set_ylim(-0.03, 1.03)
        t_form = formation["tick_local_mean_median"]
        if t_form is not None:
            ax.axvline(t_form, color="k", ls=":", lw=0.9)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel(ylabel, fontsize=8)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax0 = axes[0, 0]
    for ph, (a, b) in bounds.items():
        if b > a:
            ax0.text(0.5 * (a + b), 0.5, ph, ha="center", va="center", fontsize=8,
                     color=_PHASE_COLORS[ph], transform=ax0.get_xaxis_transform())
    axes[-1, 0].set_xlabel("tick")
    fig.suptitle(f"phases under the {sched.kind} κ schedule ({sched.initial_kappa:+g} → "
                 f"{sched.final_kappa:+g}, warm-up {sched.warmup_steps} ticks)\nmedian and "
                 f"10–90 % of {m['R'].shape[0]} systems; green: healthy range; dotted vertical: "
                 f"local landscape forms\ncontrols, same seeds (medians): κ held constant "
                 f"(dashed, red = +1 … blue = −1), fields off (black dotted)", fontsize=9)
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
