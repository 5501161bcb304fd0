"""Simulator trajectories as labelled data: ``Trajectory`` ↔ ``xarray.Dataset`` ↔ zarr.

Dims come from the shape suffix of each array field of ``Trajectory`` (the mapping ``DIMS``:
B system, T tick, L layer, E expert), so the layout follows the dataclass without naming its
fields: ``R_BT`` is the variable ``R`` with dims (system, tick), ``Tbar_local_BTLE`` is
``Tbar_local`` (system, tick, layer, expert). ``tick_T`` is the ``tick`` coordinate and
``seeds_B`` the ``seed`` coordinate along ``system`` (``COORDS``). The controller state of each
system after the last tick is stored as ``final_<name>`` (``final_theta`` (system, layer,
expert), ``final_R`` (system), ...), and the run's configs (controller, env, schedule, events)
as JSON text attributes (with ``controller_fields``), so a store holds everything ``Trajectory.from_zarr`` needs: the round
trip is exact (same dtypes, same bits).

A zarr store is written to a hidden sibling directory and renamed into place, so a crash leaves
either no store or a complete one; an existing store is replaced only with ``overwrite=True``.
xarray and zarr are imported inside the functions (``import chronomoe_dyn`` stays light).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DIMS", "COORDS", "FORMAT", "split_suffix", "to_dataset", "from_dataset",
           "trajectory_arrays", "write_zarr", "read_zarr", "from_plain", "atomic_dir",
           "is_zarr_store"]

DIMS = {"B": "system", "T": "tick", "L": "layer", "E": "expert"}
"""Shape-suffix letter -> dimension name."""
COORDS = {"tick_T": "tick", "seeds_B": "seed"}
"""Array fields stored as coordinates (field -> coordinate name)."""
FORMAT = "chronomoe_dyn.Trajectory/zarr-1"
_META = ("config", "env", "schedule", "events", "controller_fields")
_FINAL = "final_"
_CHUNK_BYTES = 32 * 2**20           # chunks of at most ~32 MB along `system`
_SUFFIX = re.compile(r"^(.+)_([%s]+)$" % "".join(DIMS))


def split_suffix(name: str) -> tuple[str, tuple[str, ...]]:
    """``"Tbar_local_BTLE"`` -> ``("Tbar_local", ("system", "tick", "layer", "expert"))``;
    a name without a shape suffix -> ``(name, ())``."""
    m = _SUFFIX.match(name)
    if m is None:
        return name, ()
    return m.group(1), tuple(DIMS[c] for c in m.group(2))


def _field_name(stem: str, dims: tuple[str, ...]) -> str:
    letters = {v: k for k, v in DIMS.items()}
    return stem + ("_" + "".join(letters[d] for d in dims) if dims else "")


def _array_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if split_suffix(f.name)[1]]


def _optional(f: dataclasses.Field) -> bool:
    return "None" in str(f.type)


def from_plain(cls: type, d: dict) -> Any:
    """Build dataclass ``cls`` from a plain dict (e.g. parsed JSON): nested dataclass fields are
    built recursively and lists become tuples where the default is a tuple."""
    kw = {}
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in d.items():
        f = by_name.get(k)
        default = None if f is None or f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = from_plain(type(default), v)
        elif isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


# ---------------------------------------------------------------------------------------------
# Trajectory <-> Dataset

def _meta_json(traj: Any) -> dict[str, str]:
    sched = dataclasses.asdict(traj.schedule)
    return {"config": json.dumps(traj.config.to_dict()), "env": json.dumps(traj.env.to_dict()),
            "schedule": json.dumps(sched), "events": json.dumps([e.to_dict() for e in traj.events]),
            "controller_fields": json.dumps(bool(traj.controller_fields))}


def to_dataset(traj: Any):
    """The trajectory as an ``xarray.Dataset`` (see the module docstring for the layout)."""
    import xarray as xr
    data, coords = {}, {}
    for f in _array_fields(type(traj)):
        a = getattr(traj, f.name)
        if a is None:
            continue
        stem, dims = split_suffix(f.name)
        if f.name in COORDS:
            coords[COORDS[f.name]] = (dims, np.asarray(a))
        else:
            data[stem] = (dims, np.asarray(a))
    states = traj.final_states
    for f in dataclasses.fields(states[0]):
        stem, dims = split_suffix(f.name)
        data[_FINAL + stem] = (("system",) + dims,
                               np.stack([np.asarray(getattr(s, f.name)) for s in states]))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(format=FORMAT, **_meta_json(traj))
    return ds


def trajectory_arrays(ds: Any, fields: Any = None, cls: type | None = None
                      ) -> dict[str, np.ndarray]:
    """Field name -> array for every Trajectory array field in ``ds`` (a dataset from
    ``to_dataset`` or a selection of one; extra leading dims are kept), or only ``fields``."""
    out = {}
    for f in _array_fields(cls or _trajectory_class()):
        if fields is not None and f.name not in fields:
            continue
        stem, dims = split_suffix(f.name)
        name = COORDS.get(f.name, stem)
        if name in ds.variables:
            out[f.name] = np.asarray(ds[name].values)
    return out


def _trajectory_class() -> type:
    """The ``Trajectory`` class, looked up where the package exports it (this module is
    imported by ``trajectory.py``, so it must not import that module: no import cycle)."""
    import chronomoe_dyn
    return chronomoe_dyn.Trajectory


def from_dataset(ds: Any, cls: type | None = None):
    """Rebuild the ``Trajectory`` that ``to_dataset`` wrote (exact)."""
    from .config import ControllerConfig
    from .env import EnvConfig, Event
    from .schedule import KnobSchedule
    from .state import ControllerState
    Trajectory = cls or _trajectory_class()
    if ds.attrs.get("format") != FORMAT:
        raise ValueError(f"not a simulator trajectory (attribute format="
                         f"{ds.attrs.get('format')!r}, expected {FORMAT!r})")
    arrays: dict[str, Any] = {}
    for f in _array_fields(Trajectory):
        stem, dims = split_suffix(f.name)
        name = COORDS.get(f.name, stem)
        if name not in ds.variables:
            if not _optional(f):
                raise ValueError(f"trajectory variable {name!r} (field {f.name}) is missing")
            arrays[f.name] = None
            continue
        v = ds[name]
        if tuple(v.dims) != dims:
            raise ValueError(f"trajectory variable {name!r} has dims {tuple(v.dims)}, "
                             f"field {f.name} needs {dims}")
        arrays[f.name] = np.asarray(v.values)
    finals_by_field = {}
    for name in ds.data_vars:
        if str(name).startswith(_FINAL):
            dims = tuple(ds[name].dims)[1:]
            finals_by_field[_field_name(str(name)[len(_FINAL):], dims)] = ds[name].values
    B = ds.sizes["system"]
    finals = [ControllerState.from_dict({k: v[b] for k, v in finals_by_field.items()})
              for b in range(B)]
    meta = {k: json.loads(ds.attrs[k]) for k in _META}
    return Trajectory(**arrays, config=ControllerConfig.from_dict(meta["config"]),
                      env=EnvConfig.from_dict(meta["env"]),
                      schedule=from_plain(KnobSchedule, meta["schedule"]),
                      events=tuple(Event.from_dict(e) for e in meta["events"]),
                      controller_fields=bool(meta["controller_fields"]), final_states=finals)


# ---------------------------------------------------------------------------------------------
# zarr files

def is_zarr_store(path: str | Path) -> bool:
    """True when ``path`` is a directory that holds a zarr group or array (v2 or v3)."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in ("zarr.json", ".zgroup", ".zarray"))


