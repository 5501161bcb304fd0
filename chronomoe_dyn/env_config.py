"""``EnvConfig`` and ``Event``: the configuration of the synthetic routing environment (``env``)
and its scripted events, frozen and validated (a bad field raises ``ValueError`` naming the field,
the value and what is allowed). The equations they parametrise are in ``env``'s docstring, which
re-exports both.

Shape legend: L layers, E experts, D domains, T tokens per tick, K top-k slots.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["EnvConfig", "Event", "EVENT_KINDS"]

EVENT_KINDS = ("collapse", "domain_shift")


def _real(name: str, v: Any, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)):
        raise ValueError(f"{name}={v!r}: expected a finite real number")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        hi_s = "inf" if hi is None else hi
        raise ValueError(f"{name}={v!r}: allowed range is {left}{lo}, {hi_s}]")


def _integer(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")


def _weights(name: str, w: Any, n: int) -> tuple[float, ...]:
    """Validate a mixture of ``n`` non-negative finite weights with a positive sum."""
    try:
        a = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={w!r}: expected {n} non-negative weights") from None
    if a.shape != (n,) or not np.all(np.isfinite(a)) or np.any(a < 0) or not a.sum() > 0:
        raise ValueError(f"{name}={w!r}: expected {n} finite non-negative weights with a "
                         f"positive sum")
    return tuple(float(x) for x in a)


@dataclass(frozen=True)
class EnvConfig:
    """The synthetic routing environment (see the module docstring for the equations)."""

    num_layers: int = 4
    """L: MoE layers."""
    num_experts: int = 8
    """E: experts per layer."""
    top_k: int = 2
    """K: experts each token is routed to, per layer."""
    tokens_per_tick: int = 256
    """T: tokens routed per layer per tick."""
    num_domains: int = 4
    """D: token domains."""
    domain_weights: tuple[float, ...] | None = None
    """Initial domain mixture (normalised). None = the linearly decreasing mixture w_d ∝ D − d
    ((0.4, 0.3, 0.2, 0.1) for D = 4). Unequal by default: the specialists of frequent domains
    are over-used, those of rare ones under-used, which is what gives the controller a landscape
    to form (with a uniform mixture every expert ends up balanced and T̄ stays flat)."""
    quality_home: tuple[float, float] = (0.75, 0.95)
    """Range of an expert's hidden quality on its home domain (drawn uniformly per expert)."""
    quality_other: tuple[float, float] = (0.15, 0.55)
    """Range of an expert's hidden quality on the other domains."""
    loss_floor: float = 1.0
    """Slot loss of a perfect expert (quality 1), before noise. Must be >= loss_noise so that
    losses stay non-negative."""
    loss_range: float = 3.0
    """Extra slot loss of a useless expert (quality 0)."""
    loss_noise: float = 0.5
    """Half-width of the uniform noise on each slot loss."""
    token_noise: float = 1.0
    """Half-width of the uniform per-token noise on each router logit (token individuality)."""
    batch_noise: float = 1.0
    """Half-width of a uniform logit offset per (layer, domain, expert) drawn afresh each tick
    and shared by all the domain's tokens of that tick (batch context). Against flat logits it
    moves many tokens at once (routing drift); once the router has learned logit gaps larger
    than it, routing no longer follows it."""
    router_sharpness: float = 5.0
    """Router logit per unit of estimated loss: logit = −sharpness·est."""
    router_memory: float = 100_000.0
    """Cap on the router's observation count per (layer, domain, expert): its estimate becomes
    an EMA with rate c/memory once it has seen this many slots."""
    router_prior_count: float = 80_000.0
    """Pseudo-observations of the prior estimate at init: the router's inertia. A home expert
    gets ~50 slots per tick, so the estimates separate over ~1000–2000 ticks (the router learns
    during the run instead of in its first ticks)."""
    router_prior: float | None = None
    """Prior loss estimate of every expert at init; None = loss_floor + loss_range/2."""

    def __post_init__(self) -> None:
        _integer("num_layers", self.num_layers, 1)
        _integer("num_experts", self.num_experts, 1)
        _integer("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k!r}: must be <= num_experts={self.num_experts!r}")
        _integer("tokens_per_tick", self.tokens_per_tick, 1)
        _integer("num_domains", self.num_domains, 1)
        if self.domain_weights is not None:
            object.__setattr__(self, "domain_weights",
                               _weights("domain_weights", self.domain_weights, self.num_domains))
        for name in ("quality_home", "quality_other"):
            v = getattr(self, name)
            try:
                lo, hi = (float(x) for x in v)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={v!r}: expected a pair (lo, hi) in [0, 1]") from None
            if not (0.0 <= lo <= hi <= 1.0):
                raise ValueError(f"{name}={v!r}: expected 0 <= lo <= hi <= 1")
            object.__setattr__(self, name, (lo, hi))
        _real("loss_noise", self.loss_noise, 0.0)
        _real("loss_floor", self.loss_floor, 0.0)
        if self.loss_floor < self.loss_noise:
            raise ValueError(f"loss_floor={self.loss_floor!r}: must be >= loss_noise="
                             f"{self.loss_noise!r} so that slot losses stay >= 0")
        _real("loss_range", self.loss_range, 0.0)
        _real("token_noise", self.token_noise, 0.0)
        _real("batch_noise", self.batch_noise, 0.0)
        _real("router_sharpness", self.router_sharpness, 0.0)
        _real("router_memory", self.router_memory, 1.0)
        _real("router_prior_count", self.router_prior_count, 0.0, self.router_memory)
        if self.router_prior is not None:
            _real("router_prior", self.router_prior, 0.0)

    @property
    def prior_loss(self) -> float:
        """The router's prior loss estimate."""
        return float(self.loss_floor + 0.5 * self.loss_range if self.router_prior is None
                     else self.router_prior)

    @property
    def weights_D(self) -> np.ndarray:
        """[D] initial domain mixture, normalised."""
        w = np.arange(self.num_domains, 0, -1, dtype=np.float64) if self.domain_weights is None \
            else np.asarray(self.domain_weights, dtype=np.float64)
        return w / w.sum()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("domain_weights", "quality_home", "quality_other"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnvConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EnvConfig field(s): {unknown}")
        kw = dict(d)
        for k in ("domain_weights", "quality_home", "quality_other"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


@dataclass(frozen=True)
class Event:
    """A scripted change of the environment at the start of tick ``tick`` (ticks from 1).

    kind "collapse": the quality of ``expert`` on every domain becomes ``quality`` in ``layer``
    (None = every layer). kind "domain_shift": the domain mixture becomes ``weights``."""

    kind: str
    tick: int
    expert: int = 0
    layer: int | None = None
    quality: float = 0.0
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"Event.kind={self.kind!r}: allowed values are {EVENT_KINDS}")
        _integer("Event.tick", self.tick, 1)
        if self.kind == "collapse":
            _integer("Event.expert", self.expert, 0)
            if self.layer is not None:
                _integer("Event.layer", self.layer, 0)
            _real("Event.quality", self.quality, 0.0, 1.0)
            if self.weights is not None:
                raise ValueError("Event.weights: only a domain_shift event takes weights")
        else:
            if self.weights is None or np.ndim(self.weights) != 1 or len(self.weights) == 0:
                raise ValueError(f"Event.weights={self.weights!r}: a domain_shift event needs "
                                 f"the new mixture, one weight per domain")
            object.__setattr__(self, "weights",
                               _weights("Event.weights", self.weights, len(self.weights)))

    def check(self, env: EnvConfig) -> None:
        """Raise ValueError unless the event fits the environment's sizes."""
        if self.kind == "collapse":
            if self.expert >= env.num_experts:
                raise ValueError(f"Event.expert={self.expert!r}: allowed range is "
                                 f"[0, {env.num_experts})")
            if self.layer is not None and self.layer >= env.num_layers:
                raise ValueError(f"Event.layer={self.layer!r}: allowed range is "
                                 f"[0, {env.num_layers}) or None (all layers)")
        elif len(self.weights) != env.num_domains:
            raise ValueError(f"Event.weights={self.weights!r}: expected {env.num_domains} weights "
                             f"(num_domains)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weights"] is not None:
            d["weights"] = list(d["weights"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Event":
        kw = dict(d)
        if kw.get("weights") is not None:
            kw["weights"] = tuple(kw["weights"])
        return cls(**kw)
