"""Controller configuration: every constant of the P×T control law, version 2 (DESIGN.md §3).

One frozen dataclass. Each field is validated in ``__post_init__``; a bad value raises
``ValueError`` naming the field, the value and what is allowed.

Defaults marked "seed" come from the original design note and prototype. The Kuramoto constants
(coupling, omega0, omega_disorder_std, phase_noise, dt) are ours, calibrated for version 1 (see
"Calibration" in ``chronomoe_dyn.simulate``). The version-2 constants (drift_gain on the z-scored
drift, pressure_gain, exploration_tau0, beta_tau, lens_rate/lens_max in normalised units, the
routing temperature clamp) were chosen once, by the calibration recorded in
``docs/calibration.md`` (the simulator's default environment and the real-text benchmark of
``chronomoe-train compare``, with every candidate that was tried): drift_gain 0.1, pressure_gain
2, beta_drift 0.1, beta_reliability 0.8, reliability_sharpness 8; the others kept their seed or
starting values, with the reasoning given per field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["ControllerConfig", "LENS_CLOCKS", "CHOICES"]

LENS_CLOCKS = ("macro", "micro")
"""Allowed values of ``ControllerConfig.lens_clock``."""
CHOICES: dict[str, tuple[str, ...]] = {"lens_clock": LENS_CLOCKS}
"""The string-valued fields and their allowed values, in a fixed order (the Numba kernels receive
the index of the value in this tuple)."""


def _check_range(name: str, value: Any, lo: float | None, hi: float | None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a real number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be finite")
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else repr(lo)
        hi_s = "inf" if hi is None else repr(hi)
        raise ValueError(f"{name}={value!r}: allowed range is {left}{lo_s}, {hi_s}{right}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: expected an integer >= {lo}")
    if value < lo:
        raise ValueError(f"{name}={value!r}: allowed range is integers >= {lo}")


@dataclass(frozen=True)
class ControllerConfig:
    """Constants of the P×T routing controller. All rates are per tick unless stated."""

    # --- clocks -------------------------------------------------------------------------
    micro_period: int = 5
    """Fast ticks per micro tick (temperature and structural-temperature update). Seed: 5."""
    macro_period: int = 20
    """Fast ticks per macro tick (lens update). Seed: 20."""

    # --- usage and reliability ----------------------------------------------------------
    usage_decay: float = 0.95
    """ρ: EMA decay of the usage fractions u and of the reliability s. Seed: 0.95."""
    reliability_sharpness: float = 8.0
    """Slope of the loss→reliability map: target s = σ(sharpness·(m̄ − m_e)/m̄), where m_e is an
    expert's mean token loss and m̄ the layer's token-weighted mean (equal losses give 0.5).
    Calibrated: 8 (the seed's 4 with β_reliability 0.2 left T_fast to the usage drift, see
    ``beta_drift``)."""

    # --- Kuramoto phases (ours) -----------------------------------------------------------
    coupling: float = 0.25
    """K: mean-field coupling strength."""
    omega0: float = 1.0
    """ω₀: common natural frequency (rad per unit time). Leaves R unchanged (rotating frame)."""
    omega_disorder_std: float = 0.05
    """Std of the fixed Gaussian per-oscillator frequency disorder, drawn at init from the seed.
    Against K it sets the R that perfectly stable routing reaches."""
    drift_gain: float = 0.1
    """α: frequency shift per unit of z-scored routing drift δ = (frac − u)/sqrt(max(u(1−u),
    1/E²)/n). Calibrated (docs/calibration.md): each tick kicks a phase by α·dt·δ, and drift
    that persists acts as frequency disorder, so locking needs α·std(δ) well below K. On real
    text the starting value 0.3 kept R at the incoherent floor all run (10–90 %: 0.07–0.35),
    0.05 and 0.1 gave R a real range (0.21–0.97, 0.21–0.85); in the simulator, whose drift is
    smaller, 0.3 spans 0.40–0.90 and 0.1 only 0.93–0.98. No single α serves both equally: 0.1
    is the smallest range change on the simulator that keeps real training's R off its floor.
    (Version 1 used α = 4 on δ = E·(frac − u), a different unit.)"""
    phase_noise: float = 0.0
    """σ: phase-diffusion noise amplitude (θ += σ·sqrt(dt)·ξ, ξ ~ N(0,1) from the counter RNG)."""
    dt: float = 0.5
    """Integration step of the phase dynamics per fast tick."""

    # --- temperatures ---------------------------------------------------------------------
    eta_structural_T_global: float = 0.005
    """η_g: EMA rate of the global structural temperature T̄_global (per micro tick). Seed."""
    eta_structural_T_local: float = 0.01
    """η_l: EMA rate of the per-layer structural temperature T̄_local (per micro tick). Seed."""
    T_base: float = 1.0
    """Base fast temperature. Seed: 1.0."""
    beta_R: float = 0.5
    """Gain of incoherence (1−R) in T_fast. Seed: 0.5."""
    beta_drift: float = 0.1
    """Gain of the normalised usage drift d̂ in T_fast. Calibrated: 0.1 (seed 0.3). With the
    seed's gains T_fast was set mostly by d̂, so valleys were the evenly used experts, not the
    good ones: valley health (share of valleys whose token loss beats the layer mean) 0.56–0.59
    in the simulator, and with the fields balancing usage the landscape rarely formed (var
    T̄_local > 0.01 in 1 of 8 systems; real text 0.002 after 500 steps). With 0.1 / 0.8 / 8:
    health 0.97, formed in every system; real text var T̄_local 0.023–0.029 after 500 steps."""
    beta_reliability: float = 0.8
    """Gain of unreliability (1−s) in T_fast. Calibrated: 0.8 (seed 0.2; see ``beta_drift``)."""
    T_min: float = 0.3
    """Lower clip of T_fast. Seed: 0.3."""
    T_max: float = 3.0
    """Upper clip of T_fast. Seed: 3.0."""

    # --- lens (integral term of the pressure controller) ---------------------------------
    lens_rate: float = 0.05
    """γ: lens step per lens tick (see ``lens_clock``), in units of the centred, σ-normalised
    logit z̃ (the bias's unit). The seed's 0.05, kept by calibration (0.1 and 0.2 did not
    balance better on real text and 0.2 cost loss); with |P| ≤ 1 and σ(5ΔR) ≈ ½ the lens moves
    ≤ 0.025 z̃ per lens tick."""
    lens_max: float = 1.0
    """Clip of |lens|, in z̃ units: one logit standard deviation (not varied by calibration)."""
    lens_clock: str = "macro"
    """Clock of the lens update: "macro" (every macro_period ticks, the seed's choice) or
    "micro" (every micro_period ticks). Calibrated: "macro". On real text the micro clock
    balanced slightly better with the seed's T_fast gains (MaxVio_global 0.24 ± 0.01 vs 0.29 ±
    0.05, 3 seeds) but not with the calibrated ones (0.27 ± 0.08 vs 0.28 ± 0.05), and in the
    simulator it cost loss (+0.036 against the ablation vs +0.012)."""

    # --- meta-knob κ ------------------------------------------------------------------------
    beta_pressure: float = 0.0
    """β_p: κ gain on the bias, factor exp(β_p κ). Calibrated: 0 (seed 0.5). Since law v2.1
    the bias corrects the router's noiseless choice, and κ already raises its authority over
    that choice through the temperature (z̃/T shrinks as T·e^{β_T κ} grows); with the seed's
    0.5 as well the loop overshot at κ = +1 on real text (MaxVio_global 0.681 ± 0.278, 3 seeds;
    0.228 ± 0.016 with 0). docs/calibration.md, "Law v2.1"."""
    beta_temperature: float = 0.4
    """β_T: κ gain on temperature, factor exp(β_T κ). Seed: 0.4."""
    beta_lens: float = 0.7
    """β_A: κ gain on the lens rate, factor exp(β_A κ). Seed: 0.7."""
    kappa_smoothing: float = 1.0
    """EMA rate of κ inside the controller: κ_s ← (1−r)κ_s + r·κ. 1.0 = no smoothing
    (the prototype used 0.3)."""

    # --- outputs: the routing rule (DESIGN.md §3.8) ---------------------------------------
    pressure_gain: float = 2.0
    """k_P: bias = e^{β_p κ}(k_P·P + lens), in units of the centred, σ-normalised logit z̃.
    Calibrated: 2. P = clip(2(1/E − share)) is small for E = 8
    (−0.06 for an expert at 1.23× its share), so k_P = 1 moved little; 4 did not balance better
    and 8 overshot (MaxVio_global 0.39 ± 0.12 on real text). Note P is not scale-free in E: the
    same k_P is weaker at larger E (a finding about DESIGN §3's P; kept as specified)."""
    routing_T_min: float = 0.1
    """T_lo: lower clamp of the output temperature (was the constant TEMPERATURE_MIN)."""
    routing_T_max: float = 10.0
    """T_hi: upper clamp of the output temperature (was the constant TEMPERATURE_MAX)."""
    exploration_tau0: float = 0.1
    """τ₀: scale of the Gumbel exploration noise at κ = 0, τ = τ₀·e^{β_τ κ} (0: no noise).
    Kept by calibration (0.05 and 0.2 were no better on real text): z̃/T has unit spread, so τ =
    1 swamps it (65 % of slots explored in the spec check); τ₀ = 0.1 explored ≈ 18 % under
    the seed's κ schedule at no loss cost."""
    beta_tau: float = 1.5
    """β_τ: κ gain on the exploration noise, τ = τ₀·e^{β_τ κ}. Not varied by calibration: makes
    κ a strong lever (spec check: constant κ = +1 vs −1 explored 61 % vs 3.8 % of slots,
    16×)."""
    logit_scale_floor: float = 1e-3
    """Floor of σ_L when routing divides by it (a router whose logits are all equal, or a layer
    not observed yet: σ_L = 0)."""

    # --- diagnostics -----------------------------------------------------------------------
    landscape_threshold_std: float = 0.5
    """Valleys are experts with T̄ < mean − this·std, ridges > mean + this·std. Seed: 0.5."""
    landscape_formed_variance: float = 0.01
    """The landscape counts as formed when var(T̄) exceeds this. Seed: 0.01."""
    unhealthy_reliability: float = 0.3
    """A valley whose reliability is below this is unhealthy. Seed: 0.3."""

    def __post_init__(self) -> None:
        _check_int("micro_period", self.micro_period, 1)
        _check_int("macro_period", self.macro_period, 1)
        _check_range("usage_decay", self.usage_decay, 0.0, 1.0, hi_open=True)
        _check_range("reliability_sharpness", self.reliability_sharpness, 0.0, None, lo_open=True)
        _check_range("coupling", self.coupling, 0.0, None)
        _check_range("omega0", self.omega0, None, None)
        _check_range("omega_disorder_std", self.omega_disorder_std, 0.0, None)
        _check_range("drift_gain", self.drift_gain, None, None)
        _check_range("phase_noise", self.phase_noise, 0.0, None)
        _check_range("dt", self.dt, 0.0, 10.0, lo_open=True)
        _check_range("eta_structural_T_global", self.eta_structural_T_global, 0.0, 1.0)
        _check_range("eta_structural_T_local", self.eta_structural_T_local, 0.0, 1.0)
        _check_range("T_base", self.T_base, 0.0, None, lo_open=True)
        _check_range("beta_R", self.beta_R, 0.0, None)
        _check_range("beta_drift", self.beta_drift, 0.0, None)
        _check_range("beta_reliability", self.beta_reliability, 0.0, None)
        _check_range("T_min", self.T_min, 0.0, None, lo_open=True)
        _check_range("T_max", self.T_max, 0.0, None, lo_open=True)
        if self.T_min > self.T_max:
            raise ValueError(f"T_min={self.T_min!r} > T_max={self.T_max!r}: need T_min <= T_max")
        _check_range("lens_rate", self.lens_rate, 0.0, None)
        _check_range("lens_max", self.lens_max, 0.0, None)
        _check_range("beta_pressure", self.beta_pressure, 0.0, 10.0)
        _check_range("beta_temperature", self.beta_temperature, 0.0, 10.0)
        _check_range("beta_lens", self.beta_lens, 0.0, 10.0)
        _check_range("kappa_smoothing", self.kappa_smoothing, 0.0, 1.0, lo_open=True)
        if self.lens_clock not in LENS_CLOCKS:
            raise ValueError(f"lens_clock={self.lens_clock!r}: allowed values are {LENS_CLOCKS}")
        _check_range("pressure_gain", self.pressure_gain, 0.0, None)
        _check_range("routing_T_min", self.routing_T_min, 0.0, None, lo_open=True)
        _check_range("routing_T_max", self.routing_T_max, 0.0, None, lo_open=True)
        if self.routing_T_min > self.routing_T_max:
            raise ValueError(f"routing_T_min={self.routing_T_min!r} > routing_T_max="
                             f"{self.routing_T_max!r}: need routing_T_min <= routing_T_max")
        _check_range("exploration_tau0", self.exploration_tau0, 0.0, None)
        _check_range("beta_tau", self.beta_tau, 0.0, 10.0)
        _check_range("logit_scale_floor", self.logit_scale_floor, 0.0, None, lo_open=True)
        _check_range("landscape_threshold_std", self.landscape_threshold_std, 0.0, None)
        _check_range("landscape_formed_variance", self.landscape_formed_variance, 0.0, None)
        _check_range("unhealthy_reliability", self.unhealthy_reliability, 0.0, 1.0)

    # Convenience ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerConfig":
        """Build from a dict; unknown keys raise ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ControllerConfig field(s): {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ControllerConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
