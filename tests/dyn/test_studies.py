"""The four studies, each in its quick form into tmp_path: files, config, and numbers that are
finite and physically sensible."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from chronomoe_dyn.studies import get_study
from chronomoe_dyn.studies.common import first_sustained, in_range_fraction, resolve_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(name, tmp_path, **kw):
    out = tmp_path / name
    summary = get_study(name).main(out_dir=out, quick=True, seed=0, progress=False, **kw)
    on_disk = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert on_disk["study"] == name and config["quick"] is True and config["seed"] == 0
    assert summary["figures"], "no figures"
    for f in summary["figures"]:
        data = open(f, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, f
    assert summary["headline"] and all(isinstance(x, str) for x in summary["headline"])
    return on_disk, config, out


def _finite(*xs):
    return all(x is not None and math.isfinite(x) for x in xs)


def test_kuramoto_study_matches_the_analytic_curve(tmp_path):
    s, cfg, out = _run("kuramoto", tmp_path)
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


def test_phases_study(tmp_path):
    s, cfg, out = _run("phases", tmp_path)
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
    for c in s["claims"].values():
        assert c["holds"] in (True, False, None) and isinstance(c["evidence"], str)
    f = s["formation"]
    assert f["num_systems"] == cfg["num_systems"]
    assert len(f["tick_local_mean_per_system"]) == f["num_systems"]
    # κ drives exploration (v2): κ = 0.5 in warm-up explores more than κ < 0 at the end
    assert s["phases"]["exploration"]["exploration_mean"] > \
        s["phases"]["exploitation"]["exploration_mean"]


def test_valley_repair_study(tmp_path):
    s, cfg, out = _run("valley-repair", tmp_path)
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


def test_valley_repair_ema_estimate_known_answers():
    from chronomoe_dyn.studies.valley_repair import ema_estimate
    # gap halves: ln 2 / −ln(0.99) micro ticks of 5 ticks
    assert ema_estimate(2.0, 1.0, 1.5, 0.01, 5) == pytest.approx(5 * math.log(2) / -math.log(0.99))
    assert ema_estimate(2.0, 1.6, 1.5, 0.01, 5) == 0.0          # not a valley any more
    assert ema_estimate(1.4, 1.0, 1.5, 0.01, 5) == math.inf     # never fills
    # ∝ 1/η for small η
    assert ema_estimate(2, 1, 1.5, 0.001, 5) / ema_estimate(2, 1, 1.5, 0.002, 5) == \
        pytest.approx(2.0, rel=2e-3)


def test_sweep_study(tmp_path):
    s, cfg, out = _run("sweep", tmp_path)
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


def test_overrides_and_quick_resolution():
    base = {"a": 1, "sec": {"b": 2, "c": [1, 2]}}
    cfg = resolve_config(base, {"a": 5}, True, {"sec.b": 7})
    assert cfg == {"a": 5, "sec": {"b": 7, "c": [1, 2]}} and base["sec"]["b"] == 2
    with pytest.raises(ValueError, match="unknown config key 'sec.zz'"):
        resolve_config(base, overrides={"sec.zz": 1})
    with pytest.raises(ValueError, match="is a section"):
        resolve_config(base, overrides={"sec": 3})


def test_study_override_reaches_the_simulation(tmp_path):
    s, cfg, _ = _run("sweep", tmp_path, overrides={"kappa": [0.0], "coupling": [0.0],
                                                   "ticks": 100, "record_every": 10})
    assert cfg["ticks"] == 100 and s["kappa"] == [0.0] and s["coupling"] == [0.0]
    # K = 0: no coupling, so R stays near the incoherent level of 32 oscillators
    assert s["grids"]["R"][0][0] < 0.5


def test_helpers():
    assert in_range_fraction(np.array([0.1, 0.5, np.nan, 0.9]), 0.3, 0.8) == pytest.approx(1 / 3)
    assert math.isnan(in_range_fraction(np.array([np.nan]), 0, 1))
    assert first_sustained(np.array([1, 0, 1, 1, 1, 0], bool), 3) == 2
    assert first_sustained(np.array([1, 0, 1, 1, 0], bool), 3) is None
