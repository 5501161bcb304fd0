"""Diagnostics of the structural-temperature landscape: valleys, ridges, valley health.

The landscape is per layer (DESIGN.md §3.5): expert e of layer 0 and expert e of layer 1 are
unrelated, so valleys and ridges are read off each layer's T̄_local; whole-model summaries
(``model_landscape``, ``model_valley_health``) aggregate over layers, never average expert
indices across layers.

On a T̄ vector over experts:
  variance = var(T̄); valleys = {e : T̄_e < mean − c·std}; ridges = {e : T̄_e > mean + c·std}
  (c = landscape_threshold_std, 0.5); formed = variance > landscape_formed_variance (0.01);
  a flat landscape (variance ≤ FLAT_VARIANCE = 1e-12) has no valleys or ridges: below that the
  spread is rounding noise of experts that are alike in exact arithmetic.
``landscape_masks`` is the one vectorised implementation (any leading axes); everything else
here, the simulator's records and the studies use it.
Valley health: the reliability s of each valley expert; unhealthy when s < 0.3; at risk when a
valley's current T_fast is above its layer's mean T_fast (hot now, still cold in T̄: the
self-correction feedback is filling it in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .config import ControllerConfig
from .state import ControllerState

__all__ = ["Landscape", "landscape", "landscape_masks", "LandscapeMasks", "state_landscape",
           "ModelLandscape", "model_landscape", "ValleyHealth", "valley_health",
           "ModelValleyHealth", "model_valley_health", "FLAT_VARIANCE"]

FLAT_VARIANCE = 1e-12
"""A T̄ vector whose variance is at most this is flat: no valleys, no ridges."""


class LandscapeMasks(NamedTuple):
    """``landscape_masks`` along the last axis: [...] statistics and [..., E] masks."""
    variance: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    valley: np.ndarray
    """bool: T̄ < mean − c·std (and not flat)."""
    ridge: np.ndarray
    """bool: T̄ > mean + c·std (and not flat)."""


def landscape_masks(tbar: np.ndarray, threshold_std: float = 0.5) -> LandscapeMasks:
    """Valley and ridge masks of T̄ along its last axis (experts), for any leading axes
    ([E], [L, E], [B, T, L, E], ...). Variance is the population variance (np.var)."""
    t = np.asarray(tbar, dtype=np.float64)
    mean = t.mean(axis=-1, keepdims=True)
    var = t.var(axis=-1, keepdims=True)
    std = np.sqrt(var)
    shaped = var > FLAT_VARIANCE
    valley = shaped & (t < mean - threshold_std * std)
    ridge = shaped & (t > mean + threshold_std * std)
    return LandscapeMasks(var[..., 0], mean[..., 0], std[..., 0], valley, ridge)


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
    m = landscape_masks(t, threshold_std)
    var = float(m.variance)
    return Landscape(variance=var, mean=float(m.mean), std=float(m.std),
                     valleys=tuple(int(i) for i in np.flatnonzero(m.valley)),
                     ridges=tuple(int(i) for i in np.flatnonzero(m.ridge)),
                     formed=var > formed_variance)


def _layer(state: ControllerState, layer: int) -> int:
    L = state.num_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -L <= layer < L:
        raise ValueError(f"layer={layer!r}: expected an integer in [-{L}, {L}) (the landscape "
                         f"is per layer; model_landscape() summarises the whole model)")
    return int(layer) % L


def state_landscape(state: ControllerState, config: ControllerConfig, layer: int) -> Landscape:
    """Landscape of one layer's T̄_local."""
    return landscape(state.Tbar_local_LE[_layer(state, layer)], config.landscape_threshold_std,
                     config.landscape_formed_variance)


@dataclass(frozen=True)
class ModelLandscape:
    """Whole-model summary of the per-layer landscapes (aggregates over layers)."""
    layers: tuple[Landscape, ...]
    """One landscape per layer."""
    variance_mean: float
    """Mean over layers of var(T̄_local[l])."""
    valleys_mean: float
    """Mean over layers of the number of valleys."""
    ridges_mean: float
    """Mean over layers of the number of ridges."""
    formed_fraction: float
    """Share of layers whose landscape is formed."""

    def to_dict(self) -> dict:
        return {"layers": [ls.to_dict() for ls in self.layers],
                "variance_mean": self.variance_mean, "valleys_mean": self.valleys_mean,
                "ridges_mean": self.ridges_mean, "formed_fraction": self.formed_fraction}


def model_landscape(state: ControllerState, config: ControllerConfig) -> ModelLandscape:
    """Every layer's landscape and their aggregates."""
    layers = tuple(state_landscape(state, config, li) for li in range(state.num_layers))
    return ModelLandscape(
        layers=layers, variance_mean=float(np.mean([ls.variance for ls in layers])),
        valleys_mean=float(np.mean([len(ls.valleys) for ls in layers])),
        ridges_mean=float(np.mean([len(ls.ridges) for ls in layers])),
        formed_fraction=float(np.mean([ls.formed for ls in layers])))


@dataclass(frozen=True)
class ValleyHealth:
    """Health of the valleys of one layer's landscape."""
    valleys: tuple[int, ...]
    reliability: tuple[float, ...]
    """Reliability of each valley expert."""
    healthy: tuple[int, ...]
    unhealthy: tuple[int, ...]
    """Valleys with reliability below ``unhealthy_reliability`` (0.3)."""
    at_risk: tuple[int, ...]
    """Valleys whose current T_fast is above the layer's mean T_fast: being filled in."""
    layer: int

    @property
    def all_healthy(self) -> bool:
        return not self.unhealthy

    def to_dict(self) -> dict:
        return {"layer": self.layer, "valleys": list(self.valleys),
                "reliability": list(self.reliability), "healthy": list(self.healthy),
                "unhealthy": list(self.unhealthy), "at_risk": list(self.at_risk)}


def valley_health(state: ControllerState, config: ControllerConfig, layer: int) -> ValleyHealth:
    """Health of the valleys of one layer."""
    li = _layer(state, layer)
    ls = state_landscape(state, config, li)
    rel = state.reliability_LE[li]
    t_fast = state.T_fast_LE[li]
    hot = t_fast > t_fast.mean()
    v = ls.valleys
    return ValleyHealth(
        valleys=v, reliability=tuple(float(rel[e]) for e in v),
        healthy=tuple(e for e in v if rel[e] >= config.unhealthy_reliability),
        unhealthy=tuple(e for e in v if rel[e] < config.unhealthy_reliability),
        at_risk=tuple(e for e in v if hot[e]), layer=li)


@dataclass(frozen=True)
class ModelValleyHealth:
    """Valley health of every layer and its whole-model aggregate."""
    layers: tuple[ValleyHealth, ...]
    valleys: int
    """Valleys over all layers."""
    healthy_fraction: float | None
    """Share of all valleys (over layers) that are healthy; None without valleys."""

    @property
    def all_healthy(self) -> bool:
        return all(vh.all_healthy for vh in self.layers)

    def to_dict(self) -> dict:
        return {"layers": [vh.to_dict() for vh in self.layers], "valleys": self.valleys,
                "healthy_fraction": self.healthy_fraction}


def model_valley_health(state: ControllerState, config: ControllerConfig) -> ModelValleyHealth:
    """``valley_health`` of every layer, and the share of healthy valleys over the model."""
    layers = tuple(valley_health(state, config, li) for li in range(state.num_layers))
    n = sum(len(vh.valleys) for vh in layers)
    good = sum(len(vh.healthy) for vh in layers)
    return ModelValleyHealth(layers=layers, valleys=n, healthy_fraction=good / n if n else None)
