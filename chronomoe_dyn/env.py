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
tokens of the std across experts of z), the explored slots and the noiseless counts (the slots
of the top-k of the noiseless score s, the router's choice before the Gumbel noise: what law
v2.1's usage reads; equal to the counts when the routing has no noise, ``controller_fields``
off or τ = 0).

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

The configuration (``EnvConfig``) and the scripted events (``Event``) are ``env_config``'s,
re-exported here. Events: ``Event("collapse", tick, expert=e, layer=l|None, quality=q)`` sets the
quality of expert e on every domain to q in one layer (or all) from that tick on;
``Event("domain_shift", tick, weights=(...))`` replaces the domain mixture. An event at tick t
acts before the routing of tick t (ticks count from 1, as the controller's clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rng
from .env_config import EVENT_KINDS, EnvConfig, Event
from .law import RoutingFields
from .rng import (STREAM_BATCH, STREAM_DOMAIN, STREAM_GUMBEL, STREAM_HOME, STREAM_LOSS,
                  STREAM_QUALITY, STREAM_TOKEN)
from .routing import route as route_layer
from .routing import sum_experts

__all__ = ["EnvConfig", "Event", "EnvState", "init_env", "apply_event", "route", "learn",
           "domain_cumulative", "make_quality", "raw_logits", "RoutedTick", "EVENT_KINDS"]

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
    noiseless_counts_LE: np.ndarray | None = None
    """[L, E] slots of the noiseless top-k (top-k of the score s without the Gumbel noise, the
    router's choice; same tokens, one slot each as ``counts_LE``). Equal to ``counts_LE`` (the
    same array) when the routing has no noise; None at construction means that."""

    def __post_init__(self) -> None:
        if self.noiseless_counts_LE is None:
            object.__setattr__(self, "noiseless_counts_LE", self.counts_LE)


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
    """One tick of routing in NumPy: the reference the Numba kernel reproduces. With noise
    (``controller_fields`` and τ > 0) the noiseless counts are those of the top-k of each
    token's noiseless score; without, they are ``counts_LE`` itself."""
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
    best_LTK = np.zeros((L, T, K), dtype=np.int64) if noisy else None
    for li in range(L):
        r = route_layer(z_LTE[li], fields.layer(li), K, None if u_LTE is None else u_LTE[li],
                        renormalize=True, controller_fields=controller_fields)
        sel_LTK[li], g_LTK[li] = r.selected_NK, r.gates_NK
        # mean over tokens, summed in token order (the kernel's loop)
        scale_L[li] = np.add.accumulate(r.logit_std_N)[-1] / T
        explored_L[li] = float(r.explored_NK.sum())
        if noisy:                   # the noiseless top-k (route formed it for the explored slots)
            best_LTK[li] = r.noiseless_NK
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
    if noisy:
        key_best = (np.arange(L)[:, None, None] * E + best_LTK).ravel()
        clean_LE = np.bincount(key_best, minlength=L * E).reshape(L, E).astype(np.float64)
    else:
        clean_LE = counts_LE
    return RoutedTick(counts_LE, wsum_LE, loss_LE, scale_L, explored_L, sumx.reshape(L, D, E),
                      cnt.reshape(L, D, E), float(tl_LT.mean()), clean_LE)


def learn(env: EnvConfig, es: EnvState, routed: RoutedTick) -> None:
    """The router's update from this tick's observed slot losses (in place)."""
    cnt, seen = routed.cnt_LDE, routed.cnt_LDE > 0
    n_new = np.minimum(es.nobs_LDE + cnt, env.router_memory)
    w = np.minimum(np.divide(cnt, n_new, out=np.zeros_like(cnt), where=seen), 1.0)
    mean_x = np.divide(routed.sumx_LDE, cnt, out=np.zeros_like(cnt), where=seen)
    es.est_LDE = np.where(seen, es.est_LDE + w * (mean_x - es.est_LDE), es.est_LDE)
    es.nobs_LDE = np.where(seen, n_new, es.nobs_LDE)
