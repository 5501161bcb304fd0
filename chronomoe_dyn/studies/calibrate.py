"""Study `calibrate`: which one set of v2 constants? (issue 9, item 2; the simulator half)

Question. The v2 law's constants (drift_gain, pressure_gain, lens_rate, lens_clock,
exploration_tau0, coupling, ...) are provisional. Which candidate set gives, in the simulator's
default environment, (1) fields that earn their keep against the ``controller_fields=False``
ablation (lower MaxVio, loss no worse), (2) a causal, monotone κ lever (exploration at κ = +1
≥ 3× that at κ = −1; balance no worse as κ rises), (3) an R that means something (10–90 % range
over a run ≥ 0.3, not pinned), (4) a landscape that forms (var T̄_local, layer mean, passes
0.01) and (5) healthy valleys (reliability > 0.5, i.e. token loss better than the layer mean,
for ≥ 70 % of valleys)? The same candidates run on real text with ``chronomoe-train compare
--arms-file`` (the file is shared); ``--set real_text=DIR`` puts those numbers beside these.

Method. Every candidate of the candidates file (``calibrate_io``: only its ``controller`` table
matters here) runs ``num_systems`` systems (seeds seed … seed+B−1, the same for every candidate
and condition: common random numbers) for ``ticks`` ticks under four conditions:
  schedule     the default schedule (cosine κ 0.5 → −0.3, warm-up a quarter of the run)
  fields_off   the same schedule, ``controller_fields=False`` (the ablation: plain top-k routing;
               the controller observes and ticks)
  kappa=-1     κ held at −1 (exploit)          kappa=+1     κ held at +1 (explore)
Per (candidate, condition), per system, then mean ± sd over systems: late loss and late MaxVio
(mean over the last ``late_fraction`` of the records; MaxVio = max/mean − 1 of the tick's slot
counts, mean over layers), exploration (explored share of routed slots, mean over the run), R
(mean, 10th and 90th percentile over the run's records), the first tick from which the layer
mean of var T̄_local stays above ``formed_variance`` for ``formed_min_records`` records, and
valley health (late valleys of every layer with reliability > ``healthy_reliability``, pooled).

Store: one grid candidate × condition (integer axes: indices into ``resolved.candidates`` and
``CONDITIONS``), systems in blocks; each cell is a whole trajectory (``store_dtype``). The
identity holds the candidates' resolved constants, so editing the file refuses the old store
(rerun with ``--overwrite``); a killed run resumes with the missing cells.

Run:  chronomoe-dyn study calibrate [--quick] [--set candidates=FILE] [--set only='["a","b"]']
                                    [--set real_text=COMPARE_DIR]
Outputs (studies/out/calibrate/): calibrate.zarr, calibrate.md (the tables), calibrate.png
(balance vs loss, R ranges, the κ lever), calibrate_real_text.png (with ``real_text``),
summary.json, config.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..gridstore import GridSpec
from .calibrate_io import default_candidates_path, load_candidates, load_real_text
from .common import KAPPA_LEVER_RATIO, claim, first_sustained, lever_ratio
from .runner import (check_late_window, constant_schedule, default_schedule_with, make_plan,
                     run_study, sim_sections, simulate_cell, system_blocks,
                     validate_simulate)

NAME = "calibrate"

CONDITIONS = ("schedule", "fields_off", "kappa=-1", "kappa=+1")
"""The conditions every candidate runs under (the ``condition`` axis indexes this tuple)."""

CONFIG = {
    "candidates": "",              # TOML arms file; "" = studies/calibration_candidates.toml
    "only": [],                    # candidate names to run; [] = every arm of the file
    "num_systems": 8,              # systems per (candidate, condition), the same seeds in each
    "systems_per_cell": None,      # systems per cell (one simulate call); None = num_systems
    "ticks": 4000,                 # simulate.DEFAULT_TICKS
    "record_every": 20,
    "env": {},                     # EnvConfig changes (none: the default environment)
    "schedule": {},                # changes to simulate.default_schedule(ticks)
    "store_dtype": "float32",      # the trajectories' float fields in the store
    "late_fraction": 0.25,         # "late": the last quarter of the records
    "formed_variance": 0.01,       # the seed's landscape threshold on var T̄_local
    "formed_min_records": 5,       # records in a row above it (100 ticks at record_every 20)
    "healthy_reliability": 0.5,    # a valley is healthy when its token loss beats the layer mean
    # the criteria of issue 9 ("What it must show"), applied to the simulator:
    "min_exploration_ratio": KAPPA_LEVER_RATIO,  # exploration at κ = +1 ≥ this × at κ = −1
    "maxvio_tolerance": 0.02,      # MaxVio(κ=+1) ≤ MaxVio(κ=−1) + this ("balance not worse")
    "min_R_span": 0.3,             # R's 10–90 % range over a run (mean over systems)
    "min_valley_health": 0.7,
    "real_text": "",               # a `chronomoe-train compare` run directory ("" = none)
}

QUICK = {"num_systems": 2, "ticks": 600, "record_every": 10, "formed_min_records": 3}

SECTIONS = {k: v for k, v in sim_sections().items() if k != "controller"}
"""``env`` and ``schedule`` take dataclass changes; the controller comes from the candidates."""
ANALYSIS_KEYS = ("candidates", "notes", "late_fraction", "formed_variance", "formed_min_records",
                 "healthy_reliability", "min_exploration_ratio", "maxvio_tolerance",
                 "min_R_span", "min_valley_health", "real_text")
"""``candidates`` (the path) and ``notes`` (descriptions, real-text-only keys) are here because
the identity holds the resolved constants (``resolved.candidates``): another path to the same
constants, or another description, reuses the cells."""
KERNELS = ("simulate_batch", "simulate_serial")

_FIELDS = ("tick_T", "R_BT", "loss_BT", "maxvio_BTL", "exploration_BT", "variance_local_BTL",
           "valley_local_BTLE", "reliability_BTLE", "gate_BT", "usage_BTLE")


def main(out_dir=None, quick: bool = False, seed: int = 0, progress: bool = True,
         overrides: dict | None = None, execution=None) -> dict:
    """Run the study (``runner.run_study``); return the summary."""
    import sys
    return run_study(sys.modules[__name__], out_dir, quick, seed, progress, overrides, execution)


def _candidates_path(cfg: dict) -> Path:
    return Path(cfg["candidates"]) if cfg["candidates"] else default_candidates_path()


def _selected(cfg: dict) -> dict:
    cands = load_candidates(_candidates_path(cfg))
    only = cfg["only"]
    if not all(isinstance(n, str) for n in only):
        raise ValueError(f"config key 'only': expected a list of candidate names, got {only!r}")
    unknown = [n for n in only if n not in cands]
    if unknown:
        raise ValueError(f"config key 'only': no candidate(s) {unknown} in "
                         f"{str(_candidates_path(cfg))!r} (it has: {', '.join(cands)})")
    return {n: c for n, c in cands.items() if not only or n in only}


def plan(cfg: dict):
    """One grid candidate × condition, systems in blocks; every cell's arguments checked."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    check_late_window(cfg)
    if cfg["real_text"]:
        load_real_text(cfg["real_text"])          # a bad path fails before any cell runs
    cands = _selected(cfg)
    ticks = cfg["ticks"]
    ec = EnvConfig(**cfg["env"])
    sched = default_schedule_with(ticks, cfg["schedule"])
    scheds = {"schedule": sched, "fields_off": sched, "kappa=-1": constant_schedule(-1.0, ticks),
              "kappa=+1": constant_schedule(1.0, ticks)}
    configs = [ControllerConfig(**c.controller) for c in cands.values()]
    cfg["resolved"] = {"candidates": [{"name": n, "controller": c.controller}
                                      for n, c in cands.items()],
                       "conditions": list(CONDITIONS), "env": ec.to_dict(),
                       "schedule": {"kind": sched.kind, "initial_kappa": sched.initial_kappa,
                                    "final_kappa": sched.final_kappa,
                                    "warmup_steps": sched.warmup_steps,
                                    "total_steps": sched.total_steps}}
    cfg["notes"] = {n: {"description": c.description, "base": c.base,
                        "real_text_only": list(c.real_text_only)} for n, c in cands.items()}
    grid = GridSpec("", {"candidate": list(range(len(cands))),
                         "condition": list(range(len(CONDITIONS)))},
                    {"system": system_blocks(cfg["num_systems"], cfg["systems_per_cell"])})

    def arg(g, cell):
        r = g.region(cell)["system"]
        cond = CONDITIONS[g.value(cell, "condition")]
        kw = dict(config=configs[g.value(cell, "candidate")], env=ec, schedule=scheds[cond],
                  num_systems=r.stop - r.start, ticks=ticks, seed=cfg["seed"] + r.start,
                  record_every=cfg["record_every"], controller_fields=cond != "fields_off")
        validate_simulate(kw)
        return {"simulate": kw, "dtype": cfg["store_dtype"]}

    return make_plan([grid], arg)


