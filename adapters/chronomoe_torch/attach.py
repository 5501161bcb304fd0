"""Attach the P×T controller to an existing MoE model through torch's hook API.

    handle = attach(model, controller_config=ControllerConfig(), optimizer=opt)
    model.train()                     # from_pretrained returns eval mode: nothing is observed
    ...train as usual...              # one controller tick per optimizer step
    handle.detach()                   # the model is exactly as before

For each router (layer ℓ) a forward hook, registered first in line (``prepend=True``), re-routes
from the router's raw logits z [N, E] with ``routing.route``, the one v2 rule the native model
uses too: selection = top-k of (z − mean z)/σ_ℓ/T_ℓ + b_ℓ (+ τ·Gumbel noise in training), gates =
the router's own gate rule on softmax(z) over the selected experts (each transformers family's
renormalisation and dtype). The hook returns (z, gates, indices) in place of the router's: the
logits are left as they are, so transformers' aux loss, the z-loss and the gradient all see the
raw z; the experts consume the controller's choice. With ``controller_fields=False`` the hook
leaves the router's output untouched (plain top-k of z) and only observes. The router's own
softmax/top-k still runs (a hook cannot skip it): the attachment costs one more top-k per layer.

Observation: in training mode each hook adds the layer's routing stats (top-k slot counts, gate
sums, Σ logit std, tokens, noiseless counts) to the controller's observation buffer
(``observe_stats``: on device, no host sync); the loss adds per-expert token-loss sums. Padding
is excluded when the model was called with a 2-D ``attention_mask`` (read by a forward pre-hook
on the model). A forward re-run inside backward (activation checkpointing) is not observed twice
and redraws the same noise.

Tick: once per optimizer step. ``attach(..., optimizer=opt)`` registers ``handle.tick`` as the
optimizer's step pre-hook (it runs after every micro-batch's backward, so gradient accumulation
sees one tick per step); without an optimizer call ``handle.tick()`` after each step. The tick is
``PxTController.tick``: it all-reduces the observation across data-parallel ranks in one
collective when a process group is up (``distributed=``, ``process_group=``), then steps the law.
A tick with nothing observed since the last one warns once (the model left in eval mode).

Logits-only routers (a module returning just the logits, the model routing from them itself):
the hook cannot hand over indices, so with fields on it adds a per-token constant
C = max z − min z + 1 to the selected experts' logits: the model's own softmax → top-k picks the
controller's choice, and renormalised gates over them equal the raw ones (the constant cancels).
Without renormalisation the model would see shifted probabilities: give such routers a
(logits, gates, indices) output instead.

Shape legend: N routed tokens (rows of a router call), E experts, K top-k, L routed layers.

Which modules are routers and how each is hooked (discovery, gate rules, expert count, top-k)
is planned in ``_attach_plan``; the hook itself is ``_attach_hook.RouterHook``; this module holds
the handle (install, tick, state, detach) and ``attach()``.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from chronomoe_dyn.config import ControllerConfig

from ._attach_hook import RouterHook
from ._attach_plan import (SUPPORTED_ROUTERS, AttachError, RouterPlan, find_routers,
                           plan_routers)
from .routing import RoutingStats, in_backward

__all__ = ["attach", "AttachHandle", "AttachError", "SUPPORTED_ROUTERS", "find_routers"]

ATTACH_FORMAT_VERSION = 2       # 2: controller law v2
# A handle per attached router module; lets attach() refuse a second attachment without
# marking the model itself (a weak map: a collected model leaves no entry).
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AttachHandle]" = weakref.WeakKeyDictionary()


def _positional_index(model: nn.Module, name: str) -> int | None:
    """Position of parameter ``name`` in ``model.forward``'s positional arguments, if any."""
    import inspect
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        if p.name == name:
            return i
    return None


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------
class AttachHandle:
    """What ``attach`` returns: the controller, the hooks' handles and the routing stats.

    Attributes: ``controller`` (a ``PxTController``), ``router_names`` (module paths, layer
    order), ``num_layers``, ``num_experts``, ``ticks`` (ticks taken through this handle),
    ``attached``, ``controller_fields``, ``routing_stats`` and ``eval_routing_stats`` (two
    ``routing.RoutingStats`` for the run metrics, of training- and eval-mode forwards; off until
    their ``start()``).
    """

    def __init__(self, model: nn.Module, controller: nn.Module, plans: Sequence[RouterPlan],
                 *, mask_padding: bool, observe_in_eval: bool, record_routing: bool,
                 controller_fields: bool = True) -> None:
        self.controller = controller
        self.router_names = [p.name for p in plans]
        self.num_layers = len(plans)
        self.num_experts = plans[0].num_experts
        self.mask_padding = mask_padding
        self.observe_in_eval = observe_in_eval
        self.record_routing = record_routing
        self.controller_fields = controller_fields
        self.routing_stats = RoutingStats(self.num_layers, self.num_experts)
        self.eval_routing_stats = RoutingStats(self.num_layers, self.num_experts)
        self.ticks = 0
        self.attached = False
        self._plans = list(plans)
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._optimizer_hook: torch.utils.hooks.RemovableHandle | None = None
        self._valid_N: torch.Tensor | None = None
        self._records: list[tuple | None] = [None] * self.num_layers
        # Host flags for the "nothing observed" warning (no sync): set by the router hooks.
        self._observed = False
        self._eval_calls = False
        self._warned_unobserved = False

    # -- hooks --------------------------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        self._mask_pos = _positional_index(model, "attention_mask")
        try:
            for layer, plan in enumerate(self._plans):
                h = plan.module.register_forward_hook(RouterHook(self, layer, plan), prepend=True)
                self._hook_handles.append(h)
            self._hook_handles.append(model.register_forward_pre_hook(
                self._model_pre_hook, with_kwargs=True))
        except Exception:
            for h in self._hook_handles:
                h.remove()
            self._hook_handles.clear()
            raise
        for plan in self._plans:
            _ATTACHED[plan.module] = self
        self.attached = True

    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Start of a model forward: remember the padding mask, drop the last routing record."""
        mask = None
        if self.mask_padding:
            mask = kwargs.get("attention_mask")
            if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
                mask = args[self._mask_pos]
        self._valid_N = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            else None
        self._records = [None] * self.num_layers
        return None

    def _observing(self, router: nn.Module) -> bool:
        # A forward re-run by activation checkpointing happens inside backward; the original
        # forward already observed these tokens.
        return (router.training or self.observe_in_eval) and not in_backward()

    def routing_output(self, logits: torch.Tensor | None = None) -> "RoutingRecord":
        """The routing of the last forward (needs ``record_routing=True``), shaped like our
        model's output for ``ChronoMoELoss``: ``router_logits`` (the raw z, differentiable),
        ``expert_indices``, ``gate_weights`` (tuples per layer) and ``logits``."""
        if not self.record_routing:
            raise RuntimeError("routing_output() needs attach(..., record_routing=True)")
        if any(r is None for r in self._records):
            missing = [self.router_names[i] for i, r in enumerate(self._records) if r is None]
            raise RuntimeError(f"routing_output(): no routing recorded for {missing} since the "
                               "last model forward")
        return RoutingRecord(logits=logits,
                             router_logits=tuple(r[0] for r in self._records),
                             expert_indices=tuple(r[1] for r in self._records),
                             gate_weights=tuple(r[2] for r in self._records))

    # -- tick --------------------------------------------------------------------------------------
    @property
    def observation_buffer(self) -> torch.Tensor:
        """The pending observation [L, 4E + 2] the next tick uses (``PxTController``)."""
        return self.controller.observation_buffer()

    def tick(self) -> None:
        """One controller step on the observation gathered since the last tick, summed over the
        data-parallel ranks first (``PxTController.tick``). No host sync. Warns once when
        nothing was observed since the last tick (e.g. the model was left in eval mode)."""
        if not self._observed and not self._warned_unobserved:
            self._warned_unobserved = True
            why = ("the routers ran in eval mode (from_pretrained returns the model in eval "
                   "mode)" if self._eval_calls else "no router ran in training mode")
            warnings.warn(f"attach: the optimizer stepped but the controller observed no "
                          f"tokens since the last tick: {why}. Call model.train() before "
                          f"training (or attach(..., observe_in_eval=True)).", stacklevel=2)
        self._observed = self._eval_calls = False
        self.controller.tick()
        self.ticks += 1

    def _optimizer_pre_hook(self, optimizer, args, kwargs) -> None:
        self.tick()
        return None

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tick as ``optimizer``'s step pre-hook (replaces an earlier registration)."""
        if not hasattr(optimizer, "register_step_pre_hook") \
                or not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            raise AttachError(
                f"optimizer {type(optimizer).__name__} has no torch step-hook machinery "
                "(a wrapper that does not call torch.optim.Optimizer.__init__?): pass the "
                "wrapped torch optimizer, or leave optimizer=None and call handle.tick() after "
                "each optimizer step")
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self._optimizer_hook = optimizer.register_step_pre_hook(self._optimizer_pre_hook)

    def metrics(self) -> dict[str, Any]:
        """The run-metrics record's controller and routing keys (docs/CONTRACTS.md "Run metrics
        v2"): R, dR, kappa, tbar_global, the per-layer landscape summaries, logit_scale_L and,
        when ``routing_stats`` gathered something since its ``start``, maxvio(_L), load_LE,
        routing_entropy, load_entropy, exploration_rate. Syncs with the device: call it on the
        logging cadence. Takes (clears) the routing stats."""
        from .metrics import controller_metrics, routing_metrics
        rec = controller_metrics(self.controller)
        acc = self.routing_stats.take()
        if acc is not None:
            rec.update(routing_metrics(acc.cpu().numpy()))
        return rec

    # -- detach ------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook this handle installed; the model behaves exactly as before attach.
        Pending observations are dropped. Idempotent."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        for plan in self._plans:
            if _ATTACHED.get(plan.module) is self:
                del _ATTACHED[plan.module]
        self._records = [None] * self.num_layers
        self._valid_N = None
        self.controller.clear_observations()
        self.attached = False

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Controller state plus what identifies the attachment (a tree ``save_state`` writes).
        Taken at an optimizer-step boundary, as trainers checkpoint: pending observations are
        not kept."""
        return {
            "format_version": ATTACH_FORMAT_VERSION,
            "controller": dict(self.controller.state_dict()),
            "routers": list(self.router_names),
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "ticks": self.ticks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` output; refuses a state of another model."""
        version = state.get("format_version")
        if version != ATTACH_FORMAT_VERSION:
            v1 = " (controller law v1: it cannot be converted; start a new run)" \
                if version == 1 else ""
            raise AttachError(f"attach state format_version={version!r}{v1}; this version "
                              f"reads {ATTACH_FORMAT_VERSION} (controller law v2)")
        shape = (state.get("num_layers"), state.get("num_experts"))
        if shape != (self.num_layers, self.num_experts):
            raise AttachError(f"attach state is for (layers, experts)={shape}, this attachment "
                              f"has {(self.num_layers, self.num_experts)}")
        routers = list(state.get("routers", []))
        if routers != self.router_names:
            raise AttachError(f"attach state routers {routers} differ from this attachment's "
                              f"{self.router_names}")
        self.controller.load_state_dict(state["controller"])
        self.controller.clear_observations()
        self.ticks = int(state.get("ticks", 0))

    def save(self, path) -> Any:
        """Write ``state_dict()`` as a checkpoint directory (``checkpoint.save_state``)."""
        from .checkpoint import save_state
        return save_state(path, self.state_dict(), kind="attach")

    def load(self, path) -> None:
        """Read a directory written by ``save`` (checksums verified, nothing unpickled)."""
        from .checkpoint import load_state
        self.load_state_dict(load_state(path, kind="attach"))

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"AttachHandle({state}, layers={self.num_layers}, experts={self.num_experts}, "
                f"ticks={self.ticks})")


