"""The synthetic routing environment the simulator closes the controller over.

Shape legend: L layers, E experts, D domains, T tokens per tick, K top-k slots.

Each tick T tokens arrive, each from one of D domains (mixture ``w_D``). Every layer routes each
token to K of E experts. Expert e of layer l has a hidden quality q[l, e, d] in [0, 1] on domain
d: one "home" domain with high quality (each layer shuffles which expert is home to which
domain), low quality elsewhere. The per-slot loss of expert e on a domain-d token is

    x = loss_floor + loss_range·(1 − q[l, e, d]) + loss_noise·(2u − 1),     u ~ U(0, 1)

and the token's loss at layer l is the gate-weighted sum Σ_k g_k x_k (fed to the controller for
every expert the token went to, as a real model's per-token loss would be).

The router learns from the losses it observes: per (layer, domain, expert) it keeps a running
mean ``est`` of the slot losses, starting from a prior worth ``router_prior_count``
observations, with the count ``n`` capped at ``router_memory`` (so it becomes an EMA once it has
seen enough and can still track a collapse):

    n ← min(n + c, memory);  est ← est + min(c/n, 1)·(mean_x − est)        (c slots this tick)

Its raw logits, per layer and token of domain d:

    z_e = base[l, d, e] + token_noise·(2u_t − 1),
    base[l, d, e] = sharpness·(mean_e' est[l, d, e'] − est[l, d, e]) + batch_noise·(2u_b − 1)

(u_b drawn once per (tick, layer, domain, expert) and shared by all the domain's tokens of the
tick: batch context; u_t per token; the mean over experts is summed in index order). The tokens
are then routed by the v2 rule, ``chronomoe_dyn.routing.route`` (the controller's fields, the
Gumbel noise u from ``rng.STREAM_GUMBEL`` at index (l·T + t)·E + e, gates renormalised over the
top-k from the raw logits; ``controller_fields=False``: plain top-k of z). The environment
reports per layer the counts, gate-weight sums, token-loss sums, the logit scale (mean over
tokens of the std across experts of z) and the explored slots.

Determinism: every random number is a counter-RNG draw keyed by the system's seed, a stream of
the registry in ``rng`` (never ``rng.STREAM_PHASE``), the tick and an index. Domains are drawn by
comparing a uniform with the cumulative mixture, the noise on the logits is uniform and the
Gumbel noise uses ``rng.log_poly``, so the environment puts no platform transcendental function
in front of a discrete choice: the logits, their centring and the noise are the same bits in
NumPy and in the Numba kernel. The controller's fields agree between backends to rounding, so
both make the same top-k choices; both order the selection by (score descending, index
ascending), -0.0 equal to 0.0, so exact ties (a flat router without noise) pick the same experts
into the same slots. Only a score difference within the rounding of the controller's fields (a
near-tie) could split them.

Events (scripted): ``Event("collapse", tick, expert=e, layer=l|None, quality=q)`` sets the
quality of expert e on every domain to q in one layer (or all) from that tick on;
``Event("domain_shift", tick, weights=(...))`` replaces the domain mixture. An event at tick t
acts before the routing of tick t (ticks count from 1, as the controller's clock).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from . import rng
from .law import RoutingFields
from .rng import (STREAM_BATCH, STREAM_DOMAIN, STREAM_GUMBEL, STREAM_HOME, STREAM_LOSS,
                  STREAM_QUALITY, STREAM_TOKEN)
from .routing import route as route_layer
from .routing import sum_experts

__all__ = ["EnvConfig", "Event", "EnvState", "init_env", "apply_event", "route", "learn",
           "domain_cumulative", "make_quality", "raw_logits", "RoutedTick", "EVENT_KINDS"]

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


def domain_cumulative(weights: Any) -> np.ndarray:
    """[D] cumulative mixture with the last entry exactly 1.0, so that a uniform u in (0, 1)
    always finds the first d with u < cum[d]."""
    w = np.asarray(weights, dtype=np.float64)
    cum = np.cumsum(w / w.sum())
    cum[-1] = 1.0
    return cum


def make_quality(env: EnvConfig, seed: int) -> np.ndarray:
    """[L, E, D] hidden quality of one system, from its seed (counter RNG, tick 0).

    Per layer the experts are shuffled and the i-th of the shuffle is at home in domain i mod D,
    so layers disagree on which expert serves which domain (as independently trained layers do).
    """
    L, E, D = env.num_layers, env.num_experts, env.num_domains
    order = rng.uniform(seed, STREAM_HOME, 0, np.arange(L * E)).reshape(L, E)
    rank_LE = np.argsort(np.argsort(order, axis=1, kind="stable"), axis=1, kind="stable")
    home_LE = rank_LE % D
    u_LED = rng.uniform(seed, STREAM_QUALITY, 0, np.arange(L * E * D)).reshape(L, E, D)
    (hlo, hhi), (olo, ohi) = env.quality_home, env.quality_other
    home_mask_LED = home_LE[:, :, None] == np.arange(D)[None, None, :]
    return np.where(home_mask_LED, hlo + (hhi - hlo) * u_LED, olo + (ohi - olo) * u_LED)


@dataclass
class EnvState:
    """Mutable state of one system's environment (NumPy reference)."""
    quality_LED: np.ndarray
    """[L, E, D] hidden quality (events change it)."""
    est_LDE: np.ndarray
    """[L, D, E] router's running-mean loss estimate."""
    nobs_LDE: np.ndarray
    """[L, D, E] router's (capped) observation count."""
    cum_D: np.ndarray
    """[D] current cumulative domain mixture."""


