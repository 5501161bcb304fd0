"""Shared by the no-sync tests: a TorchDispatchMode that records host-sync ops.

``aten._local_scalar_dense`` is what ``.item()``, ``bool(t)`` and ``float(t)`` call; the other
ops in SYNC_OPS read data back to the host too (data-dependent shapes or comparisons)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
            "_unique2", "unique_dim", "unique_consecutive", "allclose"}


class SyncCounter(TorchDispatchMode):
    """Records the name of every host-sync op dispatched while not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.syncs: list[str] = []

    @property
    def count(self) -> int:
        return len(self.syncs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name in SYNC_OPS:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))
