"""Controller configuration: every constant of the P×T control law (DESIGN.md §3).

One frozen dataclass. Each field is validated in ``__post_init__``; a bad value raises
``ValueError`` naming the field, the value and what is allowed.

Defaults marked "seed" come from the original design note and prototype. The Kuramoto
constants (coupling, omega0, omega_disorder_std, drift_gain, phase_noise, dt) and lens_max are
ours; they were calibrated against the simulator's default environment and κ schedule (the
"Calibration" paragraph of ``chronomoe_dyn.simulate`` says how) and checked with the ``phases``
and ``kuramoto`` studies (see README, "Calibration").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["ControllerConfig"]


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
    reliability_sharpness: float = 4.0
    """Slope of the loss→reliability map: target s = σ(sharpness·(m̄ − m_e)/m̄), where m_e is an
    expert's mean token loss and m̄ the layer's token-weighted mean (equal losses give 0.5)."""

    # --- Kuramoto phases (ours) -----------------------------------------------------------
    coupling: float = 0.25
    """K: mean-field coupling strength."""
    omega0: float = 1.0
    """ω₀: common natural frequency (rad per unit time). Leaves R unchanged (rotating frame)."""
    omega_disorder_std: float = 0.05
    """Std of the fixed Gaussian per-oscillator frequency disorder, drawn at init from the seed.
    Against K it sets the R that perfectly stable routing reaches."""
    drift_gain: float = 4.0
    """α: frequency shift per unit of signed routing drift δ = E·(frac − u). Calibrated (see
    "Calibration" in ``chronomoe_dyn.simulate``): with α = 4 the drift of an unsettled router
    keeps R near the incoherent 1/sqrt(L·E) level, while the token-sampling drift of a settled
    one (δ std ≈ 0.12 per tick at 256 tokens) still leaves R ≈ 0.88; with α = 1, R ≥ 0.95 from
    tick ≈ 1000 whatever the router does."""
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
    beta_drift: float = 0.3
    """Gain of the normalised usage drift d̂ in T_fast. Seed: 0.3."""
    beta_reliability: float = 0.2
    """Gain of unreliability (1−s) in T_fast. Seed: 0.2."""
    T_min: float = 0.3
    """Lower clip of T_fast. Seed: 0.3."""
    T_max: float = 3.0
    """Upper clip of T_fast. Seed: 3.0."""

    # --- lens (integral term of the pressure controller) ---------------------------------
    lens_rate: float = 0.05
    """γ: lens step per macro tick. Seed: 0.05."""
    lens_max: float = 1.0
    """Clip of |lens| (ours)."""

    # --- meta-knob κ ------------------------------------------------------------------------
    beta_pressure: float = 0.5
    """β_p: κ gain on pressure, factor exp(β_p κ). Seed: 0.5."""
    beta_temperature: float = 0.4
    """β_T: κ gain on temperature, factor exp(β_T κ). Seed: 0.4."""
    beta_lens: float = 0.7
    """β_A: κ gain on the lens rate, factor exp(β_A κ). Seed: 0.7."""
    kappa_smoothing: float = 1.0
    """EMA rate of κ inside the controller: κ_s ← (1−r)κ_s + r·κ. 1.0 = no smoothing
    (the prototype used 0.3)."""

    # --- outputs ------------------------------------------------------------------------
    pressure_scale: float = 0.1
    """Scale of the routing bias: bias = pressure_scale·exp(β_p κ)·(P + lens). Seed: 0.1."""
    temperature_scale: float = 1.0
    """Scale of the applied temperature before its clamp to [0.1, 10]. Seed: 1.0."""

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
        _check_range("pressure_scale", self.pressure_scale, 0.0, None)
        _check_range("temperature_scale", self.temperature_scale, 0.0, None, lo_open=True)
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
