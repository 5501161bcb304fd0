"""Batched closed-loop simulation: B controllers, each over its own synthetic routing
environment (``env.py``), under a κ schedule and scripted events.

Shape legend: B systems, T recorded ticks, L layers, E experts.

Per tick t = 1..ticks of each system:
  1. events scheduled for tick t change the environment;
  2. κ_t = kappa_at(schedule, t − 1) (adaptive: plus the rule-based offset, updated on macro
     ticks from R and var(T̄_global));
  3. the environment routes its tokens with ``routing_fields`` of the controller (at the κ this
     tick's step puts in effect) and returns counts, gate-weight sums and token losses;
  4. ``step`` (the reference law; in Numba, a line-by-line port) with κ_t;
  5. the router learns from the slot losses it saw;
  6. every ``record_every`` ticks the trajectory records the state.

System b uses the seed ``seed + b`` for everything (controller init, phase noise, environment),
so system b of a batch equals a one-system run with that seed.

``backend="numba"`` runs every system in a parallel kernel (``_kernels.simulate_batch``);
``backend="numpy"`` runs the same environment in NumPy (``env.route``/``env.learn``) and calls
the reference ``chronomoe_dyn.step`` every tick: the reference the kernel must match.

Calibration (ControllerConfig.drift_gain, and this environment's router constants), against
the default environment and ``default_schedule`` over 4000 ticks, 16 systems. Varied: α
(drift_gain) 1–6, router sharpness 2–6, the router's prior count (inertia) 2–80 000, batch
noise 1–2, the domain mixture, K 0.25–0.35. Seen: with α = 1 (the design's toy value) R is
≈ 0.8 over the first 400 ticks and ≥ 0.95 from tick ≈ 1000 on, whatever the router does; R only
responds to routing when α·δ is comparable with K, and the only drift that changes over a run
is the router's own (batch-context noise moves tokens en masse while its logits are flat, not
once it has learned gaps larger than that noise); token sampling alone leaves δ with a std of
≈ 0.12 per tick at 256 tokens. A router that learns in its first ticks (prior count 2) puts R
at ≈ 0.89 by tick 400 for good; a uniform domain mixture lets every expert end up balanced and
the landscape fade (var(T̄_local) peaks at 0.011, then 0.001 by the end). Chosen: α = 4 (K 0.25,
ω₀ 1, disorder 0.05, σ 0, dt 0.5, lens_max 1 unchanged), prior count 80 000, sharpness 5,
mixture (0.4, 0.3, 0.2, 0.1). Then, mean over 16 systems: ticks 0–1000 (κ = 0.5) R ≈ 0.18
(the incoherent 1/sqrt(32)), var(T̄_local) ≈ 0.005; the local landscape forms (var > 0.01)
at tick ≈ 850 (780–1080 across systems), just before the warm-up ends; ticks 1000–2800 R rises
0.24 → 0.85 as the router settles (loss 2.06 → 1.44); ticks 2800–4000 (κ → −0.3) R ≈ 0.88,
var(T̄_local) ≈ 0.014, valleys healthy (mean reliability 0.50, < 0.3 in 0 % of cases).
Honest caveats: var(T̄_global) stays ≈ 0.004 (< 0.01: layers disagree on which experts are
valleys, the global mean washes it out); layers show ≈ 4 valleys and 3–4 ridges of 8 (the seed
says 1–3); the landscape's formation time is set by η_local (≈ 500 ticks), not by κ; and κ
barely matters here: a constant κ = 0.5 or −0.3 gives the same R and variance within 0.005,
because a layer-wide temperature factor cannot change a top-k choice and the bias
(pressure_scale 0.1) is small against the learned logit gaps. The rise of R is the router's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import ControllerConfig
from .env import (EnvConfig, Event, apply_event, domain_cumulative, init_env, learn, make_quality,
                  route)
from .law import routing_fields, step
from .schedule import AdaptiveRule, AdaptiveState, KnobSchedule, adaptive_update, kappa_at
from .state import ControllerState, RoutingObservation, init_state

__all__ = ["Trajectory", "simulate", "default_schedule", "DEFAULT_TICKS", "GATE_MIN_COHERENCE",
           "GATE_STRENGTH"]

DEFAULT_TICKS = 4000
"""Default run length: long enough for T̄_local (time constant 500 ticks) to form."""
GATE_MIN_COHERENCE = 0.2
"""min_coherence of the recorded gate (seed default)."""
GATE_STRENGTH = 0.5
"""gating_strength of the recorded gate (seed default)."""

_LAYER_FIELDS = ("Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE",
                 "valley_local_BTLE", "ridge_local_BTLE")
_ARRAY_FIELDS = ("tick_T", "seeds_B", "R_BT", "dR_BT", "kappa_BT", "gate_BT", "loss_BT",
                 "Tbar_global_BTE", "variance_global_BT", "variance_local_BTL",
                 "valley_global_BTE", "ridge_global_BTE") + _LAYER_FIELDS


@dataclass(frozen=True)
class Trajectory:
    """What ``simulate`` records every ``record_every`` ticks, per system. Leading dims [B, T].
    The [B, T, L, E] fields are None when the run used ``record_layers=False``."""

    tick_T: np.ndarray
    """[T] tick of each record (record_every, 2·record_every, ...)."""
    seeds_B: np.ndarray
    """[B] seed of each system (seed + b)."""
    R_BT: np.ndarray
    """Kuramoto coherence R after the tick."""
    dR_BT: np.ndarray
    """ΔR of the tick."""
    kappa_BT: np.ndarray
    """κ in effect in the controller (after its smoothing)."""
    gate_BT: np.ndarray
    """coherence_gate(R, 0.2, 0.5): the seed's optimizer gate."""
    loss_BT: np.ndarray
    """Mean token loss of the tick over layers and tokens."""
    Tbar_global_BTE: np.ndarray
    """Global structural temperature."""
    variance_global_BT: np.ndarray
    """var over experts of T̄_global."""
    variance_local_BTL: np.ndarray
    """var over experts of each layer's T̄_local."""
    valley_global_BTE: np.ndarray
    """bool: T̄_global < mean − c·std (c = landscape_threshold_std)."""
    ridge_global_BTE: np.ndarray
    """bool: T̄_global > mean + c·std."""
    Tbar_local_BTLE: np.ndarray | None
    T_fast_BTLE: np.ndarray | None
    usage_BTLE: np.ndarray | None
    reliability_BTLE: np.ndarray | None
    valley_local_BTLE: np.ndarray | None
    """bool: valleys of each layer's T̄_local."""
    ridge_local_BTLE: np.ndarray | None
    config: ControllerConfig
    env: EnvConfig
    schedule: KnobSchedule
    events: tuple[Event, ...]
    final_states: list[ControllerState] = field(repr=False)
    """The controller state of each system after the last tick."""

    @property
    def num_systems(self) -> int:
        return int(self.R_BT.shape[0])

    def to_npz(self, path: str | Path) -> Path:
        """Save every array, the configs (JSON) and the final states to one .npz file (its
        folder is created if needed)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        arrays = {n: getattr(self, n) for n in _ARRAY_FIELDS if getattr(self, n) is not None}
        meta = {"config": self.config.to_dict(), "env": self.env.to_dict(),
                "schedule": asdict(self.schedule), "events": [e.to_dict() for e in self.events],
                "format": "chronomoe_dyn.Trajectory/1"}
        arrays["meta_json"] = np.array(json.dumps(meta))
        for name in ("tick", "seed", "R", "psi", "dR", "kappa"):
            arrays[f"final_{name}"] = np.array([getattr(s, name) for s in self.final_states])
        for name in ControllerState.__dataclass_fields__:
            v = getattr(self.final_states[0], name)
            if isinstance(v, np.ndarray):
                arrays[f"final_{name}"] = np.stack([getattr(s, name) for s in self.final_states])
        np.savez_compressed(p, **arrays)
        return p if p.suffix == ".npz" else p.with_name(p.name + ".npz")

    @classmethod
    def from_npz(cls, path: str | Path) -> "Trajectory":
        with np.load(Path(path), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data.pop("meta_json")))
        sched = dict(meta["schedule"])
        sched["rule"] = AdaptiveRule(**sched["rule"])
        B = int(data["R_BT"].shape[0])
        finals = []
        for b in range(B):
            d = {k[len("final_"):]: v[b] for k, v in data.items() if k.startswith("final_")}
            finals.append(ControllerState.from_dict(d))
        kw = {n: data.get(n) for n in _ARRAY_FIELDS}
        return cls(**kw, config=ControllerConfig.from_dict(meta["config"]),
                   env=EnvConfig.from_dict(meta["env"]), schedule=KnobSchedule(**sched),
                   events=tuple(Event.from_dict(e) for e in meta["events"]), final_states=finals)


    # Labelled data (xarray / zarr): the layout lives in ``store.py``.
    def to_xarray(self):
        """``xarray.Dataset`` with dims system, tick, layer, expert; coordinates ``tick`` and
        ``seed``; the final states as ``final_*``; the configs as JSON attributes."""
        from .store import to_dataset
        return to_dataset(self)

    @classmethod
    def from_xarray(cls, ds) -> "Trajectory":
        from .store import from_dataset
        return from_dataset(ds)

    def to_zarr(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a zarr store (atomically; an existing one only with ``overwrite=True``)."""
        from .store import write_zarr
        return write_zarr(self, path, overwrite)

    @classmethod
    def from_zarr(cls, path: str | Path) -> "Trajectory":
        """Read a store written by ``to_zarr``: the same arrays, bit for bit."""
        from .store import read_zarr
        return read_zarr(path)


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
              progress, record_layers):
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
    for name, v in (("progress", progress), ("record_layers", record_layers)):
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{name}={v!r}: expected a bool")
    return schedule, B, ticks, seed, record_every, events


