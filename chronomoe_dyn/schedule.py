"""Meta-knob κ schedules: pure functions of the step.

κ is held at ``initial_kappa`` for ``warmup_steps``, then annealed to ``final_kappa`` at
``total_steps`` (progress p = (step − warmup)/(total − warmup), clipped to [0, 1]):

  linear:   κ = κ₀ + (κ₁ − κ₀)·p
  cosine:   κ = κ₁ + (κ₀ − κ₁)·(1 + cos πp)/2      (starts at κ₀, ends at κ₁)
  step:     κ₀ for p < 1/3, (κ₀ + κ₁)/2 for 1/3 ≤ p < 2/3, κ₁ from p ≥ 2/3
  adaptive: the linear base plus a rule-based offset o (state), faded out as (1 − p)·o so
            the schedule still ends at κ₁. Rules, applied once per update with rate a:
              R < R_low            → o += a  (incoherent: explore more)
              R > R_high, formed   → o −= a  (coherent, landscape formed: exploit)
              var(T̄) > var_high    → o += a  (over-differentiated: explore)
              otherwise            → o ← decay·o
            o is clipped to ±max_offset.
Every κ is clipped to [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["KnobSchedule", "kappa_at", "phase_label", "AdaptiveRule", "AdaptiveState",
           "adaptive_offset_update", "SCHEDULE_KINDS"]

SCHEDULE_KINDS = ("constant", "linear", "cosine", "step", "adaptive")


@dataclass(frozen=True)
class AdaptiveRule:
    """Parameters of the rule-based adaptive κ controller."""
    R_low: float = 0.3
    """Below this coherence, push κ up (explore)."""
    R_high: float = 0.8
    """Above this coherence with a formed landscape, push κ down (exploit)."""
    variance_high: float = 0.1
    """Above this T̄ variance the landscape is over-differentiated: push κ up."""
    rate: float = 0.02
    """Offset change per rule firing."""
    decay: float = 0.9
    """Offset decay when no rule fires."""
    max_offset: float = 0.3
    """Clip of |offset|."""

    def __post_init__(self) -> None:
        for name, lo, hi in (("R_low", 0.0, 1.0), ("R_high", 0.0, 1.0), ("variance_high", 0.0, 1e9),
                             ("rate", 0.0, 1.0), ("decay", 0.0, 1.0), ("max_offset", 0.0, 2.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                    or not lo <= v <= hi:
                raise ValueError(f"AdaptiveRule.{name}={v!r}: allowed range is [{lo}, {hi}]")
        if self.R_low > self.R_high:
            raise ValueError(f"AdaptiveRule.R_low={self.R_low!r} > R_high={self.R_high!r}")


@dataclass(frozen=True)
class AdaptiveState:
    """State of the adaptive controller: the current offset and the number of updates."""
    offset: float = 0.0
    updates: int = 0


@dataclass(frozen=True)
class KnobSchedule:
    """A κ schedule from ``initial_kappa`` to ``final_kappa``."""
    kind: str = "cosine"
    """One of constant, linear, cosine, step, adaptive."""
    initial_kappa: float = 0.5
    """κ during warm-up (seed: 0.5, exploratory)."""
    final_kappa: float = -0.3
    """κ at and after ``total_steps`` (seed: -0.3, exploitative)."""
    warmup_steps: int = 1000
    """Steps κ is held at ``initial_kappa`` (seed: 1000)."""
    total_steps: int = 100_000
    """Step at which κ reaches ``final_kappa``; must exceed ``warmup_steps``."""
    rule: AdaptiveRule = AdaptiveRule()
    """Rules of the ``adaptive`` kind (ignored by the others)."""

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind={self.kind!r}: allowed values are {SCHEDULE_KINDS}")
        for name in ("initial_kappa", "final_kappa"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not -1.0 <= v <= 1.0:
                raise ValueError(f"{name}={v!r}: allowed range is [-1, 1]")
        for name, lo in (("warmup_steps", 0), ("total_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be < "
                             f"total_steps={self.total_steps!r}")

    def progress(self, step: int | np.ndarray) -> np.ndarray | float:
        """Anneal progress p in [0, 1] at ``step``."""
        s = np.asarray(step, dtype=np.float64)
        p = np.clip((s - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0)
        return float(p) if p.ndim == 0 else p


def _base(kind: str, k0: float, k1: float, p: np.ndarray) -> np.ndarray:
    if kind == "constant":
        return np.full_like(p, k0)
    if kind in ("linear", "adaptive"):
        k = k0 + (k1 - k0) * p
    elif kind == "cosine":
        k = k1 + (k0 - k1) * 0.5 * (1.0 + np.cos(np.pi * p))
    elif kind == "step":
        return np.where(p < 1.0 / 3.0, k0, np.where(p < 2.0 / 3.0, 0.5 * (k0 + k1), k1))
    else:
        raise ValueError(f"unknown schedule kind {kind!r}")  # unreachable after validation
    # Rounding can leave k0 + (k1 − k0)·1 an ulp short of k1 or past it (likewise the cosine at
    # p = 0): keep κ between the two ends and hit both exactly.
    k = np.clip(k, min(k0, k1), max(k0, k1))
    return np.where(p <= 0.0, k0, np.where(p >= 1.0, k1, k))


def kappa_at(schedule: KnobSchedule, step: int | np.ndarray,
             adaptive: AdaptiveState | None = None) -> float | np.ndarray:
    """κ at ``step`` (scalar or array). For ``adaptive`` pass the controller's state; without
    it the offset is 0 (the linear base)."""
    s = np.asarray(step)
    if np.any(s < 0):
        raise ValueError(f"step must be >= 0, got {step!r}")
    p = np.asarray(schedule.progress(s), dtype=np.float64)
    k = _base(schedule.kind, float(schedule.initial_kappa), float(schedule.final_kappa), p)
    if schedule.kind == "adaptive" and adaptive is not None:
        k = k + (1.0 - p) * adaptive.offset
    k = np.clip(k, -1.0, 1.0)
    return float(k) if k.ndim == 0 else k


def phase_label(schedule: KnobSchedule, step: int) -> str:
    """Label for logs: warmup_explore, <kind>_anneal, final_exploit (seed's log format)."""
    if step < schedule.warmup_steps:
        return "warmup_explore"
    if step >= schedule.total_steps or schedule.kind == "constant":
        return "final_exploit" if schedule.kind != "constant" else "constant"
    return "adaptive" if schedule.kind == "adaptive" else f"{schedule.kind}_anneal"


def adaptive_offset_update(offset: float, R: float, variance: float, formed: bool,
                           R_low: float, R_high: float, variance_high: float, rate: float,
                           decay: float, max_offset: float) -> float:
    """One rule-based update of the adaptive offset (scalars only, so Numba can compile it)."""
    if R < R_low:
        o = offset + rate
    elif R > R_high and formed:
        o = offset - rate
    elif variance > variance_high:
        o = offset + rate
    else:
        o = offset * decay
    return min(max(o, -max_offset), max_offset)


def adaptive_update(state: AdaptiveState, rule: AdaptiveRule, R: float, variance: float,
                    formed: bool) -> AdaptiveState:
    """Advance the adaptive controller by one observation of (R, var(T̄), formed)."""
    for name, v in (("R", R), ("variance", variance)):
        if not math.isfinite(float(v)):
            raise ValueError(f"adaptive_update: {name}={v!r} is not finite")
    o = adaptive_offset_update(float(state.offset), float(R), float(variance), bool(formed),
                               rule.R_low, rule.R_high, rule.variance_high, rule.rate,
                               rule.decay, rule.max_offset)
    return AdaptiveState(offset=o, updates=state.updates + 1)


__all__.append("adaptive_update")
