"""The one prologue and execution path of every study.

A study module (``phases.py``, ``sweep.py``, ...) declares

    NAME, CONFIG, QUICK         its name, config (a JSON-able dict) and the quick variant
    SECTIONS                    config entries that hold dataclass changes (``sim_sections()``)
    ANALYSIS_KEYS               config keys only the analysis reads (changing them reuses the
                                stored cells)
    KERNELS                     Numba entry points it compiles (for the first-run note)
    plan(cfg) -> Plan           its grids of cells, every config built and validated
    run_cell(arg) -> Dataset    one cell (one ``simulate`` call): runs on a worker
    analyse(cfg, store, out) -> (summary, figures)   numbers and PNGs, read from the store

and ``run_study`` does the rest, the same way for all: resolve the config (``--quick``,
``--set``), plan (every error before any cell runs), open the study's zarr store
``<out>/<name>.zarr`` (refusing one of another study or config without ``overwrite``), run
the cells the store does not have (in this process or on a dask cluster, ``cluster.py``),
write each into the store as it finishes, then analyse and write ``summary.json`` and
``config.json``. A new study (the v2 calibration) is a module with these names plus a line in
``STUDIES``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

from ..cluster import ClusterSpec, close_client, describe, open_client, run_tasks
from ..gridstore import Cell, GridSpec, GridStore
from .common import finish, out_dir_for, resolve_config

__all__ = ["Execution", "Plan", "make_plan", "run_study", "StudyError", "sim_sections",
           "simulate_cell", "validate_simulate", "system_blocks", "kernels_cached",
           "default_schedule_with", "constant_schedule", "check_late_window"]


class StudyError(RuntimeError):
    """Some cells failed (the store keeps the others; a rerun computes the missing ones)."""


@dataclass(frozen=True)
class Execution:
    """Where the cells run. cluster: None = in this process, one cell after the other (Numba
    uses every core inside a cell); a ClusterSpec = a LocalCluster or an external scheduler.
    overwrite: replace an existing store of another study or config."""
    cluster: ClusterSpec | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class Plan:
    """A study's grids and cells: cell name -> (cell, the argument of ``run_cell``)."""
    grids: list[GridSpec]
    tasks: dict[str, tuple[Cell, Any]]


def make_plan(grids: Sequence[GridSpec], arg: Callable[[GridSpec, Cell], Any]) -> Plan:
    """Every cell of ``grids`` with ``arg(grid, cell)`` as its task argument."""
    tasks = {c.name: (c, arg(g, c)) for g in grids for c in g.cells()}
    return Plan(list(grids), tasks)


def system_blocks(num_systems: int, per_cell: int | None) -> tuple[int, int]:
    """(size, block) of the ``system`` dim: ``per_cell`` systems per cell (None = all)."""
    return int(num_systems), int(per_cell or num_systems)


def sim_sections() -> dict[str, type]:
    """The dataclasses behind the ``controller``, ``env`` and ``schedule`` config entries."""
    from ..config import ControllerConfig
    from ..env import EnvConfig
    from ..schedule import KnobSchedule
    return {"controller": ControllerConfig, "env": EnvConfig, "schedule": KnobSchedule}


def default_schedule_with(ticks: int, changes: dict):
    """``simulate.default_schedule(ticks)`` (cosine 0.5 → −0.3, warm-up a quarter) with the
    study's ``schedule`` changes (KnobSchedule fields; ``rule`` a dict of AdaptiveRule fields)."""
    from dataclasses import asdict

    from ..schedule import KnobSchedule
    from ..simulate import default_schedule
    from ..store import from_plain
    base = asdict(default_schedule(ticks))
    base.update({k: v for k, v in changes.items() if k != "rule"})
    base["rule"].update(changes.get("rule", {}))
    return from_plain(KnobSchedule, base)


def constant_schedule(kappa: float, ticks: int):
    """κ held at ``kappa`` for the whole run (the κ controls)."""
    from ..schedule import KnobSchedule
    return KnobSchedule(kind="constant", initial_kappa=float(kappa), final_kappa=float(kappa),
                        warmup_steps=0, total_steps=ticks)


def check_late_window(cfg: dict) -> None:
    """ValueError naming the key unless ``store_dtype`` (float64/float32) and ``late_fraction``
    (in (0, 1]) of a study that reads late-window means from a float store are usable."""
    if cfg["store_dtype"] not in ("float64", "float32"):
        raise ValueError(f"config key 'store_dtype': allowed values are 'float64', 'float32', "
                         f"got {cfg['store_dtype']!r}")
    if not 0.0 < cfg["late_fraction"] <= 1.0:
        raise ValueError(f"config key 'late_fraction': expected a number in (0, 1], got "
                         f"{cfg['late_fraction']!r}")


def validate_simulate(kw: dict) -> None:
    """Raise the ValueError ``simulate(**kw)`` would raise on its arguments, without running."""
    from ..simulate import check_arguments
    check_arguments(**kw)


