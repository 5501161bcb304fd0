"""Attach the P×T controller to an existing MoE model through torch's hook API.

    handle = attach(model, controller_config=ControllerConfig(), optimizer=opt)
    ...train as usual...              # one controller tick per optimizer step
    handle.detach()                   # the model is exactly as before

For each router (layer ℓ) a forward hook, registered first in line (``prepend=True``), rewrites
the router's output. With raw logits l [N, E] and the controller's fields (b_ℓ, T_ℓ):

    l' = (l + b_ℓ) / T_ℓ                  computed in float32, returned in l's dtype
    p  = softmax(l'),  top-k of p,  g = the router's own gate rule on p (renormalised or not)

and the hook returns (l', g, top-k indices) in place of the router's (l, g, idx). So the experts
consume the modified top-k, gradients reach the router weight through l' (the bias is a
constant, the temperature a detached divisor), and transformers' own output recorder, whose hook
runs after ours, records l' for its load-balancing loss. For the Hugging Face routers the gate rule
is the router's own (same ops in the same order), so identity fields (b = 0, T = 1) reproduce the
unattached model bit for bit; the one exception is CPU with E < 16 experts, where the softmax and
the renormalised gates are taken in a faster form that agrees to float32 rounding
(``FAST_CPU_SOFTMAX_BELOW``). The router's own softmax/top-k still runs (a hook cannot skip it):
the attachment costs about one more top-k per layer, plus the tick.

Observation: in training mode each hook records the layer's top-k selection, and at the end of
the model's forward (a forward hook on the model) the top-k slot counts and gate-weight sums of
all layers are added, on device and without a host sync, to the controller's pending observation
(two ``scatter_add_`` into ``controller.observation_buffer()`` for all layers: the sums
``controller.observe`` would add, in the same order); ``handle.tick()`` and
``handle.observation_buffer`` add anything still recorded (e.g. routers called on their own).
The loss adds per-expert token-loss sums (``controller.observe_loss``). Padding is excluded when
the model was called with a 2-D ``attention_mask`` keyword (read by a forward pre-hook on the
model). A forward re-run inside backward (activation checkpointing) is not observed twice.

Tick: once per optimizer step. ``attach(..., optimizer=opt)`` registers ``handle.tick`` as the
optimizer's step pre-hook (it runs after every micro-batch's backward, so gradient accumulation
sees one tick per step); without an optimizer call ``handle.tick()`` after each step. The tick
all-reduces the controller's accumulated observation ([3, L, E]: counts, gate-weight sums,
loss sums) across data-parallel ranks in one collective (see ``distributed``), then steps it.

Shape legend: N routed tokens (rows of a router call), E experts, K top-k, L routed layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from chronomoe_dyn.config import ControllerConfig

from . import distributed as _dist

__all__ = ["attach", "AttachHandle", "AttachError", "SUPPORTED_ROUTERS", "find_routers"]

ATTACH_FORMAT_VERSION = 1
# A handle per attached router module; lets attach() refuse a second attachment without
# marking the model itself (a weak map: a collected model leaves no entry).
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, AttachHandle]" = weakref.WeakKeyDictionary()


class AttachError(ValueError):
    """attach() refused: no router found, inconsistent expert counts, already attached, or a
    state_dict for another model. The model is left untouched."""


# --------------------------------------------------------------------------------------------
# Routing rules
# --------------------------------------------------------------------------------------------
RouteFn = Callable[[nn.Module, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

# On CPU, torch's last-dim softmax kernel is not vectorised for rows shorter than this: for E = 8
# it is ~6x slower than the same softmax taken along dim 0 of the transposed logits. Below it we
# take that softmax, and renormalised top-k gates as the softmax over the k largest logits
# (p_i / Σ_topk p_j = e^{l_i} / Σ_topk e^{l_j}: the same function, without the [N, E] softmax,
# the division and their backward). Equal to within float32 rounding, not bit for bit; the same
# selections. (0 disables it.)
FAST_CPU_SOFTMAX_BELOW = 16


def _fast_cpu(logits_NE: torch.Tensor) -> bool:
    return logits_NE.device.type == "cpu" and logits_NE.shape[-1] < FAST_CPU_SOFTMAX_BELOW


def _softmax_f32(logits_NE: torch.Tensor) -> torch.Tensor:
    """float32 softmax over the last dim, as the transformers routers take it."""
    x_NE = logits_NE if logits_NE.dtype == torch.float32 else logits_NE.float()
    if x_NE.device.type == "cpu" and x_NE.shape[-1] < FAST_CPU_SOFTMAX_BELOW:
        return F.softmax(x_NE.t(), dim=0).t()
    return F.softmax(x_NE, dim=-1)


def _renormalised_topk(logits_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k of the float32 softmax renormalised over the k, their indices) [N, K].

    On the fast CPU path: the softmax over the k largest logits (same function, fewer kernels
    forward and backward; taken along the rows, which gives contiguous gates the experts read
    without a copy). Otherwise the transformers rule op for op: softmax, top-k, divide by the
    sum (bit for bit the router's own gates)."""
    if _fast_cpu(logits_NE):
        x_NE = logits_NE if logits_NE.dtype == torch.float32 else logits_NE.float()
        top_NK, idx_NK = torch.topk(x_NE, k, dim=-1)
        return F.softmax(top_NK, dim=-1), idx_NK
    top_NK, idx_NK = torch.topk(_softmax_f32(logits_NE), k, dim=-1)
    return top_NK / top_NK.sum(dim=-1, keepdim=True), idx_NK


