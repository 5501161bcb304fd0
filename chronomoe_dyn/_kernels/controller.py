"""The control law in Numba: ``law.step`` (``controller_step``) and ``law.routing_fields``
(``routing_fields_into``) on one system's arrays, in place.

Both follow the NumPy reference line by line, in the same operand order, with the same
hull-clipped EMA (``law.ema`` itself, compiled) and the same phase noise, so the two agree to
the rounding of the transcendental functions and of NumPy's pairwise sums (tested ≤ 1e-12).

The parameter record is derived from ``dataclasses.fields(ControllerConfig)`` (``ctrl_params``):
every field reaches the kernels under its own name, ints as ints, floats as floats, and a
string field as the index of its value in ``config.CHOICES`` (``lens_clock``: 0 macro, 1 micro).
A new ControllerConfig field is in the record without any change here; a test checks that every
field is read by a kernel, or is listed in ``HOST_ONLY_FIELDS`` with the reason.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import fields


from ..config import CHOICES, ControllerConfig
from ..law import DRIFT_EPS, LENS_DR_GAIN, ema
from ..rng import STREAM_PHASE
from .jit import helper, kernel
from .libm import TWO_PI, _hash_base, _normal_at

__all__ = ["CtrlParams", "ctrl_params", "controller_step", "routing_fields_into",
           "HOST_ONLY_FIELDS"]

CtrlParams = namedtuple("CtrlParams", [f.name for f in fields(ControllerConfig)])
"""ControllerConfig as a numba-friendly tuple with the same field names."""

HOST_ONLY_FIELDS: dict[str, str] = {
    "landscape_threshold_std": "landscape diagnostics: simulate computes the valley/ridge "
                               "masks from the records in NumPy (landscape.landscape_masks)",
    "unhealthy_reliability": "valley-health diagnostics, computed in NumPy (landscape.py)",
    "omega_disorder_std": "init_state draws the frequency disorder in NumPy; the kernels "
                          "receive it as an array",
}
"""The fields no kernel reads, and why (a test keeps this list exact)."""

_CASTS = {"int": int, "float": float}


def ctrl_params(config: ControllerConfig) -> CtrlParams:
    """The kernels' parameter record of ``config``: one entry per dataclass field."""
    vals = []
    for f in fields(ControllerConfig):
        v = getattr(config, f.name)
        if f.name in CHOICES:
            vals.append(CHOICES[f.name].index(v))
        else:
            vals.append(_CASTS[f.type](v))     # declared type (annotations are strings)
    return CtrlParams(*vals)


_ema = helper(ema)


@helper
def _sigmoid(x):
    z = math.exp(-abs(x))
    return 1.0 / (1.0 + z) if x >= 0 else z / (1.0 + z)


@helper
def _clip(x, lo, hi):
    return min(max(x, lo), hi)


@helper
def _usage_and_scale(cp, choice_LE, usage_LE, delta_LE, logit_scale_L, scale_obs_L, has_scale):
    """law.step item 2 on the router's choice (the noiseless counts, law v2.1): z-scored drift
    against u before the update, the usage EMA, and σ_L (layers whose choice has slots)."""
    L, E = usage_LE.shape
    rate_u = 1.0 - cp.usage_decay
    eps = 1.0 / (E * E)
    for l in range(L):
        tot = 0.0
        for e in range(E):
            tot += choice_LE[l, e]
        if tot > 0:
            for e in range(E):
                f = choice_LE[l, e] / tot
                u = usage_LE[l, e]
                var = max(u * (1.0 - u), eps)
                delta_LE[l, e] = (f - u) / math.sqrt(var / tot)
                usage_LE[l, e] = _ema(u, f, rate_u)
            if has_scale:
                s_old = logit_scale_L[l]
                x = scale_obs_L[l]
                logit_scale_L[l] = x if s_old == 0.0 else _ema(s_old, x, rate_u)
        else:
            for e in range(E):
                delta_LE[l, e] = 0.0


