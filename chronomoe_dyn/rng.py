"""Counter-based random numbers shared by every backend, and the registry of their streams.

A draw is a pure function of (seed, stream, tick, index): no generator state to carry, so the
NumPy reference, the Numba kernels and the torch controller produce the same bits for the same
keys, in any order and on any number of threads.

Hash: the 32-bit ``lowbias32`` integer finaliser (xorshift-multiply, constants 0x7feb352d and
0x846ca68b), chained over the key words with wrap-around addition. Uniforms are
``(h + 0.5) / 2**32`` (exact in float64, never 0 or 1); normals use Box–Muller over two draws.
All arithmetic is done in 64-bit integers masked to 32 bits, which every backend supports.

Gumbel noise (the routing rule's exploration, DESIGN.md §3.8) is g = −log(−log u). The backends
must make the same discrete choices from it, so the log is not the platform's libm but
``log_poly``: a fixed sequence of IEEE operations (exponent split on the bits, an atanh series
on the mantissa) that NumPy and the Numba kernel evaluate in the same order, hence bit for bit
alike; it is within a few ulp of ``np.log`` (tested).

Streams (one registry: every module imports its ids from here; never change a value, the
Numba kernels bake them into cached machine code and saved runs depend on them):
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np

__all__ = ["MASK32", "GOLDEN32", "mix32", "hash_key", "uniform", "normal", "log_poly",
           "gumbel_from_uniform", "gumbel", "split_head", "LN2_HI", "LN2_LO", "STREAMS", "STREAM_PHASE", "STREAM_DOMAIN",
           "STREAM_TOKEN", "STREAM_LOSS", "STREAM_QUALITY", "STREAM_HOME",
           "STREAM_KURAMOTO_INIT", "STREAM_BATCH", "STREAM_GUMBEL", "LOG_POLY_COEFFS"]

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9

STREAM_PHASE = 0
"""Controller phase noise: index l·E + e (law.step, every backend)."""
STREAM_DOMAIN = 11
"""Simulator environment: domain of each token, index t."""
STREAM_TOKEN = 12
"""Simulator environment: per-token logit noise, index (l·T + t)·E + e."""
STREAM_LOSS = 13
"""Simulator environment: per-slot loss noise, index (l·T + t)·K + k."""
STREAM_QUALITY = 14
"""Simulator environment: hidden expert quality at init, index (l·E + e)·D + d (tick 0)."""
STREAM_HOME = 15
"""Simulator environment: home-domain shuffle at init, index l·E + e (tick 0)."""
STREAM_KURAMOTO_INIT = 16
"""``simulate_kuramoto``: default initial phases, index b·N + i (tick 0)."""
STREAM_BATCH = 17
"""Simulator environment: per-tick logit offset of a domain's tokens, index (l·D + d)·E + e."""
STREAM_GUMBEL = 18
"""Routing exploration noise. Simulator: index (l·T + t)·E + e. torch: keyed on (seed, stream,
tick, layer, call-in-tick) and the token position (docs/CONTRACTS.md, Version 2)."""

