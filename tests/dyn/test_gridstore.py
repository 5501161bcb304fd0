"""GridStore: one zarr store filled cell by cell (region writes, done markers, identity)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from chronomoe_dyn.gridstore import Cell, GridSpec, GridStore, StoreMismatch, diff_keys


def _cell_data(seed0: int, n: int, T: int = 4) -> xr.Dataset:
    """A stand-in for one cell's result: per-system rows that depend on the seed only."""
    seeds = np.arange(seed0, seed0 + n)
    R = np.sin(seeds[:, None] * 1.0 + np.arange(T)[None, :])
    return xr.Dataset({"R": (("system", "tick"), R),
                       "flag": (("system", "tick"), R > 0),
                       "count": (("system",), seeds * 3)},
                      coords={"tick": np.arange(1, T + 1) * 10, "seed": ("system", seeds)})


GRID = GridSpec("", {"coupling": [0.0, 0.5], "kappa_const": [-0.3, 0.3, 0.6]},
                {"system": (5, 2)})


def _fill(store: GridStore, cells=None) -> None:
    for c in cells or store.cells():
        r = store.grids[c.grid].region(c)["system"]
        store.write(c, _cell_data(r.start, r.stop - r.start))


def test_cells_and_regions():
    cells = list(GRID.cells())
    assert len(cells) == 2 * 3 * 3                      # 5 systems in blocks of 2: 2, 2, 1
    last = cells[-1]
    assert GRID.region(last) == {"coupling": slice(1, 2), "kappa_const": slice(2, 3),
                                 "system": slice(4, 5)}
    assert GRID.value(last, "kappa_const") == 0.6
    # the blocks tile the systems exactly once
    assert [GRID.region(c)["system"] for c in cells[:3]] == [slice(0, 2), slice(2, 4),
                                                             slice(4, 5)]
    assert len({c.name for c in cells}) == len(cells)
    with pytest.raises(ValueError, match="distinct"):
        GridSpec("", {"k": [1, 1]})


def test_store_equals_the_unsplit_data_and_keeps_dtypes(tmp_path):
    store = GridStore.open(tmp_path / "s.zarr", "demo", {"a": 1}, [GRID])
    _fill(store)
    ds = GridStore(tmp_path / "s.zarr", [GRID]).dataset("")
    full = _cell_data(0, 5)
    for i in range(2):
        for j in range(3):
            cell = ds.isel(coupling=i, kappa_const=j)
            for v in ("R", "flag", "count", "seed"):
                assert cell[v].dtype == full[v].dtype, v
                np.testing.assert_array_equal(cell[v].values, full[v].values)
    assert ds["tick"].values.tolist() == [10, 20, 30, 40]
    assert ds["kappa_const"].values.tolist() == [-0.3, 0.3, 0.6]
    assert ds["cell_done"].values.all()


def test_reopen_computes_only_missing_cells(tmp_path):
    p = tmp_path / "s.zarr"
    store = GridStore.open(p, "demo", {"a": 1}, [GRID])
    cells = store.cells()
    _fill(store, cells[:7])
    again = GridStore.open(p, "demo", {"a": 1}, [GRID])
    assert [c.name for c in again.missing()] == [c.name for c in cells[7:]]
    _fill(again, again.missing())
    assert GridStore.open(p, "demo", {"a": 1}, [GRID]).missing() == []


def test_interrupted_cell_is_redone(tmp_path):
    """A crash after a cell's data landed but before its done marker: the cell counts as
    missing and is written again. Mutation caught: ``is_done`` reading the data instead of
    ``cell_done`` (or marking before writing)."""
    p = tmp_path / "s.zarr"
    store = GridStore.open(p, "demo", {"a": 1}, [GRID])
    c = store.cells()[3]
    _fill(store, [c])
    import zarr
    zarr.open_array(p / "cell_done", mode="r+")[store._done_index(c)] = False   # the crash
    again = GridStore.open(p, "demo", {"a": 1}, [GRID])
    assert c in again.missing() and len(again.missing()) == len(again.cells())
    _fill(again, [c])
    assert c not in GridStore(p, [GRID]).missing()


