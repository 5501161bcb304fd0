"""The invariant checker of the test kit (``chronomoe_dyn.testing`` re-exports it)."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from ..config import ControllerConfig
from ..law import TWO_PI, order_parameter, routing_fields
from ..state import ControllerState, RoutingObservation

__all__ = ["check_invariants", "assert_invariants", "bias_bound", "tbar_bounds"]

# ----------------------------------------------------------------------------------------------
# Invariant checker
# ----------------------------------------------------------------------------------------------

_TOL = 1e-12
"""Absolute slack for checks that compare recomputed floats (sums, products, recomputed targets).
Range and hull checks the law enforces with clips are exact."""


def bias_bound(config: ControllerConfig, kappa: float) -> float:
    """|bias| ≤ e^{β_p|κ|}·(k_P + lens_max): |P| ≤ 1 by its clip, |lens| ≤ lens_max by its
    clip, and e^{β_p κ} ≤ e^{β_p|κ|}."""
    return math.exp(config.beta_pressure * abs(kappa)) \
        * (config.pressure_gain + config.lens_max)


def tbar_bounds(config: ControllerConfig) -> tuple[float, float]:
    """Hull of the structural temperatures of any reachable state: they start at 1 and are EMAs
    of T_fast ∈ [T_min, T_max] (T̄_global of its layer mean), so they stay in
    [min(1, T_min), max(1, T_max)]."""
    return min(1.0, config.T_min), max(1.0, config.T_max)


def _outside(x: np.ndarray, lo, hi, tol: float = 0.0) -> np.ndarray:
    return (x < np.asarray(lo) - tol) | (x > np.asarray(hi) + tol)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _range(v: list, name: str, x: np.ndarray, lo, hi, tol: float = 0.0) -> None:
    bad = _outside(x, lo, hi, tol)
    if np.any(bad):
        idx = _first(bad)
        lo_i = np.broadcast_to(lo, x.shape)[idx]
        hi_i = np.broadcast_to(hi, x.shape)[idx]
        v.append(f"{name}{list(idx)}={x[idx]!r} outside [{lo_i!r}, {hi_i!r}] "
                 f"({int(bad.sum())} entries)")


def _unchanged(v: list, name: str, new: np.ndarray, old: np.ndarray, why: str) -> None:
    if not np.array_equal(new, old):
        v.append(f"{name} changed on a tick that is not a {why} tick")


def check_invariants(state: ControllerState, config: ControllerConfig,
                     prev: ControllerState | None = None, obs: RoutingObservation | None = None,
                     kappa: float | None = None) -> list[str]:
    """Violations of the controller's invariants, as messages (empty list: all hold).

    ``prev``: the state ``state`` was stepped from; ``obs``/``kappa``: that step's inputs (they
    are only used together with ``prev``)."""
    v: list[str] = []
    cfg = config
    L, E = state.theta_LE.shape if np.ndim(state.theta_LE) == 2 else (None, None)
    if L is None:
        return [f"theta_LE has shape {np.shape(state.theta_LE)}, expected [L, E]"]
    for f in fields(ControllerState):
        x = getattr(state, f.name)
        if isinstance(x, np.ndarray):
            want = (L,) if f.name == "logit_scale_L" else (L, E)
            if x.shape != want:
                v.append(f"{f.name} has shape {x.shape}, expected {want}")
            elif not np.all(np.isfinite(x)):
                v.append(f"{f.name} has non-finite entries at {_first(~np.isfinite(x))}")
        elif f.name not in ("tick", "seed") and not math.isfinite(x):
            v.append(f"{f.name}={x!r} is not finite")
    if v:
        return v  # shapes or NaNs: the checks below would only repeat them

    # Phases and coherence.
    _range(v, "theta_LE", state.theta_LE, 0.0, np.nextafter(TWO_PI, 0.0))
    if not 0.0 <= state.R <= 1.0:
        v.append(f"R={state.R!r} outside [0, 1]")
    if not -math.pi <= state.psi <= math.pi:
        v.append(f"psi={state.psi!r} outside [-π, π]")
    R_th, psi_th = order_parameter(state.theta_LE)
    if abs(R_th - state.R) > _TOL:
        v.append(f"R={state.R!r} but order_parameter(theta_LE) gives {R_th!r}")
    if R_th > 1e-6 and abs(math.remainder(psi_th - state.psi, TWO_PI)) > 1e-9:
        v.append(f"psi={state.psi!r} but order_parameter(theta_LE) gives {psi_th!r}")
    if not -1.0 <= state.dR <= 1.0:
        v.append(f"dR={state.dR!r} outside [-1, 1]")

    # Usage on the simplex, reliability a probability, drift bounded with zero row sums.
    u = state.usage_LE
    _range(v, "usage_LE", u, 0.0, 1.0)
    sums = u.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _TOL * E):
        i = int(np.argmax(np.abs(sums - 1.0)))
        v.append(f"usage_LE row {i} sums to {sums[i]!r}, not 1 (off the simplex)")
    _range(v, "reliability_LE", state.reliability_LE, 0.0, 1.0)
    _range(v, "logit_scale_L", state.logit_scale_L, 0.0, np.inf)

    # Pressure, lens, temperatures.
    _range(v, "pressure_LE", state.pressure_LE, -1.0, 1.0)
    _range(v, "lens_LE", state.lens_LE, -cfg.lens_max, cfg.lens_max)
    _range(v, "T_fast_LE", state.T_fast_LE, cfg.T_min, cfg.T_max)
    lo, hi = tbar_bounds(cfg)
    _range(v, "Tbar_local_LE", state.Tbar_local_LE, lo, hi)
    if not lo <= state.Tbar_global <= hi:
        v.append(f"Tbar_global={state.Tbar_global!r} outside [{lo!r}, {hi!r}]")
    T_eff = state.T_fast_LE * state.Tbar_global * state.Tbar_local_LE
    if not np.allclose(state.T_eff_LE, T_eff, rtol=_TOL, atol=0.0):
        v.append("T_eff_LE != T_fast_LE · Tbar_global · Tbar_local_LE")
    if not -1.0 <= state.kappa <= 1.0:
        v.append(f"kappa={state.kappa!r} outside [-1, 1]")

    # What the router receives.
    f = routing_fields(state, cfg)
    if not all(np.all(np.isfinite(x)) for x in f):
        v.append("routing_fields returned non-finite values")
    else:
        bb = bias_bound(cfg, state.kappa)
        _range(v, "bias", f.bias_LE, -bb * (1 + _TOL), bb * (1 + _TOL))
        _range(v, "temperature", f.temperature_LE, cfg.routing_T_min, cfg.routing_T_max)
        _range(v, "scale", f.scale_L, cfg.logit_scale_floor, np.inf)
        tau = cfg.exploration_tau0 * math.exp(cfg.beta_tau * state.kappa)
        if not f.tau == tau:
            v.append(f"tau={f.tau!r}, expected τ₀·e^(β_τ κ) = {tau!r}")

    if prev is not None:
        _check_transition(v, state, cfg, prev, obs, kappa)
    return v


def _check_transition(v: list, state: ControllerState, cfg: ControllerConfig,
                      prev: ControllerState, obs: RoutingObservation | None,
                      kappa: float | None) -> None:
    L, E = state.num_layers, state.num_experts
    if prev.theta_LE.shape != (L, E):
        v.append(f"prev has shape {prev.theta_LE.shape}, state {(L, E)}")
        return
    if state.tick != prev.tick + 1:
        v.append(f"tick went {prev.tick} -> {state.tick}, expected +1")
    if state.seed != prev.seed:
        v.append(f"seed changed {prev.seed} -> {state.seed}")
    if not np.array_equal(state.omega_disorder_LE, prev.omega_disorder_LE):
        v.append("omega_disorder_LE changed (it is fixed at init)")
    if state.dR != state.R - prev.R:
        v.append(f"dR={state.dR!r} != R - prev.R = {state.R - prev.R!r}")

    micro = state.tick % cfg.micro_period == 0
    macro = state.tick % cfg.macro_period == 0
    lens_tick = macro if cfg.lens_clock == "macro" else micro
    if not micro:
        for name in ("T_fast_LE", "pressure_LE", "Tbar_local_LE", "Tbar_global", "T_eff_LE"):
            _unchanged(v, name, getattr(state, name), getattr(prev, name), "micro")
    else:
        # T̄_global: EMA of the mean over layers and experts of the T_fast before this tick.
        inp = float(prev.T_fast_LE.mean())
        g_lo, g_hi = min(prev.Tbar_global, inp), max(prev.Tbar_global, inp)
        if not g_lo - _TOL <= state.Tbar_global <= g_hi + _TOL:
            v.append(f"Tbar_global={state.Tbar_global!r} outside the hull of its old value "
                     f"{prev.Tbar_global!r} and its input {inp!r}")
        _range(v, "Tbar_local_LE (hull of old value and T_fast)", state.Tbar_local_LE,
               np.minimum(prev.Tbar_local_LE, state.T_fast_LE),
               np.maximum(prev.Tbar_local_LE, state.T_fast_LE))
        # Under-used experts get positive pressure, over-used negative.
        gap = 1.0 / E - state.usage_LE / state.usage_LE.sum(axis=1, keepdims=True)
        wrong = (np.abs(gap) > _TOL) & (np.sign(state.pressure_LE) != np.sign(gap))
        if np.any(wrong):
            v.append(f"pressure_LE{list(_first(wrong))} has the wrong sign for its usage")
    if not lens_tick:
        _unchanged(v, "lens_LE", state.lens_LE, prev.lens_LE, f"lens ({cfg.lens_clock})")
    else:
        dl = state.lens_LE - prev.lens_LE
        step_max = cfg.lens_rate * math.exp(cfg.beta_lens * state.kappa) \
            * np.abs(state.pressure_LE)
        if np.any(np.abs(dl) > step_max * (1 + _TOL) + _TOL):
            v.append("lens_LE moved by more than lens_rate·e^{β_A κ}·|P| on a lens tick")
        if np.any(dl * state.pressure_LE < 0):
            v.append("lens_LE moved against the sign of the pressure")
    if kappa is not None:
        lo, hi = min(prev.kappa, kappa), max(prev.kappa, kappa)
        if not lo <= state.kappa <= hi:
            v.append(f"kappa={state.kappa!r} outside the hull of prev.kappa={prev.kappa!r} "
                     f"and the input {kappa!r}")
    if obs is not None:
        _check_observation_response(v, state, cfg, prev, obs)


def _check_observation_response(v: list, state: ControllerState, cfg: ControllerConfig,
                                prev: ControllerState, obs: RoutingObservation) -> None:
    E = state.num_experts
    counts = np.asarray(obs.counts, dtype=np.float64)
    # law v2.1: usage, drift and σ_L read the router's choice (the noiseless counts, when the
    # observation has them); reliability reads the routed counts its losses belong to.
    choice = counts if obs.noiseless_counts is None else \
        np.asarray(obs.noiseless_counts, dtype=np.float64)
    tot = choice.sum(axis=1, keepdims=True)
    active = (tot > 0)[:, 0]
    for i in np.flatnonzero(~active):
        for name in ("usage_LE", "logit_scale_L"):
            if not np.array_equal(getattr(state, name)[i], getattr(prev, name)[i]):
                v.append(f"{name}[{i}] changed although layer {i} saw no tokens")
        if counts[i].sum() == 0 and not np.array_equal(state.reliability_LE[i],
                                                       prev.reliability_LE[i]):
            v.append(f"reliability_LE[{i}] changed although layer {i} saw no tokens")
        if np.any(state.delta_LE[i] != 0.0):
            v.append(f"delta_LE[{i}] is nonzero although layer {i} saw no tokens")
    if obs.logit_scale is None and not np.array_equal(state.logit_scale_L, prev.logit_scale_L):
        v.append("logit_scale_L changed although the observation has no logit scale")
    if obs.logit_scale is not None:
        obs_s = np.asarray(obs.logit_scale, dtype=np.float64)
        for i in np.flatnonzero(active):
            old, new, x = prev.logit_scale_L[i], state.logit_scale_L[i], obs_s[i]
            if old == 0.0 and new != x:
                v.append(f"logit_scale_L[{i}]={new!r}: the first observation {x!r} must set it")
            elif old != 0.0 and not min(old, x) <= new <= max(old, x):
                v.append(f"logit_scale_L[{i}]={new!r} outside the hull of its old value "
                         f"{old!r} and the observed {x!r}")
    if not np.any(active):
        return
    n = tot[active]
    frac = choice[active] / n
    u_old, u_new = prev.usage_LE[active], state.usage_LE[active]
    _range(v, "usage_LE (hull of old value and chosen fractions)", u_new,
           np.minimum(u_old, frac), np.maximum(u_old, frac))
    # z-scored drift, written from DESIGN.md §3.2 independently of the law's code
    want = (frac - u_old) / np.sqrt(np.maximum(u_old * (1.0 - u_old), 1.0 / E**2) / n)
    if not np.allclose(state.delta_LE[active], want, rtol=1e-12, atol=_TOL):
        v.append("delta_LE != (frac − u_old)/sqrt(max(u_old(1 − u_old), 1/E²)/n) on the layers "
                 "that saw tokens (frac, n: the noiseless counts when given)")

    # Reliability: experts without (routed) tokens keep s; the others move toward the target
    # of DESIGN.md §3.3 and stay in the hull of the old s and that target.
    seen = counts > 0
    s_old, s_new = prev.reliability_LE, state.reliability_LE
    if np.any((~seen) & (s_new != s_old)):
        v.append(f"reliability_LE{list(_first((~seen) & (s_new != s_old)))} changed although "
                 f"that expert got no tokens")
    target = _reliability_target(counts, obs.loss_sum, state.usage_LE, cfg.reliability_sharpness)
    lo, hi = np.minimum(s_old, target), np.maximum(s_old, target)
    bad = seen & _outside(s_new, lo, hi, _TOL)
    if np.any(bad):
        idx = _first(bad)
        v.append(f"reliability_LE{list(idx)}={s_new[idx]!r} outside the hull of its old value "
                 f"{s_old[idx]!r} and its target {target[idx]!r}")


def _reliability_target(counts: np.ndarray, loss, usage_new: np.ndarray,
                        sharpness: float) -> np.ndarray:
    """Target reliability, written from DESIGN.md §3.3 independently of the law's code:
    σ(sharp·(m̄ − m_e)/m̄) with m_e = loss_e/count_e and m̄ = Σloss/Σcount (0.5 when m̄ = 0), or
    the usage proxy u/max(u) on the updated usage."""
    if loss is None:
        return usage_new / usage_new.max(axis=1, keepdims=True)
    loss = np.asarray(loss, dtype=np.float64)
    out = np.full(counts.shape, 0.5)
    for i in range(counts.shape[0]):
        mbar = loss[i].sum() / counts[i].sum() if counts[i].sum() > 0 else 0.0
        for e in range(counts.shape[1]):
            if counts[i, e] > 0 and mbar > 0:
                x = sharpness * (mbar - loss[i, e] / counts[i, e]) / mbar
                out[i, e] = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else \
                    math.exp(x) / (1.0 + math.exp(x))
    return out


def assert_invariants(state: ControllerState, config: ControllerConfig,
                      prev: ControllerState | None = None, obs: RoutingObservation | None = None,
                      kappa: float | None = None) -> None:
    """Raise AssertionError listing every violated invariant (see ``check_invariants``)."""
    violations = check_invariants(state, config, prev=prev, obs=obs, kappa=kappa)
    if violations:
        raise AssertionError(f"{len(violations)} controller invariant(s) violated at tick "
                             f"{state.tick}:\n  - " + "\n  - ".join(violations))