def simulate_cell(arg: dict):
    """Task of the simulator studies: ``simulate(**arg["simulate"])`` as an xarray Dataset
    (``Trajectory.to_xarray``), float64 fields cast to ``arg["dtype"]`` (the final states
    stay float64)."""
    from ..simulate import simulate
    ds = simulate(**arg["simulate"]).to_xarray()
    ds.attrs = {}           # the configs live in the store's identity, not per cell
    dtype = np.dtype(arg.get("dtype", "float64"))
    if dtype != np.float64:
        for n, v in list(ds.data_vars.items()):
            if v.dtype == np.float64 and not str(n).startswith("final_"):
                ds[n] = v.astype(dtype)
    return ds


def kernels_cached(names: Sequence[str]) -> bool:
    """False when none of the Numba dispatchers ``names`` of ``chronomoe_dyn._kernels`` has a
    usable on-disk cache entry (the first run compiles them: tens of seconds)."""
    if not names:
        return True
    from .. import _kernels
    found = False
    for n in names:
        disp = getattr(_kernels, n, None)
        cache = getattr(disp, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_load_index", None)
        if index is None:
            continue        # not a cached dispatcher (or Numba changed): say nothing
        found = True
        try:
            if index():
                return True
        except Exception:  # noqa: BLE001  (an unreadable index is a cold cache)
            pass
    return not found


_CELL_CODE = ("_kernels", "simulate", "env", "env_config", "law", "state", "config",
              "schedule", "rng", "kuramoto", "landscape", "routing", "trajectory", "store")
"""Modules (or packages: every .py file inside) whose code decides what a cell computes: their
source is part of a store's identity, so cells computed by other code are never mixed into one
store. A name that is neither raises (a renamed module must not drop out silently)."""


def code_fingerprint(pkg: Path | None = None) -> str:
    """sha256 of the sources of the modules and packages in ``_CELL_CODE`` (of ``pkg``, by
    default this installed chronomoe_dyn)."""
    import hashlib
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parents[1] if pkg is None else Path(pkg)
    for name in _CELL_CODE:
        files = sorted((pkg / name).glob("*.py")) if (pkg / name).is_dir() \
            else [pkg / f"{name}.py"]
        if not files or not files[0].is_file():
            raise FileNotFoundError(f"studies.runner._CELL_CODE names {name!r}, which is no "
                                    f"module or package of chronomoe_dyn")
        for f in files:
            h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_study(module: ModuleType, out_dir: str | Path | None = None, quick: bool = False,
              seed: int = 0, progress: bool = True, overrides: dict | None = None,
              execution: Execution | None = None) -> dict:
    """Run the study ``module``; return its summary (see the module docstring)."""
    t0 = time.perf_counter()
    execution = execution or Execution()
    cfg = resolve_config(module.CONFIG, module.QUICK, quick, overrides,
                         getattr(module, "SECTIONS", None))
    cfg["seed"], cfg["quick"] = seed, quick
    plan = module.plan(cfg)
    out = out_dir_for(module.NAME, out_dir, quick)
    identity = {k: v for k, v in cfg.items() if k not in getattr(module, "ANALYSIS_KEYS", ())}
    identity["simulator_code_sha256"] = code_fingerprint()
    path = out / f"{module.NAME}.zarr"
    # Every check before anything is written: the store's identity, then the cluster.
    reuse = GridStore.check(path, module.NAME, identity, execution.overwrite)
    store = GridStore(path, plan.grids) if reuse else None
    names = {n: c for n, (c, _) in plan.tasks.items()}
    todo = [n for n, c in names.items() if store is None or not store.is_done(c)]
    where = describe(execution.cluster)
    if progress:
        _note(f"{module.NAME}: {len(names)} cells, {len(names) - len(todo)} already in {path}, "
              f"{len(todo)} to run {'on ' if execution.cluster else ''}{where}")
    client = None
    started = time.perf_counter()
    try:
        if todo:
            if execution.cluster is not None:
                client = open_client(execution.cluster)
            if not kernels_cached(getattr(module, "KERNELS", ())):
                _note("compiling kernels (first run only)…")
        if store is None:
            store = GridStore.open(path, module.NAME, identity, plan.grids,
                                   overwrite=execution.overwrite)
        threads = execution.cluster.threads_per_task if execution.cluster else 1
        report = run_tasks(client, {n: a for n, (_, a) in plan.tasks.items()}, module.run_cell,
                           is_done=lambda n: store.is_done(names[n]),
                           on_done=lambda n, ds: store.write(names[n], ds),
                           progress=progress, desc=module.NAME, unit="cell",
                           threads=threads)
    finally:
        close_client(client)
    run_seconds = time.perf_counter() - started
    if report.failed:
        first = next(iter(report.failed.items()))
        raise StudyError(f"{module.NAME}: {len(report.failed)} of {len(names)} cells failed "
                         f"(first: {first[0]}: {first[1]}); the {len(names) - len(report.failed)}"
                         f" others are in {store.path}; rerun to compute the missing ones")
    summary, figures = module.analyse(cfg, store, out)
    summary = dict(summary)
    summary["execution"] = {"where": where, "cells": len(names), "computed": len(report.done),
                            "reused": len(report.skipped), "store": str(store.path),
                            "cell_seconds": round(run_seconds, 2)}
    return finish(out, module.NAME, cfg, summary, figures, t0)