STREAMS: dict[str, int] = {
    "phase": STREAM_PHASE, "domain": STREAM_DOMAIN, "token": STREAM_TOKEN, "loss": STREAM_LOSS,
    "quality": STREAM_QUALITY, "home": STREAM_HOME, "kuramoto_init": STREAM_KURAMOTO_INIT,
    "batch": STREAM_BATCH, "gumbel": STREAM_GUMBEL,
}
"""Every stream id by name (distinct values; a test checks)."""


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 finaliser on uint64 arrays holding 32-bit values; returns the same dtype."""
    x = np.asarray(x, dtype=np.uint64) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(MASK32)
    x = x ^ (x >> np.uint64(16))
    return x


def hash_key(seed: int, stream: int, tick: int, index: np.ndarray) -> np.ndarray:
    """32-bit hash of (seed, stream, tick, index) as uint64 values < 2**32."""
    s = np.uint64((int(seed) ^ ((int(stream) * GOLDEN32) & MASK32)) & MASK32)
    h0 = mix32(s)
    h1 = mix32((h0 + np.uint64(int(tick) & MASK32)) & np.uint64(MASK32))
    idx = np.asarray(index, dtype=np.uint64) & np.uint64(MASK32)
    return mix32(h1 ^ idx)


def uniform(seed: int, stream: int, tick: int, index: np.ndarray) -> np.ndarray:
    """Uniform float64 in (0, 1), one per index."""
    h = hash_key(seed, stream, tick, index)
    return (h.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)


def normal(seed: int, stream: int, tick: int, index: np.ndarray) -> np.ndarray:
    """Standard normal float64, one per index (Box–Muller over draws 2i and 2i+1)."""
    idx = np.asarray(index, dtype=np.uint64)
    u1 = uniform(seed, stream, tick, idx * np.uint64(2))
    u2 = uniform(seed, stream, tick, idx * np.uint64(2) + np.uint64(1))
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


# ---------------------------------------------------------------------------------------------
# log_poly: x = 2^k·m with m in [1/√2, √2) read from the bits (exact), then
# log m = 2·atanh(f), f = (m − 1)/(m + 1), |f| ≤ 0.1716: 2f + f·z·P(z), z = f², with
# P(z) = Σ_{n=1..10} 2/(2n+1)·z^(n−1) (the first omitted term is < 7e-19 of the result), and
# log x = k·ln2_hi + (2f + (f·(z·P(z)) + k·ln2_lo)), ln2 split so that k·ln2_hi is exact.
LOG_POLY_COEFFS = tuple(2.0 / (2 * n + 1) for n in range(1, 11))
"""2/3, 2/5, ..., 2/21: the atanh series of log_poly, lowest order first (Horner from the top)."""


def split_head(x: float) -> float:
    """x with the low 27 bits of its mantissa cleared (26 significant bits are left), so k·head
    is exact for |k| < 2**27 (Cody–Waite argument reduction)."""
    bits = np.array([x]).view(np.uint64) & np.uint64(0xFFFFFFFFF8000000)
    return float(bits.view(np.float64)[0])


with localcontext() as _ctx:
    _ctx.prec = 50
    LN2_HI = split_head(math.log(2.0))
    """ln 2 cut to 26 significant bits."""
    LN2_LO = float(Decimal(2).ln() - Decimal(LN2_HI))
    """ln 2 − LN2_HI, rounded."""
SQRT2 = math.sqrt(2.0)
_MANT = np.int64(0x000FFFFFFFFFFFFF)
_EXP0 = np.int64(0x3FF0000000000000)


def log_poly(x: np.ndarray) -> np.ndarray:
    """Natural log of positive, finite, normal float64 values by a fixed operation sequence
    (module docstring); the Numba kernel evaluates the same sequence, so both give the same
    bits. Subnormals, zeros, negatives, inf and NaN are outside its domain (not checked)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    bits = x.view(np.int64)
    k = ((bits >> 52) - 1023).astype(np.float64)
    m = ((bits & _MANT) | _EXP0).view(np.float64)
    big = m > SQRT2
    m = np.where(big, m * 0.5, m)
    k = np.where(big, k + 1.0, k)
    f = (m - 1.0) / (m + 1.0)
    z = f * f
    c = LOG_POLY_COEFFS
    p = c[9]
    for j in range(8, -1, -1):
        p = c[j] + z * p
    return k * LN2_HI + ((f + f) + (f * (z * p) + k * LN2_LO))


def gumbel_from_uniform(u: np.ndarray) -> np.ndarray:
    """Standard Gumbel g = −log(−log u) for u in (0, 1), with ``log_poly``."""
    return -log_poly(-log_poly(u))


def gumbel(seed: int, stream: int, tick: int, index: np.ndarray) -> np.ndarray:
    """Standard Gumbel draws of the counter RNG, one per index."""
    return gumbel_from_uniform(uniform(seed, stream, tick, index))