def _route_mixtral(router: nn.Module, logits_NE: torch.Tensor):
    """MixtralTopKRouter's rule: float32 softmax, top-k, always renormalised, gates stay float32."""
    return _renormalised_topk(logits_NE, router.top_k)


def _route_qwen_olmoe(router: nn.Module, logits_NE: torch.Tensor):
    """Qwen2-MoE / Qwen3-MoE / OLMoE rule: float32 softmax, top-k, renormalised only with
    ``norm_topk_prob``, gates cast back to the logits' dtype."""
    if router.norm_topk_prob:
        top_NK, idx_NK = _renormalised_topk(logits_NE, router.top_k)
    else:
        top_NK, idx_NK = torch.topk(_softmax_f32(logits_NE), router.top_k, dim=-1)
    return top_NK.to(logits_NE.dtype), idx_NK


# transformers 5.x router classes (``model.layers[i].mlp.gate``), by class name, with their rule.
SUPPORTED_ROUTERS: dict[str, RouteFn] = {
    "MixtralTopKRouter": _route_mixtral,
    "Qwen2MoeTopKRouter": _route_qwen_olmoe,
    "Qwen3MoeTopKRouter": _route_qwen_olmoe,
    "OlmoeTopKRouter": _route_qwen_olmoe,
}


def _route_generic(top_k: int, renormalize: bool) -> RouteFn:
    """Softmax → top-k → optional renormalisation: the rule assumed for a user's own router."""
    def route(router: nn.Module, logits_NE: torch.Tensor):
        if renormalize:
            return _renormalised_topk(logits_NE, top_k)
        return torch.topk(_softmax_f32(logits_NE), top_k, dim=-1)
    return route


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
    route: RouteFn
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
    """Forward hook of one router: applies the fields, re-routes, records the routing for the
    observation (added by the handle at the end of the model's forward)."""

    def __init__(self, handle: "AttachHandle", layer: int, plan: _RouterPlan) -> None:
        self.handle_ref = weakref.ref(handle)
        self.layer = layer
        self.plan = plan

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        handle = self.handle_ref()
        if handle is None:
            return None
        plan = self.plan
        is_tensor = isinstance(output, torch.Tensor)
        logits = output if is_tensor else output[0]
        bias_E, temperature_E = handle.controller.layer_fields(self.layer)
        # l' = (l + b) / T in float32 (the bias, ~0.1, is below bf16 resolution), back in l's dtype.
        if logits.dtype == torch.float32:
            mod = (logits + bias_E) / temperature_E
        else:
            mod = ((logits.float() + bias_E) / temperature_E).to(logits.dtype)
        mod_NE = mod if mod.dim() == 2 else mod.reshape(-1, mod.shape[-1])
        observing = handle._observing(module)

        if plan.output_kind == "hf":
            gate_NK, idx_NK = plan.route(module, mod_NE)
            result = (mod, gate_NK, idx_NK, *output[3:])
        elif (not is_tensor and len(output) >= 3 and isinstance(output[2], torch.Tensor)
              and not output[2].is_floating_point()):
            # A user's (logits, gates, indices, ...): re-route, keep the output's shapes/dtypes.
            gate_NK, idx_NK = plan.route(module, mod_NE)
            result = (mod, gate_NK.to(output[1].dtype).reshape(output[1].shape),
                      idx_NK.reshape(output[2].shape), *output[3:])
        else:
            # Logits only: the model routes from them itself; route here only to observe.
            gate_NK = idx_NK = None
            if observing or handle.record_routing:
                gate_NK, idx_NK = plan.route(module, mod_NE.detach())
            result = mod if is_tensor else (mod, *output[1:])
        if observing:
            handle._pending.append((self.layer, idx_NK, gate_NK, handle._valid_N))
        if handle.record_routing:
            handle._records[self.layer] = (mod_NE, idx_NK, gate_NK)
        if is_tensor or type(output) is tuple:
            return result
        if hasattr(output, "_fields"):           # a NamedTuple
            return type(output)(*result)
        return type(output)(result)


