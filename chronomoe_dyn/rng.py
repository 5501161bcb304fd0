"""Counter-based random numbers shared by every backend.

A draw is a pure function of (seed, stream, tick, index): no generator state to carry, so the
NumPy reference, the Numba kernels and the torch controller produce the same bits for the same
keys, in any order and on any number of threads.

Hash: the 32-bit ``lowbias32`` integer finaliser (xorshift-multiply, constants 0x7feb352d and
0x846ca68b), chained over the key words with wrap-around addition. Uniforms are
``(h + 0.5) / 2**32`` (exact in float64, never 0 or 1); normals use Box–Muller over two draws.
All arithmetic is done in 64-bit integers masked to 32 bits, which every backend supports.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MASK32", "mix32", "hash_key", "uniform", "normal", "STREAM_PHASE"]

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9
STREAM_PHASE = 0
"""Stream id of the controller's phase noise. Environments use other ids."""


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
