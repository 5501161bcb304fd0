"""The P×T control law, version 2: the NumPy reference every backend must match (DESIGN.md §3).

Per tick, given counts_LE, wsum_LE, optionally loss_LE, logit_scale_L (σ observed) and the
noiseless counts c°_LE (top-k slots of the score without exploration noise; = counts without
noise):

1. clocks: tick += 1; micro when tick % micro_period == 0, macro when tick % macro_period == 0.
2. usage (layers with n = Σ_e c° > 0): frac = c°/n (the router's choice: pressure corrects the
   router, not the balance the noise lends it; version 2.1, docs/CONTRACTS.md);
   δ = (frac − u)/sqrt(max(u(1−u), 1/E²)/n)  (u before the update: a z-score against
   multinomial sampling noise, |δ| ~ 1 for stable routing whatever n);  u ← ρu + (1−ρ)frac;
   σ_L ← observed σ on the layer's first observation (σ_L == 0), else ρσ_L + (1−ρ)σ.
3. reliability target: σ(sharp·(m̄ − m_e)/m̄) from mean token losses m_e = loss/counts (m̄:
   the layer's token-weighted mean; the routed counts), else u/max(u); s ← ρs + (1−ρ)target
   for experts that got tokens (counts > 0).
4. Kuramoto over all L·E oscillators: Z = mean(e^{iθ}) = R e^{iψ};
   θ ← θ + dt·(ω₀ + ω_dis + α·δ + K·R·sin(ψ − θ)) + σ_θ·sqrt(dt)·ξ  (mod 2π); ΔR = R_new − R_old.
5. micro tick: T̄_g ← (1−η_g)T̄_g + η_g·mean_{L,E}(T_fast)  (a scalar; T_fast of the last micro
   tick; the mean clipped to the range of the T_fast, against rounding); P = clip(2(1/E − u/Σu), −1, 1); d̂ = |u/Σu − 1/E| / max;
   T_fast = clip(T_base(1+β_R(1−R))(1+β_d d̂)(1+β_s(1−s)), T_min, T_max);
   T̄_l ← (1−η_l)T̄_l + η_l·T_fast; T_eff = T_fast·T̄_g·T̄_l.
6. lens tick (``lens_clock``: macro or micro): lens ← clip(lens + γ·e^{β_A κ}·σ(5ΔR)·P, ±lens_max).
7. κ (EMA rate r, 1 = none; ``smooth_kappa``) scales pressure by e^{β_p κ}, temperature by
   e^{β_T κ}, the lens rate by e^{β_A κ} and the exploration noise by e^{β_τ κ}.
8. outputs (``routing_fields``): bias = e^{β_p κ}·(k_P·P + lens);
   temperature = clip(T_eff·e^{β_T κ}, T_lo, T_hi); scale_L = max(σ_L, floor); τ = τ₀·e^{β_τ κ}.
   The routing rule that uses them is ``chronomoe_dyn.routing``.

Every EMA is clipped to the hull of its old value and its input (``ema``), so floating point
never steps outside it. Bad observations raise before anything is computed: the old state is
never touched.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import rng
from .config import ControllerConfig
from .state import ControllerState, RoutingObservation, order_parameter, validate_observation

__all__ = [
    "step", "routing_fields", "RoutingFields", "LayerFields", "order_parameter", "knob_factors",
    "KnobFactors", "coherence_gate", "smooth_kappa", "ema", "drift_zscore", "TWO_PI",
    "check_kappa", "DRIFT_EPS", "LENS_DR_GAIN",
]

TWO_PI = 2.0 * math.pi
LENS_DR_GAIN = 5.0
"""Slope of σ(5ΔR) in the lens update (DESIGN.md §3.6)."""
DRIFT_EPS = 1e-12
"""Largest usage drift max_e|u_e/Σu − 1/E| still read as uniform routing (d̂ = 0). u/Σu carries
rounding noise of ~1e-16 even when u is exactly uniform (Σu ≠ 1 in floating point for E = 6, 7,
...), and d̂ = d/max(d) would blow that noise up to the full β_d boost of T_fast."""


class KnobFactors(NamedTuple):
    """Multipliers the meta-knob κ applies: exp(β_p κ), exp(β_T κ), exp(β_A κ), exp(β_τ κ)."""
    pressure: float
    temperature: float
    lens: float
    exploration: float


class LayerFields(NamedTuple):
    """The controller's fields for one layer, as the routing rule takes them."""
    bias_E: np.ndarray
    """[E] additive bias on the score, in z̃ units."""
    temperature_E: np.ndarray
    """[E] per-expert routing temperature (divides z̃)."""
    scale: float
    """max(σ_L, logit_scale_floor): divides the centred logits."""
    tau: float
    """Gumbel noise scale τ = τ₀·e^{β_τ κ} (0: deterministic routing)."""


