"""The batch driver: per system and tick, events, κ, the controller's fields, the environment's
routing, ``controller_step``, the router's learning, the adaptive κ rule, the records.
``controller_step`` gets the routing's noiseless counts (law v2.1: usage and drift read the
router's choice) besides the routed counts and losses (reliability); the records' MaxVio reads
the routed counts (the load the experts got).

Systems are independent and each runs sequentially, so results do not depend on the number of
threads. ONE body, ``_simulate``, compiled twice: ``simulate_batch`` with ``parallel=True``
(systems in ``prange``) and ``simulate_serial`` without (``prange`` runs as ``range``), which
skips the thread pool's launch cost (milliseconds per call on a busy machine, more than a short
run of one system).

Arguments are the fields of ``BatchState``, ``Events`` and ``Records``, flat: a namedtuple of
arrays in a jitted signature costs seconds of compile time each (its boxing code), flat arrays
almost nothing.
"""

from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np

from ..schedule import adaptive_offset_update
from .controller import _clip, _ema, controller_step, routing_fields_into
from .environment import env_learn, env_route, route_scratch
from .jit import helper, kernel

__all__ = ["AdaptParams", "BatchState", "Events", "Records", "simulate_batch",
           "simulate_serial"]

AdaptParams = namedtuple("AdaptParams", [
    "enabled", "R_low", "R_high", "variance_high", "rate", "decay", "max_offset"])

BatchState = namedtuple("BatchState", [
    "tick_B", "seed_B", "theta_BLE", "omega_BLE", "usage_BLE", "rel_BLE", "delta_BLE",
    "pressure_BLE", "lens_BLE", "T_fast_BLE", "Tbar_local_BLE", "T_eff_BLE", "logit_scale_BL",
    "scal_B5", "offset_B", "quality_BLED", "est_BLDE", "nobs_BLDE", "cum_BD"])
"""Everything carried between chunks. scal_B5 = (R, ψ, ΔR, κ, T̄_global) of each controller."""

Events = namedtuple("Events", ["tick_X", "kind_X", "layer_X", "index_X", "value_X", "cum_XD"])
"""kind 0 = collapse (index = expert, layer −1 = all, value = quality), 1 = domain shift
(index = row of cum_XD)."""

