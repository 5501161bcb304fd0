"""Private Numba kernels of the simulator: arrays and scalars in, results written into ``out``
buffers. The public API (``kuramoto.py``, ``simulate.py``) validates, allocates and dispatches.

Shape legend: B systems, N oscillators, T recorded ticks (``_BT`` records) or tokens per tick
(``_T`` scratch), L layers, E experts, D domains, K top-k slots, X events.

Three groups:
* the counter RNG of ``rng.py`` (lowbias32 hash on uint64 masked to 32 bits; same bits);
* the mean-field Kuramoto integrator (``kuramoto_batch``): per step one pass per system that
  advances θ with K·R·sin(ψ − θ) = K·(S·cos θ − C·sin θ) (S, C the means of sin θ, cos θ, so
  sin/cos are computed once per oscillator per step) and accumulates the next S, C. sin/cos come
  from a branch-free polynomial (``_sincos``) that LLVM vectorises (llvmlite ships no SVML);
* the controller simulator (``simulate_batch``): per system, per tick the environment routes
  (``env.py``), then ``controller_step`` (``law.step`` in the same order of operations, with
  the hull-clipped EMAs and the same phase noise), then the router learns. Systems run in
  ``prange``; each system is sequential, so results do not depend on the number of threads.

Compiled lazily on first call, cached on disk (``cache=True``). Numba keys the cache on this
file: the stream ids imported from ``env``, the constants imported from ``law`` (DRIFT_EPS,
LENS_DR_GAIN, the temperature clamps) and ``schedule.adaptive_offset_update`` are baked into the
cached machine code, so clear ``__pycache__/*.nbi|*.nbc`` after changing those.
"""

from __future__ import annotations

import math
from collections import namedtuple
from decimal import Decimal, localcontext

import numpy as np
from numba import njit, prange

from .env import STREAM_BATCH, STREAM_DOMAIN, STREAM_LOSS, STREAM_TOKEN
from .law import DRIFT_EPS, LENS_DR_GAIN, TEMPERATURE_MAX, TEMPERATURE_MIN
from .rng import GOLDEN32, MASK32, STREAM_PHASE
from .schedule import adaptive_offset_update

# --------------------------------------------------------------------------------------------
# Counter RNG (rng.py): every operand stays uint64 (numba turns uint64 ∘ int64 into float64).
_M32 = np.uint64(MASK32)
_GOLD = np.uint64(GOLDEN32)
_C1 = np.uint64(0x7FEB352D)
_C2 = np.uint64(0x846CA68B)
_SH15 = np.uint64(15)
_SH16 = np.uint64(16)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_INV32 = 1.0 / 4294967296.0
TWO_PI = 2.0 * math.pi


@njit(cache=True, inline="always")
def _mix32(x):
    x = x & _M32
    x = x ^ (x >> _SH16)
    x = (x * _C1) & _M32
    x = x ^ (x >> _SH15)
    x = (x * _C2) & _M32
    return x ^ (x >> _SH16)


@njit(cache=True, inline="always")
def _hash_base(seed, stream, tick):
    """The per-(seed, stream, tick) part of ``rng.hash_key`` (h1); hash = mix32(h1 ^ index)."""
    s = (np.uint64(seed) ^ ((np.uint64(stream) * _GOLD) & _M32)) & _M32
    h0 = _mix32(s)
    return _mix32((h0 + (np.uint64(tick) & _M32)) & _M32)


@njit(cache=True, inline="always")
def _uniform_at(h1, index):
    """``rng.uniform`` for the index under the base h1: (h + 0.5)/2**32, in (0, 1)."""
    h = _mix32(h1 ^ (np.uint64(index) & _M32))
    # via int64 (exact: h < 2**32): signed conversion vectorises, unsigned does not
    return (np.float64(np.int64(h)) + 0.5) * _INV32


@njit(cache=True, inline="always")
def _normal_at(h1, index):
    """``rng.normal``: Box–Muller over the uniforms of indices 2i and 2i+1."""
    i2 = np.uint64(index) * _U2
    u1 = _uniform_at(h1, i2)
    u2 = _uniform_at(h1, i2 + _U1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True)
def hash_into(seed, stream, tick, index_N, out_N):
    """out[i] = rng.hash_key(seed, stream, tick, index[i]) (for tests)."""
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _mix32(h1 ^ (np.uint64(index_N[i]) & _M32))


@njit(cache=True)
def uniform_into(seed, stream, tick, index_N, out_N):
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _uniform_at(h1, index_N[i])


