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
sums, Σ logit std, tokens) to the controller's observation buffer (``observe_stats``: on device,
no host sync); the loss adds per-expert token-loss sums. Padding is excluded when the model was
called with a 2-D ``attention_mask`` (read by a forward pre-hook on the model). A forward re-run
inside backward (activation checkpointing) is not observed twice and redraws the same noise.

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

Over 400 lines: router discovery and planning, the hook and the handle are one attachment's
life cycle (plan → install → route/observe → tick → state → detach), read together.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from chronomoe_dyn.config import ControllerConfig

from .routing import RoutingStats, in_backward, route, stats_row

__all__ = ["attach", "AttachHandle", "AttachError", "SUPPORTED_ROUTERS", "find_routers"]

ATTACH_FORMAT_VERSION = 2       # 2: controller law v2
# A handle per attached router module; lets attach() refuse a second attachment without
# marking the model itself (a weak map: a collected model leaves no entry).
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AttachHandle]" = weakref.WeakKeyDictionary()


class AttachError(ValueError):
    """attach() refused: no router found, inconsistent expert counts, already attached, or a
    state_dict for another model. The model is left untouched."""


# --------------------------------------------------------------------------------------------
# Gate rules of the supported transformers routers: (renormalise?, cast gates to z's dtype?)
# --------------------------------------------------------------------------------------------
GateRule = Callable[[nn.Module], "tuple[bool, bool]"]

# transformers 5.x router classes (``model.layers[i].mlp.gate``), by class name: Mixtral always
# renormalises and keeps float32 gates; Qwen2-MoE / Qwen3-MoE / OLMoE renormalise only with
# ``norm_topk_prob`` and cast the gates back to the logits' dtype.
SUPPORTED_ROUTERS: dict[str, GateRule] = {
    "MixtralTopKRouter": lambda m: (True, False),
    "Qwen2MoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
    "Qwen3MoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
    "OlmoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
}


