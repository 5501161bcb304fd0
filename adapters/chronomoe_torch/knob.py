"""The meta-knob κ in training: ``MetaKnob``, ``AdaptiveKnobController``, ``KnobScheduler``.

κ ∈ [-1, 1]: > 0 explores (more pressure, hotter routing), < 0 exploits (DESIGN.md §3.7). The
schedules are ``chronomoe_dyn.schedule``'s pure functions (``kappa_at``, ``phase_label``,
``adaptive_update``); this module only holds their state, steps them, and pushes κ to a
``PxTController`` with ``set_knob``. κ goes from ``initial_kappa`` to ``final_kappa`` for every
kind (the prototype's cosine ran backwards; ``kappa_at`` is tested against that).

Step convention (like torch LR schedulers): at construction the scheduler is at step 0 and has set
κ(0); each ``step()`` advances to the next step and sets its κ. Call it after
``optimizer.step()`` (``register_on(optimizer)``: in its step post-hook), so the controller's
tick at optimizer step n (in the step pre-hook) applies κ(n − 1).

One κ smoothing: κ is smoothed once, inside the law, by ``ControllerConfig.kappa_smoothing``
(every backend has it, and it is checkpointed with the controller). ``MetaKnob`` used to carry a
second EMA of its own, which compounded with the controller's (two EMAs in series lag twice and
change the schedule's shape); it was removed: ``MetaKnob`` holds the scheduled κ as it is.

Syncs: κ itself is a host value, so scheduling never syncs. The adaptive rule reads R and the
landscape: given floats (``observe(R, variance, formed)``) nothing syncs; reading them from the
controller (``adaptive_interval`` > 0) syncs once per ``adaptive_interval`` steps — put that on
the logging cadence.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import fields
from typing import Any

from chronomoe_dyn.law import check_kappa
from chronomoe_dyn.schedule import (SCHEDULE_KINDS, AdaptiveRule, AdaptiveState, KnobSchedule,
                                    adaptive_update, kappa_at, phase_label)

__all__ = ["MetaKnob", "AdaptiveKnobController", "KnobScheduler"]


def _kappa(v: Any) -> float:
    """κ as a float; ValueError unless a real number in [-1, 1] (strings are not numbers)."""
    if not isinstance(v, numbers.Real):
        raise ValueError(f"kappa={v!r}: expected a real number in [-1, 1]")
    return check_kappa(v)


class MetaKnob:
    """Holds κ ∈ [-1, 1] and pushes it to a controller (``set_knob``).

    ``set(k)`` validates k (ValueError outside [-1, 1] or non-finite) and sets κ = k; ``get()``
    returns κ. Smoothing is the controller's (``ControllerConfig.kappa_smoothing``): see the
    module docstring.
    """

    def __init__(self, kappa: float = 0.0, controller: Any = None) -> None:
        self._kappa = _kappa(kappa)
        self.controller = controller
        self._push()

    def set(self, kappa: float) -> float:
        """Set κ and push it to the controller; returns κ."""
        self._kappa = _kappa(kappa)
        self._push()
        return self._kappa

    def get(self) -> float:
        return self._kappa

    @property
    def target(self) -> float:
        """The last value passed to ``set`` (= κ: no smoothing here)."""
        return self._kappa

    def _push(self) -> None:
        if self.controller is not None:
            self.controller.set_knob(self._kappa)

    def state_dict(self) -> dict[str, float]:
        return {"kappa": self._kappa}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "kappa" not in state_dict:
            raise ValueError("MetaKnob.load_state_dict: missing ['kappa']")
        if state_dict.get("smoothing", 1.0) != 1.0:
            raise ValueError(f"MetaKnob.load_state_dict: smoothing={state_dict['smoothing']!r}: "
                             f"MetaKnob no longer smooths κ (one smoothing: "
                             f"ControllerConfig.kappa_smoothing)")
        self._kappa = _kappa(state_dict["kappa"])
        self._push()

    def __repr__(self) -> str:
        return f"MetaKnob(kappa={self._kappa:.4f})"


class AdaptiveKnobController:
    """The rule-based adaptive κ offset (``chronomoe_dyn.adaptive_update``) with its state.

    ``update(R, variance, formed)`` takes Python numbers (a tensor R is converted with ``float``,
    which syncs); ``update_from_controller(c)`` reads R and the global T̄ landscape from a
    ``PxTController`` (syncs)."""

    def __init__(self, rule: AdaptiveRule = AdaptiveRule()) -> None:
        if not isinstance(rule, AdaptiveRule):
            raise ValueError(f"rule must be an AdaptiveRule, got {type(rule).__name__}")
        self.rule = rule
        self.state = AdaptiveState()

    @property
    def offset(self) -> float:
        return self.state.offset

    def update(self, R: float, variance: float, formed: bool) -> float:
        """One rule application; returns the new offset."""
        self.state = adaptive_update(self.state, self.rule, float(R), float(variance), bool(formed))
        return self.state.offset

    def update_from_controller(self, controller: Any) -> float:
        d = controller.get_structural_temperature_diagnostics()
        return self.update(d["R"], d["variance"], d["formed"])

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.state.offset, "updates": self.state.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"offset", "updates"} - set(state_dict)
        if missing:
            raise ValueError(f"AdaptiveKnobController.load_state_dict: missing {sorted(missing)}")
        off, n = state_dict["offset"], state_dict["updates"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off) \
                or abs(off) > self.rule.max_offset:
            raise ValueError(f"offset={off!r}: allowed range is "
                             f"[-{self.rule.max_offset}, {self.rule.max_offset}]")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"updates={n!r}: expected an integer >= 0")
        self.state = AdaptiveState(offset=float(off), updates=n)


_UNSET: Any = object()


class KnobScheduler:
    """Schedules κ from ``initial_kappa`` to ``final_kappa`` and sets it on a controller.

    Either pass a ``chronomoe_dyn.KnobSchedule``, or a kind (``"constant"``, ``"linear"``,
    ``"cosine"``, ``"step"``, ``"adaptive"``) with the keyword arguments (defaults from the seed:
    0.5 → -0.3, 1000 warm-up steps, 100 000 total).

    Args:
        schedule: a KnobSchedule or a kind.
        controller: a ``PxTController`` (or anything with ``set_knob``), or None.
        initial_kappa, final_kappa, warmup_steps, total_steps, rule: the schedule's fields, only
            with a kind.
        adaptive_interval: for the adaptive kind with a controller, read R and the landscape
            from it every this many steps (a sync each time); 0 = never (call ``observe``).
    """

    def __init__(self, schedule: KnobSchedule | str = "cosine", controller: Any = None, *,
                 initial_kappa: float = _UNSET, final_kappa: float = _UNSET,
                 warmup_steps: int = _UNSET, total_steps: int = _UNSET,
                 rule: AdaptiveRule = _UNSET, adaptive_interval: int = 100) -> None:
        given = {k: v for k, v in (("initial_kappa", initial_kappa), ("final_kappa", final_kappa),
                                   ("warmup_steps", warmup_steps), ("total_steps", total_steps),
                                   ("rule", rule)) if v is not _UNSET}
        if isinstance(schedule, KnobSchedule):
            if given:
                raise ValueError(f"KnobScheduler: pass either a KnobSchedule or keyword fields, "
                                 f"not both (got {sorted(given)})")
            self.schedule = schedule
        elif isinstance(schedule, str):
            if schedule not in SCHEDULE_KINDS:
                raise ValueError(f"schedule={schedule!r}: allowed values are {SCHEDULE_KINDS}")
            kw = {"initial_kappa": 0.5, "final_kappa": -0.3, "warmup_steps": 1000,
                  "total_steps": 100_000}
            kw.update(given)
            self.schedule = KnobSchedule(kind=schedule, **kw)
        else:
            raise ValueError(f"schedule must be a KnobSchedule or a kind in {SCHEDULE_KINDS}, "
                             f"got {schedule!r}")
        if isinstance(adaptive_interval, bool) or not isinstance(adaptive_interval, int) \
                or adaptive_interval < 0:
            raise ValueError(f"adaptive_interval={adaptive_interval!r}: expected an integer >= 0")
        if controller is not None and not callable(getattr(controller, "set_knob", None)):
            raise ValueError(f"controller must have set_knob(kappa), got "
                             f"{type(controller).__name__}")
        self.controller = controller
        self.adaptive_interval = adaptive_interval
        self.adaptive = AdaptiveKnobController(self.schedule.rule)
        self.step_count = 0
        self.meta_knob = MetaKnob(self._scheduled(), controller=controller)

    @property
    def is_adaptive(self) -> bool:
        return self.schedule.kind == "adaptive"

    def _scheduled(self) -> float:
        return float(kappa_at(self.schedule, self.step_count,
                              self.adaptive.state if self.is_adaptive else None))

    def step(self) -> float:
        """Advance one step, update the adaptive offset on its cadence, set and return κ."""
        self.step_count += 1
        if self.is_adaptive and self.controller is not None and self.adaptive_interval \
                and self.step_count % self.adaptive_interval == 0 \
                and hasattr(self.controller, "get_structural_temperature_diagnostics"):
            self.adaptive.update_from_controller(self.controller)   # syncs (see top)
        return self.meta_knob.set(self._scheduled())

    def observe(self, R: float, variance: float, formed: bool) -> float:
        """Feed the adaptive rule with host values (no sync); returns the offset. Takes effect
        at the next ``step()``. Ignored (returns 0) for non-adaptive kinds."""
        if not self.is_adaptive:
            return 0.0
        return self.adaptive.update(R, variance, formed)

    def register_on(self, optimizer: Any) -> Any:
        """``step()`` in ``optimizer``'s step post-hook (torch's hook API); returns the handle
        (keep it to remove the hook)."""
        if not hasattr(optimizer, "register_step_post_hook"):
            raise ValueError(f"register_on: {type(optimizer).__name__} has no "
                             f"register_step_post_hook (expected a torch.optim.Optimizer)")

        def _knob_post_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.step()

        return optimizer.register_step_post_hook(_knob_post_hook)

    def get_kappa(self) -> float:
        """κ currently set (the scheduled value; the controller may smooth it)."""
        return self.meta_knob.get()

    def get_phase(self) -> str:
        """Log label: ``warmup_explore``, ``<kind>_anneal``, ``adaptive``, ``final_exploit``."""
        return phase_label(self.schedule, self.step_count)

    def state_dict(self) -> dict[str, Any]:
        sched = {f.name: getattr(self.schedule, f.name) for f in fields(self.schedule)
                 if f.name != "rule"}
        return {"step_count": self.step_count, "meta_knob": self.meta_knob.state_dict(),
                "adaptive": self.adaptive.state_dict(), "schedule": sched}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore step, κ and the adaptive offset; κ is pushed to the controller. The schedule
        itself is this object's (the saved one is informational, so a resumed run may change
        it)."""
        missing = {"step_count", "meta_knob", "adaptive"} - set(state_dict)
        if missing:
            raise ValueError(f"KnobScheduler.load_state_dict: missing {sorted(missing)}")
        n = state_dict["step_count"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"step_count={n!r}: expected an integer >= 0")
        self.adaptive.load_state_dict(state_dict["adaptive"])
        self.step_count = n
        self.meta_knob.load_state_dict(state_dict["meta_knob"])

    def __repr__(self) -> str:
        s = self.schedule
        return (f"KnobScheduler(kind={s.kind!r}, {s.initial_kappa} -> {s.final_kappa}, "
                f"warmup={s.warmup_steps}, total={s.total_steps}, step={self.step_count}, "
                f"kappa={self.get_kappa():.4f})")