Records = namedtuple("Records", [
    "R_BT", "dR_BT", "kappa_BT", "loss_BT", "Tbar_global_BT", "explore_BT", "logit_scale_BTL",
    "maxvio_BTL", "var_local_BTL", "Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "rel_BTLE"])
"""Outputs every ``record_every`` ticks; the _BTLE ones have T = 0 when layers are not kept."""

_adaptive_update = helper(adaptive_offset_update)


@helper
def _variance(x_E):
    """np.var of a vector (two passes; sequential sums)."""
    n = x_E.shape[0]
    m = 0.0
    for i in range(n):
        m += x_E[i]
    m /= n
    v = 0.0
    for i in range(n):
        v += (x_E[i] - m) * (x_E[i] - m)
    return v / n


@helper
def _apply_events(t, quality_LED, cum_D, ev_tick_X, ev_kind_X, ev_layer_X, ev_index_X,
                  ev_value_X, ev_cum_XD):
    L, E, D = quality_LED.shape
    for x in range(ev_tick_X.shape[0]):
        if ev_tick_X[x] == t:
            if ev_kind_X[x] == 0:
                for l in range(L):
                    if ev_layer_X[x] < 0 or ev_layer_X[x] == l:
                        for d in range(D):
                            quality_LED[l, ev_index_X[x], d] = ev_value_X[x]
            else:
                cum_D[:] = ev_cum_XD[ev_index_X[x]]


@helper
def _run_system(b, t_start, t_stop, record_every, controller_fields, cp, ep, ap, kappa_T, p_T,
                tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE, pressure_BLE,
                lens_BLE, T_fast_BLE, Tbar_local_BLE, T_eff_BLE, logit_scale_BL, scal_B5,
                offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD, ev_tick_X, ev_kind_X,
                ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD, R_BT, dR_BT, kappa_BT, loss_BT,
                Tbar_global_BT, explore_BT, logit_scale_BTL, maxvio_BTL, var_local_BTL,
                Tbar_local_BTLE, T_fast_BTLE, usage_BTLE, rel_BTLE):
    """Ticks t_start+1 .. t_stop of system b (events, κ, route, step, learn, adapt, record)."""
    L, E, D = quality_BLED.shape[1:]
    T, K = ep.tokens, ep.top_k
    seed = seed_B[b]
    counts_LE = np.zeros((L, E))
    noiseless_LE = np.zeros((L, E))
    loss_LE = np.zeros((L, E))
    bias_LE = np.zeros((L, E))
    temp_LE = np.ones((L, E))
    scale_L = np.ones(L)
    scale_obs_L = np.zeros(L)
    sumx_LDE = np.zeros((L, D, E))
    cnt_LDE = np.zeros((L, D, E))
    (dom_T, base_LDE, z_ET, m_T, v_T, s_T, g_T, b_T, top_KT, sel_KT, best_KT, bsel_KT, w_KT,
     x_KT, tl_T, bits_T) = route_scratch(L, D, E, T, K)
    d_E = np.zeros(E)
    quality_LED = quality_BLED[b]
    cum_D = cum_BD[b]
    scal_5 = scal_B5[b]
    keep_layers = Tbar_local_BTLE.shape[1] > 0
    for t in range(t_start + 1, t_stop + 1):
        _apply_events(t, quality_LED, cum_D, ev_tick_X, ev_kind_X, ev_layer_X, ev_index_X,
                      ev_value_X, ev_cum_XD)
        if ap.enabled:
            k_in = _clip(kappa_T[t - 1] + (1.0 - p_T[t - 1]) * offset_B[b], -1.0, 1.0)
        else:
            k_in = kappa_T[t - 1]
        # route with the κ this tick's step will put in effect (law.smooth_kappa)
        tau = routing_fields_into(cp, _ema(scal_5[3], k_in, cp.kappa_smoothing),
                                  pressure_BLE[b], lens_BLE[b], T_eff_BLE[b], logit_scale_BL[b],
                                  bias_LE, temp_LE, scale_L)
        mean_loss, explored = env_route(
            ep, seed, t, controller_fields, quality_LED, est_BLDE[b], cum_D, bias_LE, temp_LE,
            scale_L, tau, counts_LE, noiseless_LE, loss_LE, scale_obs_L, sumx_LDE, cnt_LDE,
            dom_T, base_LDE, z_ET, m_T, v_T, s_T, g_T, b_T, top_KT, sel_KT, best_KT, bsel_KT,
            w_KT, x_KT, tl_T, bits_T)
        tick_B[b] = controller_step(
            cp, seed, tick_B[b], theta_BLE[b], omega_BLE[b], usage_BLE[b], rel_BLE[b],
            delta_BLE[b], pressure_BLE[b], lens_BLE[b], T_fast_BLE[b], Tbar_local_BLE[b],
            T_eff_BLE[b], logit_scale_BL[b], scal_5, counts_LE, noiseless_LE, loss_LE, True,
            scale_obs_L, True, k_in, d_E)
        env_learn(ep, est_BLDE[b], nobs_BLDE[b], sumx_LDE, cnt_LDE)
        if ap.enabled and tick_B[b] % cp.macro_period == 0:
            # whole-model T̄ variance: mean over layers of var(T̄_local[l])
            var_m = 0.0
            for l in range(L):
                var_m += _variance(Tbar_local_BLE[b, l])
            var_m /= L
            offset_B[b] = _adaptive_update(
                offset_B[b], scal_5[0], var_m, var_m > cp.landscape_formed_variance, ap.R_low,
                ap.R_high, ap.variance_high, ap.rate, ap.decay, ap.max_offset)
        if t % record_every == 0:
            r = t // record_every - 1
            R_BT[b, r] = scal_5[0]
            dR_BT[b, r] = scal_5[2]
            kappa_BT[b, r] = scal_5[3]
            Tbar_global_BT[b, r] = scal_5[4]
            loss_BT[b, r] = mean_loss
            explore_BT[b, r] = explored / (L * T * K)
            for l in range(L):
                var_local_BTL[b, r, l] = _variance(Tbar_local_BLE[b, l])
                logit_scale_BTL[b, r, l] = scale_obs_L[l]
                tot = 0.0
                cmax = 0.0
                for e in range(E):
                    tot += counts_LE[l, e]
                    cmax = max(cmax, counts_LE[l, e])
                maxvio_BTL[b, r, l] = cmax / (tot / E) - 1.0
            if keep_layers:
                Tbar_local_BTLE[b, r] = Tbar_local_BLE[b]
                T_fast_BTLE[b, r] = T_fast_BLE[b]
                usage_BTLE[b, r] = usage_BLE[b]
                rel_BTLE[b, r] = rel_BLE[b]


def _simulate(t_start, t_stop, record_every, controller_fields, cp, ep, ap, kappa_T, p_T,
              tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE, delta_BLE, pressure_BLE,
              lens_BLE, T_fast_BLE, Tbar_local_BLE, T_eff_BLE, logit_scale_BL, scal_B5, offset_B,
              quality_BLED, est_BLDE, nobs_BLDE, cum_BD, ev_tick_X, ev_kind_X, ev_layer_X,
              ev_index_X, ev_value_X, ev_cum_XD, R_BT, dR_BT, kappa_BT, loss_BT, Tbar_global_BT,
              explore_BT, logit_scale_BTL, maxvio_BTL, var_local_BTL, Tbar_local_BTLE,
              T_fast_BTLE, usage_BTLE, rel_BTLE):
    """Advance every system from tick t_start to t_stop (state in place, records written)."""
    for b in numba.prange(theta_BLE.shape[0]):
        _run_system(np.int64(b), t_start, t_stop, record_every, controller_fields, cp, ep, ap,
                    kappa_T, p_T, tick_B, seed_B, theta_BLE, omega_BLE, usage_BLE, rel_BLE,
                    delta_BLE, pressure_BLE, lens_BLE, T_fast_BLE, Tbar_local_BLE, T_eff_BLE,
                    logit_scale_BL, scal_B5, offset_B, quality_BLED, est_BLDE, nobs_BLDE, cum_BD,
                    ev_tick_X, ev_kind_X, ev_layer_X, ev_index_X, ev_value_X, ev_cum_XD, R_BT,
                    dR_BT, kappa_BT, loss_BT, Tbar_global_BT, explore_BT, logit_scale_BTL,
                    maxvio_BTL, var_local_BTL, Tbar_local_BTLE, T_fast_BTLE, usage_BTLE,
                    rel_BTLE)


simulate_batch = kernel(_simulate, parallel=True)
"""``_simulate`` over the thread pool."""
simulate_serial = kernel(_simulate)
"""``_simulate`` on the calling thread (prange runs as range)."""
