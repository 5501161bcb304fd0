"""The ``kernel`` decorator: ``numba.njit`` with an on-disk cache keyed on every kernel source.

Numba keys a function's cache on the bytecode of that function and the timestamp of its own
file only. The kernels are split over several modules and bake in constants and functions of
``rng``, ``law``, ``schedule`` and ``config``: editing one of those would leave the cached
machine code of a kernel in another file stale, silently. ``kernel`` adds a hash of all those
sources (and the jit options, so a parallel and a serial compile of the same Python function
keep separate entries) to the cache's index key. Helpers that only other kernels call use
``helper`` (compiled into their caller, not cached on their own).

Both use ``error_model="numpy"``: a float division by zero gives inf/nan instead of raising
ZeroDivisionError. The raise is a branch in every division that keeps LLVM from vectorising
the loop (3× on the Gumbel noise's log); every division in the kernels is guarded or has a
divisor > 0 by construction, as in the NumPy reference.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numba
from numba.core.caching import FunctionCache

__all__ = ["kernel", "helper", "SOURCE_KEY", "SOURCES"]

_DEFAULTS = {"error_model": "numpy"}

_PKG = Path(__file__).resolve().parent.parent
SOURCES = tuple(sorted(Path(__file__).resolve().parent.glob("*.py"))) + tuple(
    _PKG / name for name in ("rng.py", "law.py", "schedule.py", "config.py", "state.py"))
"""Files whose content the compiled kernels depend on."""
SOURCE_KEY = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()


class _KeyedCache(FunctionCache):
    """Numba's function cache with ``extra`` appended to every index key."""

    def __init__(self, py_func, extra):
        super().__init__(py_func)
        self._extra = extra

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (self._extra,)


def kernel(fn=None, **options):
    """``numba.njit(**options)`` cached on disk under (signature, bytecode, SOURCE_KEY,
    options). Use bare (``@kernel``) or with options (``@kernel(parallel=True)``), or call
    ``kernel(f, parallel=True)`` to compile an existing function."""
    opts = {**_DEFAULTS, **options}

    def build(f):
        dispatcher = numba.njit(**opts)(f)
        dispatcher._cache = _KeyedCache(f, (SOURCE_KEY, tuple(sorted(opts.items()))))
        return dispatcher
    return build if fn is None else build(fn)


def helper(fn=None, **options):
    """``numba.njit`` with the kernels' defaults, not cached (for functions other kernels
    call). Bare (``@helper``) or with options (``@helper(inline="always")``)."""
    opts = {**_DEFAULTS, **options}
    return numba.njit(**opts) if fn is None else numba.njit(**opts)(fn)