@njit(cache=True)
def normal_into(seed, stream, tick, index_N, out_N):
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _normal_at(h1, index_N[i])


# --------------------------------------------------------------------------------------------
# sin and cos together, branch-free so that loops over oscillators vectorise.
# x = k·π/2 + r with |r| <= π/4 (Cody–Waite: π/2 split in a 26-bit head, so k·head is exact
# for |k| < 2**27, and a tail); then Taylor polynomials of sin r (to r^17) and
# cos r (to r^18), whose truncation error on |r| <= π/4 is below 1e-19; the quadrant k mod 4
# swaps and signs them. Accuracy: a few ulp of np.sin/np.cos (tested).
_PI_50 = Decimal("3.14159265358979323846264338327950288419716939937510")


def _head(x: float) -> float:
    """x with the low 27 bits of its mantissa cleared (26 significant bits are left), so k·head
    is exact for |k| < 2**27."""
    bits = np.array([x]).view(np.uint64) & np.uint64(0xFFFFFFFFF8000000)
    return float(bits.view(np.float64)[0])


with localcontext() as _ctx:
    _ctx.prec = 50
    _PIO2_HI = _head(math.pi / 2)
    _PIO2_LO = float(_PI_50 / 2 - Decimal(_PIO2_HI))
    _LN2_HI = _head(math.log(2.0))
    _LN2_LO = float(Decimal(2).ln() - Decimal(_LN2_HI))
_TWO_OVER_PI = 2.0 / math.pi
_SIN3, _SIN5, _SIN7, _SIN9 = -1.0 / 6.0, 1.0 / 120.0, -1.0 / 5040.0, 1.0 / 362880.0
_SIN11, _SIN13 = -1.0 / 39916800.0, 1.0 / 6227020800.0
_SIN15, _SIN17 = -1.0 / 1307674368000.0, 1.0 / 355687428096000.0
_COS2, _COS4, _COS6, _COS8 = -0.5, 1.0 / 24.0, -1.0 / 720.0, 1.0 / 40320.0
_COS10, _COS12, _COS14 = -1.0 / 3628800.0, 1.0 / 479001600.0, -1.0 / 87178291200.0
_COS16, _COS18 = 1.0 / 20922789888000.0, -1.0 / 6402373705728000.0


@njit(cache=True, inline="always")
def _sincos(x):
    k = math.floor(x * _TWO_OVER_PI + 0.5)
    r = (x - k * _PIO2_HI) - k * _PIO2_LO
    z = r * r
    s = r + r * z * (_SIN3 + z * (_SIN5 + z * (_SIN7 + z * (_SIN9 + z * (
        _SIN11 + z * (_SIN13 + z * (_SIN15 + z * _SIN17)))))))
    c = 1.0 + z * (_COS2 + z * (_COS4 + z * (_COS6 + z * (_COS8 + z * (
        _COS10 + z * (_COS12 + z * (_COS14 + z * (_COS16 + z * _COS18))))))))
    q = np.int64(k) & 3
    odd = (q & 1) == 1
    sin_sign = 1.0 - 2.0 * ((q >> 1) & 1)
    cos_sign = 1.0 - 2.0 * (((q + 1) >> 1) & 1)
    sn = c if odd else s
    cs = s if odd else c
    return sin_sign * sn, cos_sign * cs


_INV_LN2 = 1.0 / math.log(2.0)
_EXP_MIN = -708.0
"""Below this exp() would leave the normal range; such gate weights are < 1e-307 (≈ 0)."""


@njit(cache=True, inline="always")
def _exp_nonpos_into(x_N, out_N, bits_N):
    """out = exp(x) for x <= 0, vectorisable: x = k·ln2 + r with |r| <= ln2/2 (Cody–Waite),
    Taylor polynomial of e^r to r^13 (truncation < 1e-17), times 2^k built from its bits.
    Within a few ulp of np.exp on [−708, 0]; x < −708 gives exp(−708) (tested)."""
    n = x_N.shape[0]
    for i in range(n):
        x = max(x_N[i], _EXP_MIN)
        k = math.floor(x * _INV_LN2 + 0.5)
        r = (x - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
            1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
                1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600
                                                             + r / 6227020800.0))))))))))))
        out_N[i] = p
        bits_N[i] = (np.int64(k) + 1023) << 52     # IEEE bits of 2^k (normal: k >= -1021)
    pow2_N = bits_N.view(np.float64)
    for i in range(n):
        out_N[i] = out_N[i] * pow2_N[i]