# --------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------
class AttachHandle:
    """What ``attach`` returns: the controller, the hooks' handles and the observation buffer.

    Attributes: ``controller`` (a ``PxTController``), ``router_names`` (module paths, layer
    order), ``num_layers``, ``num_experts``, ``ticks`` (ticks taken through this handle),
    ``attached``.
    """

    def __init__(self, model: nn.Module, controller: nn.Module, plans: Sequence[_RouterPlan],
                 *, mask_padding: bool, observe_in_eval: bool, record_routing: bool,
                 process_group=None, distributed: bool | None = None) -> None:
        self.controller = controller
        self.router_names = [p.name for p in plans]
        self.num_layers = len(plans)
        self.num_experts = plans[0].num_experts
        self.mask_padding = mask_padding
        self.observe_in_eval = observe_in_eval
        self.record_routing = record_routing
        self.process_group = process_group
        self.distributed = distributed
        self.ticks = 0
        self.attached = False
        self._plans = list(plans)
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._optimizer_hook: torch.utils.hooks.RemovableHandle | None = None
        self._valid_N: torch.Tensor | None = None
        # Routing observed since the last flush: (layer, idx_NK, gate_NK, valid_N or None).
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._records: list[tuple | None] = [None] * self.num_layers
        acc_3LE = controller.observation_buffer()
        self._acc_cache: tuple | None = None
        self._ones_M: torch.Tensor | None = None
        # Per-expert slot counts summed over the ticks since the last ``pop_load`` (metrics).
        self.load_LE = torch.zeros_like(acc_3LE[0])

    # -- hooks --------------------------------------------------------------------------------
    def _install(self, model: nn.Module) -> None:
        self._mask_pos = _positional_index(model, "attention_mask")
        try:
            for layer, plan in enumerate(self._plans):
                h = plan.module.register_forward_hook(_RouterHook(self, layer, plan), prepend=True)
                self._hook_handles.append(h)
            self._hook_handles.append(model.register_forward_pre_hook(
                self._model_pre_hook, with_kwargs=True))
            self._hook_handles.append(model.register_forward_hook(self._model_post_hook))
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
        self._flush_observations()        # routers called on their own, or a failed forward
        mask = None
        if self.mask_padding:
            mask = kwargs.get("attention_mask")
            if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
                mask = args[self._mask_pos]
        self._valid_N = mask.reshape(-1) if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            else None
        self._records = [None] * self.num_layers
        return None

    def _model_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._flush_observations()
        return None

    def _observing(self, router: nn.Module) -> bool:
        if not (router.training or self.observe_in_eval):
            return False
        # A forward re-run by activation checkpointing happens inside backward; the original
        # forward already observed these tokens.
        return torch._C._current_graph_task_id() == -1

    @torch.no_grad()
    def _flush_observations(self) -> None:
        """Add the routing recorded since the last flush to the controller's pending
        observation: per expert, the top-k slot counts and gate sums (M = N·K routed slots),
        into rows 0 and 1 of ``observation_buffer()`` [3, L, E], the sums ``controller.observe``
        would add. A forward's L layers go in together (two scatter-adds), the same sums in the
        same order as one ``index_add_`` per layer, which is the fallback (e.g. for a router
        called twice)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        acc_3LE, counts_LE, counts_L, wsum_L = self._acc_rows()
        idx0, valid0 = pending[0][1], pending[0][3]
        if [p[0] for p in pending] == list(range(self.num_layers)) \
                and all(p[1].shape == idx0.shape and p[3] is valid0 for p in pending):
            L, M = len(pending), idx0.numel()
            idx_LM = torch.stack([p[1] for p in pending]).view(L, M)
            gate_LM = torch.stack([p[2] for p in pending]).view(L, M).to(acc_3LE.dtype)
            w_M, masked = self._slot_weights(valid0, idx0.shape[-1], M, acc_3LE)
            if masked:
                gate_LM = gate_LM * w_M
            counts_LE.scatter_add_(1, idx_LM, w_M.expand(L, M))
            acc_3LE[1].scatter_add_(1, idx_LM, gate_LM)
            return
        for layer, idx_NK, gate_NK, valid_N in pending:
            idx_M = idx_NK.reshape(-1)
            gate_M = gate_NK.reshape(-1).to(acc_3LE.dtype)
            w_M, masked = self._slot_weights(valid_N, idx_NK.shape[-1], idx_M.numel(), acc_3LE)
            if masked:
                gate_M = gate_M * w_M
            counts_L[layer].index_add_(0, idx_M, w_M)
            wsum_L[layer].index_add_(0, idx_M, gate_M)

    def _slot_weights(self, valid_N: torch.Tensor | None, K: int, M: int, like: torch.Tensor
                      ) -> tuple[torch.Tensor, bool]:
        """([M] what each routed slot adds to its expert's count, whether it is a mask): 1 per
        slot (a cached row of ones), or with a padding mask of N = M / K tokens, the mask
        repeated for each token's K slots (0 for padding)."""
        if valid_N is not None and valid_N.numel() * K == M:
            return valid_N.to(like.device, like.dtype).repeat_interleave(K), True
        ones = self._ones_M
        if ones is None or ones.shape[0] != M or ones.device != like.device \
                or ones.dtype != like.dtype:
            ones = self._ones_M = torch.ones(M, dtype=like.dtype, device=like.device)
        return ones, False

    def _acc_rows(self) -> tuple:
        """(observation buffer, its counts row [L, E], per-layer count rows, per-layer gate-sum
        rows): views cached while the controller keeps the same buffer (no per-call selects)."""
        acc_3LE = self.controller.observation_buffer()
        cached = self._acc_cache
        if cached is None or cached[0] is not acc_3LE:
            counts_LE = acc_3LE[0]
            cached = self._acc_cache = (acc_3LE, counts_LE, counts_LE.unbind(0),
                                        acc_3LE[1].unbind(0))
        return cached

    def routing_output(self, logits: torch.Tensor | None = None) -> "RoutingRecord":
        """The routing of the last forward (needs ``record_routing=True``), shaped like our
        model's output for ``ChronoMoELoss``: ``router_logits`` (modified, differentiable),
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
    def _is_distributed(self) -> bool:
        if self.distributed is False:
            return False
        return _dist.is_distributed(self.process_group)

    @property
    def observation_buffer(self) -> torch.Tensor:
        """The pending observation [3, L, E] (counts, gate sums, loss sums) the next tick uses."""
        self._flush_observations()
        return self.controller.observation_buffer()

    @torch.no_grad()
    def tick(self) -> None:
        """One controller step on the observation gathered since the last tick, summed over the
        data-parallel ranks first. No host sync."""
        self._flush_observations()
        acc_3LE, counts_LE, _, _ = self._acc_rows()
        if self._is_distributed():
            _dist.all_reduce_observation(acc_3LE, self.process_group)
        self.load_LE.add_(counts_LE)
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

    @torch.no_grad()
    def pop_load(self) -> torch.Tensor:
        """Slot counts per (layer, expert) summed over the ticks since the last call; resets."""
        load = self.load_LE.clone()
        self.load_LE.zero_()
        return load

    def metrics(self) -> dict[str, Any]:
        """The controller's side of one run-metrics record (docs/CONTRACTS.md, "Run metrics
        (JSONL)"): R, dR, kappa, tbar_variance (global), tbar_variance_local (mean over layers),
        valleys/ridges (global landscape), tbar_local_LE, tbar_global_E, and, when ticks happened
        since the last call, load_LE (each layer's share of the top-k slots over those ticks),
        maxvio (mean over layers of (max load − mean load)/mean load) and maxvio_L (per layer).
        Syncs with the device: call it on the logging cadence. Resets the load window."""
        c = self.controller
        diag = c.get_structural_temperature_diagnostics()
        st = c.to_reference_state()
        rec: dict[str, Any] = {
            "R": st.R, "dR": st.dR, "kappa": st.kappa,
            "tbar_variance": diag["variance"], "tbar_variance_local": diag["local_variance_mean"],
            "valleys": [int(i) for i in diag["valleys"]],
            "ridges": [int(i) for i in diag["ridges"]],
            "landscape_formed": bool(diag["formed"]), "skipped_ticks": diag["skipped_ticks"],
            "tbar_local_LE": st.Tbar_local_LE.tolist(), "tbar_global_E": st.Tbar_global_E.tolist(),
        }
        load_LE = self.pop_load().to("cpu", torch.float64)
        total_L1 = load_LE.sum(-1, keepdim=True)
        if bool((total_L1 > 0).any()):
            mean_L1 = total_L1 / self.num_experts
            share_LE = torch.where(total_L1 > 0, load_LE / total_L1, torch.nan)
            maxvio_L = torch.where(total_L1[:, 0] > 0,
                                   (load_LE.amax(-1) - mean_L1[:, 0]) / mean_L1[:, 0], torch.nan)
            rec["load_LE"] = share_LE.tolist()
            rec["maxvio_L"] = maxvio_L.tolist()
            rec["maxvio"] = float(maxvio_L.nanmean())
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
        self._pending = []
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
            raise AttachError(f"attach state format_version={version!r}; this version reads "
                              f"{ATTACH_FORMAT_VERSION}")
        shape = (state.get("num_layers"), state.get("num_experts"))
        if shape != (self.num_layers, self.num_experts):
            raise AttachError(f"attach state is for (layers, experts)={shape}, this attachment "
                              f"has {(self.num_layers, self.num_experts)}")
        routers = list(state.get("routers", []))
        if routers != self.router_names:
            raise AttachError(f"attach state routers {routers} differ from this attachment's "
                              f"{self.router_names}")
        self.controller.load_state_dict(state["controller"])
        self._pending = []
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
                  top_k: int | None, renormalize: bool, route_fn: RouteFn | None
                  ) -> list[_RouterPlan]:
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
            plans.append(_RouterPlan(name, m, int(m.num_experts),
                                     route_fn or SUPPORTED_ROUTERS[type(m).__name__], "hf"))
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
                plans.append(_RouterPlan(names[id(m)], m, E,
                                         route_fn or SUPPORTED_ROUTERS[type(m).__name__], "hf"))
                continue
            k = _top_k_of(m, top_k)
            if k is None and route_fn is None:
                raise AttachError(f"attach: cannot tell the top-k of {names[id(m)]} "
                                  f"({type(m).__name__}: no top_k attribute); pass top_k=")
            route = route_fn or _route_generic(k, renormalize)
            plans.append(_RouterPlan(names[id(m)], m, E, route, "generic"))
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
           num_experts: int | None = None,
           top_k: int | None = None,
           renormalize: bool = True,
           route_fn: RouteFn | None = None,
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
    has its gates and indices recomputed from the modified logits (softmax → top-k → renormalise
    if ``renormalize``, or ``route_fn(module, logits_NE) -> (gates_NK, idx_NK)``); for any
    other output only the logits are replaced and the model routes from them itself (``top_k``
    is then needed to observe the selection, read from the module's ``top_k`` if not given).
    Layers are the routers in module order.

    ``controller_config`` / ``seed`` / ``dtype`` / ``device`` build a new ``PxTController``
    (device: the first router's); or pass a ready ``controller`` of the right shape.
    ``num_experts``: the expert count you expect (checked against every router).
    ``optimizer``: register the tick as its step pre-hook. ``mask_padding``: leave padding
    out of the observation. ``observe_in_eval``: observe in eval mode too.
    ``record_routing``: keep the last forward's routing for ``routing_output()`` (the loss).
    ``distributed``: all-reduce observations across ranks (None: when a process group is up).

    Raises ``AttachError`` (nothing installed) for: no router, an expert-count mismatch, a
    router already attached, a controller of the wrong shape, an optimizer without step hooks.
    """
    if not isinstance(model, nn.Module):
        raise AttachError(f"attach: model is a {type(model).__name__}, expected an nn.Module")
    plans = _plan_routers(model, routers, num_experts, top_k, renormalize, route_fn)
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
    handle = AttachHandle(model, controller, plans, mask_padding=mask_padding,
                          observe_in_eval=observe_in_eval, record_routing=record_routing,
                          process_group=process_group, distributed=distributed)
    if optimizer is not None:
        handle.register_optimizer(optimizer)  # validated before any module hook goes in
    try:
        handle._install(model)
    except Exception:
        handle.detach()
        raise
    return handle
