"""The synthetic routing environment (``env.route``/``env.learn``) in Numba.

The inner loops run over tokens (structure of arrays) so that hashing, the logits, the Gumbel
noise, the scores and the branch-free top-k insertion vectorise; only the accumulation into the
per-(layer, domain, expert) sums is a sequential per-token loop, in ``env.route``'s bincount
order (token, then slot). The raw logits, their centring, the scores and the noise are computed
with the operations of ``env.raw_logits``/``routing.route`` in the same order (sums over experts
in index order, ``libm._gumbel_into`` = ``rng.log_poly``), so the same discrete choices follow.
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from ..rng import STREAM_BATCH, STREAM_DOMAIN, STREAM_GUMBEL, STREAM_LOSS, STREAM_TOKEN
from .jit import helper, kernel
from .libm import _exp_nonpos_into, _gumbel_into, _hash_base, _uniform_at

__all__ = ["EnvParams", "env_params", "env_route", "env_learn", "route_scratch"]

EnvParams = namedtuple("EnvParams", [
    "tokens", "top_k", "loss_floor", "loss_range", "loss_noise", "token_noise", "batch_noise",
    "router_sharpness", "router_memory"])


def env_params(env) -> EnvParams:
    """The kernels' record of an ``EnvConfig``."""
    return EnvParams(int(env.tokens_per_tick), int(env.top_k), float(env.loss_floor),
                     float(env.loss_range), float(env.loss_noise), float(env.token_noise),
                     float(env.batch_noise), float(env.router_sharpness),
                     float(env.router_memory))


@kernel
def route_scratch(L, D, E, T, K):
    """Scratch buffers of ``env_route``, in its argument order (allocated once per system)."""
    return (np.zeros(T, dtype=np.int64), np.zeros((L, D, E)), np.zeros((E, T)), np.zeros(T),
            np.zeros(T), np.zeros(T), np.zeros(T), np.zeros(T, dtype=np.int64), np.zeros((K, T)),
            np.zeros((K, T), dtype=np.int64), np.zeros((K, T)), np.zeros((K, T), dtype=np.int64),
            np.zeros((K, T)), np.zeros((K, T)), np.zeros(T), np.zeros(T, dtype=np.int64))


@helper
def _clear_topk(top_KT, sel_KT):
    for j in range(top_KT.shape[0]):
        for t in range(top_KT.shape[1]):
            top_KT[j, t] = -np.inf
            sel_KT[j, t] = -1


@helper
def _insert_topk(s_T, e, top_KT, sel_KT, b_T):
    """Insert expert e with scores s_T into each token's top-k list, kept ordered by (score
    descending, index ascending): the order of a stable sort of −score. Experts arrive in index
    order, so e loses ties; an entry pushed down from slot j−1 has the lower index and wins its
    tie with slot j. Selects, not branches (random scores would mispredict). -0.0 == 0.0 as in
    NumPy's sort. Clobbers s_T (the general-K path carries the pushed-down entries in it)."""
    K, T = top_KT.shape
    if K == 1 or K == 2:
        # the pushed-down entry goes straight to slot 1: plain selects over 1-D rows
        top0_T, sel0_T = top_KT[0], sel_KT[0]
        top1_T, sel1_T = top_KT[K - 1], sel_KT[K - 1]
        for t in range(T):
            s = s_T[t]
            a0 = top0_T[t]
            a1 = top1_T[t]
            c0 = sel0_T[t]
            c1 = sel1_T[t]
            gt0 = s > a0
            gt1 = s > a1
            if K == 2:
                top1_T[t] = a0 if gt0 else (s if gt1 else a1)
                sel1_T[t] = c0 if gt0 else (e if gt1 else c1)
            top0_T[t] = s if gt0 else a0
            sel0_T[t] = e if gt0 else c0
        return
    for t in range(T):
        b_T[t] = e
    for j in range(K):
        for t in range(T):
            s = s_T[t]
            sj = top_KT[j, t]
            b = b_T[t]
            bj = sel_KT[j, t]
            gt = (s > sj) | ((s == sj) & (b < bj))
            top_KT[j, t] = s if gt else sj
            sel_KT[j, t] = b if gt else bj
            s_T[t] = sj if gt else s
            b_T[t] = bj if gt else b


