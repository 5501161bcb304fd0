"""One zarr store for a grid of independent cells, filled one finished cell at a time.

A study (or any batch of runs) is a set of *grids*: each grid has named axes with coordinate
values (``coupling × kappa``), and optionally dims its cells' data is cut into blocks along
(``system``: 20,000 systems in blocks of 500). A *cell* is one point of a grid's axes and one
block; it returns an ``xarray.Dataset`` of any variables and dims (not the axes), and
``GridStore.write`` puts it in its region of the store. Nothing here knows what a cell computes.

Layout of a store (one directory):
  zarr.json                      root attributes: {"chronomoe_dyn": "grid-store/1", "kind": the
                                 study, "identity": what the cells depend on (a JSON dict)}
  <grid>/ (or the root for "")   one zarr group per grid, readable with ``xarray.open_zarr(path,
                                 group=...)``:
    <axis>                       the coordinate of each axis
    cell_done (axes…, blocks…)   bool, True where a cell's data has landed
    <var> (axes…, cell dims…)    each variable the cells return; one zarr chunk per cell
  Variables are created when the grid's first cell arrives (their shapes come from it).

Crash safety: the store is created in a hidden sibling and renamed into place; zarr writes each
chunk to a temporary file and renames it; a cell's ``cell_done`` entries are written after its
data. So a crash at any moment leaves every finished cell readable and every other cell marked
not done: reopening the store with the same identity computes only those. Opening refuses a
store of another kind or identity (naming the keys that differ) unless ``overwrite``.
One process writes (the one that collects results); cells never share a chunk of data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .store import atomic_dir, is_zarr_store

__all__ = ["GridSpec", "Cell", "GridStore", "StoreMismatch", "diff_keys"]

FORMAT = "grid-store/1"
DONE = "cell_done"


class StoreMismatch(ValueError):
    """The store at a path belongs to another study or another configuration."""


@dataclass(frozen=True)
class GridSpec:
    """One grid of cells (a zarr group).

    name: group path ("" = the store's root). axes: axis -> coordinate values; one cell per
    combination. blocks: dim -> (size, block): the cells' data is cut along ``dim`` (a dim of the
    cells' own data) into blocks of ``block`` (the last may be shorter)."""
    name: str
    axes: Mapping[str, Sequence] = field(default_factory=dict)
    blocks: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for d, (size, block) in self.blocks.items():
            if not (isinstance(size, int) and isinstance(block, int) and size >= 1 and block >= 1):
                raise ValueError(f"grid {self.name!r}: blocks[{d!r}]=({size!r}, {block!r}): "
                                 f"expected integers >= 1")
        clash = set(self.axes) & set(self.blocks)
        if clash:
            raise ValueError(f"grid {self.name!r}: {sorted(clash)} both an axis and a block dim")
        for a, values in self.axes.items():
            if len(values) == 0 or len(set(map(_key, values))) != len(values):
                raise ValueError(f"grid {self.name!r}: axis {a!r} needs distinct values, got "
                                 f"{list(values)!r}")

    def nblocks(self, dim: str) -> int:
        size, block = self.blocks[dim]
        return math.ceil(size / block)

    def cells(self) -> Iterator["Cell"]:
        """Every cell of the grid, in axis order then block order."""
        for at in np.ndindex(*[len(v) for v in self.axes.values()]):
            for blk in np.ndindex(*[self.nblocks(d) for d in self.blocks]):
                yield Cell(self.name, dict(zip(self.axes, map(int, at))),
                           dict(zip(self.blocks, map(int, blk))))

    def region(self, cell: "Cell") -> dict[str, slice]:
        """The cell's region of the grid's arrays."""
        reg = {a: slice(i, i + 1) for a, i in cell.at.items()}
        for d, b in cell.block.items():
            size, block = self.blocks[d]
            reg[d] = slice(b * block, min(size, (b + 1) * block))
        return reg

    def value(self, cell: "Cell", axis: str) -> Any:
        return list(self.axes[axis])[cell.at[axis]]


def _key(v: Any) -> str:
    return json.dumps(v, sort_keys=True)


@dataclass(frozen=True)
class Cell:
    """A point of a grid: index along each axis and block index along each block dim."""
    grid: str
    at: Mapping[str, int]
    block: Mapping[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [f"{a}={i}" for a, i in self.at.items()]
        parts += [f"{d}-block={b}" for d, b in self.block.items()]
        return "/".join([self.grid or "root"] + parts)


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, sort_keys=True))


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(key)
            else:
                out += diff_keys(a[k], b[k], key)
        return out
    return [] if a == b else [prefix or "(root)"]


