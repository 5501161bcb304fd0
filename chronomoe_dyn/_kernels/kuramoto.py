"""Mean-field Kuramoto integrator (``kuramoto.simulate_kuramoto``'s Numba backend).

Per step one pass per system advances θ with K·R·sin(ψ − θ) = K·(S·cos θ − C·sin θ) (S, C the
means of sin θ and cos θ, so sin/cos are computed once per oscillator per step) and accumulates
the next S, C. sin/cos come from the branch-free ``libm._sincos``, which LLVM vectorises.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..rng import STREAM_PHASE
from .jit import helper, kernel
from .libm import TWO_PI, _hash_base, _normal_at, _sincos


@helper(inline="always")
def _wrap_store(th, i, theta_N, sin_N, cos_N):
    """θ_i ← th wrapped to [0, 2π) (keeps the polynomial's argument small; floor vectorises),
    with its sin and cos stored; returns (sin, cos)."""
    th -= TWO_PI * math.floor(th * (1.0 / TWO_PI))
    sn, cs = _sincos(th)
    theta_N[i] = th
    sin_N[i] = sn
    cos_N[i] = cs
    return sn, cs


@helper(fastmath=True)
def _kuramoto_one(theta_N, omega_N, coupling, dt, steps, noise, seed, index0, record_every,
                  R_T, psi_T):
    """Integrate one system for ``steps`` Euler steps in place; record R, ψ every
    ``record_every`` steps (index 0 = the initial state). Noise of step t (1-based) is
    rng.normal(seed, STREAM_PHASE, t, index0 + i)."""
    N = theta_N.shape[0]
    sin_N = np.empty(N)
    cos_N = np.empty(N)
    S = 0.0
    C = 0.0
    for i in range(N):
        sn, cs = _sincos(theta_N[i])
        sin_N[i] = sn
        cos_N[i] = cs
        S += sn
        C += cs
    S /= N
    C /= N
    R_T[0] = min(math.sqrt(S * S + C * C), 1.0)
    psi_T[0] = math.atan2(S, C)
    amp = noise * math.sqrt(dt)
    KS = coupling * S
    KC = coupling * C
    for t in range(1, steps + 1):
        S1 = 0.0
        C1 = 0.0
        # Two loops that differ only by the noise term: the noiseless one has no hash in it
        # and vectorises; one loop with the noise behind a branch did not.
        if noise > 0.0:
            h1 = _hash_base(seed, STREAM_PHASE, t)
            for i in range(N):
                th = theta_N[i] + dt * (omega_N[i] + (KS * cos_N[i] - KC * sin_N[i])) \
                    + amp * _normal_at(h1, index0 + i)
                sn, cs = _wrap_store(th, i, theta_N, sin_N, cos_N)
                S1 += sn
                C1 += cs
        else:
            for i in range(N):
                th = theta_N[i] + dt * (omega_N[i] + (KS * cos_N[i] - KC * sin_N[i]))
                sn, cs = _wrap_store(th, i, theta_N, sin_N, cos_N)
                S1 += sn
                C1 += cs
        S = S1 / N
        C = C1 / N
        KS = coupling * S
        KC = coupling * C
        if t % record_every == 0:
            r = t // record_every
            R_T[r] = min(math.sqrt(S * S + C * C), 1.0)
            psi_T[r] = math.atan2(S, C)


@kernel(parallel=True)
def kuramoto_batch(theta_BN, omega_BN, coupling, dt, steps, noise, seed, record_every,
                   R_BT, psi_BT):
    """Independent systems in parallel; system b's noise indices are b·N + i."""
    B, N = theta_BN.shape
    for b in numba.prange(B):
        _kuramoto_one(theta_BN[b], omega_BN[b], coupling, dt, steps, noise, seed, b * N,
                      record_every, R_BT[b], psi_BT[b])
