"""``PxTController``: the chronomoe_dyn P×T control law on torch tensors (DESIGN.md §3).

Shape legend: L layers, E experts, N = L·E oscillators, H history length. Suffixes name shapes.

The law is the NumPy reference's (``chronomoe_dyn.law.step``), ported op for op so that the same
observation sequence gives the same state (float64 ≤ 1e-10, float32 ≤ 1e-5; tested). The state is
a set of persistent buffers named after the ``ControllerState`` fields, so ``state_dict`` is a
complete checkpoint of the controller and ``to_reference_state``/``load_reference_state`` convert
at one boundary.

Training-loop contract:
  * forward passes call ``observe``/``observe_all``/``observe_loss``: detached, on-device
    accumulation into non-persistent buffers (no host sync);
  * ``tick()`` runs once per optimizer step, in an optimizer step pre-hook (``register_on``), on
    the summed observation of all micro-batches since the last tick, then clears it;
  * the router reads ``routing_fields()``/``layer_fields(i)``: float32 tensors recomputed after
    ``tick()`` and ``set_knob()``. They are fresh tensors each time (never modified in place), so
    a forward pass that saved them for backward is never invalidated by a tick.

No host–device sync in ``observe*``, ``tick``, ``routing_fields``, ``coherence`` or
``set_knob(tensor)``: the micro/macro clock decisions use a host-side Python mirror of the tick
counter (deterministic: it counts ``tick()`` calls, and ``load_state_dict`` re-syncs it from the
buffer), data-dependent choices use ``torch.where``/``clamp``, and the phase noise is the
counter-based hash of ``chronomoe_dyn.rng`` keyed on (seed, STREAM_PHASE, tick, l·E + e).
Diagnostics (``get_*``, ``to_reference_state``) do sync: call them on the logging cadence.

Bad input: wrong shapes or layer indices raise ``ValueError`` at ``observe*`` time. Values
cannot be inspected on the host without a sync, so ``tick()`` checks the accumulated observation
on the device: if any value is non-finite or negative, or large enough that a layer's sum or a
mean loss per token would overflow (what ``chronomoe_dyn.validate_observation`` rejects; the
bounds are those of ``dtype``), the tick leaves the law state (phases, usage, reliability,
temperatures, lens, κ) untouched and increments ``skipped_ticks``. The clock (``tick_counter``)
still advances: it counts optimizer steps, and the host mirror must equal it without a sync. A
skipped tick is therefore the reference state with ``tick + 1``.

Precision. The phase subsystem (θ, ω_disorder, R, ψ, ΔR, the usage EMA u and its drift δ) is
always float64: the phases integrate α·dt·δ every tick and Σδ telescopes to E·(u_T − u_0)/(1−ρ),
so a persistent rounding bias of u is amplified by E·α·dt/(1−ρ) (80 at E = 8, 640 at E = 64)
into a phase error that grows linearly with time. Measured with an all-float32 port: 4e-5 rad
after 120 ticks at L = 3, E = 8, past the 1e-5 equivalence bound and growing. These tensors are
[L, E]: float64 costs nothing measurable (the tick is latency bound). ``dtype`` sets the
precision of everything else (reliability, pressure, lens, T_fast, T̄_local, T̄_global, T_eff, κ,
accumulators, histories). In float32 (default) T̄ stays within ~2e-6 and T_eff within ~7e-6 of
the float64 reference over 10⁴ ticks (measured, L = 4, E = 16): a float32 EMA of rate η stops
moving once |input − T̄| < ulp(T̄)/(2η) ≈ 1.2e-5 for T̄_global (η_g = 0.005), so float32
cannot resolve landscape differences below ~1e-5, far below the variance 0.01 that defines a
formed landscape. Use float64 to replay a run against the reference over long horizons or to
study tiny landscape differences. Devices without float64 (MPS) are not supported. The dtype of
every buffer is fixed at construction: ``Module.to(dtype)``/``.half()`` move the controller
between devices but keep its dtypes (a bf16 controller would lose the slow EMAs entirely).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from chronomoe_dyn import ControllerConfig, ControllerState, init_state
from chronomoe_dyn.landscape import state_landscape, valley_health
from chronomoe_dyn.law import (DRIFT_EPS, LENS_DR_GAIN, TEMPERATURE_MAX, TEMPERATURE_MIN,
                               TWO_PI, check_kappa, knob_factors)
from chronomoe_dyn.rng import STREAM_PHASE

from . import _rng

__all__ = ["PxTController"]

# State buffers: name -> (shape, precision). Names match ControllerState fields. "phase" buffers
# are always float64 (see the module docstring); "state" buffers use the controller's dtype.
_STATE_FIELDS = {
    "theta_LE": ("LE", "phase"), "omega_disorder_LE": ("LE", "phase"), "R": ("", "phase"),
    "psi": ("", "phase"), "dR": ("", "phase"), "usage_LE": ("LE", "phase"),
    "reliability_LE": ("LE", "state"), "delta_LE": ("LE", "phase"),
    "pressure_LE": ("LE", "state"), "lens_LE": ("LE", "state"), "T_fast_LE": ("LE", "state"),
    "Tbar_local_LE": ("LE", "state"), "Tbar_global_E": ("E", "state"),
    "T_eff_LE": ("LE", "state"), "kappa": ("", "state"),
}
PHASE_DTYPE = torch.float64
_BELOW_TWO_PI = float(np.nextafter(TWO_PI, 0.0))   # x ≥ 2π ⟺ x > this
_ACC_COUNTS, _ACC_WSUM, _ACC_LOSS = 0, 1, 2


def _ema(old: torch.Tensor, new: torch.Tensor, rate: float) -> torch.Tensor:
    """(1 − rate)·old + rate·new, clamped to the hull of old and new (as the reference).

    Where ``new`` equals ``old`` the result is ``old`` exactly (the hull is a point): the tick
    uses that to leave entries unchanged without a separate ``where``."""
    out = old * (1.0 - rate) + new * rate
    return torch.clamp(out, torch.minimum(old, new), torch.maximum(old, new))


def _sync_after_load(module: "PxTController", incompatible_keys: Any) -> None:
    module._sync_host_mirrors()


class PxTController(nn.Module):
    """The P×T routing controller as an ``nn.Module`` whose state is persistent buffers.

    Args:
        num_layers: L, MoE layers controlled.
        num_experts: E, experts per layer.
        config: the law's constants (``chronomoe_dyn.ControllerConfig``).
        seed: key of the initial phases/frequency disorder and of the phase noise, in [0, 2³²).
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
            size = {"LE": (L, E), "E": (E,), "": ()}[shape]
            self.register_buffer(name, torch.zeros(
                size, dtype=PHASE_DTYPE if prec == "phase" else dtype, device=device))
        self.register_buffer("kappa_target", torch.zeros((), **fkw))
        self.register_buffer("skipped_ticks", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("coherence_history", torch.zeros(history_length, **fkw))
        self.register_buffer("meta_knob_history", torch.zeros(history_length, **fkw))

        # Per-step scratch, not checkpointed.
        self.register_buffer("_acc_FLE", torch.zeros((3, L, E), **fkw), persistent=False)
        self.register_buffer("_acc_has_loss_L", torch.zeros(L, dtype=torch.bool, device=device),
                             persistent=False)
        idx = torch.arange(L * E, dtype=torch.int64, device=device)
        self.register_buffer("_noise_index_2N", torch.stack([idx * 2, idx * 2 + 1]),
                             persistent=False)
        self.register_buffer("_bias_LE", torch.zeros((L, E), dtype=torch.float32, device=device),
                             persistent=False)
        self.register_buffer("_temperature_LE",
                             torch.ones((L, E), dtype=torch.float32, device=device),
                             persistent=False)
        # Constants of the tick (0-d, so a where() takes them without a scalar→tensor kernel).
        self.register_buffer("_inf", torch.full((), math.inf, **fkw), persistent=False)
        self.register_buffer("_inf64", torch.full((), math.inf, dtype=PHASE_DTYPE, device=device),
                             persistent=False)
        self.register_buffer("_zero64", torch.zeros((), dtype=PHASE_DTYPE, device=device),
                             persistent=False)
        self.register_buffer("_beta_pt_2", torch.tensor(
            [config.beta_pressure, config.beta_temperature], **fkw), persistent=False)
        self._buffer_dtypes = {name: buf.dtype for name, buf in self._buffers.items()}
        # Accepted entries are < finfo.max / E (E·entry < max: a layer's sum stays finite),
        # checked as x ≤ the largest value of ``dtype`` below that bound.
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        bound = np_dtype(torch.finfo(dtype).max / E)
        self._max_entry_incl = float(np.nextafter(bound, np_dtype(0)))
        self._tiny = float(torch.finfo(dtype).tiny)
        self._acc_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._drive0_key: tuple[torch.Tensor, int] | None = None
        self._drive0_val: torch.Tensor | None = None
        self._field_rows: tuple | None = None

        # Host-side mirrors (deterministic; re-synced from the buffers on load).
        self._tick_host = 0
        self._seed_host = int(seed)
        self._loss_layers: set[int] = set()
        self._hook_handles: dict[int, RemovableHandle] = {}
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

    # ------------------------------------------------------------------ observations
    def _check_layer(self, layer: Any) -> int:
        L = self.num_layers
        if type(layer) is int and 0 <= layer < L:      # the common case, on every router call
            return layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not -L <= layer < L:
            raise ValueError(f"layer={layer!r}: expected an integer in [0, {L})")
        return int(layer) % L

    def _as_obs(self, x: Any, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if tuple(x.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {shape}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} has dtype {x.dtype}, expected a real number type")
        return x.detach().to(device=self._acc_FLE.device, dtype=self.dtype)

    def observe(self, layer: int, counts_E: torch.Tensor, weight_sum_E: torch.Tensor,
                loss_sum_E: torch.Tensor | None = None) -> None:
        """Add one layer's routing of one micro-batch: tokens per expert (top-k slots counted),
        the sum of their gate weights, and optionally the sum of their token losses."""
        li = self._check_layer(layer)
        E = self.num_experts
        c = self._as_obs(counts_E, f"observe(layer={li}): counts_E", (E,))
        w = self._as_obs(weight_sum_E, f"observe(layer={li}): weight_sum_E", (E,))
        lo = None if loss_sum_E is None else \
            self._as_obs(loss_sum_E, f"observe(layer={li}): loss_sum_E", (E,))
        # Validated before anything is added: a bad call accumulates nothing.
        self._acc_FLE[_ACC_COUNTS, li].add_(c)
        self._acc_FLE[_ACC_WSUM, li].add_(w)
        if lo is not None:
            self._add_loss(li, lo)

    def observe_loss(self, layer: int, loss_sum_E: torch.Tensor) -> None:
        """Add the per-expert sums of the token losses of one layer (enables loss-based
        reliability for that layer at the next tick)."""
        li = self._check_layer(layer)
        self._add_loss(li, self._as_obs(loss_sum_E, f"observe_loss(layer={li}): loss_sum_E",
                                        (self.num_experts,)))

    def _add_loss(self, li: int, loss_E: torch.Tensor) -> None:
        self._acc_FLE[_ACC_LOSS, li].add_(loss_E)
        self._acc_has_loss_L[li] = True
        self._loss_layers.add(li)

    def observe_all(self, counts_LE: torch.Tensor, wsum_LE: torch.Tensor,
                    loss_LE: torch.Tensor | None = None) -> None:
        """Add the routing of every layer at once ([L, E] each)."""
        LE = (self.num_layers, self.num_experts)
        c = self._as_obs(counts_LE, "observe_all: counts_LE", LE)
        w = self._as_obs(wsum_LE, "observe_all: wsum_LE", LE)
        lo = None if loss_LE is None else self._as_obs(loss_LE, "observe_all: loss_LE", LE)
        self._acc_FLE[_ACC_COUNTS].add_(c)
        self._acc_FLE[_ACC_WSUM].add_(w)
        if lo is not None:
            self._acc_FLE[_ACC_LOSS].add_(lo)
            self._acc_has_loss_L.fill_(True)
            self._loss_layers.update(range(self.num_layers))

    def clear_observations(self) -> None:
        """Drop the accumulated observation without ticking."""
        self._acc_FLE.zero_()
        if self._loss_layers:
            self._acc_has_loss_L.zero_()
            self._loss_layers.clear()

    def observation_buffer(self) -> torch.Tensor:
        """The accumulator [3, L, E] (counts, weight sums, loss sums), e.g. to all-reduce it
        across data-parallel ranks before ``tick()`` so every rank ticks on the global batch."""
        return self._acc_FLE

    # ------------------------------------------------------------------ the tick
    # Cost model: the tick is ~60 small kernels on [L, E] tensors, so its time is dispatch, not
    # arithmetic: a few µs per kernel in a loop, and several times that inside a training step,
    # where it runs with caches evicted by the backward pass and each distinct op (Python
    # binding, kernel) pays for it again. Hence few kernels and few distinct ops: no
    # scalar→tensor conversions (constants are cached 0-d buffers), divisions guarded by an ∞
    # denominator (x/∞ = 0) instead of a where on each side, idle rows left unchanged by the
    # EMA's hull clamp instead of a where, cached views, and the same few operators throughout.
    # Buffers are read from ``self._buffers`` (``b``): through ``Module.__getattr__`` each read
    # costs ~0.7 µs, and a tick reads ~40.
    # Every value keeps the reference's operations and order: float64 state is bitwise the
    # previous implementation's (and float32 state too, on CPU).
    @torch.no_grad()
    def tick(self) -> None:
        """One control step on the accumulated observation, with the κ set by ``set_knob``.
        No host sync. Clears the accumulators."""
        cfg, b = self.config, self._buffers
        t = self._tick_host + 1
        micro = t % cfg.micro_period == 0
        macro = t % cfg.macro_period == 0
        acc, counts, loss = self._acc_rows()
        # Bad observation (non-finite, negative, or ≥ max_entry so that a layer's sum could
        # overflow: what the reference rejects): the clamp moves it (NaN − NaN is NaN, nonzero).
        bad = (torch.clamp(acc, 0.0, self._max_entry_incl) - acc).any()

        # κ smoothing first, so this tick's lens sees it.
        r = cfg.kappa_smoothing
        kap_old, kap_in = b["kappa"], b["kappa_target"]
        if r == 1.0:
            kap = kap_in
        else:
            kap = torch.clamp(kap_old * (1.0 - r) + kap_in * r,
                              torch.minimum(kap_old, kap_in), torch.maximum(kap_old, kap_in))

        usage, delta, active_L1 = self._usage_step(counts)

        # Reliability: experts that got tokens move; the others get target = s, which the EMA's
        # hull clamp keeps exactly (the reference's where(counts > 0, ·, s)).
        seen = counts > 0
        target, bad_target = self._reliability_target(counts, loss, seen, active_L1, usage)
        if bad_target is not None:
            bad = bad | bad_target
        s = b["reliability_LE"]
        reliability = _ema(s, torch.where(seen, target, s), 1.0 - cfg.usage_decay)

        th_new, R, psi, dR = self._phase_step(delta, t)
        updates = [(b["kappa"], kap), (b["usage_LE"], usage), (b["delta_LE"], delta),
                   (b["reliability_LE"], reliability), (b["theta_LE"], th_new),
                   (b["R"], R), (b["psi"], psi), (b["dR"], dR)]
        pressure = b["pressure_LE"]
        if micro:
            pressure, micro_updates = self._micro_step(usage, reliability, R)
            updates += micro_updates
        if macro:
            # Lens: integral of pressure, rate scaled by κ and by σ(5ΔR).
            rate = (torch.exp(kap * cfg.beta_lens) * cfg.lens_rate
                    * torch.sigmoid(dR.to(self.dtype) * LENS_DR_GAIN))
            lens = torch.clamp(b["lens_LE"] + pressure * rate, -cfg.lens_max, cfg.lens_max)
            updates.append((b["lens_LE"], lens))

        # Commit: a bad observation leaves every law buffer as it was.
        for buf, new in updates:
            torch.where(bad, buf, new, out=buf)
        b["skipped_ticks"].add_(bad)
        b["tick_counter"].fill_(t)
        slot = (t - 1) % self.history_length
        b["coherence_history"][slot] = b["R"]
        b["meta_knob_history"][slot] = b["kappa"]
        self._tick_host = t
        self.clear_observations()
        if micro or macro or r != 1.0:
            # Otherwise nothing the fields read has changed (set_knob refreshed them already).
            self._refresh_fields()

    def _usage_step(self, counts: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(usage, δ, active_L1), in float64 (the counts promoted exactly). An idle layer (no
        tokens) gets frac = u: its δ is exactly 0 and its EMA stays at u (the hull of u and u),
        the reference's where(active, ·, u) and where(active, ·, 0)."""
        u = self._buffers["usage_LE"]                               # float64 (phase input)
        tot64_L1 = counts.sum(dim=1, keepdim=True, dtype=PHASE_DTYPE)
        active_L1 = tot64_L1 > 0
        frac = torch.where(active_L1, counts / tot64_L1, u)
        delta = (frac - u) * self.num_experts
        usage = _ema(u, frac, 1.0 - self.config.usage_decay)
        return usage, delta, active_L1

    def _phase_step(self, delta: torch.Tensor, t: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kuramoto phases driven by δ, with the mean field of the previous tick: (θ, R, ψ, ΔR)."""
        cfg, b = self.config, self._buffers
        R0, psi0, th = b["R"], b["psi"], b["theta_LE"]
        drive = self._drive0() + delta * cfg.drift_gain            # (ω₀ + ω_dis) + α·δ
        drive = drive + torch.sin(psi0 - th) * (R0 * cfg.coupling)
        th_new = th + drive * cfg.dt
        if cfg.phase_noise > 0.0:
            h1 = _rng.key_prefix(self._seed_host, STREAM_PHASE, t)
            xi = _rng.normal_from_pairs(h1, b["_noise_index_2N"]).view_as(th)
            th_new = th_new + xi * (cfg.phase_noise * math.sqrt(cfg.dt))
        th_new = torch.remainder(th_new, TWO_PI)
        th_new = torch.where(th_new > _BELOW_TWO_PI, b["_zero64"], th_new)  # mod can give 2π
        # Means as sum / n (what torch's CPU mean computes), sharing the sum kernel.
        n = th_new.numel()
        c, sn = torch.cos(th_new).sum() / n, torch.sin(th_new).sum() / n
        R = torch.clamp(torch.hypot(c, sn), max=1.0)
        return th_new, R, torch.atan2(sn, c), R - R0

    def _micro_step(self, usage: torch.Tensor, reliability: torch.Tensor, R: torch.Tensor
                    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Temperatures of a micro tick: (pressure, [(buffer, new value), ...])."""
        cfg, b, E = self.config, self._buffers, self.num_experts
        Tbar_g = _ema(b["Tbar_global_E"], b["T_fast_LE"].sum(dim=0) / self.num_layers,
                      cfg.eta_structural_T_global)                    # EMA of mean_L(T_fast)
        share = usage / usage.sum(dim=1, keepdim=True)               # float64, then cast
        dev = share - 1.0 / E
        # P = clip(2(1/E − share)) and d = |share − 1/E|: 1/E − x = −(x − 1/E) exactly.
        pressure = torch.clamp(dev * -2.0, -1.0, 1.0).to(self.dtype)
        d = torch.abs(dev)
        dmax = d.amax(dim=1, keepdim=True)
        # ~uniform (dmax ≤ ε): d̂ = d/∞ = 0.
        d_hat = (d / torch.where(dmax > DRIFT_EPS, dmax, b["_inf64"])).to(self.dtype)
        base = (1.0 - R) * cfg.beta_R + 1.0
        if cfg.T_base != 1.0:
            base = base * cfg.T_base
        T_fast = torch.clamp(base.to(self.dtype) * (d_hat * cfg.beta_drift + 1.0)
                             * ((1.0 - reliability) * cfg.beta_reliability + 1.0),
                             cfg.T_min, cfg.T_max)
        Tbar_l = _ema(b["Tbar_local_LE"], T_fast, cfg.eta_structural_T_local)
        T_eff = T_fast * Tbar_g * Tbar_l
        return pressure, [(b["Tbar_global_E"], Tbar_g), (b["pressure_LE"], pressure),
                          (b["T_fast_LE"], T_fast), (b["Tbar_local_LE"], Tbar_l),
                          (b["T_eff_LE"], T_eff)]

    def _reliability_target(self, counts: torch.Tensor, loss: torch.Tensor, seen: torch.Tensor,
                            active_L1: torch.Tensor, usage: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[L, E] target reliability (read where ``seen``): loss-based for layers that got
        losses, else u / max(u).

        Also returns, on the loss path, a 0-d flag that the relative loss was not finite (tiny
        counts can overflow loss / counts; the reference rejects such observations)."""
        nl = len(self._loss_layers)
        proxy = None
        if nl < self.num_layers:
            us = usage.to(self.dtype)
            # u / max(u), 0 for an all-zero row. max(u) ≥ ~1/E for any state the law reaches;
            # the clamp only turns a zero maximum into a harmless denominator.
            proxy = us / torch.clamp(us.amax(dim=1, keepdim=True), min=self._tiny)
            if nl == 0:
                return proxy, None
        b = self._buffers
        inf = b["_inf"]
        tot_c = counts.sum(dim=1, keepdim=True)
        tot_l = loss.sum(dim=1, keepdim=True)
        # Guarded divisions, x/∞ = 0 where the reference's safe division gives 0.
        mbar = tot_l / torch.where(active_L1, tot_c, inf)          # token-weighted mean loss
        m = loss / torch.where(seen, counts, inf)                   # per-expert mean loss
        rel = (mbar - m) / torch.where(mbar > 0, mbar, inf)
        bad = (rel * 0.0).any()                                     # inf·0 = NaN: not finite
        from_loss = torch.sigmoid(rel * self.config.reliability_sharpness)   # in [0, 1]
        if proxy is None:
            return from_loss, bad
        return torch.where(b["_acc_has_loss_L"].unsqueeze(1), from_loss, proxy), bad

    def _acc_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(accumulator, its counts row, its loss row), the rows as cached views."""
        acc = self._buffers["_acc_FLE"]
        cached = self._acc_cache
        if cached is None or cached[0] is not acc:
            cached = self._acc_cache = (acc, acc[_ACC_COUNTS], acc[_ACC_LOSS])
        return cached

    def _drive0(self) -> torch.Tensor:
        """ω₀ + ω_dis [L, E] (float64), cached while the ω_dis buffer is not modified."""
        om = self._buffers["omega_disorder_LE"]
        key = self._drive0_key
        if key is None or key[0] is not om or key[1] != om._version:   # replaced or written
            self._drive0_val = om + self.config.omega0
            self._drive0_key = (om, om._version)
        return self._drive0_val

    # ------------------------------------------------------------------ outputs
    def _refresh_fields(self) -> None:
        """Recompute the cached router fields from the state and the κ in effect."""
        cfg, b = self.config, self._buffers
        f_p, f_t = torch.exp(b["kappa"] * b["_beta_pt_2"]).unbind()   # exp(β_p κ), exp(β_T κ)
        if cfg.pressure_scale != 1.0:
            f_p = f_p * cfg.pressure_scale
        bias = (b["pressure_LE"] + b["lens_LE"]) * f_p
        temp = b["T_eff_LE"]
        if cfg.temperature_scale != 1.0:
            temp = temp * cfg.temperature_scale
        temp = torch.clamp(temp * f_t, TEMPERATURE_MIN, TEMPERATURE_MAX)
        # New tensors each time (see module docstring), float32 for the router.
        self._bias_LE = bias.to(torch.float32)
        self._temperature_LE = temp.to(torch.float32)

    def routing_fields(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias_LE, temperature_LE), float32: the router uses (logits + bias) / temperature."""
        return self._bias_LE, self._temperature_LE

    def layer_fields(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bias_E, temperature_E) of one layer (views of the cached fields)."""
        li = self._check_layer(layer)
        b = self._buffers
        bias, temp = b["_bias_LE"], b["_temperature_LE"]
        rows = self._field_rows
        if rows is None or rows[0] is not bias or rows[1] is not temp:
            # One unbind per refresh instead of two selects per router call.
            rows = self._field_rows = (bias, temp, bias.unbind(0), temp.unbind(0))
        return rows[2][li], rows[3][li]

    def coherence(self) -> torch.Tensor:
        """Kuramoto coherence R after the last tick, a 0-d tensor (a copy; no sync)."""
        return self.R.clone()

    def get_coherence_history(self) -> torch.Tensor:
        """R after each of the last min(ticks, H) ticks, oldest first (no sync)."""
        return self._history(self.coherence_history)

    def get_meta_knob_history(self) -> torch.Tensor:
        """κ in effect after each of the last min(ticks, H) ticks, oldest first (no sync)."""
        return self._history(self.meta_knob_history)

    def _history(self, ring: torch.Tensor) -> torch.Tensor:
        n, H = self._tick_host, self.history_length
        if n <= H:
            return ring[:n].clone()
        return torch.roll(ring, -(n % H))

    # ------------------------------------------------------------------ meta-knob
    def set_knob(self, kappa: float | torch.Tensor) -> None:
        """Set the target κ ∈ [-1, 1] that the next ``tick()`` applies (through the config's
        ``kappa_smoothing``). Without smoothing (rate 1) κ also takes effect immediately in
        ``routing_fields``; with smoothing it moves only at ticks.

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

    def get_knob_state(self) -> dict[str, float]:
        """κ in effect, target κ and the multipliers they apply (syncs: logging only)."""
        k, kt = (float(v) for v in torch.stack([self.kappa, self.kappa_target]).tolist())
        f = knob_factors(min(max(k, -1.0), 1.0), self.config)
        return {"kappa": k, "kappa_target": kt, "pressure_factor": f.pressure,
                "temperature_factor": f.temperature, "lens_factor": f.lens,
                "kappa_smoothing": self.config.kappa_smoothing}

    # ------------------------------------------------------------------ diagnostics (sync)
    def get_structural_temperature_diagnostics(self) -> dict[str, Any]:
        """Landscape of T̄_global and of each layer's T̄_local (syncs: logging only).

        Top-level ``variance``/``valleys``/``ridges``/``formed`` describe the global landscape
        (the seed's log line); ``local`` holds one landscape per layer."""
        st = self.to_reference_state()
        g = state_landscape(st, self.config, None)
        local = [state_landscape(st, self.config, li) for li in range(self.num_layers)]
        return {
            "tick": st.tick, "R": st.R, "variance": g.variance, "valleys": list(g.valleys),
            "ridges": list(g.ridges), "formed": g.formed, "global": g.to_dict(),
            "local": [ls.to_dict() for ls in local],
            "local_variance_mean": float(np.mean([ls.variance for ls in local])),
            "Tbar_global": st.Tbar_global_E.tolist(),
            "skipped_ticks": int(self.skipped_ticks),
        }

    def get_valley_health_diagnostics(self, layer: int | None = None) -> dict[str, Any]:
        """Health of the valleys of the global landscape, or of one layer (syncs)."""
        if layer is not None:
            layer = self._check_layer(layer)
        vh = valley_health(self.to_reference_state(), self.config, layer)
        d = vh.to_dict()
        d.update(all_healthy=vh.all_healthy, num_valleys=len(vh.valleys),
                 num_unhealthy=len(vh.unhealthy))
        return d

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
        set to the state's κ; accumulators are cleared; histories are left as they are."""
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
        return self

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_experts={self.num_experts}, "
                f"dtype={self.dtype}, history_length={self.history_length}, "
                f"tick={self._tick_host}")