def _is_hf_router(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ in SUPPORTED_ROUTERS and cls.__module__.startswith("transformers.")


def _strip_wrappers(name: str) -> str:
    """Module path without the prefixes that DDP/FSDP/torch.compile wrappers add."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod", "_fsdp_wrapped_module",
                                                       "_checkpoint_wrapped_module")]
    return ".".join(parts)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recognised transformers routers of ``model`` in module order, as (name, module)."""
    return [(_strip_wrappers(n), m) for n, m in model.named_modules() if _is_hf_router(m)]


# --------------------------------------------------------------------------------------------
# Per-router plan and hook
# --------------------------------------------------------------------------------------------
@dataclass
class _RouterPlan:
    name: str
    module: nn.Module
    num_experts: int
    top_k: int | None
    """K, or None for a supported transformers router (read from the module at call time)."""
    gate_rule: GateRule
    output_kind: str
    """"hf": (logits, gates, idx) from a supported transformers router; "generic": a user's
    router, its output read at call time (a tensor of logits, a tuple (logits, gates, idx, ...)
    whose gates and indices are recomputed, or a tuple whose first entry is the logits)."""


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


def _expert_count(m: nn.Module, num_experts: int | None) -> int | None:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    if isinstance(m, nn.Linear):
        return m.out_features
    return num_experts


def _top_k_of(m: nn.Module, top_k: int | None) -> int | None:
    if top_k is not None:
        return top_k
    for attr in ("top_k", "num_experts_per_tok", "k"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


class _RouterHook:
    """Forward hook of one router: routes by the v2 rule from its raw logits, observes."""

    def __init__(self, handle: "AttachHandle", layer: int, plan: _RouterPlan) -> None:
        self.handle_ref = weakref.ref(handle)
        self.layer = layer
        self.plan = plan

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        handle = self.handle_ref()
        if handle is None:
            return None
        plan, layer, ctrl = self.plan, self.layer, handle.controller
        is_tensor = isinstance(output, torch.Tensor)
        z = output if is_tensor else output[0]
        z_NE = z if z.dim() == 2 else z.reshape(-1, z.shape[-1])
        observing = handle._observing(module)
        stats = handle.routing_stats if module.training else handle.eval_routing_stats
        full = stats.enabled and not in_backward()
        has_idx = plan.output_kind == "hf" or (
            not is_tensor and len(output) >= 3 and isinstance(output[2], torch.Tensor)
            and not output[2].is_floating_point())
        renorm, cast = plan.gate_rule(module)
        K = plan.top_k if plan.top_k is not None else module.top_k
        fields = noise = None
        if handle.controller_fields:
            fields = ctrl.layer_fields(layer)
            if module.training:
                noise = ctrl.noise_key(layer, z_NE.shape[0])
        valid_N = handle._valid_N
        if valid_N is not None and valid_N.numel() != z_NE.shape[0]:
            valid_N = None                          # a router called on other tokens

        result, idx_NK, gate_NK, row = output, None, None, None
        if fields is None and has_idx:
            # The router's own routing stands (plain top-k of z); observe it as it is.
            if observing or full or handle.record_routing:
                idx_NK = output[2].reshape(-1, output[2].shape[-1])
                gate_NK = output[1].reshape(idx_NK.shape)
                row = stats_row(idx_NK, gate_NK.detach(), z_NE.detach(), valid_N, full=full)
        elif fields is not None or observing or full or handle.record_routing:
            r = route(z_NE, K, fields=fields, renormalize=renorm,
                      gate_dtype=z.dtype if cast else torch.float32, training=module.training,
                      valid_N=valid_N, noise=noise, want_probs=False, full_stats=full)
            idx_NK, gate_NK, row = r.expert_idx_NK, r.gate_NK, r.stats_F
            if fields is not None:
                result = self._hand_over(output, z, z_NE, idx_NK, gate_NK, has_idx, is_tensor)
        if observing:
            ctrl.observe_stats(layer, row)
            handle._observed = True
        elif not module.training:
            handle._eval_calls = True
        if full:
            stats.add(layer, row)
        if handle.record_routing:
            handle._records[layer] = (z_NE, idx_NK, gate_NK)
        if result is output:
            return None
        if is_tensor or type(output) is tuple:
            return result
        if hasattr(output, "_fields"):           # a NamedTuple
            return type(output)(*result)
        return type(output)(result)

    @staticmethod
    def _hand_over(output: Any, z: torch.Tensor, z_NE: torch.Tensor, idx_NK: torch.Tensor,
                   gate_NK: torch.Tensor, has_idx: bool, is_tensor: bool) -> Any:
        """The router's output with the controller's routing in it."""
        if has_idx:
            gates = gate_NK.to(output[1].dtype).reshape(output[1].shape)
            return (output[0], gates, idx_NK.reshape(output[2].shape), *output[3:])
        # Logits only: lift the selected experts by a per-token constant (module docstring).
        with torch.no_grad():
            c_N1 = (z_NE.amax(-1, keepdim=True) - z_NE.amin(-1, keepdim=True)).float() + 1.0
            lift_NE = torch.zeros(z_NE.shape, dtype=torch.float32, device=z.device
                                  ).scatter_(1, idx_NK, c_N1.expand_as(idx_NK))
        shifted = (z_NE.float() + lift_NE).to(z.dtype).reshape(z.shape)
        return shifted if is_tensor else (shifted, *output[1:])


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

    def __init__(self, model: nn.Module, controller: nn.Module, plans: Sequence[_RouterPlan],
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
                h = plan.module.register_forward_hook(_RouterHook(self, layer, plan), prepend=True)
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
        """The pending observation [L, 3E + 2] the next tick uses (``PxTController``)."""
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
def _plan_routers(model: nn.Module, routers: Iterable[nn.Module] | None, num_experts: int | None,
                  top_k: int | None, renormalize: bool) -> list[_RouterPlan]:
    names = {id(m): _strip_wrappers(n) for n, m in model.named_modules()}
    plans: list[_RouterPlan] = []
    if routers is None:
        found = find_routers(model)
        if not found:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if "router" in type(m).__name__.lower()
                            or "gate" in type(m).__name__.lower()})
            raise AttachError(
                f"attach: no supported router in {type(model).__name__}; expected modules of "
                f"class {sorted(SUPPORTED_ROUTERS)} (transformers 5.x); router-like classes "
                f"found: {kinds or 'none'}. For another MoE pass routers=[module, ...]")
        for name, m in found:
            plans.append(_RouterPlan(name, m, int(m.num_experts), None,
                                     SUPPORTED_ROUTERS[type(m).__name__], "hf"))
    else:
        routers = list(routers)
        if not routers:
            raise AttachError("attach: routers=[] is empty; pass the router modules, or "
                              "routers=None to find transformers routers")
        seen: set[int] = set()
        for i, m in enumerate(routers):
            if not isinstance(m, nn.Module):
                raise AttachError(f"attach: routers[{i}] is a {type(m).__name__}, expected an "
                                  "nn.Module")
            if id(m) not in names:
                raise AttachError(f"attach: routers[{i}] ({type(m).__name__}) is not a "
                                  f"submodule of the {type(model).__name__} given")
            if id(m) in seen:
                raise AttachError(f"attach: routers[{i}] ({names[id(m)]}) is listed twice")
            seen.add(id(m))
            E = _expert_count(m, num_experts)
            if E is None:
                raise AttachError(f"attach: cannot tell the expert count of {names[id(m)]} "
                                  f"({type(m).__name__}: no num_experts attribute, not an "
                                  "nn.Linear); pass num_experts=")
            if _is_hf_router(m):
                plans.append(_RouterPlan(names[id(m)], m, E, None,
                                         SUPPORTED_ROUTERS[type(m).__name__], "hf"))
                continue
            k = _top_k_of(m, top_k)
            if k is None:
                raise AttachError(f"attach: cannot tell the top-k of {names[id(m)]} "
                                  f"({type(m).__name__}: no top_k attribute); pass top_k=")
            plans.append(_RouterPlan(names[id(m)], m, E, k, lambda _m: (renormalize, False),
                                     "generic"))
    counts = {p.name: p.num_experts for p in plans}
    expected = num_experts if num_experts is not None else plans[0].num_experts
    bad = {n: e for n, e in counts.items() if e != expected}
    if bad:
        raise AttachError(f"attach: expert count mismatch: expected {expected} experts "
                          f"({'num_experts' if num_experts is not None else plans[0].name}), "
                          f"found {bad}")
    return plans


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
    plans = _plan_routers(model, routers, num_experts, top_k, renormalize)
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
