"""Batched closed-loop simulation: B controllers, each over its own synthetic routing
environment (``env.py``), under a κ schedule and scripted events (law version 2).

Shape legend: B systems, T recorded ticks, L layers, E experts.

Per tick t = 1..ticks of each system:
  1. events scheduled for tick t change the environment;
  2. κ_t = kappa_at(schedule, t − 1) (adaptive: plus the rule-based offset, updated on macro
     ticks from R and the whole-model T̄ variance, the mean over layers of var(T̄_local[l]));
  3. the environment routes its tokens by the v2 rule with ``routing_fields`` of the controller
     (at the κ this tick's step puts in effect) and returns counts, gate-weight sums, token
     losses, the logit scale per layer, the explored slots and the noiseless counts (the
     slots of the top-k of the score without the Gumbel noise; = counts without noise);
     ``controller_fields=False`` routes by the plain top-k of the raw logits (the ablation:
     the controller still observes and ticks);
  4. ``step`` (the reference law v2.1; in Numba, a line-by-line port) with κ_t: usage, drift
     and pressure read the noiseless counts, reliability the routed counts and losses;
  5. the router learns from the slot losses it saw;
  6. every ``record_every`` ticks the trajectory (``trajectory.Trajectory``) records the state.

System b uses the seed ``seed + b`` for everything (controller init, phase noise, environment),
so system b of a batch equals a one-system run with that seed.

``backend="numba"`` runs every system in a parallel kernel (``_kernels.simulate_batch``);
``backend="numpy"`` runs the same environment in NumPy (``env.route``/``env.learn``) and calls
the reference ``chronomoe_dyn.step`` every tick: the reference the kernel must match.

Calibration. The version-2 constants were chosen against this environment and the real-text
benchmark (``docs/calibration.md``; ``ControllerConfig`` says which and why). The environment's own constants come from the version-1 calibration (default
environment and ``default_schedule``, 4000 ticks, 16 systems): router prior count 80 000 (the
router learns during the run, its estimates separating over ~1000–2000 ticks), sharpness 5,
domain mixture (0.4, 0.3, 0.2, 0.1) (a uniform mixture lets every expert end up balanced and
the landscape fade). Version 1's finding that motivated version 2: a constant κ = 0.5 or −0.3
gave the same R and T̄ variance within 0.005 (a layer-wide temperature cannot change a top-k
choice; the bias, pressure_scale 0.1 in logit units, was small against the learned gaps).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .config import ControllerConfig
from .env import (EnvConfig, Event, apply_event, domain_cumulative, init_env, learn, make_quality,
                  route)
from .landscape import landscape_masks
from .law import coherence_gate, routing_fields, smooth_kappa, step
from .schedule import AdaptiveState, KnobSchedule, adaptive_update, kappa_at
from .state import ControllerState, RoutingObservation, init_state
from .trajectory import LAYER_FIELDS, Trajectory

__all__ = ["Trajectory", "simulate", "default_schedule", "DEFAULT_TICKS", "GATE_MIN_COHERENCE",
           "GATE_STRENGTH"]

DEFAULT_TICKS = 4000
"""Default run length: long enough for T̄_local (time constant 500 ticks) to form."""
GATE_MIN_COHERENCE = 0.2
"""min_coherence of the recorded gate (seed default)."""
GATE_STRENGTH = 0.5
"""gating_strength of the recorded gate (seed default)."""


def default_schedule(ticks: int) -> KnobSchedule:
    """The seed's schedule scaled to the run: cosine 0.5 → −0.3, warm-up a quarter of it."""
    return KnobSchedule(kind="cosine", initial_kappa=0.5, final_kappa=-0.3,
                        warmup_steps=ticks // 4, total_steps=ticks)


# ---------------------------------------------------------------------------------------------
# validation and shared set-up

def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo \
            or (hi is not None and v > hi):
        allowed = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={v!r}: expected an integer {allowed}")
    return int(v)


def _validate(config, env, schedule, num_systems, ticks, seed, record_every, events, backend,
              progress, record_layers, controller_fields):
    if not isinstance(config, ControllerConfig):
        raise ValueError(f"config={config!r}: expected a ControllerConfig")
    if not isinstance(env, EnvConfig):
        raise ValueError(f"env={env!r}: expected an EnvConfig")
    B = _check_int("num_systems", num_systems, 1)
    ticks = _check_int("ticks", ticks, 1)
    seed = _check_int("seed", seed, 0, 2**32 - B)
    record_every = _check_int("record_every", record_every, 1, ticks)
    if schedule is None:
        schedule = default_schedule(ticks)
    elif not isinstance(schedule, KnobSchedule):
        raise ValueError(f"schedule={schedule!r}: expected a KnobSchedule or None")
    if isinstance(events, Event):
        events = (events,)
    try:
        events = tuple(events)
    except TypeError:
        raise ValueError(f"events={events!r}: expected a sequence of Event") from None
    for ev in events:
        if not isinstance(ev, Event):
            raise ValueError(f"events: {ev!r} is not an Event")
        ev.check(env)
    events = tuple(sorted(events, key=lambda e: e.tick))    # stable: same-tick order kept
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend={backend!r}: allowed values are 'numba', 'numpy'")
    for name, v in (("progress", progress), ("record_layers", record_layers),
                    ("controller_fields", controller_fields)):
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name}={v!r}: expected a bool")
    return schedule, B, ticks, seed, record_every, events