class RoutingFields(NamedTuple):
    """What the router receives from the controller (``routing_fields``)."""
    bias_LE: np.ndarray
    """[L, E] e^{β_p κ}·(k_P·P + lens)."""
    temperature_LE: np.ndarray
    """[L, E] clip(T_eff·e^{β_T κ}, routing_T_min, routing_T_max)."""
    scale_L: np.ndarray
    """[L] max(σ_L, logit_scale_floor)."""
    tau: float
    """τ₀·e^{β_τ κ}."""

    def layer(self, layer: int) -> LayerFields:
        """The fields of one layer."""
        return LayerFields(self.bias_LE[layer], self.temperature_LE[layer],
                           float(self.scale_L[layer]), float(self.tau))


def check_kappa(kappa: float) -> float:
    """Return κ as a float or raise ValueError unless it is finite and in [-1, 1]."""
    if isinstance(kappa, bool):
        raise ValueError(f"kappa={kappa!r}: expected a real number in [-1, 1]")
    try:
        k = float(kappa)
    except (TypeError, ValueError):
        raise ValueError(f"kappa={kappa!r}: expected a real number in [-1, 1]") from None
    if not math.isfinite(k) or k < -1.0 or k > 1.0:
        raise ValueError(f"kappa={kappa!r}: allowed range is [-1, 1]")
    return k


def knob_factors(kappa: float, config: ControllerConfig) -> KnobFactors:
    """The κ multipliers; all equal 1 at κ = 0 and increase with κ."""
    k = check_kappa(kappa)
    return KnobFactors(math.exp(config.beta_pressure * k), math.exp(config.beta_temperature * k),
                       math.exp(config.beta_lens * k), math.exp(config.beta_tau * k))


def ema(old, new, rate):
    """(1 − rate)·old + rate·new, clipped to the hull of old and new. Scalars or arrays; the
    Numba kernels compile this same function, so the bits agree."""
    out = (1.0 - rate) * old + rate * new
    return np.minimum(np.maximum(out, np.minimum(old, new)), np.maximum(old, new))


def smooth_kappa(kappa_old, kappa_target, smoothing):
    """κ in effect after one tick of the controller's κ smoothing (EMA of rate ``smoothing``,
    1 = none, hull-clipped). Scalars or arrays. The one formula of κ smoothing: law.step, the
    simulator and the kernels use it; the torch adapter mirrors it."""
    return ema(kappa_old, kappa_target, smoothing)


