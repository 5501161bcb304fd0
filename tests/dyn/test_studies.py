"""The studies in their quick form, each run once into a temporary folder: files, config,
physically sensible numbers, and the headline numbers, recomputed here from the study's zarr
store and compared with the values measured when the study was written.

Tolerances of the headline numbers. The simulator is deterministic (counter RNG, fixed seeds):
on these configs the NumPy reference and the Numba kernel, which differ only in rounding, give
the same routing choices and agree to 1e-13 in every recorded number (measured on the quick
phases config: schedule, κ ≡ +1, fields off). So a number that moves by more than its tolerance
means the law, a constant, the environment or the analysis changed, and the README's figures
must be re-measured (``studies/run_all.sh``). Each tolerance is about a fifth of the smallest
difference the study's claims rest on (at the provisional constants the κ controls differed
from the schedule by ≥ 0.1 in R and ≥ 0.2 in exploration): tight enough that a claim cannot
silently flip, loose enough to let a rounding-level near-tie on another platform pass. The
headline numbers were re-measured at the calibrated defaults (drift_gain 0.1, pressure_gain 2,
beta_drift 0.1, beta_reliability 0.8, reliability_sharpness 8) on 2026-12-05, tolerances
unchanged. With these constants R locks near its ceiling in every condition, so the κ controls
now differ from the schedule by ≥ 0.21 in exploration (quick phases) but by ≤ 0.039 in R: the
phases claim that rests on R (``phases_driven_by_kappa``: |ΔR| > 0.05) is 0.011 from its
threshold, closer than the R tolerance, so the tests assert that claim's verdict directly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr

from chronomoe_dyn import ControllerConfig
from chronomoe_dyn.studies import get_study
from chronomoe_dyn.studies.common import first_sustained, in_range_fraction, resolve_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, out, **kw):
    summary = get_study(name).main(out_dir=out, quick=True, seed=0, progress=False, **kw)
    on_disk = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert on_disk["study"] == name and config["quick"] is True and config["seed"] == 0
    assert summary["figures"], "no figures"
    for f in summary["figures"]:
        data = open(f, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, f
    assert summary["headline"] and all(isinstance(x, str) for x in summary["headline"])
    for c in on_disk.get("claims", {}).values():
        assert c["holds"] in (True, False, None) and isinstance(c["evidence"], str)
    return on_disk, config, out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """name -> (summary, config, out) of each quick study, run once for this module."""
    done: dict = {}

    def get(name):
        if name not in done:
            done[name] = _run(name, tmp_path_factory.mktemp(name.replace("-", "_")))
        return done[name]
    return get


def _open(out, name, group=None):
    return xr.open_zarr(out / f"{name}.zarr", group=group, consolidated=False, chunks=None)


def _finite(*xs):
    return all(x is not None and math.isfinite(x) for x in xs)


def _near(got, want, tol, what):
    assert abs(got - want) <= tol, f"{what}: {got:.6g}, measured {want:.6g} (tolerance {tol})"


# ---- kuramoto ---------------------------------------------------------------------------------

def test_kuramoto_study_matches_the_analytic_curve(quick):
    s, cfg, out = quick("kuramoto")
    assert {p.name for p in out.glob("*.png")} == {"R_vs_K.png", "R_time.png"}
    for N, entry in s["lorentzian"].items():
        K = np.array(entry["K"])
        R = np.array(entry["R_sim"])
        assert np.all((R >= 0) & (R <= 1))
        assert entry["max_abs_error_far"] < 0.03, (N, entry)        # K ≥ 1.5 K_c
        i = int(np.argmin(np.abs(K - 2.0)))                          # K/K_c = 2: R = 1/√2
        assert abs(R[i] - math.sqrt(0.5)) < 0.03
        assert R[K < 1.0].max() < 0.25                               # incoherent below K_c
    small, big = sorted(s["lorentzian"], key=int)[:2]
    # below K_c R shrinks with N
    assert s["lorentzian"][big]["R_sim"][0] < s["lorentzian"][small]["R_sim"][0]
    cd = s["controller_default"]
    assert 0.9 < cd["R_theory_N_inf"] < 1.0 and _finite(cd["R_sim_N32"])
    assert all(c["holds"] for c in s["claims"].values()), s["claims"]


def test_kuramoto_quick_headline_numbers(quick):
    """Stationary R recomputed from the store (mean over systems of R over the second half)
    against the measured values. Tolerance 0.005: the finite-N fluctuation of a two-system mean
    is ≈ 0.01 at N = 200, but the run is deterministic, so only a change of the integrator or
    of the frequencies moves it; the claim it supports has tolerance 0.03."""
    s, cfg, out = quick("kuramoto")
    ds = _open(out, "kuramoto", "lorentzian")
    R = ds["R"].values                                  # [N, K, system, step]
    half = R[..., R.shape[-1] // 2:].mean(-1).mean(-1)  # [N, K]
    Ns, Ks = list(ds["N"].values), list(ds["K"].values)
    for N, entry in s["lorentzian"].items():
        np.testing.assert_allclose(half[Ns.index(int(N))], entry["R_sim"], rtol=0, atol=1e-12)
    measured = {(1000, 2.0): 0.7022, (1000, 3.0): 0.8123, (200, 0.5): 0.0976}
    for (N, K), want in measured.items():
        _near(float(half[Ns.index(N), Ks.index(K)]), want, 0.005, f"R(N={N}, K={K})")
    _near(s["controller_default"]["R_sim_N32"], 0.9794, 0.005, "controller R at N=32")


def test_kuramoto_gaussian_self_consistency_known_values():
    from chronomoe_dyn.studies.kuramoto import gaussian_R, lorentzian_R
    sigma = 0.05
    Kc = sigma * math.sqrt(8 / math.pi)
    assert gaussian_R(0.95 * Kc, sigma) == 0.0
    # near K_c: R ≈ sqrt(16 (K − K_c) / (π K_c⁴ |g''(0)|)), g''(0) = −1/(σ³ sqrt(2π))
    K = 1.01 * Kc
    g2 = 1.0 / (sigma ** 3 * math.sqrt(2 * math.pi))
    expected = math.sqrt(16 * (K - Kc) / (math.pi * Kc ** 4 * g2))
    assert gaussian_R(K, sigma) == pytest.approx(expected, rel=0.05)
    assert gaussian_R(10.0, sigma) > 0.99
    np.testing.assert_allclose(lorentzian_R([0.5, 1.0, 2.0, 4.0], 0.5),
                               [0.0, 0.0, math.sqrt(0.5), math.sqrt(0.75)])


# ---- phases -----------------------------------------------------------------------------------

def test_phases_study(quick):
    s, cfg, out = quick("phases")
    assert (out / "phases.png").is_file() and (out / "healthy_fractions.png").is_file()
    assert (out / "run" / "tbar_snapshots.png").is_file() and (out / "run" / "load.png").is_file()
    assert set(s["phases"]) == {"exploration", "formation", "exploitation"}
    assert cfg["resolved"]["schedule"]["kind"] == "cosine"
    for name, ph in s["phases"].items():
        assert ph is not None, name
        assert _finite(ph["kappa_mean"], ph["R_mean"], ph["var_local_mean"], ph["gate_mean"],
                       ph["loss_mean"], ph["exploration_mean"], ph["maxvio_mean"],
                       ph["tbar_global_mean"])
        assert 0 <= ph["R_mean"] <= 1 and 0.5 <= ph["gate_mean"] <= 1  # gate = 1 − 0.5(1 − g)
        assert ph["var_local_mean"] >= 0 and 0 <= ph["exploration_mean"] <= 1
        for k, v in ph["healthy_fraction"].items():
            assert v is None or 0.0 <= v <= 1.0, (name, k, v)
    # κ follows the schedule: 0.5 in warm-up, below 0 by the end
    assert abs(s["phases"]["exploration"]["kappa_mean"] - 0.5) < 1e-9
    assert s["phases"]["exploitation"]["kappa_mean"] < 0
    assert s["claims"]["exploration_kappa_high"]["holds"] is True
    assert s["claims"]["exploitation_kappa_low"]["holds"] is True
    f = s["formation"]
    assert f["num_systems"] == cfg["num_systems"]
    assert len(f["tick_local_mean_per_system"]) == f["num_systems"]
    assert set(s["controls"]) == {"κ≡+0.5", "κ≡-0.3", "κ≡+1", "κ≡-1", "fields off"}
    # κ ≡ 0.5 equals the schedule during its warm-up (κ = 0.5 there): same seeds, same bits
    assert s["controls"]["κ≡+0.5"]["phases"]["exploration"]["R_schedule_minus_control"] == 0.0


def test_phases_quick_headline_numbers(quick):
    """Per-phase means and the controls, recomputed from the store, against the measured values;
    and the control claims as the data decide them. Tolerances: R 0.02, explored share 0.01,
    MaxVio 0.02 (module docstring). Re-measured at the calibrated defaults on 2026-12-05 (old →
    new): R exploration 0.2417 → 0.8323, exploitation 0.2707 → 0.9353; explored 0.3049 →
    0.2840, 0.1589 → 0.1206; MaxVio 0.7092 → 0.7227, 0.6811 → 0.6944; κ≡+1 R 0.7462 → 0.9430,
    explored 0.5188 → 0.5391, MaxVio 0.4206 → 0.3985; κ≡−1 R 0.2251 → 0.8919, explored 0.0302
    → 0.0240, MaxVio 0.8121 → 0.8204; fields off MaxVio 0.8848 (unchanged: the ablation routes
    without the fields, and the constants that changed act only through them).
    Re-measured for law v2.1 (noiseless counts, β_p 0) on 2026-12-05 (v2 → v2.1): R exploration
    0.8323 → 0.8108, exploitation 0.9353 → 0.9322; explored 0.2840 → 0.2873, 0.1206 → 0.1218;
    MaxVio 0.7227 → 0.7194, 0.6944 → 0.6831; κ≡+1 R 0.9430 → 0.8891, explored 0.5391 →
    0.5486, MaxVio 0.3985 → 0.3777; κ≡−1 R 0.8919 → 0.8914, explored 0.0240 → 0.0242, MaxVio
    0.8204 → 0.7978; fields off unchanged (0.8848).
    Claims: ``phases_driven_by_kappa`` no longer holds (largest |ΔR| between the schedule and a
    constant κ 0.039, tolerance 0.05; provisional constants: it held): R is near its ceiling
    whatever κ does. The controls still differ (exploration ≥ 0.21, loss up to 0.34)."""
    s, cfg, out = quick("phases")
    sch = _open(out, "phases", "scheduled")
    tick = sch["tick"].values
    warm, total = cfg["resolved"]["schedule"]["warmup_steps"], cfg["ticks"]
    windows = {"exploration": tick <= warm, "exploitation": tick > 0.7 * total}
    R, ex = sch["R"].values, sch["exploration"].values
    vio = sch["maxvio"].values.mean(-1)
    for ph, mk in windows.items():
        for key, a in (("R_mean", R), ("exploration_mean", ex), ("maxvio_mean", vio)):
            assert float(a[:, mk].mean()) == pytest.approx(s["phases"][ph][key], abs=1e-12)
    measured = {("exploration", "R"): 0.8108, ("exploitation", "R"): 0.9322,
                ("exploration", "exploration"): 0.2873, ("exploitation", "exploration"): 0.1218,
                ("exploration", "maxvio"): 0.7194, ("exploitation", "maxvio"): 0.6831}
    tol = {"R": 0.02, "exploration": 0.01, "maxvio": 0.02}
    arrays = {"R": R, "exploration": ex, "maxvio": vio}
    for (ph, key), want in measured.items():
        _near(float(arrays[key][:, windows[ph]].mean()), want, tol[key], f"{ph} {key}")

    ctl = _open(out, "phases", "controls")
    kap = [float(k) for k in ctl["kappa_const"].values]
    run = {k: {"R": float(ctl["R"].values[i].mean()),
               "exploration": float(ctl["exploration"].values[i].mean()),
               "maxvio": float(ctl["maxvio"].values[i].mean())} for i, k in enumerate(kap)}
    for k, got in run.items():
        for key, v in got.items():
            assert v == pytest.approx(s["controls"][f"κ≡{k:+g}"]["run"][key], abs=1e-12)
    measured_ctl = {(1.0, "R"): 0.8891, (-1.0, "R"): 0.8914, (1.0, "exploration"): 0.5486,
                    (-1.0, "exploration"): 0.0242, (1.0, "maxvio"): 0.3777,
                    (-1.0, "maxvio"): 0.7978}
    for (k, key), want in measured_ctl.items():
        _near(run[k][key], want, tol[key], f"κ≡{k:+g} {key}")
    abl = _open(out, "phases", "ablation")
    assert np.all(abl["exploration"].values == 0.0)          # no noise without the fields
    _near(float(abl["maxvio"].values.mean()), 0.8848, tol["maxvio"], "fields off MaxVio")
    c = s["claims"]
    assert c["kappa_controls_differ"]["holds"] is True          # v1: they did not
    # R-based: held at the provisional constants; now R sits near its ceiling (docstring)
    assert c["phases_driven_by_kappa"]["holds"] is False
    assert c["exploration_rises_with_kappa"]["holds"] is True
    assert c["kappa_lever_3x"]["holds"] is True
    assert c["balance_no_worse_as_kappa_rises"]["holds"] is True
    assert c["fields_change_routing"]["holds"] is True
    assert c["fields_lower_maxvio"]["holds"] is True
    # the finding: heavy exploration RAISES R in the simulator (the seed expects low R)
    assert c["high_kappa_lowers_R"]["holds"] is False


# ---- valley-repair ----------------------------------------------------------------------------

def test_valley_repair_study(quick):
    s, cfg, out = quick("valley-repair")
    cells = s["cells"]
    assert len(cells) == len(cfg["beta_reliability"]) * len(cfg["eta_structural_T_local"])
    assert s["samples_total"] >= 1, "expert 0 was never a valley: nothing measured"
    for c in cells:
        assert c["filled"] + c["censored"] == c["n"] <= c["pairs"]
        if c["filled"]:
            assert 0 < c["q25"] <= c["median"] <= c["q75"]
            # a repaired valley fills no faster than one micro tick and within the run
            assert 5 <= c["median"] <= s["post_collapse_ticks"] or math.isinf(c["median"])
    assert (out / "repair_vs_beta.png").is_file() and (out / "repair_vs_eta.png").is_file()
    r = s["estimate_over_measured"]["median"]
    assert r is None or 0.1 < r < 10


def test_valley_repair_quick_headline_numbers(quick):
    """Repair times recomputed from the store for the default cell (the ControllerConfig
    defaults: β_reliability 0.8, η_local 0.01): for every (system, layer) where expert 0 was a
    valley just before the collapse, the first record after it where it is not. Tolerance 10
    ticks (two records); the EMA ratio within 0.05 (its claim allows ±0.25). Re-measured at the
    calibrated defaults on 2026-12-05 (old → new): the default cell moved from β 0.2 to 0.8
    with the default; median 160 → 55 ticks (4 valleys; the β 0.2 cell, now also at the other
    calibrated constants: 70); valleys 15 → 14, none censored; estimate / measured 1.009 →
    0.981. Claims: as before (``repair_scales_as_inverse_eta`` does not hold and is not
    asserted: slopes −0.24 and −0.44 against −1 ± 0.3)."""
    s, cfg, out = quick("valley-repair")
    ds = _open(out, "valley-repair")
    beta0, eta0 = (float(x) for x in cfg["default_cell"])
    i = list(ds["beta_reliability"].values).index(beta0)
    j = list(ds["eta_local"].values).index(eta0)
    valley = ds["valley_local"].values[i, j, :, :, :, cfg["collapse_expert"]]   # [B, T, L]
    tick = ds["tick"].values
    pre = int(np.searchsorted(tick, cfg["collapse_tick"] - 1))
    times = []
    for b in range(valley.shape[0]):
        for l in range(valley.shape[2]):
            if valley[b, pre, l]:
                after = np.flatnonzero(~valley[b, pre + 1:, l])
                times.append(float(tick[pre + 1 + after[0]] - tick[pre]) if after.size
                             else math.inf)
    cell = next(c for c in s["cells"] if (c["beta_reliability"], c["eta_local"]) == (beta0, eta0))
    assert len(times) == cell["n"] and sum(map(math.isfinite, times)) == cell["filled"]
    med = float(np.quantile(np.sort(times), 0.5, method="lower"))
    assert med == cell["median"]
    assert (beta0, eta0) == (ControllerConfig().beta_reliability,
                             ControllerConfig().eta_structural_T_local)
    _near(med, 55.0, 10.0, "median repair ticks at the defaults")
    assert (s["samples_total"], s["censored_total"]) == (14, 0)
    _near(s["estimate_over_measured"]["median"], 0.981, 0.05, "EMA estimate / measured")
    c = s["claims"]
    assert c["bad_valleys_fill"]["holds"] and c["ema_estimate_agrees"]["holds"]
    assert c["faster_with_eta"]["holds"] and c["faster_with_beta"]["holds"]


def test_valley_repair_ema_estimate_known_answers():
    from chronomoe_dyn.studies.valley_repair import ema_estimate
    # gap halves: ln 2 / −ln(0.99) micro ticks of 5 ticks
    assert ema_estimate(2.0, 1.0, 1.5, 0.01, 5) == pytest.approx(5 * math.log(2) / -math.log(0.99))
    assert ema_estimate(2.0, 1.6, 1.5, 0.01, 5) == 0.0          # not a valley any more
    assert ema_estimate(1.4, 1.0, 1.5, 0.01, 5) == math.inf     # never fills
    # ∝ 1/η for small η
    assert ema_estimate(2, 1, 1.5, 0.001, 5) / ema_estimate(2, 1, 1.5, 0.002, 5) == \
        pytest.approx(2.0, rel=2e-3)


# ---- sweep ------------------------------------------------------------------------------------

def test_sweep_study(quick):
    s, cfg, out = quick("sweep")
    g = s["grids"]
    shape = (len(cfg["coupling"]), len(cfg["kappa"]))
    for k in ("R", "var_local", "valleys_local", "exploration", "maxvio", "loss", "healthy"):
        a = np.array(g[k], dtype=float)
        assert a.shape == shape and np.all(np.isfinite(a)), k
    R = np.array(g["R"])
    assert np.all((R >= 0) & (R <= 1))
    # stronger coupling, more coherence (rows are K ascending), at every κ
    assert np.all(R[-1] > R[0])
    assert np.all(np.array(g["valleys_local"]) <= cfg.get("env", {}).get("num_experts", 8))
    # exploration rises with κ at every K (τ = τ₀·e^{β_τ κ}); columns are κ ascending
    assert np.all(np.diff(np.array(g["exploration"]), axis=1) > 0)
    assert {p.name for p in out.glob("*.png")} == {"sweep_heatmaps.png", "sweep_healthy.png"}


def test_sweep_quick_headline_numbers(quick):
    """Late means (last quarter of the records, then over systems) recomputed from the store,
    against the measured values. Tolerances as in the module docstring (R 0.02, explored
    share 0.01, MaxVio 0.02). Re-measured at the calibrated defaults on 2026-12-05 (old → new):
    R(K 2, κ 0.6) 0.8672 → 0.9862, R(K 0, κ 0) 0.1278 → 0.1745; explored (K 0, κ ±0.6) 0.4490 →
    0.5151 and 0.0646 → 0.0901; MaxVio (K 2, κ 0.6) 0.6648 → 0.6211, (K 0, κ −0.6) 0.7980 →
    0.7922. The asserted claims hold as before."""
    s, cfg, out = quick("sweep")
    ds = _open(out, "sweep")
    T = ds.sizes["tick"]
    late = slice(T - int(round(cfg["late_fraction"] * T)), T)
    R = ds["R"].values[..., late].mean((-1, -2))                        # [K, κ]
    ex = ds["exploration"].values[..., late].mean((-1, -2))
    vio = ds["maxvio"].values[..., late, :].mean((-1, -2, -3))
    np.testing.assert_allclose(R, s["grids"]["R"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ex, s["grids"]["exploration"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(vio, s["grids"]["maxvio"], rtol=0, atol=1e-12)
    Ks, kap = list(ds["coupling"].values), list(ds["kappa_const"].values)
    measured = {("R", 2.0, 0.6): 0.9862, ("R", 0.0, 0.0): 0.1745,
                ("exploration", 0.0, 0.6): 0.5151, ("exploration", 0.0, -0.6): 0.0901,
                ("maxvio", 2.0, 0.6): 0.6211, ("maxvio", 0.0, -0.6): 0.7922}
    arrays, tol = {"R": R, "exploration": ex, "maxvio": vio}, {"R": 0.02, "exploration": 0.01,
                                                              "maxvio": 0.02}
    for (key, K, k), want in measured.items():
        _near(float(arrays[key][Ks.index(K), kap.index(k)]), want, tol[key], f"{key} K={K} κ={k}")
    c = s["claims"]
    assert c["exploration_rises_with_kappa"]["holds"] and c["kappa_lever_3x"]["holds"]
    assert c["balance_no_worse_as_kappa_rises"]["holds"] and c["coupling_raises_R"]["holds"]


def test_overrides_and_quick_resolution():
    base = {"a": 1, "sec": {"b": 2, "c": [1, 2]}}
    cfg = resolve_config(base, {"a": 5}, True, {"sec.b": 7})
    assert cfg == {"a": 5, "sec": {"b": 7, "c": [1, 2]}} and base["sec"]["b"] == 2
    with pytest.raises(ValueError, match="unknown config key 'sec.zz'"):
        resolve_config(base, overrides={"sec.zz": 1})
    with pytest.raises(ValueError, match="is a section"):
        resolve_config(base, overrides={"sec": 3})


def test_study_override_reaches_the_simulation(tmp_path):
    s, cfg, _ = _run("sweep", tmp_path / "s", overrides={"kappa": [0.0], "coupling": [0.0],
                                                         "ticks": 100, "record_every": 10})
    assert cfg["ticks"] == 100 and s["kappa"] == [0.0] and s["coupling"] == [0.0]
    # K = 0: no coupling, so R stays near the incoherent level of 32 oscillators
    assert s["grids"]["R"][0][0] < 0.5


def test_helpers():
    assert in_range_fraction(np.array([0.1, 0.5, np.nan, 0.9]), 0.3, 0.8) == pytest.approx(1 / 3)
    assert math.isnan(in_range_fraction(np.array([np.nan]), 0, 1))
    assert first_sustained(np.array([1, 0, 1, 1, 1, 0], bool), 3) == 2
    assert first_sustained(np.array([1, 0, 1, 1, 0], bool), 3) is None


# ---- shared claim helpers ---------------------------------------------------------------------

def test_lever_ratio_is_never_a_vacuous_lever():
    """κ's lever (every study's claim): hi/lo, ∞ from zero exploration, 0 when both are 0 (a
    run set with no exploration at all must not pass a ≥ 3× lever)."""
    from chronomoe_dyn.studies.common import KAPPA_LEVER_RATIO, lever_ratio
    assert lever_ratio(0.6, 0.2) == pytest.approx(3.0)
    assert lever_ratio(0.6, 0.0) == math.inf
    assert lever_ratio(0.0, 0.0) == 0.0 and not lever_ratio(0.0, 0.0) >= KAPPA_LEVER_RATIO
    got = lever_ratio(np.array([0.6, 0.6, 0.0]), np.array([0.3, 0.0, 0.0]))
    assert got.tolist() == [2.0, math.inf, 0.0]
    assert isinstance(lever_ratio(1.0, 0.5), float)