def test_refuses_another_kind_or_identity_and_writes_nothing(tmp_path):
    p = tmp_path / "s.zarr"
    _fill(GridStore.open(p, "demo", {"a": 1, "b": {"c": 2}}, [GRID]))
    before = {f: f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()}
    with pytest.raises(StoreMismatch, match="holds study 'demo', not 'other'"):
        GridStore.open(p, "other", {"a": 1, "b": {"c": 2}}, [GRID])
    with pytest.raises(StoreMismatch, match=r"differs in: b\.c"):
        GridStore.open(p, "demo", {"a": 1, "b": {"c": 3}}, [GRID])
    after = {f: f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()}
    assert after == before
    # overwrite replaces it
    fresh = GridStore.open(p, "demo", {"a": 2}, [GRID], overwrite=True)
    assert len(fresh.missing()) == len(fresh.cells())
    # a plain folder is never a store, and never replaced
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.txt").write_text("keep")
    for ow in (False, True):
        with pytest.raises(StoreMismatch, match="not a zarr store"):
            GridStore.open(plain, "demo", {}, [GRID], overwrite=ow)
    assert (plain / "x.txt").read_text() == "keep"


def test_identity_survives_variable_creation(tmp_path):
    """xarray's mode="a" replaces a group's attributes; the root's identity must survive the
    creation of the variables. Mutation caught: not handing the attributes back in
    ``_ensure_vars``."""
    p = tmp_path / "s.zarr"
    _fill(GridStore.open(p, "demo", {"a": 1}, [GRID]))
    GridStore.open(p, "demo", {"a": 1}, [GRID])           # would raise if the attrs were lost


def test_named_groups_and_errors(tmp_path):
    grids = [GridSpec("main", {}, {"system": (3, 3)}), GridSpec("ctl", {"k": [1.0, 2.0]})]
    store = GridStore.open(tmp_path / "s.zarr", "demo", {}, grids)
    assert [c.name for c in store.cells()] == ["main/system-block=0", "ctl/k=0", "ctl/k=1"]
    store.write(store.cells()[0], _cell_data(0, 3))
    store.write(store.cells()[1], _cell_data(0, 2))
    assert xr.open_zarr(tmp_path / "s.zarr", group="ctl", consolidated=False)["R"].dims == \
        ("k", "system", "tick")
    with pytest.raises(ValueError, match="block is 3"):
        store.write(Cell("main", {}, {"system": 0}), _cell_data(0, 2))
    with pytest.raises(ValueError, match="coordinate 'tick' differs"):
        store.write(store.cells()[2], _cell_data(0, 2).assign_coords(tick=[1, 2, 3, 4]))
    clash = GridStore.open(tmp_path / "c.zarr", "demo", {}, [GridSpec("", {"R": [1, 2]})])
    with pytest.raises(ValueError, match="named like the grid's axes"):
        clash.write(clash.cells()[0], _cell_data(0, 2))


def test_diff_keys():
    assert diff_keys({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 3]}, "d": 0}) == \
        ["b.c", "d"]
    assert diff_keys({"a": 1}, {"a": 1}) == []


def test_failed_data_write_is_not_marked_done(tmp_path, monkeypatch):
    """Mutation caught: writing ``cell_done`` before the cell's data (a crash in between
    would leave a cell marked done without its data)."""
    p = tmp_path / "s.zarr"
    store = GridStore.open(p, "demo", {"a": 1}, [GRID])
    _fill(store, store.cells()[:1])                  # variables exist from here on
    import zarr
    real = zarr.Array.__setitem__

    def crash(self, key, value):
        if self.path.endswith("flag"):
            raise OSError("killed mid-write")
        return real(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", crash)
    c = store.cells()[1]
    with pytest.raises(OSError, match="killed"):
        _fill(store, [c])
    monkeypatch.undo()
    assert c in GridStore.open(p, "demo", {"a": 1}, [GRID]).missing()