def init_env(env: EnvConfig, seed: int) -> EnvState:
    L, E, D = env.num_layers, env.num_experts, env.num_domains
    return EnvState(quality_LED=make_quality(env, seed),
                    est_LDE=np.full((L, D, E), env.prior_loss),
                    nobs_LDE=np.full((L, D, E), float(env.router_prior_count)),
                    cum_D=domain_cumulative(env.weights_D))


def apply_event(es: EnvState, ev: Event) -> None:
    """Apply one event to the environment state in place."""
    if ev.kind == "collapse":
        if ev.layer is None:
            es.quality_LED[:, ev.expert, :] = ev.quality
        else:
            es.quality_LED[ev.layer, ev.expert, :] = ev.quality
    else:
        es.cum_D = domain_cumulative(ev.weights)


@dataclass(frozen=True)
class RoutedTick:
    """What one tick of routing produced (NumPy reference)."""
    counts_LE: np.ndarray
    wsum_LE: np.ndarray
    loss_LE: np.ndarray
    logit_scale_L: np.ndarray
    """Mean over the tick's tokens of the std across experts of the raw logits, per layer."""
    explored_L: np.ndarray
    """Explored slots per layer (selected experts outside the noiseless top-k)."""
    sumx_LDE: np.ndarray
    """Sum of the slot losses the router observed per (layer, domain, expert)."""
    cnt_LDE: np.ndarray
    """Slots per (layer, domain, expert)."""
    mean_loss: float
    """Mean token loss over layers and tokens."""


