"""Dynamics studies: one module per question, each a straight script.

Run one as ``chronomoe-dyn study NAME`` or ``python studies/NAME.py`` (``valley_repair.py`` for
``valley-repair``). Each module's ``main(out_dir=None, quick=False, seed=0, progress=True,
overrides=None, execution=None) -> dict`` runs the study through ``runner.run_study``: its cells
(one ``simulate`` call each) run in this process (``execution=None``) or on a dask cluster
(``runner.Execution(cluster.ClusterSpec(...))``), land in ``<out>/<name>.zarr``, and the
analysis reads them back to write PNGs, ``summary.json`` (its numbers) and ``config.json`` (the
resolved config) to ``studies/out/<name>/`` (``<name>-quick/`` for ``quick``) unless
``out_dir`` is given; it returns the summary. ``runner.py`` lists what a study module declares;
adding one is a module plus a line below.

The registry below is plain data so that listing the studies imports neither the simulator nor
Numba.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["STUDIES", "study_names", "get_study"]

STUDIES: dict[str, tuple[str, str]] = {
    "phases": ("chronomoe_dyn.studies.phases",
               "κ, R, T̄ variance, valleys/ridges and gate over one run under the default cosine "
               "κ schedule: do the seed's three phases and healthy ranges appear, and when?"),
    "valley-repair": ("chronomoe_dyn.studies.valley_repair",
                      "an expert collapses while it is a valley: ticks until the valley fills, "
                      "against β_reliability and η_local, vs a geometric-EMA estimate"),
    "kuramoto": ("chronomoe_dyn.studies.kuramoto",
                 "simulated stationary R(K) against R = sqrt(1 − 2γ/K) for Lorentzian ω"),
    "sweep": ("chronomoe_dyn.studies.sweep",
              "κ × coupling phase diagram over many systems: late R, T̄ variance, valleys, "
              "exploration, MaxVio, loss"),
    "calibrate": ("chronomoe_dyn.studies.calibrate",
                  "candidate v2 constants (a compare arms file) under the schedule, the "
                  "fields-off ablation and κ ≡ ±1: balance, loss, the κ lever, R range, "
                  "landscape, valley health"),
}
"""study name -> (module, one-line question)."""


def study_names() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> ModuleType:
    """The module of study ``name`` (``valley_repair`` and ``valley-repair`` both work)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in STUDIES:
        raise KeyError(f"unknown study {name!r}; available: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[key][0])
