"""Controller state (law version 2), routing observations, ``init_state`` and the Kuramoto
order parameter.

Shape legend: L layers, E experts. Suffixes name shapes (``usage_LE`` is [L, E],
``logit_scale_L`` is [L]). Scalars are Python floats/ints. Arrays are float64.

This module depends on ``config`` only; ``law`` builds on it (no import cycle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .config import ControllerConfig

__all__ = ["ControllerState", "RoutingObservation", "init_state", "validate_observation",
           "noiseless_counts_of", "NOISELESS_TOTAL_RTOL",
           "order_parameter"]

_ARRAY_FIELDS = (
    "theta_LE", "omega_disorder_LE", "usage_LE", "reliability_LE", "delta_LE", "pressure_LE",
    "lens_LE", "T_fast_LE", "Tbar_local_LE", "T_eff_LE", "logit_scale_L",
)
_INT_FIELDS = ("tick", "seed")


def order_parameter(theta: np.ndarray) -> tuple[float, float]:
    """Kuramoto order parameter of all phases in ``theta`` (any shape): (R, ψ).

    R = |mean(e^{iθ})| clipped to [0, 1]; ψ = arg of the mean, in (-π, π]."""
    th = np.asarray(theta, dtype=np.float64)
    if th.size == 0:
        raise ValueError("order_parameter: theta is empty")
    c = float(np.mean(np.cos(th)))
    s = float(np.mean(np.sin(th)))
    R = min(1.0, math.hypot(c, s))
    return R, math.atan2(s, c)


@dataclass(frozen=True)
class ControllerState:
    """Everything the controller carries between ticks. Treat as immutable: ``step`` returns a
    new state and never writes into the arrays of the old one."""

    tick: int
    """Fast clock: number of ticks taken. Micro tick when tick % micro_period == 0, macro when
    tick % macro_period == 0 (checked after the increment)."""
    seed: int
    """Key of the counter-based phase noise (see ``rng``)."""
    theta_LE: np.ndarray
    """[L, E] Kuramoto phases in [0, 2π)."""
    omega_disorder_LE: np.ndarray
    """[L, E] fixed frequency disorder of each oscillator (added to ω₀)."""
    R: float
    """Kuramoto coherence |mean(exp iθ)| over all L·E oscillators, in [0, 1]."""
    psi: float
    """Mean-field phase arg(mean(exp iθ)) in (-π, π]."""
    dR: float
    """R after the last tick minus R before it."""
    usage_LE: np.ndarray
    """[L, E] usage EMA u; each row is on the simplex (sums to 1)."""
    reliability_LE: np.ndarray
    """[L, E] reliability EMA s in [0, 1]."""
    delta_LE: np.ndarray
    """[L, E] z-scored routing drift of the last tick, δ = (frac − u)/sqrt(max(u(1−u), 1/E²)/n)
    with u before the update and n the layer's slots (0 for a layer without tokens)."""
    pressure_LE: np.ndarray
    """[L, E] pressure P in [-1, 1] (positive for under-used experts), from the last micro tick."""
    lens_LE: np.ndarray
    """[L, E] lens (integral of pressure) in [-lens_max, lens_max]."""
    T_fast_LE: np.ndarray
    """[L, E] fast temperature in [T_min, T_max]."""
    Tbar_local_LE: np.ndarray
    """[L, E] per-layer structural temperature T̄_local (slow EMA of T_fast)."""
    Tbar_global: float
    """Global structural temperature T̄_global: the model's slowest level, a scalar EMA of the
    mean of T_fast over every layer and expert (version 1 kept one per expert index, averaging
    unrelated experts of different layers)."""
    T_eff_LE: np.ndarray
    """[L, E] effective temperature T_fast · T̄_global · T̄_local."""
    logit_scale_L: np.ndarray
    """[L] σ_L: EMA of the router's observed logit scale (mean over tokens of the std across
    experts of the raw logits). 0 = not observed yet; routing divides by
    max(σ_L, logit_scale_floor)."""
    kappa: float
    """Meta-knob κ in effect (after the controller's optional smoothing), in [-1, 1]."""

    @property
    def num_layers(self) -> int:
        return int(self.theta_LE.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.theta_LE.shape[1])

    @property
    def Tbar_hier_LE(self) -> np.ndarray:
        """[L, E] hierarchical structural temperature T̄_global · T̄_local."""
        return self.Tbar_global * self.Tbar_local_LE

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict (arrays are copied)."""
        return {f.name: (np.array(getattr(self, f.name)) if f.name in _ARRAY_FIELDS
                         else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerState":
        """Inverse of ``to_dict``. A version-1 state (``Tbar_global_E``, no ``logit_scale_L``)
        is refused with a message saying so."""
        if "Tbar_global_E" in d and "Tbar_global" not in d:
            raise ValueError("ControllerState.from_dict: this is a version-1 controller state "
                             "(Tbar_global_E per expert, no logit_scale_L); the version-2 law "
                             "cannot continue it: start a new run")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"ControllerState.from_dict: missing field(s) {missing}")
        kw = {}
        for n in names:
            v = d[n]
            if n in _ARRAY_FIELDS:
                kw[n] = np.array(v, dtype=np.float64)
            elif n in _INT_FIELDS:
                kw[n] = int(v)
            else:
                kw[n] = float(v)
        state = cls(**kw)
        L, E = state.theta_LE.shape
        for n in _ARRAY_FIELDS:
            want = (L,) if n == "logit_scale_L" else (L, E)
            if getattr(state, n).shape != want:
                raise ValueError(f"ControllerState.from_dict: {n} has shape "
                                 f"{getattr(state, n).shape}, expected {want}")
        return state

    def allclose(self, other: "ControllerState", atol: float = 0.0, rtol: float = 0.0) -> bool:
        """True when every field matches within the tolerance (exact by default)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if not np.allclose(a, b, atol=atol, rtol=rtol):
                return False
        return True


