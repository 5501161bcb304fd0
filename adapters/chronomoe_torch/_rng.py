"""Torch port of ``chronomoe_dyn.rng``: the counter-based random numbers every backend shares.

A draw is a pure function of (seed, stream, tick, index), so the torch controller produces the
same phase noise as the NumPy reference for the same keys, on any device, with no generator
state and no host–device sync.

Hash (same as the reference): the 32-bit ``lowbias32`` finaliser chained over the key words,
``h0 = mix(seed ^ (stream·φ mod 2³²))``, ``h1 = mix(h0 + tick mod 2³²)``, ``h = mix(h1 ^ index)``.
Uniforms are ``(h + 0.5) / 2**32`` in float64 (exact, never 0 or 1); normals use Box–Muller
over draws 2i and 2i+1.

Integer arithmetic: torch has no general uint32/uint64 arithmetic on every device, so values are
int64 tensors holding numbers < 2³². The second multiplier 0x846CA68B is >= 2³¹, so a plain
int64 product could reach 2⁶⁴ and rely on signed wrap-around; ``_mul32`` instead splits the
constant into 16-bit halves, keeping every intermediate below 2⁴⁹ (no overflow on any backend,
including compiled kernels), and keeps the low 32 bits exactly.

The scalar part of the key (seed, stream, tick) may be Python ints, hashed on the host (no
device work at all), or int64 tensors on the device (hashed there, still without a sync).
"""

from __future__ import annotations

import math

import torch

from chronomoe_dyn.rng import GOLDEN32, MASK32, STREAM_GUMBEL, STREAM_PHASE

__all__ = ["MASK32", "STREAM_PHASE", "STREAM_GUMBEL", "mix32", "mix32_wrap", "mix32_int",
           "key_prefix",
           "hash_key", "uniform", "normal", "normal_from_pairs", "gumbel_prefix",
           "uniform_from_prefix"]

_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_INV_2_32 = 1.0 / 4294967296.0


# --- host (Python int) side -------------------------------------------------------------------
def mix32_int(x: int) -> int:
    """lowbias32 finaliser on a Python int (its low 32 bits)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


# --- device (int64 tensor) side ---------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for int64 ``x`` in [0, 2³²) and a constant c < 2³², without overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    # x·c = x·lo + (x·hi)·2¹⁶; only the low 16 bits of x·hi survive the shift mod 2³².
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finaliser on an int64 tensor (its low 32 bits); returns int64 values < 2³²."""
    if x.dtype != torch.int64:
        raise ValueError(f"mix32: expected an int64 tensor, got {x.dtype}")
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32        # x < 2³², _M1 < 2³¹: the product fits in int64
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    x = x ^ (x >> 16)
    return x


def mix32_wrap(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` for int64 values already < 2³², with plain int64 products: (x·0x846CA68B) can
    pass 2⁶³ and relies on two's-complement wrap-around, which ATen's CPU and CUDA integer
    kernels do (only the low 32 bits are kept). 10 ops instead of 15: for the routing noise,
    drawn for every token; tested bit for bit against the reference hash."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def key_prefix(seed: int | torch.Tensor, stream: int, tick: int | torch.Tensor
               ) -> int | torch.Tensor:
    """h1 = mix(mix(seed ^ stream·φ) + tick): the part of the hash shared by every index.

    Python ints give a Python int (computed on the host); a tensor seed or tick gives a 0-d
    int64 tensor on its device."""
    s_mix = (int(stream) * GOLDEN32) & MASK32
    if isinstance(seed, torch.Tensor):
        h0 = mix32((seed.to(torch.int64) & MASK32) ^ s_mix)
    else:
        h0 = mix32_int((int(seed) ^ s_mix) & MASK32)
    if isinstance(tick, torch.Tensor):
        t = tick.to(torch.int64) & MASK32
        if not isinstance(h0, torch.Tensor):
            h0 = torch.tensor(h0, dtype=torch.int64, device=tick.device)
        return mix32((h0 + t) & MASK32)
    if isinstance(h0, torch.Tensor):
        return mix32((h0 + (int(tick) & MASK32)) & MASK32)
    return mix32_int((h0 + (int(tick) & MASK32)) & MASK32)


def hash_key(seed: int | torch.Tensor, stream: int, tick: int | torch.Tensor,
             index: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (seed, stream, tick, index) as int64 values < 2³², shaped like ``index``."""
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise ValueError("hash_key: index must be an int64 tensor")
    h1 = key_prefix(seed, stream, tick)
    return mix32((index & MASK32) ^ h1)


def uniform(seed: int | torch.Tensor, stream: int, tick: int | torch.Tensor,
            index: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform draws in (0, 1), one per index. float64 reproduces the reference bit for bit."""
    h = hash_key(seed, stream, tick, index)
    return (h.to(dtype) + 0.5) * _INV_2_32


def normal(seed: int | torch.Tensor, stream: int, tick: int | torch.Tensor,
           index: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal draws, one per index (Box–Muller over draws 2i and 2i+1).

    Agrees with ``chronomoe_dyn.rng.normal`` to a few ulp in float64 (log/cos come from
    different math libraries); the underlying uniforms are bit-identical."""
    idx2 = index * 2
    u1 = uniform(seed, stream, tick, idx2, dtype)
    u2 = uniform(seed, stream, tick, idx2 + 1, dtype)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def normal_from_pairs(h1: int | torch.Tensor, index_pairs: torch.Tensor,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normals from a precomputed key prefix ``h1`` and an index tensor [2, N] holding 2i and
    2i+1 (the controller keeps that tensor, saving two ops per tick)."""
    u = (mix32(index_pairs ^ h1).to(dtype) + 0.5) * _INV_2_32          # [2, N]
    return torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos((2.0 * math.pi) * u[1])


# --- Gumbel routing noise (routing.py) ----------------------------------------------------------
def gumbel_prefix(seed: int, tick: int, layer: int) -> int:
    """Host-side key of a layer's routing noise within a tick: the reference chain (seed,
    STREAM_GUMBEL, tick) extended by one more word, ``mix(h1 ^ layer)``. A Python int < 2³²."""
    h1 = key_prefix(int(seed), STREAM_GUMBEL, int(tick))
    return mix32_int(h1 ^ (int(layer) & MASK32))


def uniform_from_prefix(prefix: int, index: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in (0, 1) of ``mix(index ^ prefix)``, one per int64 index."""
    return (mix32(index ^ prefix).to(torch.float64) + 0.5) * _INV_2_32
