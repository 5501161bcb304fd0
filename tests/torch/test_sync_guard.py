"""The host-sync guard (``_sync.SyncGuard``) catches every entry of its lists, on a CPU-only
machine too: one case per entry of ``SYNC_METHODS`` and ``SYNC_OPS`` (the test id is the entry;
each case's comment names the call), and a set of calls that must not count.

The old guard counted aten ops only, so every Python-level read (``tolist``, ``numpy``,
``cpu``, ...) passed unseen on CPU; ``test_every_listed_entry_has_a_case`` ties the lists to the
cases, so an entry cannot be added without a test that the guard catches it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _sync import SYNC_METHODS, SYNC_OPS, SyncGuard

t = torch.tensor([1.0, 2.0, 2.0])
m = torch.tensor([True, False, True])
i = torch.tensor([1, 2])
meta = torch.empty(3, device="meta")    # a non-CPU tensor on a CPU-only machine


def _call(fn):
    try:
        fn()
    except (RuntimeError, NotImplementedError, AssertionError, AttributeError):
        pass    # copies out of "meta" and torch.cuda.synchronize without CUDA fail after the call


CASES = {
    # Python-level calls (TorchFunctionMode)
    "item": lambda: t[0].item(),                                   # Tensor.item
    "tolist": lambda: t.tolist(),                                  # Tensor.tolist
    "numpy": lambda: t.numpy(),                                    # Tensor.numpy
    "cpu": lambda: t.cpu(),                                        # Tensor.cpu (a CPU tensor too)
    "to": lambda: meta.to("cpu"),                                  # Tensor.to(cpu) off a device
    "__bool__": lambda: bool(t[0]),                                # bool(t), `if t:`
    "__float__": lambda: float(t[0]),                              # float(t)
    "__int__": lambda: int(t[0]),                                  # int(t)
    "__complex__": lambda: complex(t[0]),                          # complex(t)
    "__index__": lambda: [0, 1, 2][i[0]],                          # a tensor as a Python index
    "__array__": lambda: np.asarray(t),                            # np.asarray(t)
    "__contains__": lambda: 2.0 in t,                              # `x in t`
    "__repr__": lambda: str(t),                                    # repr(t), str(t), print(t)
    "__format__": lambda: f"{t[0]:.2f}",                           # f"{t:.2f}"
    "cuda.synchronize": lambda: torch.cuda.synchronize(),          # an explicit device sync
    # aten operators (TorchDispatchMode)
    "_local_scalar_dense": lambda: torch.ops.aten._local_scalar_dense(t[0]),  # scalar reads
    "nonzero": lambda: torch.nonzero(m),                           # also torch.where(cond), argwhere
    "masked_select": lambda: torch.masked_select(t, m),            # torch.masked_select
    "_unique": lambda: torch._unique(t),                           # torch._unique
    "_unique2": lambda: torch.unique(t),                           # torch.unique
    "unique_dim": lambda: torch.unique(t, dim=0),                  # torch.unique(dim=)
    "unique_consecutive": lambda: torch.unique_consecutive(t, dim=0),  # unique_consecutive
    "bincount": lambda: torch.bincount(i),                         # output size = max + 1
    "repeat_interleave": lambda: torch.repeat_interleave(t, i.new_tensor([1, 0, 2])),
    "index": lambda: t[m],                                         # boolean-mask indexing
    "index_put_": lambda: t.clone().__setitem__(m, 0.0),           # t[mask] = v
    "index_put": lambda: torch.index_put(t, (m,), torch.tensor(0.0)),
    "_index_put_impl_": lambda: torch.ops.aten._index_put_impl_(t.clone(), (m,),
                                                                torch.tensor(0.0)),
    "equal": lambda: torch.equal(t, t),                            # torch.equal
    "allclose": lambda: torch.allclose(t, t),                      # torch.allclose
    "copy_": lambda: torch.empty(3).copy_(meta),                   # device-to-host copy_
    "_to_copy": lambda: torch.ops.aten._to_copy(meta, device="cpu"),  # its aten form
}


def test_every_listed_entry_has_a_case():
    assert set(CASES) == SYNC_METHODS | SYNC_OPS


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_guard_catches(name):
    """The guard records exactly this call, once, by the name in its list (the outermost level
    that sees it: ``t.item()`` is "item", not also "_local_scalar_dense")."""
    with SyncGuard() as g:
        _call(CASES[name])
    assert g.syncs == [name], g.report()
    assert g.where[0].startswith("test_sync_guard.py:")      # where the sync is in the code


@pytest.mark.parametrize("call, name", [
    (lambda: torch.where(m), "nonzero"), (lambda: torch.argwhere(m), "nonzero"),
    (lambda: torch.is_nonzero(t[:1]), "_local_scalar_dense"),
    (lambda: 1 if (t > 1).any() else 0, "__bool__"),
    (lambda: torch.split(t, i.new_tensor([1, 2]).tolist()), "tolist"),
], ids=["where(cond)", "argwhere", "is_nonzero", "if t.any()", "split by tensor sizes"])
def test_calls_that_reach_a_listed_entry(call, name):
    with SyncGuard() as g:
        call()
    assert g.syncs == [name], g.report()


NOT_SYNCS = {
    "arithmetic and reductions on device": lambda: (t * 2 + 1).sum().sqrt(),
    "to(cpu) of a CPU tensor, to(dtype)": lambda: (t.to("cpu"), t.to(torch.float64)),
    "integer indexing and index_select": lambda: (t[i], t.index_select(0, i), t[1:]),
    "where with three arguments": lambda: torch.where(m, t, -t),
    "repeat_interleave with output_size": lambda: torch.repeat_interleave(
        t, i.new_tensor([1, 0, 2]), output_size=3),
    "repeat_interleave by an int": lambda: torch.repeat_interleave(t, 2),
    "masked_fill and scatter_add": lambda: (t.masked_fill(m, 0.0),
                                           torch.zeros(3).scatter_add_(0, i, t[:2])),
    "shapes and dtypes": lambda: (t.shape, t.numel(), t.dtype, len(t)),
    "topk, sort, searchsorted": lambda: (t.topk(2), t.sort(), torch.searchsorted(t, t)),
}


@pytest.mark.parametrize("what", sorted(NOT_SYNCS))
def test_the_guard_does_not_count(what):
    with SyncGuard() as g:
        NOT_SYNCS[what]()
    assert g.syncs == [], g.report()


def test_pause_and_restore():
    g = SyncGuard()
    real = torch.cuda.synchronize                # the guard patches it while active
    with g:
        g.paused = True
        t.tolist()
        g.paused = False
        t.tolist()
    assert g.syncs == ["tolist"]
    assert torch.cuda.synchronize is real        # restored on exit
    t.tolist()
    assert g.syncs == ["tolist"]                 # nothing recorded outside the block