@dataclass(frozen=True)
class RoutingObservation:
    """What the controller sees of one tick of routing, per layer and expert.

    counts: [L, E] tokens routed to each expert (top-k slots counted), >= 0.
    weight_sum: [L, E] sum of the gate weights of those slots, >= 0.
    loss_sum: optional [L, E] sum of the per-token losses (>= 0) of those tokens; enables the
        loss-based reliability signal.
    logit_scale: optional [L] mean over the tick's (non-padding) tokens of the population
        standard deviation across experts of the raw router logits z; finite, >= 0. None (or a
        layer without tokens) leaves σ_L unchanged.
    noiseless_counts: optional [L, E] top-k slots of the *noiseless* score (the router's choice
        before the exploration noise: what eval-mode routing would pick for the same tokens),
        >= 0, each layer summing to the same slots as ``counts``. Usage, drift and pressure
        read it (the controller corrects the router, not the noise's balance); reliability
        reads ``counts`` (the losses belong to the routed slots). None: equal to ``counts``
        (no exploration noise: eval mode, τ = 0, fields off).
    """

    counts: np.ndarray
    weight_sum: np.ndarray
    loss_sum: np.ndarray | None = None
    logit_scale: np.ndarray | None = None
    noiseless_counts: np.ndarray | None = None


def _as_array(name: str, v: Any, want: tuple[int, ...], what: str) -> np.ndarray:
    """``v`` as a finite, non-negative float64 array of shape ``want``, or ValueError."""
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"RoutingObservation.{name} is not a numeric array of shape {want}: "
                         f"{e}") from None
    if a.shape != want:
        raise ValueError(f"RoutingObservation.{name} has shape {a.shape}, expected {want} "
                         f"({what})")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"RoutingObservation.{name} has a non-finite value "
                         f"{a[tuple(bad)]!r} at {what}={tuple(int(i) for i in bad)}")
    if np.any(a < 0):
        bad = np.argwhere(a < 0)[0]
        raise ValueError(f"RoutingObservation.{name} has a negative value "
                         f"{a[tuple(bad)]!r} at {what}={tuple(int(i) for i in bad)}; "
                         f"must be >= 0")
    return a