run_cell = simulate_cell


# ---------------------------------------------------------------------------------------------
# analysis

def per_system(tr: dict, cfg: dict) -> dict[str, np.ndarray]:
    """[B] metrics of one (candidate, condition) from its trajectory arrays (module docstring)."""
    R = tr["R_BT"].astype(np.float64)
    T = R.shape[1]
    late = slice(max(0, T - max(1, int(round(cfg["late_fraction"] * T)))), T)
    var_BT = tr["variance_local_BTL"].astype(np.float64).mean(-1)
    formed = [first_sustained(v > cfg["formed_variance"], cfg["formed_min_records"])
              for v in var_BT]
    valley = tr["valley_local_BTLE"][:, late].astype(bool)
    good = valley & (tr["reliability_BTLE"][:, late] > cfg["healthy_reliability"])
    n_valleys = valley.sum(axis=(1, 2, 3)).astype(np.float64)
    # the real text's MaxVio_global is taken on slot counts summed over an eval set; here: the
    # usage EMA (≈ the last 20 ticks' shares) averaged over the late records, max/mean − 1
    u_BLE = tr["usage_BTLE"][:, late].astype(np.float64).mean(1)
    return {
        "loss_late": tr["loss_BT"][:, late].astype(np.float64).mean(1),
        "maxvio_late": tr["maxvio_BTL"][:, late].astype(np.float64).mean((1, 2)),
        "maxvio_global_late": (u_BLE.max(-1) / u_BLE.mean(-1) - 1.0).mean(-1),
        "exploration": tr["exploration_BT"].astype(np.float64).mean(1),
        "R_mean": R.mean(1),
        "R_p10": np.percentile(R, 10, axis=1), "R_p90": np.percentile(R, 90, axis=1),
        "gate_mean": tr["gate_BT"].astype(np.float64).mean(1),
        "var_local_late": var_BT[:, late].mean(1),
        "formed_tick": np.array([np.nan if i is None else float(tr["tick_T"][i])
                                 for i in formed]),
        "valleys": n_valleys, "healthy_valleys": good.sum(axis=(1, 2, 3)).astype(np.float64),
    }


