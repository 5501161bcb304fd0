"""``CoherenceGatedOptimizer``: gate the *update* of any torch optimizer by Kuramoto coherence.

    gate = 1 − strength·(1 − g(R)),   g = 0 for R < min_coherence, else (R − min)/(1 − min)

(``chronomoe_dyn.coherence_gate``, evaluated here on a tensor without a host sync).

Why the update and not the gradient: Adam-type optimizers are invariant to the scale of the
gradient, so scaling it (the prototype) does nothing, and a zero gradient still moves parameters
through momentum. The gate scales the step's parameter change instead, by one of two paths
(``gate_via``; "auto" picks "lr" where it applies, else "snapshot"):

"snapshot" (any optimizer): snapshot the parameters (one fused ``_foreach_copy_``), let the
wrapped optimizer step, blend ``p ← lerp(p_after, p_before, 1 − gate)``:
  * gate g scales the parameter change of the step by g (to the rounding of one ``lerp``);
  * gate 1 gives the plain optimizer's parameters (``lerp`` with weight 0 returns its start
    exactly; the only possible difference is the sign of an exact zero, -0.0 vs +0.0);
  * gate 0 leaves the parameters *and* the optimizer state (every tensor in ``state[p]``, e.g.
    AdamW's exp_avg, exp_avg_sq, step) bit-for-bit untouched: both are restored with
    ``torch.where`` on the gate. Gate 0 is reachable only when ``gating_strength == 1`` (the gate is
    at least 1 − strength), so the state snapshot is taken only then.
  Memory: one extra copy of the parameters that have gradients (plus one of their optimizer state
  when ``gating_strength == 1``).

"lr" (``torch.optim.Adam``/``AdamW`` built with ``fused=True``): Adam's parameter change in a
step, −lr·(wd·p + m̂/(√v̂ + ε)) (AdamW; Adam folds wd·p into the gradient), is linear in lr, so
the fused kernel run with the tensor lr = gate·lr scales the change by the gate, with no snapshot
and no extra pass over the parameters:
  * gate g scales the change by g (to the rounding of the kernel's arithmetic);
  * gate 1 is the plain optimizer bit for bit on CPU (the gated lr is float64 there and
    1·lr = lr). CUDA's fused kernel reads a tensor lr as float32, so there the lr is rounded to
    float32 (relative 6e-8) and gate 1 equals the plain step to that rounding;
  * gate 0 (``gating_strength == 1``): the kernel also gets ``found_inf = (gate == 0)`` (torch's
    AMP skip, combined with any ``found_inf`` already set on the optimizer), so parameters,
    moments and step counts stay bit-for-bit untouched.
  During the wrapped step ``param_groups[i]["lr"]`` holds the gated 0-d tensor (hooks of the
  wrapped optimizer see it); it is put back right after.
Both paths: for 0 < g < 1 the optimizer state advances as in a plain step; only the parameter
change is scaled.

No host sync: the gate is a 0-d tensor, every choice is ``torch.where``/``lerp``/a tensor lr. One
exception, only when ``gating_strength == 1``: on the step that *creates* a parameter's optimizer
state (usually the first), lazy state creation cannot be undone without knowing the gate on the
host, so that step reads the gate once (a sync) and skips the wrapped step entirely if it is 0.

Order of operations in ``step()`` (documented contract):
  1. this wrapper's step pre-hooks (``PxTController.register_on(gated_opt)`` ticks the controller
     here, so R is the coherence *after* this step's tick);
  2. the gate from that R (``last_gate_value``);
  3. the wrapped optimizer's ``step()`` (its own hooks run inside), gated by one of the paths;
  4. this wrapper's step post-hooks.
Register the controller on the wrapper, not on the wrapped optimizer (whose pre-hooks would run
after the gate was computed from the previous tick's R).

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are
the wrapped optimizer's, so ``torch.optim.lr_scheduler.*`` drive it as usual.

About 400 lines, kept whole: one class whose two gate paths share its step, hooks and state dict
(an eighth of the file is the contract above).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["CoherenceGatedOptimizer", "LrGatedAdamW", "coherence_gate_tensor",
           "lr_gating_supported", "GATE_VIA"]

RSource = Callable[[], "torch.Tensor | float"]
GATE_VIA = ("auto", "lr", "snapshot")


def coherence_gate_tensor(R: torch.Tensor, min_coherence: float = 0.2,
                          strength: float = 0.5) -> torch.Tensor:
    """The seed's gate on a tensor R (any shape), without a host sync.

    Same formula and operation order as ``chronomoe_dyn.coherence_gate`` (bitwise equal in
    float64). A non-finite R counts as R = 0 (NaN, −inf) or 1 (+inf)."""
    _check_gate_args(min_coherence, strength)
    r = torch.clamp(torch.nan_to_num(R, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    g = torch.where(r < min_coherence, 0.0, (r - min_coherence) / (1.0 - min_coherence))
    return torch.clamp(1.0 - strength * (1.0 - g), 0.0, 1.0)


def _check_gate_args(min_coherence: Any, strength: Any) -> None:
    for name, v, hi_open in (("min_coherence", min_coherence, True),
                             ("gating_strength", strength, False)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                or v < 0.0 or (v >= 1.0 if hi_open else v > 1.0):
            allowed = "[0, 1)" if hi_open else "[0, 1]"
            raise ValueError(f"{name}={v!r}: allowed range is {allowed}")


def _r_source(controller_or_R_fn: Any) -> RSource:
    coh = getattr(controller_or_R_fn, "coherence", None)
    if callable(coh):
        return coh
    if callable(controller_or_R_fn):
        return controller_or_R_fn
    raise ValueError(f"controller_or_R_fn must be a PxTController (anything with .coherence()) "
                     f"or a callable returning R, got {type(controller_or_R_fn).__name__}")


def lr_gating_supported(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the gate can go through the learning rate ("lr" path): a ``torch.optim.Adam`` or
    ``AdamW`` whose every param group is fused (tensor lr and ``found_inf`` supported)."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
            and all(g.get("fused") and not g.get("differentiable")
                    for g in optimizer.param_groups))


class CoherenceGatedOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so each step's parameter update is scaled by the coherence gate.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (AdamW, SGD, ...).
        controller_or_R_fn: a ``PxTController`` (its ``coherence()`` is read) or a callable
            returning R as a 0-d tensor (no sync) or a float.
        min_coherence: below this R, g(R) = 0. Seed: 0.2. In [0, 1).
        gating_strength: how far the gate can close: gate ∈ [1 − strength, 1]. Seed: 0.5.
        enabled: False gives the plain optimizer (gate 1, no snapshot).
        gate_via: how the gate is applied (module docstring): "lr" (fused Adam/AdamW only),
            "snapshot" (any optimizer) or "auto" ("lr" where ``lr_gating_supported``). The
            resolved choice is ``self.gate_via``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, controller_or_R_fn: Any,
                 min_coherence: float = 0.2, gating_strength: float = 0.5,
                 enabled: bool = True, gate_via: str = "auto") -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        if isinstance(optimizer, CoherenceGatedOptimizer):
            raise ValueError("optimizer is already a CoherenceGatedOptimizer")
        _check_gate_args(min_coherence, gating_strength)
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled={enabled!r}: expected a bool")
        if gate_via not in GATE_VIA:
            raise ValueError(f"gate_via={gate_via!r}: allowed values are {GATE_VIA}")
        lr_ok = lr_gating_supported(optimizer)
        if gate_via == "lr" and not lr_ok:
            raise ValueError(f"gate_via='lr' needs a torch.optim.Adam/AdamW built with "
                             f"fused=True, got {type(optimizer).__name__} (fused="
                             f"{optimizer.defaults.get('fused')}); use 'snapshot'")
        self.gate_via = "lr" if gate_via == "lr" or (gate_via == "auto" and lr_ok) \
            else "snapshot"
        # No Optimizer.__init__: param groups and state belong to the wrapped optimizer.
        self.optimizer = optimizer
        self._r_fn = _r_source(controller_or_R_fn)
        self.min_coherence = float(min_coherence)
        self.gating_strength = float(gating_strength)
        self.enabled = enabled
        self.num_steps = 0
        self._last_gate: torch.Tensor = torch.ones(())
        self._snapshots: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()   # torch's step pre/post hook machinery

    # ------------------------------------------------------------------ delegation
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    # ------------------------------------------------------------------ gate
    @property
    def last_gate_value(self) -> torch.Tensor:
        """Gate of the last step, a 0-d tensor (1 before the first step; no sync)."""
        return self._last_gate

    def last_gate_float(self) -> float:
        """Gate of the last step as a Python float (syncs: logging only)."""
        return float(self._last_gate)

    def current_gate(self) -> torch.Tensor:
        """The gate R gives now (0-d tensor, no sync); 1 when disabled."""
        if not self.enabled:
            return torch.ones((), dtype=self._last_gate.dtype, device=self._last_gate.device)
        R = self._r_fn()
        if not isinstance(R, torch.Tensor):
            R = torch.tensor(float(R), dtype=torch.float64)
        return coherence_gate_tensor(R.detach(), self.min_coherence, self.gating_strength)

    # ------------------------------------------------------------------ step
    def _gated_params(self, closure: Any) -> list[torch.Tensor]:
        ps = [p for g in self.param_groups for p in g["params"]]
        # Without a closure only parameters that have a gradient can move; with one, the
        # gradients appear inside the wrapped step, so every trainable parameter is gated.
        if closure is None:
            return [p for p in ps if p.grad is not None]
        return [p for p in ps if p.requires_grad]

    def _snapshot(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        snaps = []
        for p in params:
            s = self._snapshots.get(p)
            if s is None or s.shape != p.shape or s.dtype != p.dtype or s.device != p.device:
                s = torch.empty_like(p, memory_format=torch.preserve_format)
                self._snapshots[p] = s
            snaps.append(s)
        if params:
            torch._foreach_copy_(snaps, [p.detach() for p in params])
        return snaps

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Gated step (see the module docstring for the order of operations)."""
        self.num_steps += 1
        if not self.enabled or self.gating_strength == 0.0:
            self._last_gate = torch.ones((), dtype=self._last_gate.dtype,
                                         device=self._last_gate.device)
            return self.optimizer.step(closure)
        gate = self.current_gate()
        self._last_gate = gate
        may_close = self.gating_strength >= 1.0
        params = self._gated_params(closure) if may_close or self.gate_via == "snapshot" else []
        if may_close and any(not self.optimizer.state.get(p) for p in params) \
                and not bool(gate > 0):
            # Lazy state creation cannot be undone: skip the step (one sync, see top).
            if closure is not None:
                with torch.enable_grad():
                    return closure()
            return None
        if self.gate_via == "lr":
            return self._step_lr(gate, may_close, closure)
        return self._step_snapshot(gate, params, may_close, closure)

    def _step_lr(self, gate: torch.Tensor, may_close: bool, closure: Any) -> Any:
        """The wrapped fused Adam(W) step with lr·gate (and ``found_inf`` when the gate can
        close); the lrs and the optimizer's own ``found_inf``/``grad_scale`` are put back."""
        opt = self.optimizer
        lrs = [g["lr"] for g in opt.param_groups]
        saved = {k: getattr(opt, k) for k in ("found_inf", "grad_scale") if hasattr(opt, k)}
        if may_close:
            closed = (gate == 0).to(torch.float32)
            fi = saved.get("found_inf")
            opt.found_inf = closed if fi is None else torch.maximum(fi, closed.to(fi.device))
            opt.grad_scale = saved.get("grad_scale")
        try:
            for g, lr in zip(opt.param_groups, lrs):
                dev = g["params"][0].device if g["params"] else gate.device
                # The CUDA kernel reads a tensor lr as float32; the CPU one as double.
                dt = torch.float64 if dev.type == "cpu" else torch.float32
                g["lr"] = gate.to(dev, dt) * lr
            return opt.step(closure)
        finally:
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
            for k in ("found_inf", "grad_scale"):
                if k in saved:
                    setattr(opt, k, saved[k])
                elif hasattr(opt, k):
                    delattr(opt, k)

    def _step_snapshot(self, gate: torch.Tensor, params: list[torch.Tensor], may_close: bool,
                       closure: Any) -> Any:
        """Snapshot, the wrapped step, blend (and the exact restore where the gate is 0)."""
        with torch.no_grad():
            snaps = self._snapshot(params)
            state_pairs = [] if not may_close else [
                (v.clone(), k, p) for p in params
                for k, v in self.optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor)]
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            if may_close:
                self._blend_exact(params, snaps, state_pairs, gate)
            else:
                self._blend(params, snaps, gate)
        return loss

    def _blend(self, params: list[torch.Tensor], snaps: list[torch.Tensor],
               gate: torch.Tensor) -> None:
        """p ← lerp(p, snapshot, 1 − gate) = p_before + gate·(p_after − p_before), per
        (device, dtype) group. The weight is a list of 0-d tensors: the single-tensor-weight
        overload of ``_foreach_lerp_`` reads it with ``.item()`` (a sync)."""
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for p, s in zip(params, snaps):
            ps, ss = groups.setdefault((p.device, p.dtype), ([], []))
            ps.append(p.detach())
            ss.append(s)
        for (dev, dt), (ps, ss) in groups.items():
            w = (1.0 - gate).to(device=dev, dtype=dt)
            torch._foreach_lerp_(ps, ss, [w] * len(ps))

    def _blend_exact(self, params: list[torch.Tensor], snaps: list[torch.Tensor],
                     state_pairs: list[tuple[torch.Tensor, str, torch.Tensor]],
                     gate: torch.Tensor) -> None:
        """As ``_blend``, plus an exact restore of parameters and state where the gate is 0."""
        closed: dict[torch.device, torch.Tensor] = {}

        def is_closed(dev: torch.device) -> torch.Tensor:
            if dev not in closed:
                closed[dev] = gate.to(dev) == 0
            return closed[dev]

        for old, key, p in state_pairs:
            cur = self.optimizer.state[p].get(key)
            if isinstance(cur, torch.Tensor) and cur.shape == old.shape:
                cur.copy_(torch.where(is_closed(cur.device), old, cur))
        self._blend(params, snaps, gate)
        for p, s in zip(params, snaps):
            pd = p.detach()
            pd.copy_(torch.where(is_closed(pd.device), s, pd))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus a ``coherence_gate`` entry."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["coherence_gate"] = {
            "last_gate_value": self._last_gate.detach().clone(),
            "min_coherence": self.min_coherence, "gating_strength": self.gating_strength,
            "enabled": self.enabled, "num_steps": self.num_steps,
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a dict from ``state_dict()`` (or a plain optimizer state dict: gate state kept)."""
        sd = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = dict(out)
        gate = sd.pop("coherence_gate", None)
        if gate is not None:
            missing = {"last_gate_value", "min_coherence", "gating_strength", "enabled",
                       "num_steps"} - set(gate)
            if missing:
                raise ValueError(f"coherence_gate state is missing {sorted(missing)}")
            _check_gate_args(gate["min_coherence"], gate["gating_strength"])
            lg = gate["last_gate_value"]
            if not isinstance(lg, torch.Tensor) or lg.numel() != 1:
                raise ValueError(f"coherence_gate.last_gate_value must be a 1-element tensor, "
                                 f"got {lg!r}")
        self.optimizer.load_state_dict(sd)
        if gate is not None:
            self._last_gate = gate["last_gate_value"].detach().clone().reshape(())
            self.min_coherence = float(gate["min_coherence"])
            self.gating_strength = float(gate["gating_strength"])
            self.enabled = bool(gate["enabled"])
            self.num_steps = int(gate["num_steps"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        d = self.__dict__.copy()
        d.pop("_snapshots", None)
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        self.__dict__.update(state)
        self._snapshots = WeakIdKeyDictionary()
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n".join("  " + line for line in repr(self.optimizer).splitlines())
        return (f"{type(self).__name__}(min_coherence={self.min_coherence}, "
                f"gating_strength={self.gating_strength}, enabled={self.enabled}, "
                f"gate_via={self.gate_via!r},\n{inner}\n)")


class LrGatedAdamW(CoherenceGatedOptimizer):
    """``CoherenceGatedOptimizer(optimizer, ..., gate_via="lr")`` under the trainer's former name:
    the gate through a fused Adam/AdamW's learning rate (ValueError for any other optimizer)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        super().__init__(optimizer, *args, gate_via="lr", **kwargs)