def coherence_gate(R, min_coherence: float = 0.2, strength: float = 0.5):
    """Seed's gate: 1 − strength·(1 − g(R)), g = 0 below min_coherence, else
    (R − min)/(1 − min). In [0, 1], non-decreasing in R; equals 1 at R = 1. R may be a float
    (returns a float) or an array (elementwise)."""
    if not 0.0 <= min_coherence < 1.0:
        raise ValueError(f"min_coherence={min_coherence!r}: allowed range is [0, 1)")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r}: allowed range is [0, 1]")
    r = np.clip(np.asarray(R, dtype=np.float64), 0.0, 1.0)
    g = np.where(r < min_coherence, 0.0, (r - min_coherence) / (1.0 - min_coherence))
    out = np.clip(1.0 - strength * (1.0 - g), 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def drift_zscore(frac: np.ndarray, usage: np.ndarray, n: np.ndarray) -> np.ndarray:
    """δ = (frac − u)/sqrt(max(u(1−u), 1/E²)/n) along the last axis (E experts); n > 0 is the
    slots of each row (broadcast)."""
    E = usage.shape[-1]
    var = np.maximum(usage * (1.0 - usage), 1.0 / (E * E))
    return (frac - usage) / np.sqrt(var / n)


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    # Stable for large |x|: exp of a non-positive number only.
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def _reliability_target(counts: np.ndarray, loss: np.ndarray | None, usage: np.ndarray,
                        sharpness: float) -> np.ndarray:
    """[L, E] target reliability in [0, 1] (meaningful only where counts > 0)."""
    if loss is None:
        umax = usage.max(axis=1, keepdims=True)
        return np.divide(usage, umax, out=np.zeros_like(usage), where=umax > 0)
    tot_c = counts.sum(axis=1, keepdims=True)
    tot_l = loss.sum(axis=1, keepdims=True)
    mbar = np.divide(tot_l, tot_c, out=np.zeros_like(tot_l), where=tot_c > 0)
    m = np.divide(loss, counts, out=np.zeros_like(loss), where=counts > 0)
    rel = np.divide(mbar - m, mbar, out=np.zeros_like(m), where=mbar > 0)
    return np.clip(_sigmoid(sharpness * rel), 0.0, 1.0)


def step(state: ControllerState, config: ControllerConfig, obs: RoutingObservation,
         kappa: float = 0.0) -> ControllerState:
    """One controller tick. Pure: returns a new state; raises on bad input, touching nothing."""
    L, E = state.num_layers, state.num_experts
    counts, _wsum, loss, scale_obs = validate_observation(obs, L, E)
    # The router's choice (top-k of the noiseless score): usage, drift and pressure read it;
    # reliability reads the routed counts its losses belong to. Validated above.
    choice = counts if obs.noiseless_counts is None else \
        np.asarray(obs.noiseless_counts, dtype=np.float64)
    k_in = check_kappa(kappa)
    cfg = config

    # 1. clocks
    tick = state.tick + 1
    micro = tick % cfg.micro_period == 0
    macro = tick % cfg.macro_period == 0
    lens_tick = macro if cfg.lens_clock == "macro" else micro

    # 7 (first, so this tick's lens sees it). κ smoothing.
    kap = float(smooth_kappa(state.kappa, k_in, cfg.kappa_smoothing))

    # 2. usage, z-scored drift, logit scale
    rho = cfg.usage_decay
    tot = choice.sum(axis=1, keepdims=True)                     # [L, 1] slots n
    active = tot > 0                                            # [L, 1]
    frac = np.divide(choice, tot, out=np.zeros_like(choice), where=active)
    delta = np.where(active, drift_zscore(frac, state.usage_LE, np.where(active, tot, 1.0)), 0.0)
    usage = np.where(active, ema(state.usage_LE, frac, 1.0 - rho), state.usage_LE)
    sigma = state.logit_scale_L
    if scale_obs is not None:
        seen_L = active[:, 0]
        first = sigma == 0.0
        sigma = np.where(seen_L, np.where(first, scale_obs, ema(sigma, scale_obs, 1.0 - rho)),
                         sigma)

    # 3. reliability (only experts that got tokens move)
    target = _reliability_target(counts, loss, usage, cfg.reliability_sharpness)
    seen = counts > 0
    reliability = np.where(seen, ema(state.reliability_LE, target, 1.0 - rho),
                           state.reliability_LE)

    # 4. Kuramoto phases (mean field before the update)
    th = state.theta_LE
    R0, psi0 = state.R, state.psi
    drive = cfg.omega0 + state.omega_disorder_LE + cfg.drift_gain * delta \
        + cfg.coupling * R0 * np.sin(psi0 - th)
    th_new = th + cfg.dt * drive
    if cfg.phase_noise > 0.0:
        xi = rng.normal(state.seed, rng.STREAM_PHASE, tick, np.arange(L * E)).reshape(L, E)
        th_new = th_new + cfg.phase_noise * math.sqrt(cfg.dt) * xi
    th_new = np.mod(th_new, TWO_PI)
    th_new = np.where(th_new >= TWO_PI, 0.0, th_new)  # mod can round up to exactly 2π
    R, psi = order_parameter(th_new)
    dR = R - R0

    # 5. micro tick: temperatures
    pressure, T_fast = state.pressure_LE, state.T_fast_LE
    Tbar_g, Tbar_l, T_eff = state.Tbar_global, state.Tbar_local_LE, state.T_eff_LE
    if micro:
        # the mean, kept inside the range of the values it averages (rounding can put the
        # mean of values all equal to T_max an ulp above T_max)
        t_mean = min(max(float(T_fast.mean()), float(T_fast.min())), float(T_fast.max()))
        Tbar_g = float(ema(Tbar_g, t_mean, cfg.eta_structural_T_global))
        share = usage / usage.sum(axis=1, keepdims=True)
        pressure = np.clip(2.0 * (1.0 / E - share), -1.0, 1.0)
        d = np.abs(share - 1.0 / E)
        dmax = d.max(axis=1, keepdims=True)
        d_hat = np.divide(d, dmax, out=np.zeros_like(d), where=dmax > DRIFT_EPS)
        T_fast = np.clip(cfg.T_base * (1.0 + cfg.beta_R * (1.0 - R))
                         * (1.0 + cfg.beta_drift * d_hat)
                         * (1.0 + cfg.beta_reliability * (1.0 - reliability)),
                         cfg.T_min, cfg.T_max)
        Tbar_l = ema(Tbar_l, T_fast, cfg.eta_structural_T_local)
        T_eff = T_fast * Tbar_g * Tbar_l

    # 6. lens tick (after the micro tick's pressure)
    lens = state.lens_LE
    if lens_tick:
        rate = cfg.lens_rate * math.exp(cfg.beta_lens * kap) * float(_sigmoid(LENS_DR_GAIN * dR))
        lens = np.clip(lens + rate * pressure, -cfg.lens_max, cfg.lens_max)

    return ControllerState(
        tick=tick, seed=state.seed, theta_LE=th_new, omega_disorder_LE=state.omega_disorder_LE,
        R=R, psi=psi, dR=dR, usage_LE=usage, reliability_LE=reliability, delta_LE=delta,
        pressure_LE=pressure, lens_LE=lens, T_fast_LE=T_fast, Tbar_local_LE=Tbar_l,
        Tbar_global=Tbar_g, T_eff_LE=T_eff, logit_scale_L=sigma, kappa=kap,
    )


def routing_fields(state: ControllerState, config: ControllerConfig,
                   kappa: float | None = None) -> RoutingFields:
    """The fields the routing rule takes (``chronomoe_dyn.routing``), DESIGN.md §3.8:
    bias = e^{β_p κ}·(k_P·P + lens), temperature = clip(T_eff·e^{β_T κ}, T_lo, T_hi),
    scale_L = max(σ_L, floor), τ = τ₀·e^{β_τ κ}.

    ``kappa`` defaults to the κ in effect in ``state`` (the last one ``step`` received, after
    smoothing)."""
    k = state.kappa if kappa is None else check_kappa(kappa)
    f_p = math.exp(config.beta_pressure * k)
    f_t = math.exp(config.beta_temperature * k)
    bias = f_p * (config.pressure_gain * state.pressure_LE + state.lens_LE)
    temperature = np.clip(state.T_eff_LE * f_t, config.routing_T_min, config.routing_T_max)
    scale = np.maximum(state.logit_scale_L, config.logit_scale_floor)
    tau = config.exploration_tau0 * math.exp(config.beta_tau * k)
    return RoutingFields(bias, temperature, scale, tau)
