"""Diagnostics of the structural-temperature landscape: valleys, ridges, valley health.

On a T̄ vector over experts (global, or one layer's local T̄):
  variance = var(T̄); valleys = {e : T̄_e < mean − c·std}; ridges = {e : T̄_e > mean + c·std}
  (c = landscape_threshold_std, 0.5); formed = variance > landscape_formed_variance (0.01).
Valley health: the reliability s of each valley expert; unhealthy when s < 0.3; at risk when a
valley's current T_fast is above its layer's mean T_fast (hot now, still cold in T̄: the
self-correction feedback is filling it in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ControllerConfig
from .state import ControllerState

__all__ = ["Landscape", "landscape", "ValleyHealth", "valley_health"]


@dataclass(frozen=True)
class Landscape:
    """Shape of one T̄ vector."""
    variance: float
    mean: float
    std: float
    valleys: tuple[int, ...]
    """Expert indices with T̄ < mean − c·std (sharp, specialised routing)."""
    ridges: tuple[int, ...]
    """Expert indices with T̄ > mean + c·std (diffuse, exploratory routing)."""
    formed: bool

    def to_dict(self) -> dict:
        return {"variance": self.variance, "mean": self.mean, "std": self.std,
                "valleys": list(self.valleys), "ridges": list(self.ridges), "formed": self.formed}


def landscape(tbar: np.ndarray, threshold_std: float = 0.5,
              formed_variance: float = 0.01) -> Landscape:
    """Valleys and ridges of a T̄ vector of shape [E]."""
    t = np.asarray(tbar, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"landscape: tbar must be a non-empty vector [E], got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("landscape: tbar has non-finite values")
    mean = float(t.mean())
    var = float(t.var())
    std = float(np.sqrt(var))
    # A flat landscape (std == 0) has neither valleys nor ridges: strict inequalities.
    valleys = tuple(int(i) for i in np.flatnonzero(t < mean - threshold_std * std))
    ridges = tuple(int(i) for i in np.flatnonzero(t > mean + threshold_std * std))
    return Landscape(variance=var, mean=mean, std=std, valleys=valleys, ridges=ridges,
                     formed=var > formed_variance)


@dataclass(frozen=True)
class ValleyHealth:
    """Health of the valleys of one landscape."""
    valleys: tuple[int, ...]
    reliability: tuple[float, ...]
    """Reliability of each valley expert (layer's s, or the mean over layers for global)."""
    healthy: tuple[int, ...]
    unhealthy: tuple[int, ...]
    """Valleys with reliability below ``unhealthy_reliability`` (0.3)."""
    at_risk: tuple[int, ...]
    """Valleys whose current T_fast is above the mean T_fast: being filled in."""
    layer: int | None

    @property
    def all_healthy(self) -> bool:
        return not self.unhealthy

    def to_dict(self) -> dict:
        return {"layer": self.layer, "valleys": list(self.valleys),
                "reliability": list(self.reliability), "healthy": list(self.healthy),
                "unhealthy": list(self.unhealthy), "at_risk": list(self.at_risk)}


def state_landscape(state: ControllerState, config: ControllerConfig,
                    layer: int | None = None) -> Landscape:
    """Landscape of the global T̄ (layer None) or of one layer's local T̄."""
    tbar = state.Tbar_global_E if layer is None else state.Tbar_local_LE[_layer(state, layer)]
    return landscape(tbar, config.landscape_threshold_std, config.landscape_formed_variance)


def _layer(state: ControllerState, layer: int) -> int:
    L = state.num_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -L <= layer < L:
        raise ValueError(f"layer={layer!r}: expected an integer in [0, {L})")
    return int(layer) % L


def valley_health(state: ControllerState, config: ControllerConfig,
                  layer: int | None = None) -> ValleyHealth:
    """Health of the valleys of the global landscape (layer None) or of one layer."""
    ls = state_landscape(state, config, layer)
    if layer is None:
        rel = state.reliability_LE.mean(axis=0)
        t_fast = state.T_fast_LE.mean(axis=0)
    else:
        li = _layer(state, layer)
        rel = state.reliability_LE[li]
        t_fast = state.T_fast_LE[li]
    hot = t_fast > t_fast.mean()
    v = ls.valleys
    return ValleyHealth(
        valleys=v, reliability=tuple(float(rel[e]) for e in v),
        healthy=tuple(e for e in v if rel[e] >= config.unhealthy_reliability),
        unhealthy=tuple(e for e in v if rel[e] < config.unhealthy_reliability),
        at_risk=tuple(e for e in v if hot[e]), layer=None if layer is None else _layer(state, layer),
    )