@helper
def _reliability(cp, counts_LE, loss_LE, has_loss, usage_LE, rel_LE):
    """law.step item 3 on the routed counts (the losses belong to the routed slots): experts
    without tokens keep theirs."""
    L, E = usage_LE.shape
    rate_u = 1.0 - cp.usage_decay
    for l in range(L):
        if has_loss:
            tot_c = 0.0
            tot_l = 0.0
            for e in range(E):
                tot_c += counts_LE[l, e]
                tot_l += loss_LE[l, e]
            mbar = tot_l / tot_c if tot_c > 0 else 0.0
            for e in range(E):
                if counts_LE[l, e] > 0:
                    m = loss_LE[l, e] / counts_LE[l, e]
                    rel = (mbar - m) / mbar if mbar > 0 else 0.0
                    target = _clip(_sigmoid(cp.reliability_sharpness * rel), 0.0, 1.0)
                    rel_LE[l, e] = _ema(rel_LE[l, e], target, rate_u)
        else:
            umax = usage_LE[l, 0]
            for e in range(1, E):
                umax = max(umax, usage_LE[l, e])
            for e in range(E):
                if counts_LE[l, e] > 0:
                    target = usage_LE[l, e] / umax if umax > 0 else 0.0
                    rel_LE[l, e] = _ema(rel_LE[l, e], target, rate_u)


@helper
def _phases(cp, seed, tick, theta_LE, omega_LE, delta_LE, R0, psi0):
    """law.step item 4 in place on θ; returns (R, ψ) after the update."""
    L, E = theta_LE.shape
    KR = cp.coupling * R0
    amp = cp.phase_noise * math.sqrt(cp.dt)
    h1 = _hash_base(seed, STREAM_PHASE, tick)
    cs = 0.0
    ss = 0.0
    for l in range(L):
        for e in range(E):
            th = theta_LE[l, e]
            drive = cp.omega0 + omega_LE[l, e] + cp.drift_gain * delta_LE[l, e] \
                + KR * math.sin(psi0 - th)
            th = th + cp.dt * drive
            if cp.phase_noise > 0.0:
                th = th + amp * _normal_at(h1, l * E + e)
            th = th % TWO_PI               # Python/NumPy float mod: result in [0, 2π]
            if th >= TWO_PI:               # ... which can round up to exactly 2π
                th = 0.0
            theta_LE[l, e] = th
            cs += math.cos(th)
            ss += math.sin(th)
    n = L * E
    c = cs / n
    s = ss / n
    return min(1.0, math.hypot(c, s)), math.atan2(s, c)


@helper
def _temperatures(cp, R, usage_LE, rel_LE, pressure_LE, T_fast_LE, Tbar_local_LE, T_eff_LE,
                  Tbar_g, d_E):
    """law.step item 5 (a micro tick) in place; returns the new T̄_global (from the T_fast of
    the last micro tick, i.e. before this one's update)."""
    L, E = usage_LE.shape
    acc = 0.0
    lo = T_fast_LE[0, 0]
    hi = T_fast_LE[0, 0]
    for l in range(L):
        for e in range(E):
            acc += T_fast_LE[l, e]
            lo = min(lo, T_fast_LE[l, e])
            hi = max(hi, T_fast_LE[l, e])
    Tbar_g = _ema(Tbar_g, _clip(acc / (L * E), lo, hi), cp.eta_structural_T_global)
    inv_E = 1.0 / E
    fR = cp.T_base * (1.0 + cp.beta_R * (1.0 - R))
    for l in range(L):
        usum = 0.0
        for e in range(E):
            usum += usage_LE[l, e]
        dmax = 0.0
        for e in range(E):
            share = usage_LE[l, e] / usum
            pressure_LE[l, e] = _clip(2.0 * (inv_E - share), -1.0, 1.0)
            d_E[e] = abs(share - inv_E)
            dmax = max(dmax, d_E[e])
        for e in range(E):
            # law.step: a drift up to DRIFT_EPS is rounding noise of a uniform usage
            d_hat = d_E[e] / dmax if dmax > DRIFT_EPS else 0.0
            tf = fR * (1.0 + cp.beta_drift * d_hat) \
                * (1.0 + cp.beta_reliability * (1.0 - rel_LE[l, e]))
            tf = _clip(tf, cp.T_min, cp.T_max)
            T_fast_LE[l, e] = tf
            Tbar_local_LE[l, e] = _ema(Tbar_local_LE[l, e], tf, cp.eta_structural_T_local)
            T_eff_LE[l, e] = tf * Tbar_g * Tbar_local_LE[l, e]
    return Tbar_g