def _mean_sd(x: np.ndarray) -> tuple[float | None, float | None]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return None, None
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def summarise(ps: dict[str, np.ndarray]) -> dict:
    """Means ± sd over systems of ``per_system``; valley health pooled over systems."""
    out: dict = {}
    for k in ("loss_late", "maxvio_late", "maxvio_global_late", "exploration", "R_mean",
              "R_p10", "R_p90", "gate_mean", "var_local_late"):
        out[k], out[f"{k}_sd"] = _mean_sd(ps[k])
    out["R_span"] = out["R_p90"] - out["R_p10"]
    ft = ps["formed_tick"]
    out["formed_systems"] = int(np.isfinite(ft).sum())
    out["systems"] = int(ft.size)
    out["formed_tick_median"] = float(np.nanmedian(ft)) if np.isfinite(ft).any() else None
    nv = float(ps["valleys"].sum())
    out["valley_health"] = float(ps["healthy_valleys"].sum() / nv) if nv > 0 else None
    out["valleys_per_record"] = nv
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _criteria(c: dict, cfg: dict) -> dict:
    """Issue 9's simulator checks for one candidate; each {"holds", "evidence"}."""
    s, off, lo, hi = c["schedule"], c["fields_off"], c["kappa=-1"], c["kappa=+1"]

    sd = max(x for x in (s["loss_late_sd"], off["loss_late_sd"], 0.0) if x is not None)
    d_loss, d_vio = s["loss_late"] - off["loss_late"], s["maxvio_late"] - off["maxvio_late"]
    ratio = lever_ratio(hi["exploration"], lo["exploration"])
    tol = cfg["maxvio_tolerance"]
    vh = s["valley_health"]
    pair = c["vs_fields_off"]
    return {
        "fields_earn_keep": claim(d_vio < 0 and d_loss <= sd,
                                f"MaxVio {s['maxvio_late']:.3f} vs {off['maxvio_late']:.3f} off "
                                f"(Δ {d_vio:+.3f}); loss Δ {d_loss:+.4f} (one sd over systems "
                                f"{sd:.4f}; paired by seed: {pair['loss']:+.4f} ± "
                                f"{pair['loss_sd'] or 0:.4f})"),
        "kappa_lever": claim(ratio >= cfg["min_exploration_ratio"]
                           and hi["maxvio_late"] <= lo["maxvio_late"] + tol,
                           f"exploration κ+1/κ−1 = {hi['exploration']:.3f}/{lo['exploration']:.3f}"
                           f" = {ratio:.1f}× (need ≥ {cfg['min_exploration_ratio']:g}×); MaxVio "
                           f"{hi['maxvio_late']:.3f} vs {lo['maxvio_late']:.3f} (tolerance "
                           f"{tol:g})"),
        "R_has_range": claim(s["R_span"] >= cfg["min_R_span"],
                           f"R 10–90 % {s['R_p10']:.2f}–{s['R_p90']:.2f} (span "
                           f"{s['R_span']:.2f}, need ≥ {cfg['min_R_span']:g})"),
        "landscape_forms": claim(s["formed_systems"] == s["systems"],
                               f"var T̄_local passes {cfg['formed_variance']:g} in "
                               f"{s['formed_systems']}/{s['systems']} systems (median tick "
                               f"{s['formed_tick_median']})"),
        "valleys_healthy": claim(None if vh is None else vh >= cfg["min_valley_health"],
                               f"valley health {vh if vh is None else round(vh, 3)} (need ≥ "
                               f"{cfg['min_valley_health']:g})"),
    }