class _Records:
    """Record buffers shared by both backends."""

    def __init__(self, B: int, T: int, L: int, E: int, record_layers: bool):
        TL = T if record_layers else 0
        self.R_BT, self.dR_BT = np.zeros((B, T)), np.zeros((B, T))
        self.kappa_BT, self.loss_BT = np.zeros((B, T)), np.zeros((B, T))
        self.Tbar_global_BT, self.explore_BT = np.zeros((B, T)), np.zeros((B, T))
        self.logit_scale_BTL = np.zeros((B, T, L))
        self.maxvio_BTL = np.zeros((B, T, L))
        self.var_local_BTL = np.zeros((B, T, L))
        self.Tbar_local_BTLE = np.zeros((B, TL, L, E))
        self.T_fast_BTLE = np.zeros((B, TL, L, E))
        self.usage_BTLE = np.zeros((B, TL, L, E))
        self.rel_BTLE = np.zeros((B, TL, L, E))
        self.keep_layers = record_layers


def _kappa_inputs(schedule: KnobSchedule, ticks: int) -> tuple[np.ndarray, np.ndarray]:
    """[ticks] κ of each step (the linear base for adaptive) and the anneal progress."""
    steps = np.arange(ticks)
    return (np.asarray(kappa_at(schedule, steps), dtype=np.float64),
            np.asarray(schedule.progress(steps), dtype=np.float64))


def maxvio(counts_LE: np.ndarray) -> np.ndarray:
    """[L] max_e count / mean count − 1 of each layer (the kernel's operations)."""
    E = counts_LE.shape[-1]
    return counts_LE.max(axis=-1) / (counts_LE.sum(axis=-1) / E) - 1.0


# ---------------------------------------------------------------------------------------------
# backends

def _run_numpy(config, env, schedule, seeds, ticks, record_every, events, rec, bar,
               controller_fields):
    L, E, T, K = env.num_layers, env.num_experts, env.tokens_per_tick, env.top_k
    kappa_T, _ = _kappa_inputs(schedule, ticks)
    adaptive = schedule.kind == "adaptive"
    finals = []
    for b, sb in enumerate(seeds):
        sb = int(sb)
        state = init_state(config, L, E, sb)
        es = init_env(env, sb)
        ad = AdaptiveState()
        for t in range(1, ticks + 1):
            for ev in events:
                if ev.tick == t:
                    apply_event(es, ev)
            k_in = float(kappa_at(schedule, t - 1, ad)) if adaptive else float(kappa_T[t - 1])
            fields = routing_fields(state, config,
                                    float(smooth_kappa(state.kappa, k_in, config.kappa_smoothing)))
            routed = route(env, es, fields, sb, t, controller_fields)
            state = step(state, config, RoutingObservation(
                routed.counts_LE, routed.wsum_LE, routed.loss_LE, routed.logit_scale_L,
                noiseless_counts=routed.noiseless_counts_LE), k_in)
            learn(env, es, routed)
            if adaptive and state.tick % config.macro_period == 0:
                var_m = float(state.Tbar_local_LE.var(axis=1).mean())
                ad = adaptive_update(ad, schedule.rule, state.R, var_m,
                                     var_m > config.landscape_formed_variance)
            if t % record_every == 0:
                r = t // record_every - 1
                rec.R_BT[b, r], rec.dR_BT[b, r] = state.R, state.dR
                rec.kappa_BT[b, r], rec.loss_BT[b, r] = state.kappa, routed.mean_loss
                rec.Tbar_global_BT[b, r] = state.Tbar_global
                rec.explore_BT[b, r] = routed.explored_L.sum() / (L * T * K)
                rec.logit_scale_BTL[b, r] = routed.logit_scale_L
                rec.maxvio_BTL[b, r] = maxvio(routed.counts_LE)
                rec.var_local_BTL[b, r] = state.Tbar_local_LE.var(axis=1)
                if rec.keep_layers:
                    rec.Tbar_local_BTLE[b, r] = state.Tbar_local_LE
                    rec.T_fast_BTLE[b, r] = state.T_fast_LE
                    rec.usage_BTLE[b, r] = state.usage_LE
                    rec.rel_BTLE[b, r] = state.reliability_LE
            if bar is not None and t % 100 == 0:
                bar.update(100)
        if bar is not None:
            bar.update(ticks % 100)
        finals.append(state)
    return finals


