"""``PxTController``: the chronomoe_dyn P×T control law v2 on torch tensors (DESIGN.md §3 v2,
docs/CONTRACTS.md "Version 2 contracts").

Shape legend: L layers, E experts, N = L·E oscillators, H history length, F the width of one
layer's observation row (4E + 2). Suffixes name shapes.

The law is the NumPy reference's (``chronomoe_dyn.law.step``), ported op for op so that the same
observation sequence gives the same state (float64 ≤ 1e-10, float32 ≤ 1e-5; tested). The state is
a set of persistent buffers named after the ``ControllerState`` fields, so ``state_dict`` is a
complete checkpoint of the controller and ``to_reference_state``/``load_reference_state`` convert
at one boundary. This module holds the state, the routing fields, κ and the torch plumbing; the
pieces with their own idea live beside it: the tick (``_tick``), the observation intake
(``_observation``), the host-side diagnostics (``_diagnostics``) and the routing noise's keys
(``_noise``).

Training-loop contract (one path for the native model and attached models):
  * router calls add their routing (``observe_stats``: the row of ``routing.route``; or
    ``observe``/``observe_all``) and the loss adds token-loss sums (``observe_loss*``) to ONE flat
    device buffer [L, F] per layer: counts [E] | gate sums [E] | Σ logit std | tokens |
    noiseless counts [E] | loss sums [E] (detached, no host sync). The noiseless counts (law
    v2.1) are the top-k slots of the score without the exploration noise: usage, drift and
    pressure read them (the controller corrects the router's choice, not the balance the noise
    lends it), reliability reads the routed counts; without noise they equal the counts;
  * ``tick()`` runs once per optimizer step (``register_on``: an optimizer step pre-hook). It
    first sums the buffer over the data-parallel ranks when a process group with more than one
    rank is initialised (one ``all_reduce`` of the whole buffer; ``set_distributed`` disables it
    or picks a group), so every rank ticks on the global batch and the controllers stay bitwise
    equal; then it steps the law and clears the buffer;
  * the routers read ``layer_fields(i)`` (bias, temperature, σ_L floored, τ, 1/(σ_L·T)) and, in
    training, ``noise_key(i, N)`` (the Gumbel noise key of a call of N tokens, see ``_noise``).
    The field buffers are updated in place after ``tick()`` and ``set_knob()``: the routing
    reads them without autograd (v2 gates come from the raw logits), so no graph holds them,
    and the per-layer views are made once instead of after every tick.

No host–device sync in ``observe*``, ``tick``, ``layer_fields``, ``noise_key``, ``coherence`` or
``set_knob(tensor)``: clock decisions use a host mirror of the tick counter (it counts ``tick()``
calls; ``load_state_dict`` re-syncs it), data-dependent choices use ``torch.where``/``clamp``,
and the phase and routing noise are the counter-based hash of ``chronomoe_dyn.rng``.
Diagnostics (``get_*``, ``to_reference_state``) do sync: call them on the logging cadence.

Bad input: wrong shapes or layer indices raise ``ValueError`` at ``observe*`` time. Values
cannot be inspected on the host without a sync, so ``tick()`` checks the accumulated observation
on the device: if any value is non-finite or negative, or large enough that a layer's sum or a
mean loss per token would overflow, or a layer's noiseless counts do not sum to its counts'
total (relative 1e-6; what ``chronomoe_dyn.validate_observation`` rejects; the bounds are those
of ``dtype``), the tick leaves the law state (phases, usage, reliability, σ_L,
temperatures, lens, κ) untouched and increments ``skipped_ticks``. The clock (``tick_counter``)
still advances: it counts optimizer steps, and the host mirror must equal it without a sync. A
skipped tick is therefore the reference state with ``tick + 1``.

Precision. The phase subsystem (θ, ω_disorder, R, ψ, ΔR, the usage EMA u and its drift δ) is
always float64: the phases integrate α·dt·δ every tick, and a persistent rounding bias of u is
amplified into a phase error that grows linearly with time (measured with an all-float32 port in
v1: 4e-5 rad after 120 ticks at L = 3, E = 8, past the 1e-5 equivalence bound and growing).
These tensors are [L, E]: float64 costs nothing measurable (the tick is latency bound). ``dtype``
sets the precision of everything else (reliability, σ_L, pressure, lens, T_fast, T̄_local,
T̄_global, T_eff, κ, the observation, histories). In float32 (default) a slow EMA of rate η stops
moving once |input − T̄| < ulp(T̄)/(2η) ≈ 1.2e-5 for T̄_global (η_g = 0.005): float32 cannot
resolve landscape differences below ~1e-5, far below the variance 0.01 that defines a formed
landscape. Use float64 to replay a run against the reference over long horizons. Devices without
float64 (MPS) are not supported. The dtype of every buffer is fixed at construction:
``Module.to(dtype)``/``.half()`` move the controller between devices but keep its dtypes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from chronomoe_dyn import ControllerConfig, ControllerState, init_state
from chronomoe_dyn.law import check_kappa

from . import _tick
from . import distributed as _dist
from ._diagnostics import DiagnosticsMixin
from ._noise import NoiseKey, NoiseKeys
from ._observation import ObservationMixin
from .routing import LayerFields

__all__ = ["PxTController"]

# State buffers: name -> (shape, precision). Names match ControllerState fields. "phase" buffers
# are always float64 (see the module docstring); "state" buffers use the controller's dtype.
_STATE_FIELDS = {
    "theta_LE": ("LE", "phase"), "omega_disorder_LE": ("LE", "phase"), "R": ("", "phase"),
    "psi": ("", "phase"), "dR": ("", "phase"), "usage_LE": ("LE", "phase"),
    "reliability_LE": ("LE", "state"), "delta_LE": ("LE", "phase"),
    "pressure_LE": ("LE", "state"), "lens_LE": ("LE", "state"), "T_fast_LE": ("LE", "state"),
    "Tbar_local_LE": ("LE", "state"), "Tbar_global": ("", "state"),
    "T_eff_LE": ("LE", "state"), "logit_scale_L": ("L", "state"), "kappa": ("", "state"),
}
PHASE_DTYPE = torch.float64


def _sync_after_load(module: "PxTController", incompatible_keys: Any) -> None:
    module._sync_host_mirrors()


class PxTController(ObservationMixin, DiagnosticsMixin, nn.Module):
    """The P×T routing controller as an ``nn.Module`` whose state is persistent buffers.

    Args:
        num_layers: L, MoE layers controlled.
        num_experts: E, experts per layer.
        config: the law's constants (``chronomoe_dyn.ControllerConfig``).
        seed: key of the initial phases/frequency disorder, the phase noise and the routing
            noise, in [0, 2³²).
        dtype: state precision, torch.float32 (default) or torch.float64 (see module docstring).
        device: where the state lives (the model's device).
        history_length: H, length of the on-device ring buffers ``coherence_history`` and
            ``meta_knob_history`` (one entry per tick).
    """

    def __init__(self, num_layers: int, num_experts: int,
                 config: ControllerConfig = ControllerConfig(), seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 history_length: int = 10_000) -> None:
        super().__init__()
        if not isinstance(config, ControllerConfig):
            raise ValueError(f"config must be a ControllerConfig, got {type(config).__name__}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r}: allowed values are torch.float32, torch.float64")
        if isinstance(history_length, bool) or not isinstance(history_length, int) \
                or history_length < 1:
            raise ValueError(f"history_length={history_length!r}: expected an integer >= 1")
        ref = init_state(config, num_layers, num_experts, seed)  # validates L, E, seed
        self.config = config
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.history_length = history_length
        self.dtype = dtype
        L, E = self.num_layers, self.num_experts
        fkw = {"dtype": dtype, "device": device}

        # Persistent state (what a checkpoint keeps).
        self.register_buffer("tick_counter", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64, device=device))
        for name, (shape, prec) in _STATE_FIELDS.items():
            size = {"LE": (L, E), "L": (L,), "": ()}[shape]
            self.register_buffer(name, torch.zeros(
                size, dtype=PHASE_DTYPE if prec == "phase" else dtype, device=device))
        self.register_buffer("kappa_target", torch.zeros((), **fkw))
        self.register_buffer("skipped_ticks", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("coherence_history", torch.zeros(history_length, **fkw))
        self.register_buffer("meta_knob_history", torch.zeros(history_length, **fkw))

        # The observation: one flat buffer (one all-reduce), not checkpointed.
        self.register_buffer("_obs_LF", torch.zeros((L, 4 * E + 2), **fkw), persistent=False)
        self.register_buffer("_has_loss_L", torch.zeros(L, dtype=torch.bool, device=device),
                             persistent=False)
        # Router fields, float32, updated in place by _refresh_fields.
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("_bias_LE", torch.zeros((L, E), **f32), persistent=False)
        self.register_buffer("_temperature_LE", torch.ones((L, E), **f32), persistent=False)
        self.register_buffer("_scale_L", torch.ones(L, **f32), persistent=False)
        self.register_buffer("_tau", torch.zeros((), **f32), persistent=False)
        self.register_buffer("_inv_LE", torch.ones((L, E), **f32), persistent=False)
        self._buffer_dtypes = {name: buf.dtype for name, buf in self._buffers.items()}
        self._kernel = _tick.TickKernel(self)
        self._field_rows: tuple | None = None

        # Host-side mirrors (deterministic; re-synced from the buffers on load).
        self._tick_host = 0
        self._seed_host = int(seed)
        self._loss_layers: set[int] = set()
        self._noise = NoiseKeys(L, E)   # the routing noise's host-side keys (``_noise``)
        self._obs_rows: tuple | None = None
        self._hook_handles: dict[int, RemovableHandle] = {}
        self.distributed: bool | None = None
        self.process_group = None
        self.register_load_state_dict_post_hook(_sync_after_load)
        self.load_reference_state(ref)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.theta_LE.device

    @property
    def eta_structural_T_global(self) -> float:
        """η_g, EMA rate of T̄_global per micro tick (from the config)."""
        return self.config.eta_structural_T_global

    @property
    def eta_structural_T_local(self) -> float:
        """η_l, EMA rate of T̄_local per micro tick (from the config)."""
        return self.config.eta_structural_T_local

    @property
    def num_ticks(self) -> int:
        """Ticks taken (host mirror of the ``tick_counter`` buffer; no sync)."""
        return self._tick_host

    def _check_layer(self, layer: Any) -> int:
        L = self.num_layers
        if type(layer) is int and 0 <= layer < L:      # the common case, on every router call
            return layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not -L <= layer < L:
            raise ValueError(f"layer={layer!r}: expected an integer in [0, {L})")
        return int(layer) % L

    # ------------------------------------------------------------------ the tick
    def set_distributed(self, enabled: bool | None = None, process_group: Any = None) -> None:
        """Data-parallel reduction of the observation before each tick: None (default) when a
        process group with more than one rank is initialised, False never, True always (an
        error outside torch.distributed is torch's). ``process_group``: the ranks to sum over
        (default: the world)."""
        if enabled not in (None, True, False):
            raise ValueError(f"set_distributed: enabled={enabled!r}: expected None, True, False")
        self.distributed, self.process_group = enabled, process_group
        self._noise.distributed, self._noise.process_group = enabled, process_group
        self._noise.invalidate()

    def _reduce_observation(self) -> None:
        if self.distributed is False:
            return
        if self.distributed or _dist.is_distributed(self.process_group):
            _dist.all_reduce_observation(self._obs_LF, self.process_group)

    @torch.no_grad()
    def tick(self) -> None:
        """One control step on the observation accumulated since the last tick (summed over the
        data-parallel ranks first, see ``set_distributed``), with the κ set by ``set_knob``.
        No host sync. Clears the observation."""
        self._reduce_observation()
        t = self._tick_host + 1
        refresh_all = self._kernel.step(t)
        self._tick_host = t
        self._noise.start(self._seed_host, t)
        self.clear_observations()
        self._refresh_fields(refresh_all)

    # ------------------------------------------------------------------ outputs
    def _refresh_fields(self, all_fields: bool = True) -> None:
        """Recompute the router fields from the state and the κ in effect, in place: σ_L always
        (it moves every tick), bias/temperature/τ when ``all_fields``, and 1/(σ_L·T)."""
        b = self._buffers
        floor = self.config.logit_scale_floor
        if self.dtype == torch.float32:                 # the fields are float32
            torch.clamp(b["logit_scale_L"], min=floor, out=b["_scale_L"])
        else:
            b["_scale_L"].copy_(torch.clamp(b["logit_scale_L"], min=floor))
        if all_fields:
            bias, temp, tau = self._kernel.fields(b["kappa"])
            b["_bias_LE"].copy_(bias)
            b["_temperature_LE"].copy_(temp)
            b["_tau"].copy_(tau)
        # 1/(σ_L·T): the router's score in one fused op (routing.LayerFields).
        torch.mul(b["_scale_L"].unsqueeze(1), b["_temperature_LE"], out=b["_inv_LE"])
        b["_inv_LE"].reciprocal_()

    def routing_fields(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias_LE, temperature_LE, scale_L, tau), float32 (``chronomoe_dyn.routing_fields``'s
        ``RoutingFields``): the router scores (z − mean z)/scale/temperature + bias + tau·g.
        Live buffers, updated in place by ticks and ``set_knob`` (clone to keep a snapshot)."""
        return self._bias_LE, self._temperature_LE, self._scale_L, self._tau

    def layer_fields(self, layer: int) -> LayerFields:
        """One layer's ``routing.LayerFields``: views of the live field buffers, made once (no
        op per router call or per tick; no sync)."""
        li = self._check_layer(layer)
        b = self._buffers
        bias, temp, scale, tau = b["_bias_LE"], b["_temperature_LE"], b["_scale_L"], b["_tau"]
        inv = b["_inv_LE"]
        rows = self._field_rows
        if rows is None or rows[0] is not bias or rows[1] is not temp or rows[2] is not scale \
                or rows[3] is not tau or rows[4] is not inv:
            # One unbind per refresh instead of selects on every router call.
            rows = self._field_rows = (bias, temp, scale, tau, inv, [
                LayerFields(bi, ti, si, tau, vi) for bi, ti, si, vi in
                zip(bias.unbind(0), temp.unbind(0), scale.unbind(0), inv.unbind(0))])
        return rows[5][li]

    def noise_key(self, layer: int, num_tokens: int) -> NoiseKey | None:
        """The Gumbel noise key of a router call of ``num_tokens`` tokens (None when τ₀ = 0: no
        noise): keyed on (seed, tick, layer) and the tokens' positions among those the layer
        routed since the tick, interleaved over data-parallel ranks (``routing``). A call inside
        backward (activation-checkpoint recompute) repeats the key of the layer's last forward.
        The draws come with the key: the first layer asking at a given (offset, N) draws every
        layer's (one pass instead of L; the layers of a forward see the same tokens), up to
        ``_noise.NOISE_BATCH_MAX`` values; a call that does not fit draws its own in ``route``."""
        if self.config.exploration_tau0 == 0.0:
            return None
        return self._noise.key(self._check_layer(layer), int(num_tokens), self.device)

    def coherence(self) -> torch.Tensor:
        """Kuramoto coherence R after the last tick, a 0-d tensor (a copy; no sync)."""
        return self.R.clone()

    # ------------------------------------------------------------------ meta-knob
    def set_knob(self, kappa: float | torch.Tensor) -> None:
        """Set the target κ ∈ [-1, 1] that the next ``tick()`` applies (through the config's
        ``kappa_smoothing``, the one κ smoothing of the system). Without smoothing (rate 1) κ
        also takes effect immediately in the fields; with smoothing it moves only at ticks.

        A Python number is validated (ValueError outside [-1, 1] or non-finite). A tensor is
        used without a sync: clamped to [-1, 1]; a non-finite tensor leaves the target as it was.
        """
        if isinstance(kappa, torch.Tensor):
            if kappa.numel() != 1:
                raise ValueError(f"set_knob: kappa tensor has shape {tuple(kappa.shape)}, "
                                 f"expected a single value")
            k = kappa.detach().reshape(()).to(device=self.device, dtype=self.dtype)
            new = torch.where(torch.isfinite(k), torch.clamp(k, -1.0, 1.0), self.kappa_target)
            self.kappa_target.copy_(new)
        else:
            self.kappa_target.fill_(check_kappa(kappa))
        if self.config.kappa_smoothing == 1.0:
            self.kappa.copy_(self.kappa_target)
            self._refresh_fields()

    # ------------------------------------------------------------------ reference boundary
    def to_reference_state(self) -> ControllerState:
        """The state as a ``chronomoe_dyn.ControllerState`` (float64 NumPy; syncs)."""
        kw: dict[str, Any] = {}
        for name, (shape, _) in _STATE_FIELDS.items():
            v = getattr(self, name).detach().to("cpu", torch.float64).numpy().copy()
            kw[name] = float(v) if shape == "" else v
        return ControllerState(tick=int(self.tick_counter), seed=int(self.seed), **kw)

    @torch.no_grad()
    def load_reference_state(self, state: ControllerState) -> None:
        """Overwrite the state with a ``ControllerState`` of the same shape. The target κ is
        set to the state's κ; the observation is cleared; histories are left as they are."""
        if not isinstance(state, ControllerState):
            raise ValueError(f"expected a ControllerState, got {type(state).__name__}")
        want = (self.num_layers, self.num_experts)
        if (state.num_layers, state.num_experts) != want:
            raise ValueError(f"ControllerState has (layers, experts)="
                             f"{(state.num_layers, state.num_experts)}, expected {want}")
        for name in _STATE_FIELDS:
            buf = getattr(self, name)
            val = torch.as_tensor(np.asarray(getattr(state, name), dtype=np.float64))
            if tuple(val.shape) != tuple(buf.shape):
                raise ValueError(f"ControllerState.{name} has shape {tuple(val.shape)}, "
                                 f"expected {tuple(buf.shape)}")
            buf.copy_(val.to(device=buf.device, dtype=buf.dtype))
        self.kappa_target.copy_(self.kappa)
        self.tick_counter.fill_(int(state.tick))
        self.seed.fill_(int(state.seed))
        self.clear_observations()
        self._sync_host_mirrors()

    def _sync_host_mirrors(self) -> None:
        """Re-read the host mirrors from the buffers (one sync; after loading only)."""
        self._tick_host = int(self.tick_counter)
        self._seed_host = int(self.seed)
        self._noise.start(self._seed_host, self._tick_host)
        self._refresh_fields()

    # ------------------------------------------------------------------ torch plumbing
    def register_on(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Tick in ``optimizer``'s step pre-hook (torch's own hook API); returns the handle.

        Register it on the outermost optimizer (a ``CoherenceGatedOptimizer``, not the one it
        wraps) so the tick runs before the gate reads R."""
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise ValueError(f"register_on: {type(optimizer).__name__} has no "
                             f"register_step_pre_hook (expected a torch.optim.Optimizer)")
        key = id(optimizer)
        old = self._hook_handles.get(key)
        if old is not None:
            live = old.hooks_dict_ref()
            if live is not None and old.id in live:
                raise ValueError("register_on: the controller already ticks on this optimizer")

        def _tick_pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.tick()

        handle = optimizer.register_step_pre_hook(_tick_pre_hook)
        self._hook_handles[key] = handle
        return handle

    def remove_hooks(self) -> None:
        """Remove every optimizer hook ``register_on`` installed."""
        for h in self._hook_handles.values():
            h.remove()
        self._hook_handles.clear()

    def _apply(self, fn: Any, recurse: bool = True) -> "PxTController":
        # Move buffers with fn (device changes) but keep each buffer's dtype fixed.
        for name, buf in list(self._buffers.items()):
            if buf is None:
                continue
            out = fn(buf)
            want = self._buffer_dtypes.get(name, buf.dtype)
            if out.dtype != want:
                out = buf.to(device=out.device, dtype=want)
            self._buffers[name] = out
        self._kernel.invalidate()
        self._noise.invalidate()
        return self

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_experts={self.num_experts}, "
                f"dtype={self.dtype}, history_length={self.history_length}, "
                f"tick={self._tick_host}")