@njit(cache=True)
def exp_nonpos_into(x_N, out_N, bits_N):
    """``_exp_nonpos_into`` (for tests)."""
    _exp_nonpos_into(x_N, out_N, bits_N)


@njit(cache=True)
def sincos_into(x_N, sin_N, cos_N):
    """Elementwise ``_sincos`` (for tests)."""
    for i in range(x_N.shape[0]):
        sin_N[i], cos_N[i] = _sincos(x_N[i])


# --------------------------------------------------------------------------------------------
# Mean-field Kuramoto.

@njit(cache=True, fastmath=True)
def _kuramoto_one(theta_N, omega_N, coupling, dt, steps, noise, seed, index0, record_every,
                  R_T, psi_T):
    """Integrate one system for ``steps`` Euler steps in place; record R, ψ every
    ``record_every`` steps (index 0 = the initial state). Noise of step t (1-based) is
    rng.normal(seed, STREAM_PHASE, t, index0 + i)."""
    N = theta_N.shape[0]
    sin_N = np.empty(N)
    cos_N = np.empty(N)
    S = 0.0
    C = 0.0
    for i in range(N):
        sn, cs = _sincos(theta_N[i])
        sin_N[i] = sn
        cos_N[i] = cs
        S += sn
        C += cs
    S /= N
    C /= N
    R_T[0] = min(math.sqrt(S * S + C * C), 1.0)
    psi_T[0] = math.atan2(S, C)
    amp = noise * math.sqrt(dt)
    KS = coupling * S
    KC = coupling * C
    for t in range(1, steps + 1):
        S1 = 0.0
        C1 = 0.0
        if noise > 0.0:
            h1 = _hash_base(seed, STREAM_PHASE, t)
            for i in range(N):
                th = theta_N[i] + dt * (omega_N[i] + (KS * cos_N[i] - KC * sin_N[i])) \
                    + amp * _normal_at(h1, index0 + i)
                th -= TWO_PI * math.floor(th * (1.0 / TWO_PI))
                sn, cs = _sincos(th)
                theta_N[i] = th
                sin_N[i] = sn
                cos_N[i] = cs
                S1 += sn
                C1 += cs
        else:
            for i in range(N):
                th = theta_N[i] + dt * (omega_N[i] + (KS * cos_N[i] - KC * sin_N[i]))
                # wrap to [0, 2π): keeps the polynomial's argument small; floor vectorises
                th -= TWO_PI * math.floor(th * (1.0 / TWO_PI))
                sn, cs = _sincos(th)
                theta_N[i] = th
                sin_N[i] = sn
                cos_N[i] = cs
                S1 += sn
                C1 += cs
        S = S1 / N
        C = C1 / N
        KS = coupling * S
        KC = coupling * C
        if t % record_every == 0:
            r = t // record_every
            R_T[r] = min(math.sqrt(S * S + C * C), 1.0)
            psi_T[r] = math.atan2(S, C)


@njit(cache=True, parallel=True)
def kuramoto_batch(theta_BN, omega_BN, coupling, dt, steps, noise, seed, record_every,
                   R_BT, psi_BT):
    """Independent systems in parallel; system b's noise indices are b·N + i."""
    B, N = theta_BN.shape
    for b in prange(B):
        _kuramoto_one(theta_BN[b], omega_BN[b], coupling, dt, steps, noise, seed, b * N,
                      record_every, R_BT[b], psi_BT[b])


# --------------------------------------------------------------------------------------------
# The controller (law.step), the environment (env.py) and the batch driver.

CtrlParams = namedtuple("CtrlParams", [
    "micro_period", "macro_period", "usage_decay", "reliability_sharpness", "coupling", "omega0",
    "drift_gain", "phase_noise", "dt", "eta_g", "eta_l", "T_base", "beta_R", "beta_drift",
    "beta_reliability", "T_min", "T_max", "lens_rate", "lens_max", "beta_pressure",
    "beta_temperature", "beta_lens", "kappa_smoothing", "pressure_scale", "temperature_scale",
    "threshold_std", "formed_variance"])
"""ControllerConfig as a numba-friendly tuple (ints for the periods, floats for the rest)."""

EnvParams = namedtuple("EnvParams", [
    "tokens", "top_k", "loss_floor", "loss_range", "loss_noise", "token_noise", "batch_noise",
    "router_sharpness", "router_memory"])

AdaptParams = namedtuple("AdaptParams", [
    "enabled", "R_low", "R_high", "variance_high", "rate", "decay", "max_offset"])