@dataclass
class RoutingRecord:
    """One forward's routing in the shape ``ChronoMoELoss`` reads (per-layer tuples)."""
    logits: torch.Tensor | None
    router_logits: tuple
    expert_indices: tuple
    gate_weights: tuple


# --------------------------------------------------------------------------------------------
# attach()
# --------------------------------------------------------------------------------------------
def attach(model: nn.Module, controller_config: ControllerConfig | None = None, *,
           optimizer: torch.optim.Optimizer | None = None,
           routers: Sequence[nn.Module] | None = None,
           seed: int = 0,
           controller: nn.Module | None = None,
           controller_fields: bool = True,
           num_experts: int | None = None,
           top_k: int | None = None,
           renormalize: bool = True,
           mask_padding: bool = True,
           observe_in_eval: bool = False,
           record_routing: bool = False,
           distributed: bool | None = None,
           process_group=None,
           dtype: torch.dtype = torch.float32,
           device: torch.device | str | None = None) -> AttachHandle:
    """Attach a P×T controller to ``model``'s routers; returns the ``AttachHandle``.

    ``model``: a transformers 5.x Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE model (routers found by
    class), or any model with ``routers=[module, ...]``: modules whose output is the router
    logits [..., E], or a tuple starting with them. A tuple ``(logits, gates, indices, ...)``
    has its gates and indices replaced by the v2 routing (gates from softmax(z), renormalised
    if ``renormalize``); for a logits-only router the selected experts' logits are lifted (see
    the module docstring; ``top_k`` is then needed, read from the module's ``top_k`` if not
    given). Layers are the routers in module order.

    ``controller_config`` / ``seed`` / ``dtype`` / ``device`` build a new ``PxTController``
    (device: the first router's); or pass a ready ``controller`` of the right shape.
    ``controller_fields``: route with the controller's fields (True), or leave routing as the
    model's plain top-k of z and only observe and tick (False: the ablation).
    ``num_experts``: the expert count you expect (checked against every router).
    ``optimizer``: register the tick as its step pre-hook. ``mask_padding``: leave padding
    out of the observation. ``observe_in_eval``: observe in eval mode too (the noise is drawn
    in training mode only). ``record_routing``: keep the last forward's routing for
    ``routing_output()`` (the loss). ``distributed`` / ``process_group``: the controller's
    data-parallel reduction (``PxTController.set_distributed``; None: when a process group
    with more than one rank is up).

    Raises ``AttachError`` (nothing installed) for: no router, an expert-count mismatch, a
    router already attached, a controller of the wrong shape, an optimizer without step hooks.
    """
    if not isinstance(model, nn.Module):
        raise AttachError(f"attach: model is a {type(model).__name__}, expected an nn.Module")
    if not isinstance(controller_fields, bool):
        raise AttachError(f"attach: controller_fields={controller_fields!r}: expected a bool")
    plans = plan_routers(model, routers, num_experts, top_k, renormalize)
    already = [(p.name, _ATTACHED[p.module]) for p in plans if p.module in _ATTACHED]
    if already:
        raise AttachError(f"attach: router(s) {[n for n, _ in already]} already attached "
                          f"({already[0][1]!r}); call handle.detach() first")
    L, E = len(plans), plans[0].num_experts
    if controller is None:
        from .controller import PxTController
        if device is None:
            p = next(plans[0].module.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        controller = PxTController(L, E, config=controller_config or ControllerConfig(),
                                   seed=seed, dtype=dtype, device=device)
    else:
        shape = (getattr(controller, "num_layers", None), getattr(controller, "num_experts", None))
        if shape != (L, E):
            raise AttachError(f"attach: controller has (layers, experts)={shape}, the model's "
                              f"routers need {(L, E)} ({[p.name for p in plans]})")
        if controller_config is not None and getattr(controller, "config", None) is not None \
                and controller.config != controller_config:
            raise AttachError("attach: both controller= and a different controller_config= "
                              "were given")
    if hasattr(controller, "set_distributed"):
        controller.set_distributed(distributed, process_group)
    handle = AttachHandle(model, controller, plans, mask_padding=mask_padding,
                          observe_in_eval=observe_in_eval, record_routing=record_routing,
                          controller_fields=controller_fields)
    if optimizer is not None:
        handle.register_optimizer(optimizer)  # validated before any module hook goes in
    try:
        handle._install(model)
    except Exception:
        handle.detach()
        raise
    return handle