def _gate(R: np.ndarray) -> np.ndarray:
    """law.coherence_gate(R, 0.2, 0.5) elementwise (same operations)."""
    r = np.clip(R, 0.0, 1.0)
    g = np.where(r < GATE_MIN_COHERENCE, 0.0,
                 (r - GATE_MIN_COHERENCE) / (1.0 - GATE_MIN_COHERENCE))
    return np.clip(1.0 - GATE_STRENGTH * (1.0 - g), 0.0, 1.0)


def _landscape_masks(tbar: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """landscape() along the last axis: (variance, valley mask, ridge mask)."""
    mean = tbar.mean(axis=-1, keepdims=True)
    var = tbar.var(axis=-1, keepdims=True)
    std = np.sqrt(var)
    return var[..., 0], tbar < mean - c * std, tbar > mean + c * std


class _Records:
    """Record buffers shared by both backends."""

    def __init__(self, B: int, T: int, L: int, E: int, record_layers: bool):
        TL = T if record_layers else 0
        self.R_BT, self.dR_BT = np.zeros((B, T)), np.zeros((B, T))
        self.kappa_BT, self.loss_BT = np.zeros((B, T)), np.zeros((B, T))
        self.Tbar_global_BTE = np.zeros((B, T, E))
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


def _smoothed(config: ControllerConfig, k_old: float, k_in: float) -> float:
    """The κ that step() will put in effect (law.step, item 7)."""
    r = config.kappa_smoothing
    return float(np.clip((1.0 - r) * k_old + r * k_in, min(k_old, k_in), max(k_old, k_in)))


# ---------------------------------------------------------------------------------------------
# backends

def _run_numpy(config, env, schedule, seeds, ticks, record_every, events, rec, bar):
    L, E = env.num_layers, env.num_experts
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
            bias_LE, temp_LE = routing_fields(state, config, _smoothed(config, state.kappa, k_in))
            routed = route(env, es, bias_LE, temp_LE, sb, t)
            state = step(state, config, RoutingObservation(routed.counts_LE, routed.wsum_LE,
                                                           routed.loss_LE), k_in)
            learn(env, es, routed)
            if adaptive and state.tick % config.macro_period == 0:
                var_g = float(state.Tbar_global_E.var())
                ad = adaptive_update(ad, schedule.rule, state.R, var_g,
                                     var_g > config.landscape_formed_variance)
            if t % record_every == 0:
                r = t // record_every - 1
                rec.R_BT[b, r], rec.dR_BT[b, r] = state.R, state.dR
                rec.kappa_BT[b, r], rec.loss_BT[b, r] = state.kappa, routed.mean_loss
                rec.Tbar_global_BTE[b, r] = state.Tbar_global_E
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


def _ctrl_params(config: ControllerConfig):
    from ._kernels import CtrlParams
    c = config
    return CtrlParams(
        int(c.micro_period), int(c.macro_period), float(c.usage_decay),
        float(c.reliability_sharpness), float(c.coupling), float(c.omega0), float(c.drift_gain),
        float(c.phase_noise), float(c.dt), float(c.eta_structural_T_global),
        float(c.eta_structural_T_local), float(c.T_base), float(c.beta_R), float(c.beta_drift),
        float(c.beta_reliability), float(c.T_min), float(c.T_max), float(c.lens_rate),
        float(c.lens_max), float(c.beta_pressure), float(c.beta_temperature),
        float(c.beta_lens), float(c.kappa_smoothing), float(c.pressure_scale),
        float(c.temperature_scale), float(c.landscape_threshold_std),
        float(c.landscape_formed_variance))


def _run_numba(config, env, schedule, seeds, ticks, record_every, events, rec, bar):
    from . import _kernels as K
    L, E, D = env.num_layers, env.num_experts, env.num_domains
    B = len(seeds)
    init = [init_state(config, L, E, int(s)) for s in seeds]
    st = K.BatchState(
        tick_B=np.zeros(B, dtype=np.int64), seed_B=np.asarray(seeds, dtype=np.int64),
        theta_BLE=np.stack([s.theta_LE for s in init]),
        omega_BLE=np.stack([s.omega_disorder_LE for s in init]),
        usage_BLE=np.stack([s.usage_LE for s in init]),
        rel_BLE=np.stack([s.reliability_LE for s in init]),
        delta_BLE=np.stack([s.delta_LE for s in init]),
        pressure_BLE=np.stack([s.pressure_LE for s in init]),
        lens_BLE=np.stack([s.lens_LE for s in init]),
        T_fast_BLE=np.stack([s.T_fast_LE for s in init]),
        Tbar_local_BLE=np.stack([s.Tbar_local_LE for s in init]),
        Tbar_global_BE=np.stack([s.Tbar_global_E for s in init]),
        T_eff_BLE=np.stack([s.T_eff_LE for s in init]),
        scal_B4=np.array([[s.R, s.psi, s.dR, s.kappa] for s in init], dtype=np.float64),
        offset_B=np.zeros(B),
        quality_BLED=np.stack([make_quality(env, int(s)) for s in seeds]),
        est_BLDE=np.full((B, L, D, E), env.prior_loss),
        nobs_BLDE=np.full((B, L, D, E), float(env.router_prior_count)),
        cum_BD=np.tile(domain_cumulative(env.weights_D), (B, 1)))
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
    ev_arrays = K.Events(np.array([e.tick for e in events], dtype=np.int64),
                         np.array(kind_X, dtype=np.int64), np.array(layer_X, dtype=np.int64),
                         np.array(index_X, dtype=np.int64), np.array(value_X, dtype=np.float64),
                         cum_XD)
    recs = K.Records(rec.R_BT, rec.dR_BT, rec.kappa_BT, rec.loss_BT, rec.Tbar_global_BTE,
                     rec.var_local_BTL, rec.Tbar_local_BTLE, rec.T_fast_BTLE, rec.usage_BTLE,
                     rec.rel_BTLE)
    ep = K.EnvParams(int(env.tokens_per_tick), int(env.top_k), float(env.loss_floor),
                     float(env.loss_range), float(env.loss_noise), float(env.token_noise),
                     float(env.batch_noise), float(env.router_sharpness),
                     float(env.router_memory))
    r = schedule.rule
    ap = K.AdaptParams(schedule.kind == "adaptive", float(r.R_low), float(r.R_high),
                       float(r.variance_high), float(r.rate), float(r.decay), float(r.max_offset))
    kappa_T, p_T = _kappa_inputs(schedule, ticks)
    cp = _ctrl_params(config)
    # Systems are independent and each runs sequentially, so both kernels give the same bits.
    kernel = K.simulate_serial if B == 1 else K.simulate_batch
    # Chunks only to move the progress bar; the state carries over exactly between them.
    chunk = ticks if bar is None else max(1, min(ticks, max(50, ticks // 50)))
    t0 = 0
    while t0 < ticks:
        t1 = min(ticks, t0 + chunk)
        kernel(t0, t1, record_every, cp, ep, ap, kappa_T, p_T, *st, *ev_arrays, *recs)
        if bar is not None:
            bar.update((t1 - t0) * B)
        t0 = t1
    finals = []
    for b in range(B):
        R, psi, dR, kap = (float(x) for x in st.scal_B4[b])
        finals.append(ControllerState(
            tick=int(st.tick_B[b]), seed=int(seeds[b]), theta_LE=st.theta_BLE[b].copy(),
            omega_disorder_LE=st.omega_BLE[b].copy(), R=R, psi=psi, dR=dR,
            usage_LE=st.usage_BLE[b].copy(), reliability_LE=st.rel_BLE[b].copy(),
            delta_LE=st.delta_BLE[b].copy(), pressure_LE=st.pressure_BLE[b].copy(),
            lens_LE=st.lens_BLE[b].copy(), T_fast_LE=st.T_fast_BLE[b].copy(),
            Tbar_local_LE=st.Tbar_local_BLE[b].copy(), Tbar_global_E=st.Tbar_global_BE[b].copy(),
            T_eff_LE=st.T_eff_BLE[b].copy(), kappa=kap))
    return finals


# ---------------------------------------------------------------------------------------------

def simulate(config: ControllerConfig = ControllerConfig(), env: EnvConfig = EnvConfig(),
             schedule: KnobSchedule | None = None, num_systems: int = 1,
             ticks: int = DEFAULT_TICKS, seed: int = 0, record_every: int = 10,
             events: Sequence[Event] = (), backend: str = "numba", progress: bool = False,
             record_layers: bool = True) -> Trajectory:
    """Simulate ``num_systems`` independent controllers over their environments.

    config: the controller's constants. env: the synthetic environment.
    schedule: κ schedule; None = ``default_schedule(ticks)`` (cosine 0.5 → −0.3, warm-up
        ticks//4, ending at the last tick).
    num_systems: B. ticks: ticks per system. seed: system b uses seed + b (in [0, 2**32)).
    record_every: record every n ticks (ticks n, 2n, ...). events: scripted ``Event``s.
    backend: "numba" (parallel kernel) or "numpy" (the reference ``step`` in a Python loop).
    progress: show a tqdm bar. record_layers: keep the [B, T, L, E] fields (False for big B).
    """
    schedule, B, ticks, seed, record_every, events = _validate(
        config, env, schedule, num_systems, ticks, seed, record_every, events, backend,
        progress, record_layers)
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
        finals = run(config, env, schedule, seeds, ticks, record_every, events, rec, bar)
    finally:
        if bar is not None:
            bar.close()

    c = config.landscape_threshold_std
    var_g, valley_g, ridge_g = _landscape_masks(rec.Tbar_global_BTE, c)
    layers: dict[str, np.ndarray | None] = dict.fromkeys(_LAYER_FIELDS)
    if record_layers:
        _, valley_l, ridge_l = _landscape_masks(rec.Tbar_local_BTLE, c)
        layers.update(Tbar_local_BTLE=rec.Tbar_local_BTLE, T_fast_BTLE=rec.T_fast_BTLE,
                      usage_BTLE=rec.usage_BTLE, reliability_BTLE=rec.rel_BTLE,
                      valley_local_BTLE=valley_l, ridge_local_BTLE=ridge_l)
    return Trajectory(
        tick_T=np.arange(1, T + 1, dtype=np.int64) * record_every, seeds_B=seeds,
        R_BT=rec.R_BT, dR_BT=rec.dR_BT, kappa_BT=rec.kappa_BT, gate_BT=_gate(rec.R_BT),
        loss_BT=rec.loss_BT, Tbar_global_BTE=rec.Tbar_global_BTE, variance_global_BT=var_g,
        variance_local_BTL=rec.var_local_BTL, valley_global_BTE=valley_g,
        ridge_global_BTE=ridge_g, **layers, config=config, env=env, schedule=schedule,
        events=events, final_states=finals)
