"""Batched mean-field Kuramoto simulation (the phase dynamics of the controller, on its own).

Shape legend: B independent systems, N oscillators per system, T recorded ticks.

Each system integrates, with Euler steps of size dt,

    θ_i ← θ_i + dt·(ω_i + K·R·sin(ψ − θ_i)) + σ·sqrt(dt)·ξ_i     (mod 2π),
    R e^{iψ} = mean_j e^{iθ_j}  (over the system's own N oscillators, before the step),

where K·R·sin(ψ − θ) = K·(S cos θ − C sin θ) with S, C the means of sin θ and cos θ. The noise
ξ of step t (1-based) for oscillator i of system b is ``rng.normal(seed, rng.STREAM_PHASE, t,
b·N + i)``, so a one-system run with N = L·E draws the controller's phase noise. Initial phases
default to ``2π·rng.uniform(seed, STREAM_KURAMOTO_INIT, 0, b·N + i)``.

Known answers: for Lorentzian ω of half-width γ and K > K_c = 2γ the stationary R of the
N → ∞ system is sqrt(1 − 2γ/K); below K_c the finite system's R is O(N^{-1/2}).

``backend="numpy"`` runs the plain vectorised NumPy loop (np.sin/np.cos, the reference the Numba
kernel is checked against and timed against); ``"numba"`` runs ``_kernels.kuramoto_batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import rng
from .rng import STREAM_KURAMOTO_INIT

__all__ = ["KuramotoResult", "simulate_kuramoto", "lorentzian_quantiles", "STREAM_KURAMOTO_INIT"]


@dataclass(frozen=True)
class KuramotoResult:
    """R and ψ every ``record_every`` steps (index 0: the initial phases).

    For omega of shape [N] the trajectories are [T]; for [B, N] they are [B, T]."""

    R: np.ndarray
    """[T] or [B, T] order parameter R in [0, 1]."""
    psi: np.ndarray
    """[T] or [B, T] mean-field phase ψ in (−π, π]."""
    theta_final: np.ndarray
    """[N] or [B, N] phases after the last step, in [0, 2π)."""
    ticks: np.ndarray
    """[T] step number of each record: 0, record_every, 2·record_every, ..."""

    def stationary_R(self, discard: float = 0.5) -> np.ndarray | float:
        """Time average of R over the records after the first ``discard`` fraction."""
        if not 0.0 <= discard < 1.0:
            raise ValueError(f"discard={discard!r}: allowed range is [0, 1)")
        R = np.atleast_2d(self.R)
        start = min(int(discard * R.shape[1]), R.shape[1] - 1)
        m = R[:, start:].mean(axis=1)
        return float(m[0]) if self.R.ndim == 1 else m


def lorentzian_quantiles(n: int, gamma: float, center: float = 0.0) -> np.ndarray:
    """[n] deterministic Lorentzian (Cauchy) sample: the quantiles at (i + 1/2)/n."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n={n!r}: expected an integer >= 1")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma={gamma!r}: expected a finite number > 0")
    q = (np.arange(n) + 0.5) / n
    return center + gamma * np.tan(np.pi * (q - 0.5))


def _as_real(name: str, v, lo: float | None = None, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)):
        raise ValueError(f"{name}={v!r}: expected a finite real number")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name}={v!r}: must be {'>' if lo_open else '>='} {lo}")
    return v


def _as_int(name: str, v, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo \
            or (hi is not None and v > hi):
        rng_s = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v!r}: expected an integer {rng_s}")
    return int(v)


