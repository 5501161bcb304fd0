"""What ``simulate`` records (law version 2), and its .npz file format.

Shape legend: B systems, T recorded ticks, L layers, E experts. Every array has leading dims
[B, T] except ``tick_T`` and ``seeds_B``.

Whole-model quantities are aggregates over layers (DESIGN.md §3.5): T̄_global is a scalar per
record, the landscape is per layer (``variance_local_BTL``, ``valley_local_BTLE``); there is no
landscape "over expert indices across layers" (version 1's ``Tbar_global_BTE`` and global
valley/ridge masks are gone).

File format ``chronomoe_dyn.Trajectory/2``: one ``np.savez_compressed`` file with every array,
``meta_json`` (configs, schedule, events, controller_fields, format) and ``final_*`` arrays of
the final controller states. No pickles. A version-1 file is refused with a message saying so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ControllerConfig
from .env import EnvConfig, Event
from .schedule import AdaptiveRule, KnobSchedule
from .state import ControllerState

__all__ = ["Trajectory", "FORMAT", "LAYER_FIELDS", "ARRAY_FIELDS"]

FORMAT = "chronomoe_dyn.Trajectory/2"

LAYER_FIELDS = ("Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE",
                "valley_local_BTLE", "ridge_local_BTLE")
"""The [B, T, L, E] fields (None with ``record_layers=False``)."""
ARRAY_FIELDS = ("tick_T", "seeds_B", "R_BT", "dR_BT", "kappa_BT", "gate_BT", "loss_BT",
                "Tbar_global_BT", "exploration_BT", "logit_scale_BTL", "maxvio_BTL",
                "variance_local_BTL") + LAYER_FIELDS


@dataclass(frozen=True)
class Trajectory:
    """What ``simulate`` records every ``record_every`` ticks, per system. Leading dims [B, T].
    The [B, T, L, E] fields are None when the run used ``record_layers=False``."""

    tick_T: np.ndarray
    """[T] tick of each record (record_every, 2·record_every, ...)."""
    seeds_B: np.ndarray
    """[B] seed of each system (seed + b)."""
    R_BT: np.ndarray
    """Kuramoto coherence R after the tick."""
    dR_BT: np.ndarray
    """ΔR of the tick."""
    kappa_BT: np.ndarray
    """κ in effect in the controller (after its smoothing)."""
    gate_BT: np.ndarray
    """coherence_gate(R, 0.2, 0.5): the seed's optimizer gate."""
    loss_BT: np.ndarray
    """Mean token loss of the tick over layers and tokens."""
    Tbar_global_BT: np.ndarray
    """Global structural temperature T̄_global (a scalar per controller)."""
    exploration_BT: np.ndarray
    """Share of the tick's routed slots (all layers) outside the noiseless top-k."""
    logit_scale_BTL: np.ndarray
    """The tick's observed logit scale per layer (mean over tokens of the std across experts
    of the raw logits), as reported to the controller."""
    maxvio_BTL: np.ndarray
    """MaxVio of the tick's slot counts per layer: max_e count / mean count − 1."""
    variance_local_BTL: np.ndarray
    """var over experts of each layer's T̄_local."""
    Tbar_local_BTLE: np.ndarray | None
    T_fast_BTLE: np.ndarray | None
    usage_BTLE: np.ndarray | None
    reliability_BTLE: np.ndarray | None
    valley_local_BTLE: np.ndarray | None
    """bool: valleys of each layer's T̄_local (``landscape.landscape_masks``)."""
    ridge_local_BTLE: np.ndarray | None
    config: ControllerConfig
    env: EnvConfig
    schedule: KnobSchedule
    events: tuple[Event, ...]
    controller_fields: bool
    """False: the ablation (routing by the plain top-k of the raw logits)."""
    final_states: list[ControllerState] = field(repr=False)
    """The controller state of each system after the last tick."""

    @property
    def num_systems(self) -> int:
        return int(self.R_BT.shape[0])

    @property
    def variance_model_BT(self) -> np.ndarray:
        """Whole-model T̄ variance: mean over layers of var(T̄_local[l])."""
        return self.variance_local_BTL.mean(axis=-1)

    @property
    def maxvio_BT(self) -> np.ndarray:
        """Mean over layers of the tick's MaxVio ("MaxVio_batch")."""
        return self.maxvio_BTL.mean(axis=-1)

    def to_npz(self, path: str | Path) -> Path:
        """Save every array, the configs (JSON) and the final states to one .npz file (its
        folder is created if needed)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = {n: getattr(self, n) for n in ARRAY_FIELDS if getattr(self, n) is not None}
        meta = {"config": self.config.to_dict(), "env": self.env.to_dict(),
                "schedule": asdict(self.schedule), "events": [e.to_dict() for e in self.events],
                "controller_fields": bool(self.controller_fields), "format": FORMAT}
        arrays["meta_json"] = np.array(json.dumps(meta))
        for name, v in self.final_states[0].to_dict().items():
            arrays[f"final_{name}"] = np.stack([np.asarray(getattr(s, name))
                                                for s in self.final_states])
        np.savez_compressed(p, **arrays)
        return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")

    @classmethod
    def from_npz(cls, path: str | Path) -> "Trajectory":
        """Read a file written by ``to_npz``; a version-1 file raises ValueError."""
        with np.load(Path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data.pop("meta_json")))
        check_format(meta.get("format"), path)
        sched = dict(meta["schedule"])
        sched["rule"] = AdaptiveRule(**sched["rule"])
        B = int(data["R_BT"].shape[0])
        finals = []
        for b in range(B):
            d = {k[len("final_"):]: v[b] for k, v in data.items() if k.startswith("final_")}
            finals.append(ControllerState.from_dict(d))
        kw = {n: data.get(n) for n in ARRAY_FIELDS}
        return cls(**kw, config=ControllerConfig.from_dict(meta["config"]),
                   env=EnvConfig.from_dict(meta["env"]), schedule=KnobSchedule(**sched),
                   events=tuple(Event.from_dict(e) for e in meta["events"]),
                   controller_fields=bool(meta["controller_fields"]), final_states=finals)

    # Labelled data (xarray / zarr): the layout lives in ``store.py``.
    def to_xarray(self):
        """``xarray.Dataset`` with dims system, tick, layer, expert; coordinates ``tick`` and
        ``seed``; the final states as ``final_*``; the configs as JSON attributes."""
        from .store import to_dataset
        return to_dataset(self)

    @classmethod
    def from_xarray(cls, ds) -> "Trajectory":
        from .store import from_dataset
        return from_dataset(ds, cls)

    def to_zarr(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a zarr store (atomically; an existing one only with ``overwrite=True``)."""
        from .store import write_zarr
        return write_zarr(self, path, overwrite)

    @classmethod
    def from_zarr(cls, path: str | Path) -> "Trajectory":
        """Read a store written by ``to_zarr``: the same arrays, bit for bit."""
        from .store import read_zarr
        return read_zarr(path, cls)



def check_format(fmt, path) -> None:
    """Raise ValueError unless ``fmt`` is this module's FORMAT (naming what the file is)."""
    if fmt != FORMAT:
        if isinstance(fmt, str) and fmt.endswith("/1"):
            raise ValueError(f"{path}: a version-1 trajectory ({fmt}); version 2 of the law "
                             f"changed the recorded fields (scalar T̄_global, per-layer "
                             f"landscapes): re-run the simulation to read it with this version")
        raise ValueError(f"{path}: unknown trajectory format {fmt!r} (expected {FORMAT!r})")