def _numba_events(events, D):
    from . import _kernels as K
    shifts = [e for e in events if e.kind == "domain_shift"]
    cum_XD = np.zeros((max(len(shifts), 1), D))
    kind_X, index_X, layer_X, value_X = [], [], [], []
    for ev in events:
        if ev.kind == "collapse":
            kind_X.append(0)
            index_X.append(ev.expert)
            layer_X.append(-1 if ev.layer is None else ev.layer)
            value_X.append(ev.quality)
        else:
            row = shifts.index(ev)
            cum_XD[row] = domain_cumulative(ev.weights)
            kind_X.append(1)
            index_X.append(row)
            layer_X.append(-1)
            value_X.append(0.0)
    return K.Events(np.array([e.tick for e in events], dtype=np.int64),
                    np.array(kind_X, dtype=np.int64), np.array(layer_X, dtype=np.int64),
                    np.array(index_X, dtype=np.int64), np.array(value_X, dtype=np.float64),
                    cum_XD)


def _run_numba(config, env, schedule, seeds, ticks, record_every, events, rec, bar,
               controller_fields):
    from . import _kernels as K
    L, E, D = env.num_layers, env.num_experts, env.num_domains
    B = len(seeds)
    init = [init_state(config, L, E, int(s)) for s in seeds]

    def stack(name):
        return np.stack([getattr(s, name) for s in init])
    st = K.BatchState(
        tick_B=np.zeros(B, dtype=np.int64), seed_B=np.asarray(seeds, dtype=np.int64),
        theta_BLE=stack("theta_LE"), omega_BLE=stack("omega_disorder_LE"),
        usage_BLE=stack("usage_LE"), rel_BLE=stack("reliability_LE"), delta_BLE=stack("delta_LE"),
        pressure_BLE=stack("pressure_LE"), lens_BLE=stack("lens_LE"),
        T_fast_BLE=stack("T_fast_LE"), Tbar_local_BLE=stack("Tbar_local_LE"),
        T_eff_BLE=stack("T_eff_LE"), logit_scale_BL=stack("logit_scale_L"),
        scal_B5=np.array([[s.R, s.psi, s.dR, s.kappa, s.Tbar_global] for s in init]),
        offset_B=np.zeros(B),
        quality_BLED=np.stack([make_quality(env, int(s)) for s in seeds]),
        est_BLDE=np.full((B, L, D, E), env.prior_loss),
        nobs_BLDE=np.full((B, L, D, E), float(env.router_prior_count)),
        cum_BD=np.tile(domain_cumulative(env.weights_D), (B, 1)))
    ev_arrays = _numba_events(events, D)
    recs = K.Records(rec.R_BT, rec.dR_BT, rec.kappa_BT, rec.loss_BT, rec.Tbar_global_BT,
                     rec.explore_BT, rec.logit_scale_BTL, rec.maxvio_BTL, rec.var_local_BTL,
                     rec.Tbar_local_BTLE, rec.T_fast_BTLE, rec.usage_BTLE, rec.rel_BTLE)
    r = schedule.rule
    ap = K.AdaptParams(schedule.kind == "adaptive", float(r.R_low), float(r.R_high),
                       float(r.variance_high), float(r.rate), float(r.decay), float(r.max_offset))
    kappa_T, p_T = _kappa_inputs(schedule, ticks)
    cp, ep = K.ctrl_params(config), K.env_params(env)
    # Systems are independent and each runs sequentially, so both kernels give the same bits.
    kernel = K.simulate_serial if B == 1 else K.simulate_batch
    # Chunks only to move the progress bar; the state carries over exactly between them.
    chunk = ticks if bar is None else max(1, min(ticks, max(50, ticks // 50)))
    t0 = 0
    while t0 < ticks:
        t1 = min(ticks, t0 + chunk)
        kernel(t0, t1, record_every, bool(controller_fields), cp, ep, ap, kappa_T, p_T, *st,
               *ev_arrays, *recs)
        if bar is not None:
            bar.update((t1 - t0) * B)
        t0 = t1
    finals = []
    for b in range(B):
        R, psi, dR, kap, tbar_g = (float(x) for x in st.scal_B5[b])
        finals.append(ControllerState(
            tick=int(st.tick_B[b]), seed=int(seeds[b]), theta_LE=st.theta_BLE[b].copy(),
            omega_disorder_LE=st.omega_BLE[b].copy(), R=R, psi=psi, dR=dR,
            usage_LE=st.usage_BLE[b].copy(), reliability_LE=st.rel_BLE[b].copy(),
            delta_LE=st.delta_BLE[b].copy(), pressure_LE=st.pressure_BLE[b].copy(),
            lens_LE=st.lens_BLE[b].copy(), T_fast_LE=st.T_fast_BLE[b].copy(),
            Tbar_local_LE=st.Tbar_local_BLE[b].copy(), Tbar_global=tbar_g,
            T_eff_LE=st.T_eff_BLE[b].copy(), logit_scale_L=st.logit_scale_BL[b].copy(),
            kappa=kap))
    return finals


# ---------------------------------------------------------------------------------------------

def simulate(config: ControllerConfig = ControllerConfig(), env: EnvConfig = EnvConfig(),
             schedule: KnobSchedule | None = None, num_systems: int = 1,
             ticks: int = DEFAULT_TICKS, seed: int = 0, record_every: int = 10,
             events: Sequence[Event] = (), backend: str = "numba", progress: bool = False,
             record_layers: bool = True, controller_fields: bool = True) -> Trajectory:
    """Simulate ``num_systems`` independent controllers over their environments.

    config: the controller's constants. env: the synthetic environment.
    schedule: κ schedule; None = ``default_schedule(ticks)`` (cosine 0.5 → −0.3, warm-up
        ticks//4, ending at the last tick).
    num_systems: B. ticks: ticks per system. seed: system b uses seed + b (in [0, 2**32)).
    record_every: record every n ticks (ticks n, 2n, ...). events: scripted ``Event``s.
    backend: "numba" (parallel kernel) or "numpy" (the reference ``step`` in a Python loop).
    progress: show a tqdm bar. record_layers: keep the [B, T, L, E] fields (False for big B).
    controller_fields: False routes by the plain top-k of the raw logits (the ablation); the
        controller still observes and ticks.
    """
    schedule, B, ticks, seed, record_every, events = _validate(
        config, env, schedule, num_systems, ticks, seed, record_every, events, backend,
        progress, record_layers, controller_fields)
    L, E = env.num_layers, env.num_experts
    T = ticks // record_every
    seeds = np.arange(B, dtype=np.int64) + seed
    rec = _Records(B, T, L, E, bool(record_layers))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=B * ticks, desc=f"simulate[{backend}]", unit="sys-tick", leave=False,
                   dynamic_ncols=True)
    try:
        run = _run_numba if backend == "numba" else _run_numpy
        finals = run(config, env, schedule, seeds, ticks, record_every, events, rec, bar,
                     bool(controller_fields))
    finally:
        if bar is not None:
            bar.close()

    layers: dict[str, np.ndarray | None] = dict.fromkeys(LAYER_FIELDS)
    if record_layers:
        m = landscape_masks(rec.Tbar_local_BTLE, config.landscape_threshold_std)
        layers.update(Tbar_local_BTLE=rec.Tbar_local_BTLE, T_fast_BTLE=rec.T_fast_BTLE,
                      usage_BTLE=rec.usage_BTLE, reliability_BTLE=rec.rel_BTLE,
                      valley_local_BTLE=m.valley, ridge_local_BTLE=m.ridge)
    return Trajectory(
        tick_T=np.arange(1, T + 1, dtype=np.int64) * record_every, seeds_B=seeds,
        R_BT=rec.R_BT, dR_BT=rec.dR_BT, kappa_BT=rec.kappa_BT,
        gate_BT=coherence_gate(rec.R_BT, GATE_MIN_COHERENCE, GATE_STRENGTH),
        loss_BT=rec.loss_BT, Tbar_global_BT=rec.Tbar_global_BT, exploration_BT=rec.explore_BT,
        logit_scale_BTL=rec.logit_scale_BTL, maxvio_BTL=rec.maxvio_BTL,
        variance_local_BTL=rec.var_local_BTL, **layers, config=config, env=env,
        schedule=schedule, events=events, controller_fields=bool(controller_fields),
        final_states=finals)


def check_arguments(**kwargs: Any) -> None:
    """Raise the ValueError ``simulate(**kwargs)`` would raise on its arguments, without
    running anything (the study runner checks every cell before the first one starts)."""
    import inspect
    bound = inspect.signature(simulate).bind(**kwargs)
    bound.apply_defaults()
    _validate(**bound.arguments)