def raw_logits(env: EnvConfig, es: EnvState, seed: int, tick: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(dom_T, z_LTE): each token's domain and the router's raw logits (module docstring)."""
    L, E, D, T = env.num_layers, env.num_experts, env.num_domains, env.tokens_per_tick
    u_T = rng.uniform(seed, STREAM_DOMAIN, tick, np.arange(T))
    dom_T = np.searchsorted(es.cum_D, u_T, side="right")        # first d with u < cum[d]
    u_LDE = rng.uniform(seed, STREAM_BATCH, tick, np.arange(L * D * E)).reshape(L, D, E)
    mean_LD1 = (sum_experts(es.est_LDE) / E)[..., None]
    base_LDE = env.router_sharpness * (mean_LD1 - es.est_LDE) \
        + env.batch_noise * (2.0 * u_LDE - 1.0)
    u_LTE = rng.uniform(seed, STREAM_TOKEN, tick, np.arange(L * T * E)).reshape(L, T, E)
    return dom_T, base_LDE[:, dom_T, :] + env.token_noise * (2.0 * u_LTE - 1.0)


def route(env: EnvConfig, es: EnvState, fields: RoutingFields, seed: int, tick: int,
          controller_fields: bool = True) -> RoutedTick:
    """One tick of routing in NumPy: the reference the Numba kernel reproduces."""
    L, E, D, T, K = (env.num_layers, env.num_experts, env.num_domains, env.tokens_per_tick,
                     env.top_k)
    dom_T, z_LTE = raw_logits(env, es, seed, tick)
    noisy = controller_fields and fields.tau > 0.0
    u_LTE = rng.uniform(seed, STREAM_GUMBEL, tick, np.arange(L * T * E)).reshape(L, T, E) \
        if noisy else None
    sel_LTK = np.zeros((L, T, K), dtype=np.int64)
    g_LTK = np.zeros((L, T, K))
    scale_L = np.zeros(L)
    explored_L = np.zeros(L)
    for li in range(L):
        r = route_layer(z_LTE[li], fields.layer(li), K, None if u_LTE is None else u_LTE[li],
                        renormalize=True, controller_fields=controller_fields)
        sel_LTK[li], g_LTK[li] = r.selected_NK, r.gates_NK
        # mean over tokens, summed in token order (the kernel's loop)
        scale_L[li] = np.add.accumulate(r.logit_std_N)[-1] / T
        explored_L[li] = float(r.explored_NK.sum())
    u_LTK = rng.uniform(seed, STREAM_LOSS, tick, np.arange(L * T * K)).reshape(L, T, K)
    q_LTK = es.quality_LED[np.arange(L)[:, None, None], sel_LTK, dom_T[None, :, None]]
    x_LTK = env.loss_floor + env.loss_range * (1.0 - q_LTK) + env.loss_noise * (2.0 * u_LTK - 1.0)
    tl_LT = (g_LTK * x_LTK).sum(axis=-1)

    # Keys over (layer, expert) and (layer, domain, expert); bincount accumulates in token
    # order, as the kernel's loop does.
    key_LTK = np.arange(L)[:, None, None] * E + sel_LTK
    counts_LE = np.bincount(key_LTK.ravel(), minlength=L * E).reshape(L, E).astype(np.float64)
    wsum_LE = np.bincount(key_LTK.ravel(), weights=g_LTK.ravel(), minlength=L * E).reshape(L, E)
    loss_LE = np.bincount(key_LTK.ravel(), weights=np.repeat(tl_LT.ravel(), K),
                          minlength=L * E).reshape(L, E)
    kd_LTK = (np.arange(L)[:, None, None] * D + dom_T[None, :, None]) * E + sel_LTK
    sumx = np.bincount(kd_LTK.ravel(), weights=x_LTK.ravel(), minlength=L * D * E)
    cnt = np.bincount(kd_LTK.ravel(), minlength=L * D * E).astype(np.float64)
    return RoutedTick(counts_LE, wsum_LE, loss_LE, scale_L, explored_L, sumx.reshape(L, D, E),
                      cnt.reshape(L, D, E), float(tl_LT.mean()))


def learn(env: EnvConfig, es: EnvState, routed: RoutedTick) -> None:
    """The router's update from this tick's observed slot losses (in place)."""
    cnt, seen = routed.cnt_LDE, routed.cnt_LDE > 0
    n_new = np.minimum(es.nobs_LDE + cnt, env.router_memory)
    w = np.minimum(np.divide(cnt, n_new, out=np.zeros_like(cnt), where=seen), 1.0)
    mean_x = np.divide(routed.sumx_LDE, cnt, out=np.zeros_like(cnt), where=seen)
    es.est_LDE = np.where(seen, es.est_LDE + w * (mean_x - es.est_LDE), es.est_LDE)
    es.nobs_LDE = np.where(seen, n_new, es.nobs_LDE)