def atomic_dir(path: Path, build, overwrite: bool = False) -> Path:
    """Build a directory with ``build(tmp)`` in a hidden sibling, then rename it to ``path``.

    An existing ``path`` is refused (FileExistsError) unless ``overwrite``; then it is replaced
    only after the new one is complete, and only if it is a zarr store (never an arbitrary
    folder)."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if not is_zarr_store(path):
            raise FileExistsError(f"{path} exists and is not a zarr store; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    try:
        build(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{token}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _encoding(ds: Any) -> dict:
    """Chunk every variable along ``system`` so that one chunk stays below ~32 MB."""
    enc = {}
    for name, v in ds.variables.items():
        if "system" not in v.dims or v.ndim == 0:
            continue
        per_system = max(1, v.dtype.itemsize * int(np.prod(v.shape)) // max(1, v.sizes["system"]))
        chunks = list(v.shape)
        chunks[v.dims.index("system")] = max(1, min(v.sizes["system"],
                                                    _CHUNK_BYTES // per_system))
        enc[name] = {"chunks": tuple(chunks)}
    return enc


def write_zarr(traj: Any, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``traj`` as a zarr store at ``path`` (atomically; see ``atomic_dir``)."""
    ds = to_dataset(traj)
    atomic_dir(Path(path), lambda tmp: ds.to_zarr(tmp, mode="w-", consolidated=False,
                                                  encoding=_encoding(ds)), overwrite)
    return Path(path)


def read_zarr(path: str | Path, cls: type | None = None):
    """The ``Trajectory`` stored at ``path`` by ``write_zarr``."""
    import xarray as xr
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trajectory store not found: {p}")
    if not is_zarr_store(p):
        raise ValueError(f"{p}: not a zarr store (no zarr.json)")
    try:
        ds = xr.open_zarr(p, consolidated=False, chunks=None).load()
    except Exception as e:  # zarr/xarray raise many types on damaged stores
        raise ValueError(f"{p}: cannot read the zarr store ({type(e).__name__}: {e})") from None
    try:
        return from_dataset(ds, cls)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if e.args else e
        raise ValueError(f"{p}: {msg}") from None