@helper
def _raw_logits(ep, l, h_tok, base_LDE, dom_T, z_ET):
    """env.raw_logits of layer l: z[e, t] = base[l, dom_t, e] + token_noise·(2u − 1)."""
    D, E = base_LDE.shape[1], base_LDE.shape[2]
    T = z_ET.shape[1]
    for e in range(E):
        if D <= 4:
            # the domain's base picked from up to four scalars with selects (no gather)
            bd0 = base_LDE[l, 0, e]
            bd1 = base_LDE[l, min(1, D - 1), e]
            bd2 = base_LDE[l, min(2, D - 1), e]
            bd3 = base_LDE[l, min(3, D - 1), e]
            for t in range(T):
                u = _uniform_at(h_tok, (l * T + t) * E + e)
                dt = dom_T[t]
                bd = bd1 if dt == 1 else bd0
                bd = bd2 if dt == 2 else bd
                bd = bd3 if dt == 3 else bd
                z_ET[e, t] = bd + ep.token_noise * (2.0 * u - 1.0)
        else:
            for t in range(T):                     # vectorises (no gather in it)
                u = _uniform_at(h_tok, (l * T + t) * E + e)
                z_ET[e, t] = ep.token_noise * (2.0 * u - 1.0)
            # one masked pass per domain instead of a gather (LLVM does not vectorise gathers
            # on this target); bd + x == x + bd exactly
            for d in range(D):
                bd = base_LDE[l, d, e]
                for t in range(T):
                    z_ET[e, t] = bd + z_ET[e, t] if dom_T[t] == d else z_ET[e, t]


@helper
def _centre(z_ET, m_T, v_T):
    """m = Σ_e z / E and Σ_e (z − m)² (index order, as routing.sum_experts); returns the sum
    over tokens of the std sqrt(v/E), in token order."""
    E, T = z_ET.shape
    for t in range(T):
        m_T[t] = z_ET[0, t]
    for e in range(1, E):
        for t in range(T):
            m_T[t] = m_T[t] + z_ET[e, t]
    for t in range(T):
        m_T[t] = m_T[t] / E
        d = z_ET[0, t] - m_T[t]
        v_T[t] = d * d
    for e in range(1, E):
        for t in range(T):
            d = z_ET[e, t] - m_T[t]
            v_T[t] = v_T[t] + d * d
    acc = 0.0
    for t in range(T):
        acc += math.sqrt(v_T[t] / E)
    return acc