def _validate(omega, coupling, dt, steps, noise, theta0, seed, record_every, backend):
    try:
        om = np.array(omega, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"omega: expected a real array of shape [N] or [B, N], got "
                         f"{type(omega).__name__}") from None
    if om.ndim not in (1, 2) or om.size == 0:
        raise ValueError(f"omega has shape {om.shape}: expected a non-empty [N] or [B, N]")
    if not np.all(np.isfinite(om)):
        raise ValueError("omega has non-finite values")
    coupling = _as_real("coupling", coupling)
    dt = _as_real("dt", dt, 0.0, lo_open=True)
    steps = _as_int("steps", steps, 1)
    noise = _as_real("noise", noise, 0.0)
    seed = _as_int("seed", seed, 0, 2**32 - 1)
    record_every = _as_int("record_every", record_every, 1, steps)
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend={backend!r}: allowed values are 'numba', 'numpy'")
    om_BN = np.ascontiguousarray(np.atleast_2d(om))
    B, N = om_BN.shape
    if theta0 is None:
        th_BN = 2.0 * np.pi * rng.uniform(seed, STREAM_KURAMOTO_INIT, 0,
                                          np.arange(B * N)).reshape(B, N)
    else:
        try:
            th = np.array(theta0, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("theta0: expected a real array shaped like omega") from None
        if th.shape != om.shape:
            raise ValueError(f"theta0 has shape {th.shape}: expected omega's shape {om.shape}")
        if not np.all(np.isfinite(th)):
            raise ValueError("theta0 has non-finite values")
        th_BN = np.ascontiguousarray(np.mod(np.atleast_2d(th), 2.0 * np.pi))
    return om_BN, th_BN, coupling, dt, steps, noise, seed, record_every


def _numpy_loop(theta_BN, omega_BN, coupling, dt, steps, noise, seed, record_every, R_BT, psi_BT):
    """Plain vectorised NumPy mean-field loop, in place on theta_BN (same update as the kernel)."""
    B, N = theta_BN.shape
    idx_BN = np.arange(B * N).reshape(B, N)
    amp = noise * math.sqrt(dt)
    s_BN, c_BN = np.sin(theta_BN), np.cos(theta_BN)
    S_B1, C_B1 = s_BN.mean(axis=1, keepdims=True), c_BN.mean(axis=1, keepdims=True)
    R_BT[:, 0] = np.minimum(np.hypot(S_B1[:, 0], C_B1[:, 0]), 1.0)
    psi_BT[:, 0] = np.arctan2(S_B1[:, 0], C_B1[:, 0])
    for t in range(1, steps + 1):
        theta_BN += dt * (omega_BN + coupling * (S_B1 * c_BN - C_B1 * s_BN))
        if noise > 0.0:
            theta_BN += amp * rng.normal(seed, rng.STREAM_PHASE, t, idx_BN)
        np.mod(theta_BN, 2.0 * np.pi, out=theta_BN)
        s_BN, c_BN = np.sin(theta_BN), np.cos(theta_BN)
        S_B1, C_B1 = s_BN.mean(axis=1, keepdims=True), c_BN.mean(axis=1, keepdims=True)
        if t % record_every == 0:
            r = t // record_every
            R_BT[:, r] = np.minimum(np.hypot(S_B1[:, 0], C_B1[:, 0]), 1.0)
            psi_BT[:, r] = np.arctan2(S_B1[:, 0], C_B1[:, 0])
    theta_BN[theta_BN >= 2.0 * np.pi] = 0.0


def simulate_kuramoto(omega, coupling: float, dt: float, steps: int, noise: float = 0.0,
                      theta0=None, seed: int = 0, record_every: int = 1,
                      backend: str = "numba") -> KuramotoResult:
    """Integrate B independent mean-field Kuramoto systems (see the module docstring).

    omega: [N] natural frequencies of one system, or [B, N] for B systems.
    coupling: K. dt: Euler step (> 0). steps: number of steps (>= 1). noise: σ (>= 0).
    theta0: initial phases shaped like omega (default: uniform from ``seed``).
    seed: key of the counter RNG, in [0, 2**32). record_every: record R, ψ every n steps.
    backend: "numba" (parallel over systems) or "numpy" (the plain reference loop).
    """
    om_BN, th_BN, K, dt, steps, noise, seed, every = _validate(
        omega, coupling, dt, steps, noise, theta0, seed, record_every, backend)
    B, N = om_BN.shape
    T = steps // every + 1
    R_BT = np.empty((B, T))
    psi_BT = np.empty((B, T))
    if backend == "numba":
        from . import _kernels
        _kernels.kuramoto_batch(th_BN, om_BN, K, dt, steps, noise, seed, every, R_BT, psi_BT)
        # the kernel's floor-based wrap may leave ±1 ulp outside [0, 2π): fold it back
        np.mod(th_BN, 2.0 * np.pi, out=th_BN)
        th_BN[th_BN >= 2.0 * np.pi] = 0.0
    else:
        _numpy_loop(th_BN, om_BN, K, dt, steps, noise, seed, every, R_BT, psi_BT)
    one = np.ndim(omega) == 1
    return KuramotoResult(R=R_BT[0] if one else R_BT, psi=psi_BT[0] if one else psi_BT,
                          theta_final=th_BN[0] if one else th_BN,
                          ticks=np.arange(T, dtype=np.int64) * every)
