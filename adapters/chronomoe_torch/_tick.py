"""The tick of ``PxTController``: law v2 (``chronomoe_dyn.law.step``) on the controller's buffers.

Every value keeps the reference's operations and order (docs/CONTRACTS.md "Version 2
contracts"); see ``controller.py`` for the precision split (phase subsystem float64).

Cost model: the tick is ~70 small kernels on [L, E] tensors, so its time is dispatch, not
arithmetic: a few µs per kernel in a loop, and several times that inside a training step, where
it runs with caches evicted by the backward pass and each distinct op (Python binding, kernel)
pays for it again. Hence few kernels and few distinct ops: no scalar→tensor conversions
(constants are cached 0-d buffers), divisions guarded by an ∞ denominator (x/∞ = 0) instead of a
where on each side, idle rows left unchanged by the EMA's hull clamp instead of a where, cached
views, and the same few operators throughout. Buffers are read from ``ctrl._buffers``: through
``Module.__getattr__`` each read costs ~0.7 µs, and a tick reads ~40.

Law v2.1 (docs/CONTRACTS.md): usage, drift and pressure read the noiseless counts c° (the
router's choice before the exploration noise), reliability the routed counts; a layer whose c°
total differs from its counts total (relative 1e-6, ``state.NOISELESS_TOTAL_RTOL``) makes the
observation bad, as the reference's ValueError.

Shape legend: L layers, E experts, F = 4E + 2 observation entries per layer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from chronomoe_dyn.law import DRIFT_EPS, LENS_DR_GAIN, TWO_PI
from chronomoe_dyn.rng import STREAM_PHASE
from chronomoe_dyn.state import NOISELESS_TOTAL_RTOL

from . import _rng

_BELOW_TWO_PI = float(np.nextafter(TWO_PI, 0.0))   # x ≥ 2π ⟺ x > this


def obs_views(obs_LF: torch.Tensor, E: int) -> dict[str, torch.Tensor]:
    """Named views of an observation buffer [L, 4E + 2] (layout: counts, gate sums, Σ logit
    std, tokens, noiseless counts, loss sums; the first 3E + 2 are ``routing``'s stats-row
    prefix, ``routing.obs_width``)."""
    return {"counts_LE": obs_LF[:, :E], "wsum_LE": obs_LF[:, E:2 * E],
            "logit_std_sum_L": obs_LF[:, 2 * E], "tokens_L": obs_LF[:, 2 * E + 1],
            "noiseless_LE": obs_LF[:, 2 * E + 2:3 * E + 2], "loss_LE": obs_LF[:, 3 * E + 2:]}


def counts_pair(obs_LF: torch.Tensor, E: int) -> torch.Tensor:
    """[L, 2, E] view of an observation buffer: [:, 0] the counts, [:, 1] the noiseless counts
    (one op adds, or sums, both)."""
    col = obs_LF.stride(1)
    return obs_LF.as_strided((obs_LF.shape[0], 2, E), (obs_LF.stride(0), (2 * E + 2) * col, col),
                             obs_LF.storage_offset())


def _ema(old: torch.Tensor, new: torch.Tensor, rate: float | torch.Tensor) -> torch.Tensor:
    """(1 − rate)·old + rate·new, clamped to the hull of old and new (as the reference).

    Where ``new`` equals ``old`` the result is ``old`` exactly (the hull is a point): the tick
    uses that to leave entries unchanged without a separate ``where``."""
    out = old * (1.0 - rate) + new * rate
    return torch.clamp(out, torch.minimum(old, new), torch.maximum(old, new))


class TickKernel:
    """The law step bound to one controller (its buffers, config and host mirrors)."""

    def __init__(self, ctrl: Any) -> None:
        self.ctrl = ctrl
        cfg, E, dtype, dev = ctrl.config, ctrl.num_experts, ctrl.dtype, ctrl.device
        L = ctrl.num_layers
        f64 = {"dtype": torch.float64, "device": dev}
        fkw = {"dtype": dtype, "device": dev}
        idx = torch.arange(L * E, dtype=torch.int64, device=dev)
        self.const = {
            "noise_index_2N": torch.stack([idx * 2, idx * 2 + 1]),
            "inf": torch.full((), math.inf, **fkw), "inf64": torch.full((), math.inf, **f64),
            "zero64": torch.zeros((), **f64),
            "beta_ptt_3": torch.tensor([cfg.beta_pressure, cfg.beta_temperature,
                                        cfg.beta_tau], **fkw),
        }
        # Accepted entries are < finfo.max / E (E·entry < max: a layer's sum stays finite),
        # checked as x ≤ the largest value of ``dtype`` below that bound.
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        bound = np_dtype(torch.finfo(dtype).max / E)
        self.max_entry_incl = float(np.nextafter(bound, np_dtype(0)))
        self.tiny = float(torch.finfo(dtype).tiny)
        self.drift_eps = 1.0 / (E * E)
        self._views: tuple | None = None
        self._drive0_key: tuple | None = None
        self._drive0_val: torch.Tensor | None = None

    def invalidate(self) -> None:
        """The controller's buffers moved (``Module.to``): rebuild constants and caches."""
        dev = self.ctrl.device
        self.const = {k: v.to(dev) for k, v in self.const.items()}
        self._views = None
        self._drive0_key = None

    def _obs(self) -> tuple:
        """(buffer, counts, noiseless counts, [L, 2, E] counts pair, std sum, tokens, loss)
        views, cached per buffer object."""
        obs = self.ctrl._buffers["_obs_LF"]
        v = self._views
        if v is None or v[0] is not obs:
            E = self.ctrl.num_experts
            d = obs_views(obs, E)
            v = self._views = (obs, d["counts_LE"], d["noiseless_LE"], counts_pair(obs, E),
                               d["logit_std_sum_L"], d["tokens_L"], d["loss_LE"])
        return v

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, t: int) -> bool:
        """Tick number ``t`` on the accumulated observation; commits unless it is bad. Returns
        whether the bias/temperature/τ fields may have changed (micro, macro or smoothing)."""
        ctrl, cfg = self.ctrl, self.ctrl.config
        b = ctrl._buffers
        micro = t % cfg.micro_period == 0
        macro = t % cfg.macro_period == 0
        lens_now = micro if cfg.lens_clock == "micro" else macro
        obs, counts, noiseless, pair, std_sum, tokens, loss = self._obs()
        # Bad observation (non-finite, negative, or ≥ max_entry so that a layer's sum could
        # overflow: what the reference rejects): the clamp moves it (NaN − NaN is NaN, nonzero).
        bad = (torch.clamp(obs, 0.0, self.max_entry_incl) - obs).any()

        # κ smoothing first, so this tick's lens sees it.
        r, rho = cfg.kappa_smoothing, 1.0 - cfg.usage_decay
        kap_old, kap_in = b["kappa"], b["kappa_target"]
        kap = kap_in if r == 1.0 else _ema(kap_old, kap_in, r)

        # Usage reads the router's choice c° (law v2.1); a c° total that is not the counts
        # total is a bad observation too.
        frac, delta, bad_total = self._usage_step(noiseless, pair)
        bad = bad | bad_total
        usage = _ema(b["usage_LE"], frac, rho)
        # σ_L: the first observation sets it (σ_L = 0 means "not observed yet"), later ones take
        # the EMA with ρ; a layer without tokens keeps it (its input is σ_L itself).
        sig = b["logit_scale_L"]
        sig_obs = torch.where(tokens > 0, std_sum / tokens, sig)
        scale = torch.where(sig == 0, sig_obs, _ema(sig, sig_obs, rho))

        # Reliability (the routed counts): experts that got tokens move; the others get
        # target = s, which the EMA's hull clamp keeps exactly (the reference's
        # where(counts > 0, ·, s)).
        seen = counts > 0
        target, bad_target = self._reliability_target(counts, loss, seen, usage)
        if bad_target is not None:
            bad = bad | bad_target
        s = b["reliability_LE"]
        reliability = _ema(s, torch.where(seen, target, s), 1.0 - cfg.usage_decay)

        th_new, R, psi, dR = self._phase_step(delta, t)
        updates = [(b["kappa"], kap), (b["usage_LE"], usage), (b["delta_LE"], delta),
                   (b["reliability_LE"], reliability), (b["theta_LE"], th_new),
                   (b["R"], R), (b["psi"], psi), (b["dR"], dR), (b["logit_scale_L"], scale)]
        pressure = b["pressure_LE"]
        if micro:
            pressure, micro_updates = self._micro_step(usage, reliability, R)
            updates += micro_updates
        if lens_now:
            # Lens: integral of pressure, rate scaled by κ and by σ(5ΔR).
            rate = (torch.exp(kap * cfg.beta_lens) * cfg.lens_rate
                    * torch.sigmoid(dR.to(ctrl.dtype) * LENS_DR_GAIN))
            lens = torch.clamp(b["lens_LE"] + pressure * rate, -cfg.lens_max, cfg.lens_max)
            updates.append((b["lens_LE"], lens))

        # Commit: a bad observation leaves every law buffer as it was.
        for buf, new in updates:
            torch.where(bad, buf, new, out=buf)
        b["skipped_ticks"].add_(bad)
        b["tick_counter"].fill_(t)
        slot = (t - 1) % ctrl.history_length
        b["coherence_history"][slot] = b["R"]
        b["meta_knob_history"][slot] = b["kappa"]
        return micro or lens_now or r != 1.0

    def _usage_step(self, noiseless: torch.Tensor, pair: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(frac, δ, bad) in float64 (the counts promoted exactly) from the noiseless counts c°
        (``pair``: the [L, 2, E] view of counts and c°); the usage EMA's input is frac. δ is
        the z-scored drift (frac − u)/sqrt(max(u(1−u), 1/E²)/n), n = Σ_e c° the layer's slots.
        An idle layer (n = 0) gets frac = u: its EMA stays at u (the hull of u and u) and
        δ = 0/sqrt(var/0) = 0/∞ = 0 exactly (var ≥ 1/E² > 0). ``bad`` (0-d): some layer's c°
        total and counts total differ by more than NOISELESS_TOTAL_RTOL·max(both, 1)."""
        u = self.ctrl._buffers["usage_LE"]                         # float64 (phase input)
        tot_L2 = pair.sum(dim=2, dtype=torch.float64)             # [L, 2]: counts, c° totals
        lo, hi = torch.aminmax(tot_L2, dim=1, keepdim=True)
        bad = ((hi - lo) > torch.clamp(hi, min=1.0) * NOISELESS_TOTAL_RTOL).any()
        n_L1 = tot_L2[:, 1:]
        frac = torch.where(n_L1 > 0, noiseless / n_L1, u)
        var = torch.clamp(u * (1.0 - u), min=self.drift_eps)
        delta = (frac - u) / torch.sqrt(var / n_L1)
        return frac, delta, bad

    def _phase_step(self, delta: torch.Tensor, t: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kuramoto phases driven by δ, with the mean field of the previous tick: (θ, R, ψ, ΔR)."""
        ctrl, cfg = self.ctrl, self.ctrl.config
        b = ctrl._buffers
        R0, psi0, th = b["R"], b["psi"], b["theta_LE"]
        drive = self._drive0() + delta * cfg.drift_gain            # (ω₀ + ω_dis) + α·δ
        drive = drive + torch.sin(psi0 - th) * (R0 * cfg.coupling)
        th_new = th + drive * cfg.dt
        if cfg.phase_noise > 0.0:
            h1 = _rng.key_prefix(ctrl._seed_host, STREAM_PHASE, t)
            xi = _rng.normal_from_pairs(h1, self.const["noise_index_2N"]).view_as(th)
            th_new = th_new + xi * (cfg.phase_noise * math.sqrt(cfg.dt))
        th_new = torch.remainder(th_new, TWO_PI)
        th_new = torch.where(th_new > _BELOW_TWO_PI, self.const["zero64"], th_new)
        # Means as sum / n (what torch's CPU mean computes), sharing the sum kernel.
        n = th_new.numel()
        c, sn = torch.cos(th_new).sum() / n, torch.sin(th_new).sum() / n
        R = torch.clamp(torch.hypot(c, sn), max=1.0)
        return th_new, R, torch.atan2(sn, c), R - R0

    def _micro_step(self, usage: torch.Tensor, reliability: torch.Tensor, R: torch.Tensor
                    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Temperatures of a micro tick: (pressure, [(buffer, new value), ...])."""
        ctrl, cfg = self.ctrl, self.ctrl.config
        b, E = ctrl._buffers, ctrl.num_experts
        T_fast_old = b["T_fast_LE"]
        # Scalar EMA of mean_{L,E}(T_fast), the mean kept in the range of what it averages
        # (as the reference: rounding can put the mean of equal values an ulp outside).
        lo, hi = torch.aminmax(T_fast_old)
        t_mean = torch.clamp(T_fast_old.sum() / T_fast_old.numel(), lo, hi)
        Tbar_g = _ema(b["Tbar_global"], t_mean, cfg.eta_structural_T_global)
        share = usage / usage.sum(dim=1, keepdim=True)               # float64, then cast
        dev = share - 1.0 / E
        # P = clip(2(1/E − share)) and d = |share − 1/E|: 1/E − x = −(x − 1/E) exactly.
        pressure = torch.clamp(dev * -2.0, -1.0, 1.0).to(ctrl.dtype)
        d = torch.abs(dev)
        dmax = d.amax(dim=1, keepdim=True)
        # ~uniform (dmax ≤ ε): d̂ = d/∞ = 0.
        d_hat = (d / torch.where(dmax > DRIFT_EPS, dmax, self.const["inf64"])).to(ctrl.dtype)
        base = (1.0 - R) * cfg.beta_R + 1.0
        if cfg.T_base != 1.0:
            base = base * cfg.T_base
        T_fast = torch.clamp(base.to(ctrl.dtype) * (d_hat * cfg.beta_drift + 1.0)
                             * ((1.0 - reliability) * cfg.beta_reliability + 1.0),
                             cfg.T_min, cfg.T_max)
        Tbar_l = _ema(b["Tbar_local_LE"], T_fast, cfg.eta_structural_T_local)
        T_eff = T_fast * Tbar_g * Tbar_l
        return pressure, [(b["Tbar_global"], Tbar_g), (b["pressure_LE"], pressure),
                          (b["T_fast_LE"], T_fast), (b["Tbar_local_LE"], Tbar_l),
                          (b["T_eff_LE"], T_eff)]

    def _reliability_target(self, counts: torch.Tensor, loss: torch.Tensor, seen: torch.Tensor,
                            usage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[L, E] target reliability (read where ``seen``): loss-based for layers that got
        losses, else u / max(u).

        Also returns, on the loss path, a 0-d flag that the relative loss was not finite (tiny
        counts can overflow loss / counts; the reference rejects such observations)."""
        ctrl = self.ctrl
        nl = len(ctrl._loss_layers)
        proxy = None
        if nl < ctrl.num_layers:
            us = usage.to(ctrl.dtype)
            # u / max(u), 0 for an all-zero row. max(u) ≥ ~1/E for any state the law reaches;
            # the clamp only turns a zero maximum into a harmless denominator.
            proxy = us / torch.clamp(us.amax(dim=1, keepdim=True), min=self.tiny)
            if nl == 0:
                return proxy, None
        inf = self.const["inf"]
        tot_c = counts.sum(dim=1, keepdim=True)
        tot_l = loss.sum(dim=1, keepdim=True)
        # Guarded divisions, x/∞ = 0 where the reference's safe division gives 0.
        mbar = tot_l / torch.where(tot_c > 0, tot_c, inf)          # token-weighted mean loss
        m = loss / torch.where(seen, counts, inf)                   # per-expert mean loss
        rel = (mbar - m) / torch.where(mbar > 0, mbar, inf)
        bad = (rel * 0.0).any()                                     # inf·0 = NaN: not finite
        from_loss = torch.sigmoid(rel * ctrl.config.reliability_sharpness)   # in [0, 1]
        if proxy is None:
            return from_loss, bad
        return torch.where(ctrl._buffers["_has_loss_L"].unsqueeze(1), from_loss, proxy), bad

    def _drive0(self) -> torch.Tensor:
        """ω₀ + ω_dis [L, E] (float64), cached while the ω_dis buffer is not modified."""
        om = self.ctrl._buffers["omega_disorder_LE"]
        key = self._drive0_key
        if key is None or key[0] is not om or key[1] != om._version:   # replaced or written
            self._drive0_val = om + self.ctrl.config.omega0
            self._drive0_key = (om, om._version)
        return self._drive0_val

    # ------------------------------------------------------------------ outputs
    def fields(self, kappa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias_LE, temperature_LE, tau) for κ: bias = e^{β_p κ}(k_P·P + lens), temperature =
        clamp(T_eff·e^{β_T κ}, T_lo, T_hi), τ = τ₀·e^{β_τ κ}."""
        cfg, b = self.ctrl.config, self.ctrl._buffers
        f_p, f_t, f_tau = torch.exp(kappa * self.const["beta_ptt_3"]).unbind()
        P = b["pressure_LE"]
        if cfg.pressure_gain != 1.0:
            P = P * cfg.pressure_gain
        bias = (P + b["lens_LE"]) * f_p
        temp = torch.clamp(b["T_eff_LE"] * f_t, cfg.routing_T_min, cfg.routing_T_max)
        return bias, temp, f_tau * cfg.exploration_tau0
