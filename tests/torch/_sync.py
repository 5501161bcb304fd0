"""The host-sync guard of the no-sync tests: ``SyncGuard`` records every call that makes the host
wait for (or read) tensor data, on any machine.

A host sync is a CUDA-side wait; on a CPU-only machine there is none to observe (CUDA's sync
debug mode sees nothing, and ``.tolist()`` of a CPU tensor dispatches no operator at all), so the
guard intercepts the *calls* that would sync on an accelerator, at two levels:

  * ``SYNC_METHODS`` — Python-level calls, seen by a ``TorchFunctionMode``: the tensor methods
    and protocols that hand data to Python (``item``, ``tolist``, ``numpy``, ``cpu``,
    ``bool()``/``float()``/``int()``/``complex()``/``operator.index`` of a tensor,
    ``np.asarray(t)``, ``x in t``, ``repr``/``str``/``format`` of a tensor: ``str`` is ``repr``), ``to`` when it
    copies a non-CPU tensor to the CPU, and ``torch.cuda.synchronize``;
  * ``SYNC_OPS`` — aten operators, seen by a ``TorchDispatchMode`` (so also when C++ or another
    library calls them): ``_local_scalar_dense`` (what every scalar read ends in), the
    operators whose output shape depends on the data (``nonzero`` and what builds on it:
    ``torch.where(cond)``, ``argwhere``; ``masked_select``; the ``unique`` family (also
    ``unique_consecutive(dim=)``); ``bincount``;
    ``repeat_interleave`` without ``output_size``), boolean-mask indexing (``index`` /
    ``index_put`` with a bool or uint8 index), operators that return a Python bool (``equal``,
    ``allclose``; ``torch.is_nonzero`` ends in ``_local_scalar_dense``), and a device-to-host
    ``copy_`` / ``_to_copy``.

Each sync is recorded once, by the outermost level that sees it (``t.item()`` is one "item", not
also a "_local_scalar_dense"), with the source line that made it. ``paused`` stops recording
(e.g. inside a wrapped optimizer whose own syncs are not under test). ``test_sync_guard.py``
holds one test per entry of both lists.
"""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_METHODS = frozenset({
    "item", "tolist", "numpy", "cpu", "to", "__bool__", "__float__", "__int__", "__complex__",
    "__index__", "__array__", "__contains__", "__repr__", "__format__",
    "cuda.synchronize",
})
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "bincount", "repeat_interleave",
    "index", "index_put", "index_put_", "_index_put_impl_", "equal", "allclose",
    "copy_", "_to_copy",
})
_MASK_DTYPES = (torch.bool, torch.uint8)


def _device_of(args, kwargs) -> torch.device | None:
    """The target device of a ``Tensor.to(...)`` call, when it names one."""
    for a in (*args[1:], kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, torch.device)):
            try:
                return torch.device(a)
            except RuntimeError:
                continue
    return None


def _to_host(src, dst_device) -> bool:
    return isinstance(src, torch.Tensor) and src.device.type != "cpu" \
        and dst_device is not None and dst_device.type == "cpu"


def _method_syncs(name: str, args, kwargs) -> bool:
    if name == "to":
        return _to_host(args[0] if args else None, _device_of(args, kwargs))
    return name in SYNC_METHODS


def _op_syncs(name: str, args, kwargs) -> bool:
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in _MASK_DTYPES for i in indices)
    if name == "repeat_interleave":       # repeats as a tensor: the output size is its sum
        repeats = args[1] if len(args) > 1 else args[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "copy_":
        return _to_host(args[1] if len(args) > 1 else None,
                        args[0].device if args and isinstance(args[0], torch.Tensor) else None)
    if name == "_to_copy":
        dev = kwargs.get("device")
        return _to_host(args[0] if args else None, None if dev is None else torch.device(dev))
    return name in SYNC_OPS


_TORCH_DIR = os.path.dirname(torch.__file__)


def _where() -> tuple[str, int]:
    """(file, line) of the innermost frame outside torch and this module."""
    for fr in reversed(traceback.extract_stack()[:-3]):
        if not fr.filename.startswith(_TORCH_DIR) and fr.filename != __file__:
            return fr.filename, fr.lineno or 0
    return "?", 0


class _FunctionSide(TorchFunctionMode):
    def __init__(self, guard: "SyncGuard") -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _method_syncs(name, args, kwargs):
            return self.guard._call(name, func, args, kwargs)
        return func(*args, **kwargs)


class _DispatchSide(TorchDispatchMode):
    def __init__(self, guard: "SyncGuard") -> None:
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.guard._depth == 0 and _op_syncs(name, args, kwargs):
            return self.guard._call(name, func, args, kwargs)
        return func(*args, **kwargs)


class SyncGuard:
    """``with SyncGuard() as g: ...`` then ``g.syncs`` (names), ``g.where`` ("file.py:line"),
    ``g.files`` (the full paths of those files)."""

    def __init__(self) -> None:
        self.paused = False
        self.syncs: list[str] = []
        self.where: list[str] = []
        self.files: list[str] = []
        self._depth = 0
        self._modes = (_FunctionSide(self), _DispatchSide(self))
        self._real_cuda_sync = None

    @property
    def count(self) -> int:
        return len(self.syncs)

    def _record(self, name: str) -> None:
        if not self.paused and self._depth == 0:
            file, line = _where()
            self.syncs.append(name)
            self.where.append(f"{os.path.basename(file)}:{line}")
            self.files.append(file)

    def _call(self, name, func, args, kwargs):
        self._record(name)
        self._depth += 1          # what this call does inside is the same sync
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= 1

    def __enter__(self) -> "SyncGuard":
        for m in self._modes:
            m.__enter__()
        self._real_cuda_sync = torch.cuda.synchronize

        def synchronize(*a, **k):
            self._record("cuda.synchronize")
            return self._real_cuda_sync(*a, **k)

        torch.cuda.synchronize = synchronize
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize = self._real_cuda_sync
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def report(self) -> str:
        return ", ".join(f"{n} at {w}" for n, w in zip(self.syncs, self.where)) or "none"


SyncCounter = SyncGuard  # the name the older tests use