def analyse(cfg: dict, store, out) -> tuple[dict, list]:
    """Per candidate and condition, the numbers, the criteria, the tables and the figures."""
    from ..store import trajectory_arrays
    from .calibrate_report import figures, markdown
    ds = store.dataset("")
    names = [c["name"] for c in cfg["resolved"]["candidates"]]
    rows = []
    for i, name in enumerate(names):
        row = {"candidate": name, "controller": cfg["resolved"]["candidates"][i]["controller"],
               **cfg["notes"][name]}
        ps = {cond: per_system(trajectory_arrays(ds.isel(candidate=i, condition=j), _FIELDS),
                               cfg) for j, cond in enumerate(CONDITIONS)}
        for cond in CONDITIONS:
            row[cond] = summarise(ps[cond])
        lo, hi = row["kappa=-1"], row["kappa=+1"]
        row["lever"] = {
            "exploration_ratio": _finite_or_none(lever_ratio(hi["exploration"],
                                                             lo["exploration"])),
            "maxvio_plus_minus_minus": hi["maxvio_late"] - lo["maxvio_late"],
            "loss_plus_minus_minus": hi["loss_late"] - lo["loss_late"],
            "R_plus_minus_minus": hi["R_mean"] - lo["R_mean"]}
        # paired by system (the same seeds): mean and sd over systems of the difference
        row["vs_fields_off"] = {}
        for key, k in (("maxvio", "maxvio_late"), ("maxvio_global", "maxvio_global_late"),
                       ("loss", "loss_late")):
            m, sd = _mean_sd(ps["schedule"][k] - ps["fields_off"][k])
            row["vs_fields_off"][key], row["vs_fields_off"][f"{key}_sd"] = m, sd
        row["criteria"] = _criteria(row, cfg)
        row["criteria_met"] = sum(bool(c["holds"]) for c in row["criteria"].values())
        rows.append(row)
    real = load_real_text(cfg["real_text"]) if cfg["real_text"] else None
    if real is not None:
        for row in rows:
            row["real_text"] = real.get(row["candidate"])
    ranked = sorted(rows, key=lambda r: (-r["criteria_met"], r["schedule"]["maxvio_late"]))
    headline = [
        f"{r['candidate']}: {r['criteria_met']}/5 criteria; loss {r['schedule']['loss_late']:.3f}"
        f" (Δoff {r['vs_fields_off']['loss']:+.3f}), MaxVio {r['schedule']['maxvio_late']:.3f} "
        f"(Δoff {r['vs_fields_off']['maxvio']:+.3f}), explored "
        f"{r['schedule']['exploration']:.3f}, R {r['schedule']['R_mean']:.2f} "
        f"[{r['schedule']['R_p10']:.2f}–{r['schedule']['R_p90']:.2f}], landscape "
        f"{r['schedule']['formed_systems']}/{r['schedule']['systems']}, valley health "
        f"{_fmt(r['schedule']['valley_health'])}, κ lever "
        f"×{_fmt(r['lever']['exploration_ratio'], '{:.1f}')}"
        for r in ranked]
    summary = {"conditions": list(CONDITIONS), "candidates": rows,
               "ranking": [r["candidate"] for r in ranked], "headline": headline,
               "real_text": None if real is None else {
                   "path": str(cfg["real_text"]),
                   "other_arms": {a: v for a, v in real.items() if a not in names}}}
    (Path(out) / "calibrate.md").write_text(markdown(summary, cfg), encoding="utf-8")
    return summary, figures(summary, cfg, Path(out))


def _fmt(v, fmt: str = "{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)