@kernel
def env_route(ep, seed, tick, controller_fields, quality_LED, est_LDE, cum_D, bias_LE, temp_LE,
              scale_L, tau, counts_LE, noiseless_LE, loss_LE, scale_obs_L, sumx_LDE, cnt_LDE,
              dom_T, base_LDE, z_ET, m_T, v_T, s_T, g_T, b_T, top_KT, sel_KT, best_KT, bsel_KT,
              w_KT, x_KT, tl_T, bits_T):
    """env.route: fills counts/loss [L, E], the noiseless counts [L, E] (slots of the top-k
    of the noiseless score, ``bsel_KT``, when noisy; a copy of counts otherwise), the observed
    logit scale [L] and the router's sums/counts [L, D, E]; returns (mean token loss, explored
    slots). From ``dom_T`` on the arguments are scratch (``route_scratch``). The gate-weight
    sums are not formed: the control law reads counts, noiseless counts, losses and the logit
    scale only."""
    L, E, D = quality_LED.shape
    T = ep.tokens
    K = ep.top_k
    noisy = controller_fields and tau > 0.0
    loss_LE[:] = 0.0
    sumx_LDE[:] = 0.0
    cnt_LDE[:] = 0.0
    h_batch = _hash_base(seed, STREAM_BATCH, tick)
    for l in range(L):
        for d in range(D):
            m = est_LDE[l, d, 0]
            for e in range(1, E):
                m = m + est_LDE[l, d, e]
            m = m / E
            for e in range(E):
                u = _uniform_at(h_batch, (l * D + d) * E + e)
                base_LDE[l, d, e] = ep.router_sharpness * (m - est_LDE[l, d, e]) \
                    + ep.batch_noise * (2.0 * u - 1.0)
    h_dom = _hash_base(seed, STREAM_DOMAIN, tick)
    for t in range(T):
        u = _uniform_at(h_dom, t)
        d = 0
        while d < D - 1 and u >= cum_D[d]:   # cum_D[D-1] == 1 > u
            d += 1
        dom_T[t] = d
    h_tok = _hash_base(seed, STREAM_TOKEN, tick)
    h_gum = _hash_base(seed, STREAM_GUMBEL, tick)
    h_loss = _hash_base(seed, STREAM_LOSS, tick)
    total = 0.0
    explored = 0
    for l in range(L):
        _raw_logits(ep, l, h_tok, base_LDE, dom_T, z_ET)
        scale_obs_L[l] = _centre(z_ET, m_T, v_T) / T
        _clear_topk(top_KT, sel_KT)
        _clear_topk(best_KT, bsel_KT)
        sc = scale_L[l]
        for e in range(E):
            if controller_fields:
                inv_b = bias_LE[l, e]
                tmp = temp_LE[l, e]
                for t in range(T):                 # s = z̃/T_e + bias, z̃ = (z − m)/scale
                    s_T[t] = (z_ET[e, t] - m_T[t]) / sc / tmp + inv_b
                if noisy:
                    for t in range(T):
                        g_T[t] = _uniform_at(h_gum, (l * T + t) * E + e)
                    _gumbel_into(g_T, g_T, bits_T)
                    for t in range(T):
                        v_T[t] = s_T[t]            # the noiseless s, for the explored slots
                    _insert_topk(v_T, e, best_KT, bsel_KT, b_T)
                    for t in range(T):
                        s_T[t] = s_T[t] + tau * g_T[t]
            else:
                for t in range(T):
                    s_T[t] = z_ET[e, t]
            _insert_topk(s_T, e, top_KT, sel_KT, b_T)
        if noisy:
            for t in range(T):
                for j in range(K):
                    hit = False
                    for i in range(K):
                        hit = hit | (sel_KT[j, t] == bsel_KT[i, t])
                    explored += 0 if hit else 1
            # the router's choice: slots of the noiseless top-k (integer sums: exact)
            nl_E = noiseless_LE[l]
            for e in range(E):
                nl_E[e] = 0.0
            for t in range(T):
                for j in range(K):
                    nl_E[np.uint64(bsel_KT[j, t])] += 1.0
        for j in range(K):
            for t in range(T):                     # vectorises: the noise term alone
                u = _uniform_at(h_loss, (l * T + t) * K + j)
                x_KT[j, t] = ep.loss_noise * (2.0 * u - 1.0)
            for t in range(T):                     # + the quality gather, in env.route's order
                x_KT[j, t] = ep.loss_floor + ep.loss_range \
                    * (1.0 - quality_LED[l, sel_KT[j, t], dom_T[t]]) + x_KT[j, t]
        # gates: softmax over the selected experts of the raw logits; token loss Σ_j g_j x_j
        for t in range(T):
            zmax = z_ET[sel_KT[0, t], t]
            for j in range(1, K):
                zmax = max(zmax, z_ET[sel_KT[j, t], t])
            m_T[t] = zmax
        for j in range(K):
            for t in range(T):
                w_KT[j, t] = z_ET[sel_KT[j, t], t] - m_T[t]        # <= 0
            _exp_nonpos_into(w_KT[j], w_KT[j], bits_T)
        for t in range(T):
            v_T[t] = w_KT[0, t]
            tl_T[t] = 0.0
        for j in range(1, K):
            for t in range(T):
                v_T[t] += w_KT[j, t]
        for j in range(K):
            for t in range(T):
                tl_T[t] += (w_KT[j, t] / v_T[t]) * x_KT[j, t]
        # bincount order: token, then slot. Flat rows and unsigned indices (no negative-index
        # fix-ups in this sequential loop); e = sel < E and d = dom < D by construction.
        lossl_E = loss_LE[l]
        sxl_F = sumx_LDE[l].reshape(D * E)
        cnl_F = cnt_LDE[l].reshape(D * E)
        for t in range(T):
            r = np.uint64(dom_T[t] * E)
            tl = tl_T[t]
            for j in range(K):
                e = np.uint64(sel_KT[j, t])
                lossl_E[e] += tl
                sxl_F[r + e] += x_KT[j, t]
                cnl_F[r + e] += 1.0
            total += tl
        for e in range(E):                         # integer sums: exact in any order
            c = 0.0
            for d in range(D):
                c += cnt_LDE[l, d, e]
            counts_LE[l, e] = c
            if not noisy:                          # no noise: the choice is the routing
                noiseless_LE[l, e] = c
    return total / (L * T), explored


@kernel
def env_learn(ep, est_LDE, nobs_LDE, sumx_LDE, cnt_LDE):
    """env.learn: running mean with the count capped at router_memory."""
    L, D, E = est_LDE.shape
    for l in range(L):
        for d in range(D):
            for e in range(E):
                c = cnt_LDE[l, d, e]
                if c > 0:
                    n_new = min(nobs_LDE[l, d, e] + c, ep.router_memory)
                    w = min(c / n_new, 1.0)
                    est_LDE[l, d, e] = est_LDE[l, d, e] + w * (sumx_LDE[l, d, e] / c
                                                               - est_LDE[l, d, e])
                    nobs_LDE[l, d, e] = n_new
