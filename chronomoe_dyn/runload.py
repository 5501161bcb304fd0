"""Reading a run for the plots: a run directory or file, or a ``Trajectory``, as a ``RunSeries``.

``load_run(run)`` takes a run directory holding ``metrics.jsonl`` (the torch trainer's or the
Hugging Face callback's run metrics), ``trajectory.npz`` (``Trajectory.to_npz``) or
``trajectory.zarr`` (``Trajectory.to_zarr``), or any single ``*.jsonl`` / ``*.npz`` / ``*.zarr``;
a metrics file is read by ``runlog.read_metrics_jsonl``, a simulator trajectory by
``series_from_trajectory`` (one system's curves, with a 10–90 % band over the batch). Errors name
the path and what was expected; an .npz is read without unpickling.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .runlog import METRICS_FILE, RunSeries, read_metrics_jsonl

__all__ = ["load_run", "resolve_run", "series_from_trajectory", "TRAJECTORY_FILE", "ZARR_STORE"]

TRAJECTORY_FILE = "trajectory.npz"
ZARR_STORE = "trajectory.zarr"


def _get(traj: Any, name: str) -> np.ndarray | None:
    v = getattr(traj, name, None) if not isinstance(traj, dict) else traj.get(name)
    return None if v is None else np.asarray(v)


def series_from_trajectory(traj: Any, system: int = 0, source: str = "trajectory") -> RunSeries:
    """RunSeries of one system of a simulator ``Trajectory`` v2 (or a dict of its arrays).

    Scalar curves carry a 10–90 % band over all systems when the batch has more than one.
    The landscape is per layer: valley/ridge counts are means over layers; MaxVio is that of
    each tick's slot counts (``maxvio_BTL``), the load figure shows the usage EMA."""
    R = _get(traj, "R_BT")
    tick = _get(traj, "tick_T")
    if R is None or tick is None:
        raise ValueError(f"{source}: not a simulator trajectory (needs tick_T and R_BT)")
    if R.ndim != 2:
        raise ValueError(f"{source}: R_BT must be [B, T], got shape {R.shape}")
    B = R.shape[0]
    if not 0 <= system < B:
        raise ValueError(f"system={system}: the trajectory has {B} system(s), allowed 0..{B - 1}")
    scalars: dict[str, np.ndarray] = {}
    bands: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def put(name: str, a_BT: np.ndarray | None) -> None:
        if a_BT is None:
            return
        a_BT = np.asarray(a_BT, dtype=np.float64)
        scalars[name] = a_BT[system]
        if B > 1:
            bands[name] = (np.quantile(a_BT, 0.1, axis=0), np.quantile(a_BT, 0.9, axis=0))

    put("R", R)
    for name, key in (("dR", "dR_BT"), ("kappa", "kappa_BT"), ("gate", "gate_BT"),
                      ("loss", "loss_BT"), ("tbar_global", "Tbar_global_BT"),
                      ("exploration_rate", "exploration_BT")):
        put(name, _get(traj, key))
    vl = _get(traj, "variance_local_BTL")
    if vl is not None:
        put("tbar_variance_local", vl.mean(axis=-1))
    for name, key in (("valleys", "valley_local_BTLE"), ("ridges", "ridge_local_BTLE")):
        m = _get(traj, key)
        if m is not None:
            put(name, m.sum(axis=-1).mean(axis=-1))
    usage = _get(traj, "usage_BTLE")
    load = None if usage is None else usage[system].astype(np.float64)
    mv = _get(traj, "maxvio_BTL")
    maxvio_L = None
    if mv is not None:
        put("maxvio", mv.mean(axis=-1))
        maxvio_L = mv[system].astype(np.float64)
    tl = _get(traj, "Tbar_local_BTLE")
    return RunSeries(source=source, step_T=tick.astype(np.int64), scalars=scalars, bands=bands,
                     load_TLE=load, load_label="usage EMA u", maxvio_TL=maxvio_L,
                     tbar_local_TLE=None if tl is None else tl[system].astype(np.float64),
                     step_label="tick")


def _load_npz(path: Path, system: int) -> RunSeries:
    """The arrays of a saved trajectory. Only arrays are read (no unpickling): a file from
    ``Trajectory.to_npz`` and a plain ``np.savez`` of the same array names both work."""
    try:
        with np.load(path, allow_pickle=False) as z:
            traj = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read simulator trajectory ({e}); is the file "
                         f"truncated or not an .npz?") from None
    if "meta_json" in traj:
        from .trajectory import check_format
        check_format(json.loads(str(traj["meta_json"])).get("format"), path)
    return series_from_trajectory(traj, system=system, source=str(path))


def _load_zarr(path: Path, system: int) -> RunSeries:
    """A trajectory store written by ``Trajectory.to_zarr``."""
    from .store import read_zarr
    try:
        import zarr
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # noqa: BLE001  (read_zarr names the problem below)
        attrs = {}
    if "kind" in attrs and "identity" in attrs:
        raise ValueError(f"{path} is the store of study {attrs['kind']!r}, not one trajectory; "
                         f"its figures are in {path.parent}")
    return series_from_trajectory(read_zarr(path), system=system, source=str(path))


def _is_zarr(p: Path) -> bool:
    from .store import is_zarr_store
    return is_zarr_store(p)


def resolve_run(run: str | Path) -> Path:
    """The file or store of ``run`` that ``load_run`` reads (errors name what is missing)."""
    p = Path(run)
    if not p.exists():
        raise FileNotFoundError(f"run not found: {p} (expected a run directory, a metrics "
                                f".jsonl file, a trajectory .npz or a trajectory .zarr store)")
    if _is_zarr(p):
        return p
    if p.is_file():
        if p.suffix not in (".jsonl", ".npz"):
            raise ValueError(f"{p}: unsupported file type {p.suffix!r} (expected .jsonl, .npz "
                             f"or a .zarr store)")
        return p
    for name in (METRICS_FILE, TRAJECTORY_FILE):
        if (p / name).is_file():
            return p / name
    if _is_zarr(p / ZARR_STORE):
        return p / ZARR_STORE
    for ext in ("*.jsonl", "*.npz", "*.zarr"):
        found = sorted(f for f in p.glob(ext) if f.is_file() or _is_zarr(f))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"{p}: several {ext} files ({names}); pass the one to plot")
    raise FileNotFoundError(f"{p}: no {METRICS_FILE}, {TRAJECTORY_FILE}, {ZARR_STORE}, *.jsonl, "
                            f"*.npz or *.zarr in this directory")


def load_run(run: str | Path, system: int = 0) -> RunSeries:
    """Read a run directory, a metrics JSONL file, a trajectory .npz or a trajectory .zarr
    store into a RunSeries."""
    p = resolve_run(run)
    if p.suffix == ".jsonl":
        return read_metrics_jsonl(p)
    return _load_zarr(p, system) if p.is_dir() else _load_npz(p, system)