class GridStore:
    """A zarr store of grids of cells; see the module docstring."""

    def __init__(self, path: Path, grids: Sequence[GridSpec]):
        import zarr
        self.path = Path(path)
        self.grids = {g.name: g for g in grids}
        self._root = zarr.open_group(self.path, mode="r+")
        self._done = {name: np.asarray(self._group(name)[DONE][...], dtype=bool)
                      for name in self.grids}
        self._fixed: dict[str, dict[str, np.ndarray]] = {}

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, kind: str, identity: dict, grids: Sequence[GridSpec],
             overwrite: bool = False) -> "GridStore":
        """Create the store, or reopen one made with the same ``kind`` and ``identity``.

        Raises StoreMismatch (before anything is written) when ``path`` holds another kind,
        another identity or something that is not a grid store, unless ``overwrite``."""
        p = Path(path)
        ident = _plain(identity)
        if not cls.check(p, kind, identity, overwrite):
            atomic_dir(p, lambda tmp: cls._create(tmp, kind, ident, grids), overwrite)
        return cls(p, grids)

    @classmethod
    def check(cls, path: str | Path, kind: str, identity: dict, overwrite: bool = False) -> bool:
        """True when ``path`` holds a store that ``open`` would reuse; False when ``open``
        would create one (nothing there, or ``overwrite``). Raises StoreMismatch like ``open``;
        writes nothing."""
        p = Path(path)
        if overwrite:
            if p.exists() and not is_zarr_store(p):
                raise StoreMismatch(f"{p} exists and is not a zarr store; refusing to replace it")
            return False
        if not p.exists():
            return False
        cls._check(p, kind, _plain(identity))
        return True

    @staticmethod
    def _check(p: Path, kind: str, ident: dict) -> None:
        hint = "; choose another --out, or pass --overwrite to replace it"
        if not is_zarr_store(p):
            raise StoreMismatch(f"{p} exists and is not a zarr store{hint}")
        import zarr
        attrs = dict(zarr.open_group(p, mode="r").attrs)
        if attrs.get("chronomoe_dyn") != FORMAT:
            raise StoreMismatch(f"{p} is a zarr store but not a study store{hint}")
        if attrs.get("kind") != kind:
            raise StoreMismatch(f"{p} holds study {attrs.get('kind')!r}, not {kind!r}{hint}")
        keys = diff_keys(attrs.get("identity"), ident)
        if keys:
            raise StoreMismatch(f"{p} holds {kind!r} with another config (differs in: "
                                f"{', '.join(keys)}){hint}")

    @staticmethod
    def _create(tmp: Path, kind: str, ident: dict, grids: Sequence[GridSpec]) -> None:
        import xarray as xr
        import zarr
        root = zarr.open_group(tmp, mode="w-", zarr_format=3)
        for g in grids:
            dims = list(g.axes) + list(g.blocks)
            shape = [len(v) for v in g.axes.values()] + [s for s, _ in g.blocks.values()]
            chunks = [1] * len(g.axes) + [b for _, b in g.blocks.values()]
            ds = xr.Dataset({DONE: (dims, np.zeros(shape, dtype=bool))},
                            coords={a: np.asarray(list(v)) for a, v in g.axes.items()})
            ds.to_zarr(tmp, group=g.name or None, mode="a", consolidated=False,
                       encoding={DONE: {"chunks": tuple(chunks)}})
        # after the groups: xarray's mode="a" writes replace a group's attributes
        root.attrs.update({"chronomoe_dyn": FORMAT, "kind": kind, "identity": ident})

    # ---- state ------------------------------------------------------------------------------
    def _group(self, name: str):
        return self._root[name] if name else self._root

    def cells(self) -> list[Cell]:
        return [c for g in self.grids.values() for c in g.cells()]

    def _done_index(self, cell: Cell) -> tuple:
        reg = self.grids[cell.grid].region(cell)
        g = self.grids[cell.grid]
        return tuple(reg[d] for d in list(g.axes) + list(g.blocks))

    def is_done(self, cell: Cell) -> bool:
        return bool(np.all(self._done[cell.grid][self._done_index(cell)]))

    def missing(self) -> list[Cell]:
        return [c for c in self.cells() if not self.is_done(c)]

    # ---- writing ----------------------------------------------------------------------------
    def write(self, cell: Cell, ds: Any) -> None:
        """Put one cell's dataset into its region, then mark the cell done."""
        g = self.grids[cell.grid]
        reg = g.region(cell)
        for d, s in reg.items():
            if d in g.blocks and ds.sizes.get(d) != s.stop - s.start:
                raise ValueError(f"cell {cell.name}: dim {d!r} has size {ds.sizes.get(d)}, its "
                                 f"block is {s.stop - s.start}")
        clash = set(g.axes) & ({str(n) for n in ds.dims} | {str(n) for n in ds.variables})
        if clash:
            raise ValueError(f"cell {cell.name}: its data has dims or variables named like the "
                             f"grid's axes {sorted(clash)}; rename the axes")
        index = [str(n) for n in ds.indexes]      # dimension coordinates (e.g. tick)
        fixed = {n: np.asarray(ds[n].values) for n in index if n not in reg}
        self._check_fixed(cell, fixed)
        other = [str(n) for n in ds.coords if str(n) not in index]
        cell_ds = ds.reset_coords(other).drop_vars(index).expand_dims(
            {a: 1 for a in g.axes}).set_coords(other)
        self._ensure_vars(g, cell_ds, fixed)
        # plain zarr writes into the variables' regions (xarray's region mode does the same
        # with twice the overhead; the dtypes here need no encoding)
        grp = self._group(g.name)
        for n, v in cell_ds.variables.items():
            grp[str(n)][tuple(reg.get(d, slice(None)) for d in v.dims)] = v.values
        idx = self._done_index(cell)
        self._group(g.name)[DONE][idx] = True
        self._done[g.name][idx] = True

    def _check_fixed(self, cell: Cell, fixed: dict[str, np.ndarray]) -> None:
        known = self._fixed.setdefault(cell.grid, {})
        grp = self._group(cell.grid)
        for n, v in fixed.items():
            if n not in known and n in grp:
                known[n] = np.asarray(grp[n][...])
            if n in known and not np.array_equal(known[n], v):
                raise ValueError(f"cell {cell.name}: coordinate {n!r} differs from the one in "
                                 f"the store")

    def _ensure_vars(self, g: GridSpec, cell_ds: Any, fixed: dict[str, np.ndarray]) -> None:
        """Create (metadata only) the variables of ``cell_ds`` that the grid does not have."""
        import dask.array as da
        import xarray as xr
        grp = self._group(g.name)
        new = [str(n) for n in cell_ds.variables if str(n) not in grp]
        if not new:
            return
        tmpl, enc = {}, {}
        for n in new:
            v = cell_ds[n]
            shape = [len(g.axes[d]) if d in g.axes else g.blocks[d][0] if d in g.blocks
                     else v.sizes[d] for d in v.dims]
            chunks = [1 if d in g.axes else g.blocks[d][1] if d in g.blocks else v.sizes[d]
                      for d in v.dims]
            tmpl[n] = (v.dims, da.zeros(shape, dtype=v.dtype, chunks=chunks))
            enc[n] = {"chunks": tuple(chunks)}
        coords = {n: a for n, a in fixed.items() if n not in grp}
        other = [n for n in new if n in cell_ds.coords]
        # mode="a" replaces the group's attributes: hand back the ones it has (the root's
        # hold the store's kind and identity)
        ds = xr.Dataset(tmpl, coords=coords, attrs=dict(grp.attrs)).set_coords(other)
        ds.to_zarr(self.path, group=g.name or None, mode="a", compute=False,
                   consolidated=False, encoding=enc)
        self._fixed.get(g.name, {}).update(coords)

    # ---- reading ----------------------------------------------------------------------------
    def dataset(self, grid: str = ""):
        """The grid as a lazily loaded ``xarray.Dataset`` (``.values`` reads only what it
        selects)."""
        import xarray as xr
        return xr.open_zarr(self.path, group=grid or None, consolidated=False, chunks=None)
