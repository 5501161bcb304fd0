"""Kernel building blocks: the counter RNG of ``rng.py`` and the elementary functions the
simulator needs, written so that loops over them vectorise and, where a discrete choice depends
on them, give the NumPy reference's bits.

* RNG: lowbias32 on uint64 masked to 32 bits (the same bits as ``rng.hash_key``/``uniform``/
  ``normal``).
* ``_sincos``: sin and cos together, branch-free (x = k·π/2 + r, |r| ≤ π/4, Cody–Waite; Taylor
  polynomials to r^17/r^18; a few ulp of np.sin/np.cos).
* ``_exp_nonpos_into``: e^x for x ≤ 0 (x = k·ln2 + r, Taylor to r^13, 2^k from its bits; a few
  ulp of np.exp on [−708, 0]).
* ``_log_into``: ``rng.log_poly`` operation for operation (bit-equal to it, a few ulp of
  np.log), and ``_gumbel_into`` = −log(−log u) for the routing rule's exploration noise.
llvmlite ships no SVML, so the platform's sin/cos/exp/log would not vectorise.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import numpy as np

from ..rng import (GOLDEN32, LN2_HI, LN2_LO, LOG_POLY_COEFFS, MASK32, SQRT2, split_head)
from .jit import helper, kernel

# Counter RNG: every operand stays uint64 (numba turns uint64 ∘ int64 into float64).
_M32 = np.uint64(MASK32)
_GOLD = np.uint64(GOLDEN32)
_C1 = np.uint64(0x7FEB352D)
_C2 = np.uint64(0x846CA68B)
_SH15 = np.uint64(15)
_SH16 = np.uint64(16)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_INV32 = 1.0 / 4294967296.0
TWO_PI = 2.0 * math.pi


@helper(inline="always")
def _mix32(x):
    x = x & _M32
    x = x ^ (x >> _SH16)
    x = (x * _C1) & _M32
    x = x ^ (x >> _SH15)
    x = (x * _C2) & _M32
    return x ^ (x >> _SH16)


@helper(inline="always")
def _hash_base(seed, stream, tick):
    """The per-(seed, stream, tick) part of ``rng.hash_key`` (h1); hash = mix32(h1 ^ index)."""
    s = (np.uint64(seed) ^ ((np.uint64(stream) * _GOLD) & _M32)) & _M32
    h0 = _mix32(s)
    return _mix32((h0 + (np.uint64(tick) & _M32)) & _M32)


@helper(inline="always")
def _uniform_at(h1, index):
    """``rng.uniform`` for the index under the base h1: (h + 0.5)/2**32, in (0, 1)."""
    h = _mix32(h1 ^ (np.uint64(index) & _M32))
    # via int64 (exact: h < 2**32): signed conversion vectorises, unsigned does not
    return (np.float64(np.int64(h)) + 0.5) * _INV32


@helper(inline="always")
def _normal_at(h1, index):
    """``rng.normal``: Box–Muller over the uniforms of indices 2i and 2i+1."""
    i2 = np.uint64(index) * _U2
    u1 = _uniform_at(h1, i2)
    u2 = _uniform_at(h1, i2 + _U1)
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


# --------------------------------------------------------------------------------------------
# sin and cos together (see the module docstring). π/2 split in a 26-bit head (k·head exact for
# |k| < 2**27) and a tail; truncation of both series below 1e-19 on |r| <= π/4.
_PI_50 = Decimal("3.14159265358979323846264338327950288419716939937510")
with localcontext() as _ctx:
    _ctx.prec = 50
    _PIO2_HI = split_head(math.pi / 2)
    _PIO2_LO = float(_PI_50 / 2 - Decimal(_PIO2_HI))
_TWO_OVER_PI = 2.0 / math.pi
_SIN3, _SIN5, _SIN7, _SIN9 = -1.0 / 6.0, 1.0 / 120.0, -1.0 / 5040.0, 1.0 / 362880.0
_SIN11, _SIN13 = -1.0 / 39916800.0, 1.0 / 6227020800.0
_SIN15, _SIN17 = -1.0 / 1307674368000.0, 1.0 / 355687428096000.0
_COS2, _COS4, _COS6, _COS8 = -0.5, 1.0 / 24.0, -1.0 / 720.0, 1.0 / 40320.0
_COS10, _COS12, _COS14 = -1.0 / 3628800.0, 1.0 / 479001600.0, -1.0 / 87178291200.0
_COS16, _COS18 = 1.0 / 20922789888000.0, -1.0 / 6402373705728000.0


@helper(inline="always")
def _sincos(x):
    k = math.floor(x * _TWO_OVER_PI + 0.5)
    r = (x - k * _PIO2_HI) - k * _PIO2_LO
    z = r * r
    s = r + r * z * (_SIN3 + z * (_SIN5 + z * (_SIN7 + z * (_SIN9 + z * (
        _SIN11 + z * (_SIN13 + z * (_SIN15 + z * _SIN17)))))))
    c = 1.0 + z * (_COS2 + z * (_COS4 + z * (_COS6 + z * (_COS8 + z * (
        _COS10 + z * (_COS12 + z * (_COS14 + z * (_COS16 + z * _COS18))))))))
    q = np.int64(k) & 3
    odd = (q & 1) == 1
    sin_sign = 1.0 - 2.0 * ((q >> 1) & 1)
    cos_sign = 1.0 - 2.0 * (((q + 1) >> 1) & 1)
    sn = c if odd else s
    cs = s if odd else c
    return sin_sign * sn, cos_sign * cs


_INV_LN2 = 1.0 / math.log(2.0)
_EXP_MIN = -708.0
"""Below this exp() would leave the normal range; such gate weights are < 1e-307 (≈ 0)."""


@helper(inline="always")
def _exp_nonpos_into(x_N, out_N, bits_N):
    """out = exp(x) for x <= 0, vectorisable (module docstring); x < −708 gives exp(−708).
    ``out_N`` may be ``x_N``."""
    n = x_N.shape[0]
    for i in range(n):
        x = max(x_N[i], _EXP_MIN)
        k = math.floor(x * _INV_LN2 + 0.5)
        r = (x - k * LN2_HI) - k * LN2_LO
        p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120 + r * (
            1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880 + r * (
                1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600
                                                             + r / 6227020800.0))))))))))))
        out_N[i] = p
        bits_N[i] = (np.int64(k) + 1023) << 52     # IEEE bits of 2^k (normal: k >= -1021)
    pow2_N = bits_N.view(np.float64)
    for i in range(n):
        out_N[i] = out_N[i] * pow2_N[i]


# --------------------------------------------------------------------------------------------
# log: rng.log_poly, operation for operation (so the bits are the same).
_MANT = np.int64(0x000FFFFFFFFFFFFF)
_EXP0 = np.int64(0x3FF0000000000000)
_L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8, _L9, _L10 = LOG_POLY_COEFFS


@helper(inline="always")
def _log_into(x_N, out_N, bits_N):
    """out = rng.log_poly(x) for positive normal x (``out_N`` may be ``x_N``); ``bits_N`` is
    int64 scratch. Two vectorisable passes: exponent and mantissa from the bits, then the
    series."""
    n = x_N.shape[0]
    xb_N = x_N.view(np.int64)
    for i in range(n):
        b = xb_N[i]
        bits_N[i] = (b & _MANT) | _EXP0
        out_N[i] = np.float64((b >> 52) - 1023)            # k, exact
    m_N = bits_N.view(np.float64)
    for i in range(n):
        m = m_N[i]
        big = m > SQRT2
        m = m * 0.5 if big else m
        k = out_N[i] + 1.0 if big else out_N[i]
        f = (m - 1.0) / (m + 1.0)
        z = f * f
        p = _L1 + z * (_L2 + z * (_L3 + z * (_L4 + z * (_L5 + z * (_L6 + z * (
            _L7 + z * (_L8 + z * (_L9 + z * _L10))))))))
        out_N[i] = k * LN2_HI + ((f + f) + (f * (z * p) + k * LN2_LO))


@helper(inline="always")
def _gumbel_into(u_N, out_N, bits_N):
    """out = −log(−log u) (``rng.gumbel_from_uniform``); ``out_N`` may be ``u_N``."""
    _log_into(u_N, out_N, bits_N)
    for i in range(out_N.shape[0]):
        out_N[i] = -out_N[i]
    _log_into(out_N, out_N, bits_N)
    for i in range(out_N.shape[0]):
        out_N[i] = -out_N[i]


# --------------------------------------------------------------------------------------------
# The torch adapter's routing-noise uniforms, for its CPU tensors (``chronomoe_torch.routing``):
# the same integers its tensor ops compute, in one pass instead of ~15 ops over int64 tensors.
_SH9 = np.uint64(9)
_HALF32 = np.float32(0.5)
_INV23 = np.float32(2.0 ** -23)


@kernel
def uniform23_into(prefix_L, offset, world, rank, E, out_LM):
    """out[l, n·E + e] = ((h >> 9) + 0.5)·2⁻²³ in float32 (exact: the top 23 bits of h) with
    h = mix32(prefix[l] ^ index), index = (((offset + n)·world + rank)·E + e) mod 2³² (``_mix32``
    keeps the low 32 bits), for n < M / E. ``prefix_L`` uint64 [L]; ``out_LM`` float32 [L, M]."""
    off, w, r, e_ = np.uint64(offset), np.uint64(world), np.uint64(rank), np.uint64(E)
    M = out_LM.shape[1]
    for li in range(prefix_L.shape[0]):
        p = np.uint64(prefix_L[li])
        for n in range(M // E):
            base = ((off + np.uint64(n)) * w + r) * e_
            for e in range(E):
                h = _mix32(p ^ (base + np.uint64(e)))
                # via int64 (exact): signed conversion vectorises, unsigned does not
                out_LM[li, n * E + e] = (np.float32(np.int64(h >> _SH9)) + _HALF32) * _INV23


# --------------------------------------------------------------------------------------------
# Entry points for the tests.

@kernel
def hash_into(seed, stream, tick, index_N, out_N):
    """out[i] = rng.hash_key(seed, stream, tick, index[i])."""
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _mix32(h1 ^ (np.uint64(index_N[i]) & _M32))


@kernel
def uniform_into(seed, stream, tick, index_N, out_N):
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _uniform_at(h1, index_N[i])


@kernel
def normal_into(seed, stream, tick, index_N, out_N):
    h1 = _hash_base(seed, stream, tick)
    for i in range(index_N.shape[0]):
        out_N[i] = _normal_at(h1, index_N[i])


@kernel
def exp_nonpos_into(x_N, out_N, bits_N):
    _exp_nonpos_into(x_N, out_N, bits_N)


@kernel
def log_into(x_N, out_N, bits_N):
    _log_into(x_N, out_N, bits_N)


@kernel
def gumbel_into(u_N, out_N, bits_N):
    _gumbel_into(u_N, out_N, bits_N)


@kernel
def sincos_into(x_N, sin_N, cos_N):
    for i in range(x_N.shape[0]):
        sin_N[i], cos_N[i] = _sincos(x_N[i])
