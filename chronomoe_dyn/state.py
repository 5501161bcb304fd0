"""Controller state, routing observations, and ``init_state``.

Shape legend: L layers, E experts. Suffixes name shapes (``usage_LE`` is [L, E],
``tbar_global_E`` is [E]). Scalars are Python floats/ints. Arrays are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .config import ControllerConfig

__all__ = ["ControllerState", "RoutingObservation", "init_state", "validate_observation"]

_ARRAY_FIELDS = (
    "theta_LE", "omega_disorder_LE", "usage_LE", "reliability_LE", "delta_LE", "pressure_LE",
    "lens_LE", "T_fast_LE", "Tbar_local_LE", "Tbar_global_E", "T_eff_LE",
)


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
    """[L, E] signed routing drift δ = E·(frac − u) of the last tick (0 for an empty layer)."""
    pressure_LE: np.ndarray
    """[L, E] pressure P in [-1, 1] (positive for under-used experts), from the last micro tick."""
    lens_LE: np.ndarray
    """[L, E] lens (integral of pressure) in [-lens_max, lens_max]."""
    T_fast_LE: np.ndarray
    """[L, E] fast temperature in [T_min, T_max]."""
    Tbar_local_LE: np.ndarray
    """[L, E] per-layer structural temperature T̄_local (slow EMA of T_fast)."""
    Tbar_global_E: np.ndarray
    """[E] global structural temperature T̄_global (slowest EMA of the layer mean of T_fast)."""
    T_eff_LE: np.ndarray
    """[L, E] effective temperature T_fast · T̄_global · T̄_local."""
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
        return self.Tbar_global_E[None, :] * self.Tbar_local_LE

    def to_dict(self) -> dict[str, Any]:
        """Fields as a dict (arrays are copied)."""
        return {f.name: (np.array(getattr(self, f.name)) if f.name in _ARRAY_FIELDS
                         else getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerState":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"ControllerState.from_dict: missing field(s) {missing}")
        kw = {}
        for n in names:
            v = d[n]
            if n in _ARRAY_FIELDS:
                kw[n] = np.array(v, dtype=np.float64)
            elif n in ("tick", "seed"):
                kw[n] = int(v)
            else:
                kw[n] = float(v)
        state = cls(**kw)
        L, E = state.theta_LE.shape
        for n in _ARRAY_FIELDS:
            want = (E,) if n == "Tbar_global_E" else (L, E)
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
    """

    counts: np.ndarray
    weight_sum: np.ndarray
    loss_sum: np.ndarray | None = None


def validate_observation(obs: RoutingObservation, num_layers: int, num_experts: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return the observation as float64 arrays, or raise ValueError naming what is wrong."""
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
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"RoutingObservation.{name} is not a numeric array of shape {want}: "
                             f"{e}") from None
        if a.shape != want:
            raise ValueError(f"RoutingObservation.{name} has shape {a.shape}, expected {want} "
                             f"(layers, experts)")
        if not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"RoutingObservation.{name} has a non-finite value "
                             f"{a[tuple(bad)]!r} at (layer, expert)={tuple(int(i) for i in bad)}")
        if np.any(a < 0):
            bad = np.argwhere(a < 0)[0]
            raise ValueError(f"RoutingObservation.{name} has a negative value "
                             f"{a[tuple(bad)]!r} at (layer, expert)={tuple(int(i) for i in bad)}; "
                             f"must be >= 0")
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
    return out[0], out[1], out[2]


def init_state(config: ControllerConfig, num_layers: int, num_experts: int, seed: int = 0
               ) -> ControllerState:
    """Fresh controller state: uniform usage, reliability 0.5, flat landscape (T̄ = 1),
    phases uniform on [0, 2π) and Gaussian frequency disorder, both drawn from ``seed``."""
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
    from .law import order_parameter  # local import: law imports this module
    R, psi = order_parameter(theta)
    T_fast = np.full((L, E), float(np.clip(config.T_base, config.T_min, config.T_max)))
    return ControllerState(
        tick=0, seed=int(seed), theta_LE=theta, omega_disorder_LE=omega, R=R, psi=psi, dR=0.0,
        usage_LE=np.full((L, E), 1.0 / E), reliability_LE=np.full((L, E), 0.5),
        delta_LE=np.zeros((L, E)), pressure_LE=np.zeros((L, E)), lens_LE=np.zeros((L, E)),
        T_fast_LE=T_fast, Tbar_local_LE=np.ones((L, E)), Tbar_global_E=np.ones(E),
        T_eff_LE=T_fast.copy(), kappa=0.0,
    )