def validate_observation(obs: RoutingObservation, num_layers: int, num_experts: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Return (counts, weight_sum, loss_sum, logit_scale) as float64 arrays (the optional ones
    may be None), or raise ValueError naming the field and what is wrong. The noiseless counts
    are checked too (``noiseless_counts_of`` returns them)."""
    if not isinstance(obs, RoutingObservation):
        raise TypeError(f"expected a RoutingObservation, got {type(obs).__name__}")
    want = (num_layers, num_experts)
    out = []
    for name in ("counts", "weight_sum", "loss_sum"):
        v = getattr(obs, name)
        if v is None:
            if name != "loss_sum":
                raise ValueError(f"RoutingObservation.{name} is None; expected an array of shape {want}")
            out.append(None)
            continue
        a = _as_array(name, v, want, "(layer, expert)")
        # Finite entries can still overflow once summed over a layer (frac and the mean loss
        # would turn into 0 or NaN): reject such an observation here, before the state moves.
        with np.errstate(over="ignore"):
            layer_sums = a.sum(axis=1)
        if not np.all(np.isfinite(layer_sums)):
            raise ValueError(f"RoutingObservation.{name}: the sum over a layer's experts "
                             f"overflows float64")
        out.append(a)
    counts, loss = out[0], out[2]
    if loss is not None:
        # The loss-based reliability divides losses by (tiny) counts: keep both per-token means
        # finite, or the reliability, and with it every temperature, becomes NaN.
        with np.errstate(over="ignore"):
            m = np.divide(loss, counts, out=np.zeros_like(loss), where=counts > 0)
            tot_c = counts.sum(axis=1)
            mbar = np.divide(loss.sum(axis=1), tot_c, out=np.zeros_like(tot_c), where=tot_c > 0)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(mbar))):
            raise ValueError("RoutingObservation.loss_sum: the mean loss per token "
                             "(loss_sum / counts) overflows float64")
    scale = None if obs.logit_scale is None else \
        _as_array("logit_scale", obs.logit_scale, (num_layers,), "(layer,)")
    noiseless_counts_of(obs, num_layers, num_experts, counts)
    return out[0], out[1], out[2], scale


NOISELESS_TOTAL_RTOL = 1e-6
"""Relative tolerance of the check that a layer's noiseless counts and counts sum to the same
slots (both are sums of the same token weights, in different orders)."""


def noiseless_counts_of(obs: RoutingObservation, num_layers: int, num_experts: int,
                        counts: np.ndarray) -> np.ndarray:
    """``obs.noiseless_counts`` as a float64 array (``counts`` itself when None), or ValueError:
    wrong shape, non-finite or negative entries, or a layer whose total differs from the
    ``counts`` total (they count the same slots, chosen with and without the noise)."""
    if obs.noiseless_counts is None:
        return counts
    a = _as_array("noiseless_counts", obs.noiseless_counts, (num_layers, num_experts),
                  "(layer, expert)")
    with np.errstate(over="ignore"):
        tot, ref = a.sum(axis=1), counts.sum(axis=1)
    if not np.all(np.isfinite(tot)):
        raise ValueError("RoutingObservation.noiseless_counts: the sum over a layer's experts "
                         "overflows float64")
    off = np.abs(tot - ref) > NOISELESS_TOTAL_RTOL * np.maximum(np.maximum(tot, ref), 1.0)
    if np.any(off):
        i = int(np.argmax(off))
        raise ValueError(f"RoutingObservation.noiseless_counts: layer {i} sums to "
                         f"{float(tot[i])!r} slots but counts to {float(ref[i])!r}; both count "
                         f"the same slots (chosen without and with the exploration noise)")
    return a


def init_state(config: ControllerConfig, num_layers: int, num_experts: int, seed: int = 0
               ) -> ControllerState:
    """Fresh controller state: uniform usage, reliability 0.5, flat landscape (T̄ = 1), σ_L = 0
    (not observed yet), phases uniform on [0, 2π) and Gaussian frequency disorder, both drawn
    from ``seed``."""
    if not isinstance(config, ControllerConfig):
        raise TypeError(f"config must be a ControllerConfig, got {type(config).__name__}")
    for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}={v!r}: expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**32)")
    L, E = int(num_layers), int(num_experts)
    rng = np.random.default_rng(int(seed))
    theta = rng.uniform(0.0, 2.0 * np.pi, size=(L, E))
    omega = rng.standard_normal((L, E)) * config.omega_disorder_std
    R, psi = order_parameter(theta)
    T_fast = np.full((L, E), float(np.clip(config.T_base, config.T_min, config.T_max)))
    return ControllerState(
        tick=0, seed=int(seed), theta_LE=theta, omega_disorder_LE=omega, R=R, psi=psi, dR=0.0,
        usage_LE=np.full((L, E), 1.0 / E), reliability_LE=np.full((L, E), 0.5),
        delta_LE=np.zeros((L, E)), pressure_LE=np.zeros((L, E)), lens_LE=np.zeros((L, E)),
        T_fast_LE=T_fast, Tbar_local_LE=np.ones((L, E)), Tbar_global=1.0,
        T_eff_LE=T_fast.copy(), logit_scale_L=np.zeros(L), kappa=0.0,
    )
