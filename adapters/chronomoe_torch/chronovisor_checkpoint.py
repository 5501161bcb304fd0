"""``ChronovisorCheckpoint``: the P×T controller's geological state (seed: "Geological
Checkpointing"), with the seed's field names.

Its fields map one to one onto the ``PxTController``'s persistent buffers (``_CORE_BUFFERS``,
``_LENS_BUFFERS``, ``_HISTORY_BUFFERS`` below); it is saved with ``checkpoint.save_state`` (kind
"chronovisor") and read back from such a checkpoint or from a trainer checkpoint. It refuses
stale snapshots and states that break the law's invariants, and checks a checksum of the state
at load and after restore. Re-exported by ``chronomoe_torch.checkpoint``.

Shapes: L layers, E experts, H history length, n <= H history entries kept.

Over 400 lines: one dataclass with the seed's field names (each documented) and its life cycle
(capture, validate, restore, (de)serialise), all reading the buffer tables below; split, one
table would be read in several files.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ._ckpt_format import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from ._ckpt_io import _load, save_state
from ._tree import _dtype_name

__all__ = ["ChronovisorCheckpoint", "LensState", "CHRONOVISOR_KIND"]

# Controller buffer  <->  checkpoint field. Every persistent buffer of a PxTController must be
# here: from_controller and restore_to_controller refuse a controller with state they do not
# know, so a new buffer can never be silently left out of checkpoints.
_CORE_BUFFERS = {
    "tick_counter": "tick", "seed": "seed", "skipped_ticks": "skipped_ticks",
    "theta_LE": "phases_LE", "omega_disorder_LE": "frequencies_LE",
    "R": "R", "psi": "psi", "dR": "dR",
    "usage_LE": "usage_LE", "reliability_LE": "reliability_LE", "delta_LE": "delta_LE",
    "Tbar_global": "structural_T_global", "logit_scale_L": "logit_scale_L",
    "kappa": "kappa", "kappa_target": "kappa_target",
}
_LENS_BUFFERS = {"lens_LE": "lens_E", "pressure_LE": "pressure_E", "T_fast_LE": "T_fast_E",
                 "Tbar_local_LE": "Tbar_local_E", "T_eff_LE": "T_eff_E"}
_HISTORY_BUFFERS = ("coherence_history", "meta_knob_history")
_KNOWN_BUFFERS = frozenset(_CORE_BUFFERS).union(_LENS_BUFFERS, _HISTORY_BUFFERS)
CHRONOVISOR_KIND = "chronovisor"


@dataclass
class LensState:
    """One layer's lens and temperatures, each [E] (the seed's ``lens_states`` entry)."""
    lens_E: torch.Tensor
    """Lens position (integral of pressure), in [-lens_max, lens_max]."""
    pressure_E: torch.Tensor
    """Pressure P of the last micro tick, in [-1, 1]."""
    T_fast_E: torch.Tensor
    """Fast temperature, in [T_min, T_max]."""
    Tbar_local_E: torch.Tensor
    """Per-layer structural temperature T̄_local."""
    Tbar_hier_E: torch.Tensor
    """Hierarchical structural temperature T̄_global·T̄_local (derived; not restored)."""
    T_eff_E: torch.Tensor
    """Effective temperature T_fast·T̄_global·T̄_local."""


def _as_controller(obj: Any) -> Any:
    ctrl = getattr(obj, "controller", None) if not hasattr(obj, "tick_counter") else obj
    if ctrl is None or not hasattr(ctrl, "tick_counter") or not hasattr(ctrl, "state_dict"):
        none = " with controller=None" if hasattr(obj, "controller") else ""
        raise TypeError(f"expected a PxTController (or a model whose .controller is one), got "
                        f"{type(obj).__name__}{none}")
    return ctrl


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _ordered_history(ring: torch.Tensor, ticks: int) -> torch.Tensor:
    """Ring buffer (tick t's entry at slot (t−1) mod H) → the last min(ticks, H), oldest first."""
    H = ring.shape[0]
    return ring[:ticks].clone() if ticks <= H else torch.roll(ring, -(ticks % H)).clone()


def _history_ring(hist: torch.Tensor, ticks: int, H: int) -> torch.Tensor:
    """Inverse of ``_ordered_history`` for a ring of length H (entries that do not fit are the
    oldest and are dropped; slots with no entry are 0, as in a fresh controller)."""
    ring = torch.zeros(H, dtype=hist.dtype)
    m = min(hist.shape[0], H, ticks)
    if m:
        t = torch.arange(ticks - m + 1, ticks + 1)
        ring[(t - 1) % H] = hist[hist.shape[0] - m:]
    return ring


@dataclass
class ChronovisorCheckpoint:
    """The P×T controller's full geological state (seed: "Geological Checkpointing").

    Shapes: L layers, E experts, n ≤ history length entries. Tensors keep the controller's
    buffer dtypes exactly (phase subsystem float64, the rest the controller's dtype), so a
    restore is bit-exact. ``state_checksum`` is the sha256 of the controller's persistent
    buffers (histories excluded) when captured; it is checked at load, at save (against the
    live controller: a snapshot the controller has moved past is refused as stale) and after
    restore (the controller must then hold exactly this state).
    """

    num_layers: int
    num_experts: int
    tick: int
    """Fast clock: ticks taken (micro/macro ticks are derived, see ``clocks``)."""
    seed: int
    """Key of the counter-based phase noise."""
    skipped_ticks: int
    """Ticks whose observation was rejected (non-finite or negative)."""
    structural_T_global: torch.Tensor
    """0-d global structural temperature T̄_global (law v2: a scalar, the model's slowest
    temperature level)."""
    logit_scale_L: torch.Tensor
    """[L] σ_L, the EMA of each layer's observed router-logit scale (0: not observed yet)."""
    lens_states: list[LensState]
    """Per layer: lens, pressure, T_fast, T̄_local, T̄_hier, T_eff."""
    phases_LE: torch.Tensor
    """[L, E] Kuramoto phases θ in [0, 2π)."""
    frequencies_LE: torch.Tensor
    """[L, E] fixed frequency disorder ω_disorder of each oscillator."""
    R: torch.Tensor
    """0-d Kuramoto coherence after the last tick."""
    psi: torch.Tensor
    """0-d mean-field phase."""
    dR: torch.Tensor
    """0-d change of R at the last tick."""
    usage_LE: torch.Tensor
    """[L, E] usage EMA (rows sum to 1)."""
    reliability_LE: torch.Tensor
    """[L, E] reliability EMA in [0, 1]."""
    delta_LE: torch.Tensor
    """[L, E] signed routing drift of the last tick."""
    kappa: torch.Tensor
    """0-d κ in effect (the smoothed value)."""
    kappa_target: torch.Tensor
    """0-d target κ that the smoothing moves towards (the smoothing state)."""
    coherence_history: torch.Tensor
    """[n] R after each of the last n ticks, oldest first."""
    meta_knob_history: torch.Tensor
    """[n] κ after each of the last n ticks, oldest first."""
    history_length: int
    """Length H of the controller's history ring buffers when captured."""
    config: Any
    """The controller's ``chronomoe_dyn.ControllerConfig``."""
    state_checksum: str = ""
    """sha256 of the controller's persistent buffers, histories excluded (see class doc)."""
    _source: Any = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- derived views
    @property
    def clocks(self) -> dict[str, int]:
        """Fast ticks and the micro/macro ticks they imply."""
        return {"tick": self.tick, "micro_ticks": self.tick // self.config.micro_period,
                "macro_ticks": self.tick // self.config.macro_period}

    def stacked(self, name: str) -> torch.Tensor:
        """[L, E] stack of one ``LensState`` field over layers (e.g. ``"T_eff_E"``)."""
        return torch.stack([getattr(ls, name) for ls in self.lens_states])

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The controller's persistent buffers (histories excluded) as this checkpoint has them."""
        out = {}
        for buf, f in _CORE_BUFFERS.items():
            v = getattr(self, f)
            out[buf] = v if isinstance(v, torch.Tensor) else torch.tensor(int(v), dtype=torch.int64)
        for buf, f in _LENS_BUFFERS.items():
            out[buf] = self.stacked(f)
        return out

    # ---------------------------------------------------------------- capture
    @classmethod
    def from_controller(cls, controller: Any, history_length: int | None = None
                        ) -> "ChronovisorCheckpoint":
        """Snapshot a ``PxTController`` (or ``model.controller``).

        history_length: keep at most this many of the newest history entries (None: all the
            controller holds). Raises ``CheckpointError`` when the controller's state is
            inconsistent (host tick mirror ≠ tick buffer) or violates the law's invariants
            (e.g. zeroed or never-initialised buffers)."""
        ctrl = _as_controller(controller)
        if history_length is not None and (isinstance(history_length, bool) or not isinstance(
                history_length, int) or history_length < 0):
            raise ValueError(f"history_length={history_length!r}: expected an int >= 0 or None")
        sd = {k: v.detach().to("cpu").clone() for k, v in ctrl.state_dict().items()}
        unknown, missing = sorted(set(sd) - _KNOWN_BUFFERS), sorted(_KNOWN_BUFFERS - set(sd))
        if unknown or missing:
            raise CheckpointError(f"ChronovisorCheckpoint.from_controller: the controller's state "
                                  f"has buffers this checkpoint does not know {unknown} / lacks "
                                  f"{missing}; update chronovisor_checkpoint._CORE_BUFFERS")
        tick = int(sd["tick_counter"])
        host = getattr(ctrl, "_tick_host", tick)
        if host != tick:
            raise CheckpointError(f"ChronovisorCheckpoint.from_controller: the controller's host "
                                  f"tick mirror ({host}) disagrees with its tick_counter buffer "
                                  f"({tick}); its state is stale or half-loaded")
        return cls._from_buffers(sd, ctrl.config, history_length, source=ctrl)

    @classmethod
    def _from_buffers(cls, sd: dict[str, torch.Tensor], config: Any,
                      history_length: int | None, source: Any = None) -> "ChronovisorCheckpoint":
        tick = int(sd["tick_counter"])
        H = int(sd["coherence_history"].shape[0])
        hist = {k: _ordered_history(sd[k], tick) for k in _HISTORY_BUFFERS}
        if history_length is not None:
            hist = {k: v[max(0, v.shape[0] - history_length):].clone() for k, v in hist.items()}
        tg = sd["Tbar_global"]
        L, E = sd["theta_LE"].shape
        lens = [LensState(**{f: sd[b][i].clone() for b, f in _LENS_BUFFERS.items()},
                          Tbar_hier_E=tg * sd["Tbar_local_LE"][i]) for i in range(L)]
        scalars = {"tick": tick, "seed": int(sd["seed"]), "skipped_ticks": int(sd["skipped_ticks"])}
        tensors = {f: sd[b] for b, f in _CORE_BUFFERS.items() if f not in scalars}
        out = cls(num_layers=int(L), num_experts=int(E), lens_states=lens, history_length=H,
                  config=config, **scalars, **tensors, **hist)
        out.state_checksum = _digest(out._buffers())
        if source is not None:  # the snapshot equals the live buffers (nothing moved meanwhile)
            if not out.matches(source):
                raise CheckpointError("ChronovisorCheckpoint.from_controller: the controller "
                                      "changed while it was being captured")
            out._source = source
        out.validate()
        return out

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Shapes, dtypes and the law's invariants; ``CheckpointCorruptError`` naming the field."""
        L, E = self.num_layers, self.num_experts

        def bad(name: str, what: str) -> CheckpointCorruptError:
            return CheckpointCorruptError(f"ChronovisorCheckpoint.{name}: {what}")

        if len(self.lens_states) != L:
            raise bad("lens_states", f"{len(self.lens_states)} layers, expected {L}")
        want = {"phases_LE": (L, E), "frequencies_LE": (L, E), "usage_LE": (L, E),
                "reliability_LE": (L, E), "delta_LE": (L, E), "structural_T_global": (),
                "logit_scale_L": (L,), "R": (), "psi": (), "dR": (), "kappa": (),
                "kappa_target": ()}
        for name, shape in want.items():
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                raise bad(name, f"shape {tuple(getattr(v, 'shape', ()))}, expected {shape}")
            if not torch.isfinite(v).all():
                raise bad(name, "holds non-finite values")
        for i, ls in enumerate(self.lens_states):
            for f in ("lens_E", "pressure_E", "T_fast_E", "Tbar_local_E", "Tbar_hier_E", "T_eff_E"):
                v = getattr(ls, f)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != (E,) \
                        or not torch.isfinite(v).all():
                    raise bad(f"lens_states[{i}].{f}", f"expected a finite [{E}] tensor")
        for name in _HISTORY_BUFFERS:
            v = getattr(self, name)
            n = min(self.tick, self.history_length)
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.shape[0] > n:
                raise bad(name, f"expected a 1-d tensor of at most min(tick, history_length)="
                                f"{n} entries")
        cfg = self.config
        T_fast, tol = self.stacked("T_fast_E"), 1 + 1e-6
        # Invariants a live controller always satisfies; zeroed or uninitialised buffers do not.
        checks = [
            ("usage_LE", (self.usage_LE.sum(-1) - 1).abs().max() < 1e-6, "rows must sum to 1"),
            ("reliability_LE", ((self.reliability_LE >= 0) & (self.reliability_LE <= 1)).all(),
             "must lie in [0, 1]"),
            ("phases_LE", ((self.phases_LE >= 0) & (self.phases_LE < 2 * math.pi)).all(),
             "must lie in [0, 2π)"),
            ("R", (self.R >= 0) & (self.R <= 1), "must lie in [0, 1]"),
            ("kappa", self.kappa.abs() <= 1, "must lie in [-1, 1]"),
            ("kappa_target", self.kappa_target.abs() <= 1, "must lie in [-1, 1]"),
            ("structural_T_global", (self.structural_T_global > 0).all(), "must be > 0"),
            ("logit_scale_L", (self.logit_scale_L >= 0).all(), "must be >= 0"),
            ("lens_states[*].T_fast_E",
             ((T_fast >= cfg.T_min / tol) & (T_fast <= cfg.T_max * tol)).all(),
             f"must lie in [T_min, T_max] = [{cfg.T_min}, {cfg.T_max}]"),
            ("lens_states[*].Tbar_local_E", (self.stacked("Tbar_local_E") > 0).all(),
             "must be > 0"),
            ("lens_states[*].lens_E", (self.stacked("lens_E").abs() <= cfg.lens_max * tol).all(),
             f"must lie in [-lens_max, lens_max] = ±{cfg.lens_max}"),
        ]
        for name, ok, what in checks:
            if not bool(ok):
                raise bad(name, f"{what} (zeroed, uninitialised or corrupted state)")
        if self.tick < 0 or self.skipped_ticks < 0 or self.skipped_ticks > self.tick:
            raise bad("tick", f"tick={self.tick}, skipped_ticks={self.skipped_ticks}: need "
                              f"0 <= skipped_ticks <= tick")

    def matches(self, controller: Any) -> bool:
        """True when the controller's live state (histories excluded) is exactly this one."""
        ctrl = _as_controller(controller)
        live = {k: v for k, v in ctrl.state_dict().items() if k not in _HISTORY_BUFFERS}
        return _digest(live) == self.state_checksum

    # ---------------------------------------------------------------- restore
    def restore_to_controller(self, controller: Any) -> None:
        """Load this state into a ``PxTController`` (or ``model.controller``) through its
        ``load_state_dict`` (which re-syncs its host mirrors), then check the result.

        The controller must have the same (layers, experts) and buffer dtypes
        (``CheckpointMismatchError`` naming both). Histories are re-laid into the controller's
        ring buffers; with another ``history_length`` the newest entries that fit are kept.
        A controller built with another ``ControllerConfig`` gets the state with a warning
        naming the differing fields (its own constants stay in force)."""
        ctrl = _as_controller(controller)
        mine = (self.num_layers, self.num_experts)
        theirs = (int(ctrl.theta_LE.shape[0]), int(ctrl.theta_LE.shape[1]))
        if mine != theirs:
            raise CheckpointMismatchError(
                f"ChronovisorCheckpoint has (layers, experts) = {mine}; the controller has "
                f"(layers, experts) = {theirs}")
        target = ctrl.state_dict()
        unknown = sorted(set(target) - _KNOWN_BUFFERS)
        if unknown:
            raise CheckpointMismatchError(f"restore_to_controller: the controller has state this "
                                          f"checkpoint does not hold: {unknown}")
        sd = self._buffers()
        for name in _HISTORY_BUFFERS:
            sd[name] = _history_ring(getattr(self, name), self.tick, int(target[name].shape[0]))
        for name, v in sd.items():
            if name in target and v.dtype != target[name].dtype:
                raise CheckpointMismatchError(
                    f"restore_to_controller: {name} is {_dtype_name(v.dtype)} in the checkpoint, "
                    f"{_dtype_name(target[name].dtype)} in the controller (build the controller "
                    f"with the checkpoint's dtype)")
        if getattr(ctrl, "config", None) is not None and hasattr(self.config, "to_dict") \
                and ctrl.config != self.config:
            a, b = self.config.to_dict(), ctrl.config.to_dict()
            diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
            warnings.warn(f"restore_to_controller: the controller's ControllerConfig differs "
                          f"from the checkpoint's in {diff} (checkpoint, controller); the "
                          f"controller keeps its own constants", stacklevel=2)
        dev = ctrl.theta_LE.device
        ctrl.load_state_dict({k: v.to(dev) for k, v in sd.items()}, strict=True)
        if not self.matches(ctrl):
            raise CheckpointError("restore_to_controller: after loading, the controller's state "
                                  "differs from the checkpoint's (state_checksum)")

    # ---------------------------------------------------------------- (de)serialisation
    def to_tree(self) -> dict[str, Any]:
        """A ``save_state`` tree (plain data: tensors, numbers, the config as a dict)."""
        t = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("lens_states", "config", "_source")}
        t["lens_states"] = [{f.name: getattr(ls, f.name) for f in fields(ls)}
                            for ls in self.lens_states]
        t["config"] = self.config.to_dict()
        return t

    @classmethod
    def from_tree(cls, tree: dict[str, Any], where: str = "tree") -> "ChronovisorCheckpoint":
        """Inverse of ``to_tree``; checks the checksum and invariants."""
        from chronomoe_dyn import ControllerConfig
        try:
            kw = {f.name: tree[f.name] for f in fields(cls) if f.name != "_source"}
            kw["lens_states"] = [LensState(**ls) for ls in tree["lens_states"]]
            kw["config"] = ControllerConfig.from_dict(tree["config"])
            for k in ("num_layers", "num_experts", "tick", "seed", "skipped_ticks",
                      "history_length"):
                if isinstance(kw[k], bool) or not isinstance(kw[k], int):
                    raise TypeError(f"{k}={kw[k]!r} is not an int")
            out = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointCorruptError(f"ChronovisorCheckpoint in {where}: malformed "
                                         f"({type(e).__name__}: {e})") from None
        out.validate()
        got = _digest(out._buffers())
        if got != out.state_checksum:
            raise CheckpointCorruptError(f"ChronovisorCheckpoint in {where}: its state does not "
                                         f"match its state_checksum ({got} != "
                                         f"{out.state_checksum})")
        return out

    def save(self, path: str | os.PathLike, *, allow_stale: bool = False, **kwargs: Any) -> Path:
        """Write as a new checkpoint directory (``save_state``, kind "chronovisor"; an existing
        ``path`` is never overwritten).

        When captured with ``from_controller``, the live controller must still hold this state:
        saving a snapshot the controller has moved past raises ``CheckpointError`` (stale)
        unless ``allow_stale``. The written files are read back and compared (``verify``)."""
        if self._source is not None and not allow_stale and not self.matches(self._source):
            raise CheckpointError(
                f"ChronovisorCheckpoint.save({path}): stale snapshot: captured at tick "
                f"{self.tick}, the controller is now at tick {int(self._source.tick_counter)} "
                f"(capture again, or pass allow_stale=True)")
        self.validate()
        return save_state(path, self.to_tree(), kind=CHRONOVISOR_KIND, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = "cpu") -> "ChronovisorCheckpoint":
        """Read one written by ``save``, or extract the controller state from a trainer
        checkpoint (its model state dict's controller buffers and its configs)."""
        path = Path(path)
        manifest, tree = _load(path, None, map_location)
        kind = manifest["kind"]
        if kind == CHRONOVISOR_KIND:
            return cls.from_tree(tree, where=str(path))
        if kind == "trainer" and isinstance(tree, dict) and isinstance(tree.get("model"), dict):
            return cls._from_trainer_tree(tree, path)
        raise CheckpointMismatchError(f"checkpoint {path} is of kind {kind!r}; a "
                                      f"ChronovisorCheckpoint reads kind {CHRONOVISOR_KIND!r} or "
                                      f"a trainer checkpoint")

    @classmethod
    def _from_trainer_tree(cls, tree: dict, path: Path) -> "ChronovisorCheckpoint":
        from chronomoe_dyn import ControllerConfig
        model = tree["model"]
        prefixes = [k[: -len("tick_counter")] for k in model if k.endswith("tick_counter")]
        if len(prefixes) != 1:
            raise CheckpointMismatchError(f"trainer checkpoint {path} holds {len(prefixes)} "
                                          f"controllers' state (saved with "
                                          f"save_chronovisor_state=False?); expected one")
        p = prefixes[0]
        sd = {k[len(p):]: v for k, v in model.items()
              if k.startswith(p) and k[len(p):] in _KNOWN_BUFFERS}
        cfg = ((tree.get("configs") or {}).get("controller"))
        try:
            config = ControllerConfig.from_dict(cfg) if isinstance(cfg, dict) \
                else ControllerConfig()
            return cls._from_buffers(sd, config, None)
        except KeyError as e:
            raise CheckpointCorruptError(f"trainer checkpoint {path}: controller buffer {e} "
                                         f"missing") from None