BatchState = namedtuple("BatchState", [
    "tick_B", "seed_B", "theta_BLE", "omega_BLE", "usage_BLE", "rel_BLE", "delta_BLE",
    "pressure_BLE", "lens_BLE", "T_fast_BLE", "Tbar_local_BLE", "Tbar_global_BE", "T_eff_BLE",
    "scal_B4", "offset_B", "quality_BLED", "est_BLDE", "nobs_BLDE", "cum_BD"])
"""Everything carried between chunks. scal_B4 = (R, ψ, ΔR, κ) of each controller."""

Events = namedtuple("Events", ["tick_X", "kind_X", "layer_X", "index_X", "value_X", "cum_XD"])
"""kind 0 = collapse (index = expert, layer −1 = all, value = quality), 1 = domain shift
(index = row of cum_XD)."""

Records = namedtuple("Records", [
    "R_BT", "dR_BT", "kappa_BT", "loss_BT", "Tbar_global_BTE", "var_local_BTL",
    "Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "rel_BTLE"])
"""Outputs every ``record_every`` ticks; the _BTLE ones have T = 0 when layers are not kept."""

_adaptive_update = njit(cache=True)(adaptive_offset_update)


@njit(cache=True)
def _ema(old, new, rate):
    """(1 − rate)·old + rate·new clipped to the hull of old and new (law._ema)."""
    out = (1.0 - rate) * old + rate * new
    return min(max(out, min(old, new)), max(old, new))


@njit(cache=True)
def _sigmoid(x):
    z = math.exp(-abs(x))
    return 1.0 / (1.0 + z) if x >= 0 else z / (1.0 + z)


@njit(cache=True)
def _clip(x, lo, hi):
    return min(max(x, lo), hi)


@njit(cache=True)
def _smoothed_kappa(cp, k_old, k_in):
    kap = (1.0 - cp.kappa_smoothing) * k_old + cp.kappa_smoothing * k_in
    return _clip(kap, min(k_old, k_in), max(k_old, k_in))


@njit(cache=True)
def controller_step(cp, seed, tick, theta_LE, omega_LE, usage_LE, rel_LE, delta_LE,
                    pressure_LE, lens_LE, T_fast_LE, Tbar_local_LE, Tbar_global_E, T_eff_LE,
                    scal_4, counts_LE, loss_LE, has_loss, kappa_in, d_E):
    """law.step in place on one system's arrays; returns the new tick. ``d_E`` is scratch.
    Follows law.step line by line (same operand order) so the two agree to rounding of the
    transcendental functions and of NumPy's pairwise sums."""
    L, E = theta_LE.shape
    tick = tick + 1
    micro = tick % cp.micro_period == 0
    macro = tick % cp.macro_period == 0
    kap = _smoothed_kappa(cp, scal_4[3], kappa_in)

    # 2. usage; δ is measured against u before the update
    rate_u = 1.0 - cp.usage_decay
    for l in range(L):
        tot = 0.0
        for e in range(E):
            tot += counts_LE[l, e]
        if tot > 0:
            for e in range(E):
                f = counts_LE[l, e] / tot
                delta_LE[l, e] = E * (f - usage_LE[l, e])
                usage_LE[l, e] = _ema(usage_LE[l, e], f, rate_u)
        else:
            for e in range(E):
                delta_LE[l, e] = 0.0

    # 3. reliability: experts without tokens keep theirs
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

    # 4. Kuramoto: drive from the mean field before the update
    R0 = scal_4[0]
    psi0 = scal_4[1]
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
    R = min(1.0, math.hypot(c, s))
    psi = math.atan2(s, c)
    dR = R - R0

    # 5. micro tick: temperatures (T̄_global from the T_fast of the last micro tick)
    if micro:
        for e in range(E):
            acc = T_fast_LE[0, e]
            for l in range(1, L):
                acc += T_fast_LE[l, e]
            Tbar_global_E[e] = _ema(Tbar_global_E[e], acc / L, cp.eta_g)
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
                Tbar_local_LE[l, e] = _ema(Tbar_local_LE[l, e], tf, cp.eta_l)
                T_eff_LE[l, e] = tf * Tbar_global_E[e] * Tbar_local_LE[l, e]

    # 6. macro tick: lens
    if macro:
        rate = cp.lens_rate * math.exp(cp.beta_lens * kap) * _sigmoid(LENS_DR_GAIN * dR)
        for l in range(L):
            for e in range(E):
                lens_LE[l, e] = _clip(lens_LE[l, e] + rate * pressure_LE[l, e], -cp.lens_max,
                                      cp.lens_max)

    scal_4[0] = R
    scal_4[1] = psi
    scal_4[2] = dR
    scal_4[3] = kap
    return tick


@njit(cache=True)
def routing_fields_into(cp, kappa, pressure_LE, lens_LE, T_eff_LE, bias_LE, temp_LE):
    """law.routing_fields: bias = scale_p·e^{β_p κ}(P + lens),
    temperature = clip(T_eff·scale_T·e^{β_T κ}, 0.1, 10)."""
    L, E = pressure_LE.shape
    f_p = math.exp(cp.beta_pressure * kappa)
    f_t = math.exp(cp.beta_temperature * kappa)
    a = cp.pressure_scale * f_p
    for l in range(L):
        for e in range(E):
            bias_LE[l, e] = a * (pressure_LE[l, e] + lens_LE[l, e])
            temp_LE[l, e] = _clip(T_eff_LE[l, e] * cp.temperature_scale * f_t,
                                  TEMPERATURE_MIN, TEMPERATURE_MAX)


@njit(cache=True)
def env_route(ep, seed, tick, quality_LED, est_LDE, cum_D, bias_LE, temp_LE, counts_LE,
              loss_LE, sumx_LDE, cnt_LDE, dom_T, base_LDE, invT_LE, s_T, b_T, top_KT,
              sel_KT, g_KT, x_KT, tot_T, tl_T, bits_T):
    """env.route in loops: fills counts/loss [L, E] and the router's sums/counts [L, D, E];
    returns the mean token loss. The rest are scratch. The gate-weight sums are not formed:
    the control law reads counts and losses only (env.route still passes them to step).

    The inner loops run over tokens (structure of arrays) so that hashing, scoring and the
    branch-free top-k insertion vectorise; only the accumulation is a sequential per-token loop,
    in env.route's bincount order (token, then slot)."""
    L, E, D = quality_LED.shape
    T = ep.tokens
    K = ep.top_k
    loss_LE[:] = 0.0
    sumx_LDE[:] = 0.0
    cnt_LDE[:] = 0.0
    # the token-independent part of the scores, once per tick (env.route has the same formula)
    h_batch = _hash_base(seed, STREAM_BATCH, tick)
    for l in range(L):
        for e in range(E):
            invT_LE[l, e] = 1.0 / temp_LE[l, e]
        for d in range(D):
            m = 0.0
            for e in range(E):
                m += est_LDE[l, d, e]
            m /= E
            for e in range(E):
                u = _uniform_at(h_batch, (l * D + d) * E + e)
                base_LDE[l, d, e] = (ep.router_sharpness * (m - est_LDE[l, d, e])
                                     + ep.batch_noise * (2.0 * u - 1.0) + bias_LE[l, e]) \
                    / temp_LE[l, e]
    h_dom = _hash_base(seed, STREAM_DOMAIN, tick)
    for t in range(T):
        u = _uniform_at(h_dom, t)
        d = 0
        while d < D - 1 and u >= cum_D[d]:   # cum_D[D-1] == 1 > u
            d += 1
        dom_T[t] = d
    h_tok = _hash_base(seed, STREAM_TOKEN, tick)
    h_loss = _hash_base(seed, STREAM_LOSS, tick)
    total = 0.0
    top0_T = top_KT[0]
    sel0_T = sel_KT[0]
    top1_T = top_KT[min(1, K - 1)]
    sel1_T = sel_KT[min(1, K - 1)]
    for l in range(L):
        for j in range(K):
            for t in range(T):
                top_KT[j, t] = -np.inf
                sel_KT[j, t] = -1
        for e in range(E):
            inv = invT_LE[l, e]
            if D <= 4:
                # noise and the domain's base score in one pass: the base is picked from up to
                # four scalars with selects (vectorises; no gather), then added as env.route does
                bd0 = base_LDE[l, 0, e]
                bd1 = base_LDE[l, min(1, D - 1), e]
                bd2 = base_LDE[l, min(2, D - 1), e]
                bd3 = base_LDE[l, min(3, D - 1), e]
                for t in range(T):
                    u = _uniform_at(h_tok, (l * T + t) * E + e)
                    dt = dom_T[t]
                    bd = bd1 if dt == 1 else bd0
                    bd = bd2 if dt == 2 else bd
                    bd = bd3 if dt == 3 else bd
                    s_T[t] = bd + ep.token_noise * (2.0 * u - 1.0) * inv
            else:
                for t in range(T):                     # vectorises (no gather in it)
                    u = _uniform_at(h_tok, (l * T + t) * E + e)
                    s_T[t] = ep.token_noise * (2.0 * u - 1.0) * inv
                # + the domain's base score, as env.route adds them. One masked pass per domain
                # instead of a gather (LLVM does not vectorise gathers on this target).
                for d in range(D):
                    bd = base_LDE[l, d, e]
                    for t in range(T):
                        s_T[t] = bd + s_T[t] if dom_T[t] == d else s_T[t]
            # insert expert e into each token's top-k list with selects (random scores would
            # mispredict branches). The list is ordered by (score descending, index ascending),
            # the order of env.route's stable sort, and the candidate is compared in that
            # order: the new expert e (the highest index so far) loses ties, but an entry
            # pushed down from slot j−1 may tie with slot j's and has the lower index, so it
            # must win that tie (a plain 's > sj' would keep the later expert ahead of it).
            # -0.0 == 0.0 here as in NumPy's sort; the scores are finite (T >= 0.1).
            if K == 2:
                # top-2 insertion of the candidate e, the highest index so far: it needs a
                # strictly greater score to pass an entry (the pushed-down entry goes straight
                # to slot 1). Plain selects over 1-D rows: vectorises.
                for t in range(T):
                    s = s_T[t]
                    a0 = top0_T[t]
                    a1 = top1_T[t]
                    c0 = sel0_T[t]
                    c1 = sel1_T[t]
                    gt0 = s > a0
                    gt1 = s > a1
                    top1_T[t] = a0 if gt0 else (s if gt1 else a1)
                    sel1_T[t] = c0 if gt0 else (e if gt1 else c1)
                    top0_T[t] = s if gt0 else a0
                    sel0_T[t] = e if gt0 else c0
                continue
            for t in range(T):
                b_T[t] = e
            for j in range(K):
                for t in range(T):
                    s = s_T[t]
                    sj = top_KT[j, t]
                    b = b_T[t]
                    bj = sel_KT[j, t]
                    gt = (s > sj) | ((s == sj) & (b < bj))
                    top_KT[j, t] = s if gt else sj
                    sel_KT[j, t] = b if gt else bj
                    s_T[t] = sj if gt else s
                    b_T[t] = bj if gt else b
        for j in range(K):
            for t in range(T):                     # vectorises: the noise term alone
                u = _uniform_at(h_loss, (l * T + t) * K + j)
                x_KT[j, t] = ep.loss_noise * (2.0 * u - 1.0)
            for t in range(T):                     # + the quality gather, in env.route's order
                x_KT[j, t] = ep.loss_floor + ep.loss_range \
                    * (1.0 - quality_LED[l, sel_KT[j, t], dom_T[t]]) + x_KT[j, t]
        # gate weights = softmax over the selected scores, token loss = Σ_j g_j x_j: passes
        # over tokens (vectorisable), each token's sums in slot order as in env.route
        for t in range(T):
            tot_T[t] = 1.0                         # exp(0) == 1 exactly, as in NumPy
            tl_T[t] = 0.0
            g_KT[0, t] = 1.0
        for j in range(1, K):
            for t in range(T):
                g_KT[j, t] = top_KT[j, t] - top_KT[0, t]      # <= 0
            _exp_nonpos_into(g_KT[j], g_KT[j], bits_T)
            for t in range(T):
                tot_T[t] += g_KT[j, t]
        for j in range(K):
            for t in range(T):
                g_KT[j, t] = g_KT[j, t] / tot_T[t]
                tl_T[t] += g_KT[j, t] * x_KT[j, t]
        # bincount order: token, then slot. Flat rows and unsigned indices (no negative-index
        # fix-ups in this sequential loop); e = sel < E and d = dom < D by construction.
        lossl_E = loss_LE[l]
        sxl_F = sumx_LDE[l].reshape(D * E)
        cnl_F = cnt_LDE[l].reshape(D * E)
        for t in range(T):
            r = np.uint64(dom_T[t] * E)
            tl = tl_T[t]
            for j in range(K):
                e = np.uint64(sel_KT[j, t])
                lossl_E[e] += tl
                sxl_F[r + e] += x_KT[j, t]
                cnl_F[r + e] += 1.0
            total += tl
        for e in range(E):                         # integer sums: exact in any order
            c = 0.0
            for d in range(D):
                c += cnt_LDE[l, d, e]
            counts_LE[l, e] = c
    return total / (L * T)


@njit(cache=True)
def env_learn(ep, est_LDE, nobs_LDE, sumx_LDE, cnt_LDE):
    """env.learn: running mean with the count capped at router_memory."""
    L, D, E = est_LDE.shape
    for l in range(L):
        for d in range(D):
            for e in range(E):
                c = cnt_LDE[l, d, e]
                if c > 0:
                    n_new = min(nobs_LDE[l, d, e] + c, ep.router_memory)
                    w = min(c / n_new, 1.0)
                    est_LDE[l, d, e] = est_LDE[l, d, e] + w * (sumx_LDE[l, d, e] / c
                                                               - est_LDE[l, d, e])
                    nobs_LDE[l, d, e] = n_new


@njit(cache=True)
def _variance(x_E):
    """np.var of a vector (two passes; sequential sums)."""
    n = x_E.shape[0]
    m = 0.0
    for i in range(n):
        m += x_E[i]
    m /= n
    v = 0.0
    for i in range(n):
        v += (x_E[i] - m) * (x_E[i] - m)
    return v / n


@njit(cache=True)
def _run_system(b, t_start, t_stop, record_every, cp, ep, ap, kappa_T, p_T,
                tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE, pressure_BLE,
                lens_BLE, T_fast_BLE, Tbar_local_BLE, Tbar_global_BE, T_eff_BLE, scal_B4, offset_B,
                quality_BLED, est_BLDE, nobs_BLDE, cum_BD, ev_tick_X, ev_kind_X, ev_layer_X,
                ev_index_X, ev_value_X, ev_cum_XD, R_BT, dR_BT, kappa_BT, loss_BT, Tbar_global_BTE,
                var_local_BTL, Tbar_local_BTLE, T_fast_BTLE, usage_BTLE, rel_BTLE):
    """Ticks t_start+1 .. t_stop of system b (events, κ, route, step, learn, adapt, record)."""
    L, E, D = quality_BLED.shape[1:]
    T, K = ep.tokens, ep.top_k
    seed = seed_B[b]
    counts_LE = np.zeros((L, E))
    loss_LE = np.zeros((L, E))
    bias_LE = np.zeros((L, E))
    temp_LE = np.ones((L, E))
    sumx_LDE = np.zeros((L, D, E))
    cnt_LDE = np.zeros((L, D, E))
    dom_T = np.zeros(T, dtype=np.int64)
    base_LDE = np.zeros((L, D, E))
    invT_LE = np.zeros((L, E))
    s_T = np.zeros(T)
    b_T = np.zeros(T, dtype=np.int64)
    top_KT = np.zeros((K, T))
    sel_KT = np.zeros((K, T), dtype=np.int64)
    g_KT = np.zeros((K, T))
    x_KT = np.zeros((K, T))
    tot_T = np.zeros(T)
    tl_T = np.zeros(T)
    bits_T = np.zeros(T, dtype=np.int64)
    d_E = np.zeros(E)
    quality_LED = quality_BLED[b]
    cum_D = cum_BD[b]
    scal_4 = scal_B4[b]
    keep_layers = Tbar_local_BTLE.shape[1] > 0
    for t in range(t_start + 1, t_stop + 1):
        for x in range(ev_tick_X.shape[0]):
            if ev_tick_X[x] == t:
                if ev_kind_X[x] == 0:
                    for l in range(L):
                        if ev_layer_X[x] < 0 or ev_layer_X[x] == l:
                            for d in range(D):
                                quality_LED[l, ev_index_X[x], d] = ev_value_X[x]
                else:
                    cum_D[:] = ev_cum_XD[ev_index_X[x]]
        if ap.enabled:
            k_in = _clip(kappa_T[t - 1] + (1.0 - p_T[t - 1]) * offset_B[b], -1.0, 1.0)
        else:
            k_in = kappa_T[t - 1]
        # route with the κ this tick's step will put in effect (smoothing included)
        routing_fields_into(cp, _smoothed_kappa(cp, scal_4[3], k_in), pressure_BLE[b],
                            lens_BLE[b], T_eff_BLE[b], bias_LE, temp_LE)
        mean_loss = env_route(ep, seed, t, quality_LED, est_BLDE[b], cum_D, bias_LE, temp_LE,
                              counts_LE, loss_LE, sumx_LDE, cnt_LDE, dom_T, base_LDE,
                              invT_LE, s_T, b_T, top_KT, sel_KT, g_KT, x_KT, tot_T, tl_T,
                              bits_T)
        tick_B[b] = controller_step(
            cp, seed, tick_B[b], theta_BLE[b], omega_BLE[b], usage_BLE[b],
            rel_BLE[b], delta_BLE[b], pressure_BLE[b], lens_BLE[b],
            T_fast_BLE[b], Tbar_local_BLE[b], Tbar_global_BE[b], T_eff_BLE[b],
            scal_4, counts_LE, loss_LE, True, k_in, d_E)
        env_learn(ep, est_BLDE[b], nobs_BLDE[b], sumx_LDE, cnt_LDE)
        if ap.enabled and tick_B[b] % cp.macro_period == 0:
            var_g = _variance(Tbar_global_BE[b])
            offset_B[b] = _adaptive_update(
                offset_B[b], scal_4[0], var_g, var_g > cp.formed_variance, ap.R_low,
                ap.R_high, ap.variance_high, ap.rate, ap.decay, ap.max_offset)
        if t % record_every == 0:
            r = t // record_every - 1
            R_BT[b, r] = scal_4[0]
            dR_BT[b, r] = scal_4[2]
            kappa_BT[b, r] = scal_4[3]
            loss_BT[b, r] = mean_loss
            Tbar_global_BTE[b, r] = Tbar_global_BE[b]
            for l in range(L):
                var_local_BTL[b, r, l] = _variance(Tbar_local_BLE[b, l])
            if keep_layers:
                Tbar_local_BTLE[b, r] = Tbar_local_BLE[b]
                T_fast_BTLE[b, r] = T_fast_BLE[b]
                usage_BTLE[b, r] = usage_BLE[b]
                rel_BTLE[b, r] = rel_BLE[b]


@njit(cache=True, parallel=True)
def simulate_batch(t_start, t_stop, record_every, cp, ep, ap, kappa_T, p_T,
                   tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE,
                   pressure_BLE, lens_BLE, T_fast_BLE, Tbar_local_BLE, Tbar_global_BE, T_eff_BLE,
                   scal_B4, offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD,
                   ev_tick_X, ev_kind_X, ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD,
                   R_BT, dR_BT, kappa_BT, loss_BT, Tbar_global_BTE, var_local_BTL,
                   Tbar_local_BTLE, T_fast_BTLE, usage_BTLE, rel_BTLE):
    """Advance every system from tick t_start to t_stop (state in place, records written).

    Arguments are the fields of BatchState, Events and Records, flat: a namedtuple of arrays
    in a jitted signature costs seconds of compile time each (its boxing code), flat arrays
    almost nothing."""
    for b in prange(theta_BLE.shape[0]):
        _run_system(np.int64(b), t_start, t_stop, record_every, cp, ep, ap, kappa_T, p_T,
                    tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE,
                    pressure_BLE, lens_BLE, T_fast_BLE, Tbar_local_BLE, Tbar_global_BE, T_eff_BLE,
                    scal_B4, offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD, ev_tick_X,
                    ev_kind_X, ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD, R_BT, dR_BT,
                    kappa_BT, loss_BT, Tbar_global_BTE, var_local_BTL, Tbar_local_BTLE,
                    T_fast_BTLE, usage_BTLE, rel_BTLE)


@njit(cache=True)
def simulate_serial(t_start, t_stop, record_every, cp, ep, ap, kappa_T, p_T,
                    tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE,
                    pressure_BLE, lens_BLE, T_fast_BLE, Tbar_local_BLE, Tbar_global_BE, T_eff_BLE,
                    scal_B4, offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD,
                    ev_tick_X, ev_kind_X, ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD,
                    R_BT, dR_BT, kappa_BT, loss_BT, Tbar_global_BTE, var_local_BTL,
                    Tbar_local_BTLE, T_fast_BTLE, usage_BTLE, rel_BTLE):
    """simulate_batch without the thread pool (one system, or one thread): launching the
    pool costs milliseconds per call on a busy machine, more than a short run of one system."""
    for b in range(theta_BLE.shape[0]):
        _run_system(np.int64(b), t_start, t_stop, record_every, cp, ep, ap, kappa_T, p_T,
                    tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE,
                    pressure_BLE, lens_BLE, T_fast_BLE, Tbar_local_BLE, Tbar_global_BE, T_eff_BLE,
                    scal_B4, offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD, ev_tick_X,
                    ev_kind_X, ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD, R_BT, dR_BT,
                    kappa_BT, loss_BT, Tbar_global_BTE, var_local_BTL, Tbar_local_BTLE,
                    T_fast_BTLE, usage_BTLE, rel_BTLE)