@kernel
def controller_step(cp, seed, tick, theta_LE, omega_LE, usage_LE, rel_LE, delta_LE,
                    pressure_LE, lens_LE, T_fast_LE, Tbar_local_LE, T_eff_LE, logit_scale_L,
                    scal_5, counts_LE, noiseless_LE, loss_LE, has_loss, scale_obs_L, has_scale,
                    kappa_in, d_E):
    """law.step in place on one system's arrays; returns the new tick.
    scal_5 = (R, ψ, ΔR, κ, T̄_global); ``d_E`` is scratch. ``noiseless_LE``: the observation's
    noiseless counts (usage, drift and so pressure read them; pass ``counts_LE`` itself when
    the observation has none); reliability reads ``counts_LE`` and ``loss_LE``."""
    L, E = theta_LE.shape
    tick = tick + 1
    micro = tick % cp.micro_period == 0
    macro = tick % cp.macro_period == 0
    lens_tick = macro if cp.lens_clock == 0 else micro
    kap = _ema(scal_5[3], kappa_in, cp.kappa_smoothing)          # law.smooth_kappa
    _usage_and_scale(cp, noiseless_LE, usage_LE, delta_LE, logit_scale_L, scale_obs_L,
                     has_scale)
    _reliability(cp, counts_LE, loss_LE, has_loss, usage_LE, rel_LE)
    R0 = scal_5[0]
    R, psi = _phases(cp, seed, tick, theta_LE, omega_LE, delta_LE, R0, scal_5[1])
    dR = R - R0
    if micro:
        scal_5[4] = _temperatures(cp, R, usage_LE, rel_LE, pressure_LE, T_fast_LE,
                                  Tbar_local_LE, T_eff_LE, scal_5[4], d_E)
    if lens_tick:
        rate = cp.lens_rate * math.exp(cp.beta_lens * kap) * _sigmoid(LENS_DR_GAIN * dR)
        for l in range(L):
            for e in range(E):
                lens_LE[l, e] = _clip(lens_LE[l, e] + rate * pressure_LE[l, e], -cp.lens_max,
                                      cp.lens_max)
    scal_5[0] = R
    scal_5[1] = psi
    scal_5[2] = dR
    scal_5[3] = kap
    return tick


@kernel
def routing_fields_into(cp, kappa, pressure_LE, lens_LE, T_eff_LE, logit_scale_L, bias_LE,
                        temp_LE, scale_L):
    """law.routing_fields into the buffers; returns τ. bias = e^{β_p κ}(k_P·P + lens),
    temperature = clip(T_eff·e^{β_T κ}, T_lo, T_hi), scale = max(σ_L, floor)."""
    L, E = pressure_LE.shape
    f_p = math.exp(cp.beta_pressure * kappa)
    f_t = math.exp(cp.beta_temperature * kappa)
    for l in range(L):
        for e in range(E):
            bias_LE[l, e] = f_p * (cp.pressure_gain * pressure_LE[l, e] + lens_LE[l, e])
            temp_LE[l, e] = _clip(T_eff_LE[l, e] * f_t, cp.routing_T_min, cp.routing_T_max)
        scale_L[l] = max(logit_scale_L[l], cp.logit_scale_floor)
    return cp.exploration_tau0 * math.exp(cp.beta_tau * kappa)
