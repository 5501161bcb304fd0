"""Test kit for people who change the controller: Hypothesis strategies and an invariant checker.

    from hypothesis import given
    from chronomoe_dyn import step
    from chronomoe_dyn.testing import config_and_state, observations_for, assert_invariants

    @given(config_and_state().flatmap(observations_for))
    def test_my_change(case):
        config, state, obs = case
        assert_invariants(step(state, config, obs), config, prev=state, obs=obs)

Strategies (all ``hypothesis`` SearchStrategy objects):
  ``configs(**fixed)``             valid ``ControllerConfig`` (fixed fields: a value or a strategy)
  ``shapes()``                     (num_layers, num_experts)
  ``kappas()``                     κ in [-1, 1], endpoints and 0 included
  ``invalid_kappas()``             NaN, ±inf, |κ| > 1, bools, non-numbers
  ``observations(L, E)``           ``RoutingObservation`` with/without loss and logit scale,
                                   empty layers, zero-token experts
  ``invalid_observations(L, E)``   (observation, name of the bad field)
  ``states(config, L, E)``         reachable states: ``init_state`` + a random observation/κ run
  ``config_and_state()``           (config, state); ``observations_for((config, state))`` adds an
                                   observation of the right shape
  ``schedules()``, ``adaptive_states()``  κ schedules of every kind, adaptive controller states
  ``invalid_config_values()``      (field, bad value) pairs for ``ControllerConfig``

Checker: ``check_invariants(state, config, prev=None, obs=None, kappa=None)`` returns a list of
human-readable violations (empty when the state is fine); ``assert_invariants`` raises
``AssertionError`` listing them. Without ``prev`` it checks what holds for every reachable state
(ranges, the simplex, R against θ, T_eff = T_fast·T̄_g·T̄_l, σ_L ≥ 0, the applied fields); with
``prev`` (the state before one ``step``) it also checks the clocks and that every EMA stays in
the hull of its old value and its input; ``obs`` and ``kappa`` (that step's inputs) add the
usage, z-scored drift, logit-scale, reliability and κ-smoothing checks.

Importing this module needs Hypothesis (the ``dev`` extra); ``import chronomoe_dyn`` does not.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
    from hypothesis.strategies import SearchStrategy
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("chronomoe_dyn.testing needs Hypothesis: pip install 'chronomoe-dyn[dev]'"
                      ) from e

from .config import ControllerConfig
from .law import TWO_PI, order_parameter, routing_fields, step
from .schedule import SCHEDULE_KINDS, AdaptiveRule, AdaptiveState, KnobSchedule
from .state import ControllerState, RoutingObservation, init_state

__all__ = [
    "configs", "shapes", "seeds", "kappas", "invalid_kappas", "observations",
    "invalid_observations", "random_observation", "states", "config_and_state",
    "observations_for", "schedules", "adaptive_rules", "adaptive_states",
    "invalid_config_values", "check_invariants", "assert_invariants", "bias_bound",
    "tbar_bounds",
]

# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------


def _f(lo: float, hi: float) -> SearchStrategy:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


# Ranges wide enough to exercise every branch (clips, zero gains, fast and frozen EMAs) while
# keeping values physical. Each lies inside what ControllerConfig accepts.
_CONFIG_FIELDS: dict[str, SearchStrategy] = {
    "micro_period": st.integers(1, 8),
    "macro_period": st.integers(1, 40),
    "usage_decay": _f(0.0, 0.999),
    "reliability_sharpness": _f(0.1, 20.0),
    "coupling": _f(0.0, 5.0),
    "omega0": _f(-3.0, 3.0),
    "omega_disorder_std": _f(0.0, 1.0),
    "drift_gain": _f(-3.0, 3.0),
    "phase_noise": _f(0.0, 1.0),
    "dt": _f(0.01, 2.0),
    "eta_structural_T_global": _f(0.0, 1.0),
    "eta_structural_T_local": _f(0.0, 1.0),
    "T_base": _f(0.1, 3.0),
    "beta_R": _f(0.0, 3.0),
    "beta_drift": _f(0.0, 3.0),
    "beta_reliability": _f(0.0, 3.0),
    "lens_rate": _f(0.0, 1.0),
    "lens_max": _f(0.0, 3.0),
    "beta_pressure": _f(0.0, 3.0),
    "beta_temperature": _f(0.0, 3.0),
    "beta_lens": _f(0.0, 3.0),
    "kappa_smoothing": _f(0.01, 1.0),
    "lens_clock": st.sampled_from(["macro", "micro"]),
    "pressure_gain": _f(0.0, 3.0),
    "exploration_tau0": _f(0.0, 2.0),
    "beta_tau": _f(0.0, 3.0),
    "logit_scale_floor": _f(1e-6, 1.0),
    "landscape_threshold_std": _f(0.0, 2.0),
    "landscape_formed_variance": _f(0.0, 0.5),
    "unhealthy_reliability": _f(0.0, 1.0),
}


@st.composite
def configs(draw, **fixed) -> ControllerConfig:
    """Valid ``ControllerConfig``s. Keyword arguments fix a field to a value or draw it from a
    given strategy, e.g. ``configs(phase_noise=0.0, micro_period=st.integers(1, 3))``."""
    unknown = sorted(set(fixed) - {f.name for f in fields(ControllerConfig)})
    if unknown:
        raise ValueError(f"configs(): unknown ControllerConfig field(s) {unknown}")
    kw = {}
    for name, strat in _CONFIG_FIELDS.items():
        if name in fixed:
            v = fixed[name]
            kw[name] = draw(v) if isinstance(v, SearchStrategy) else v
        else:
            kw[name] = draw(strat)
    # T_min <= T_max: draw a sorted pair, then let fixed values override and bound the other.
    lo, hi = sorted(draw(st.tuples(_f(0.05, 5.0), _f(0.05, 5.0))))
    for name in ("T_min", "T_max"):
        if name in fixed:
            v = fixed[name]
            kw[name] = draw(v) if isinstance(v, SearchStrategy) else v
    if "T_min" in kw and "T_max" not in kw:
        kw["T_max"] = max(hi, kw["T_min"])
    elif "T_max" in kw and "T_min" not in kw:
        kw["T_min"] = min(lo, kw["T_max"])
    elif "T_min" not in kw:
        kw["T_min"], kw["T_max"] = lo, hi
    # routing_T_min <= routing_T_max likewise
    rlo, rhi = sorted(draw(st.tuples(_f(0.01, 20.0), _f(0.01, 20.0))))
    for name, default in (("routing_T_min", rlo), ("routing_T_max", None)):
        v = fixed.get(name, default)
        v = draw(v) if isinstance(v, SearchStrategy) else v
        kw[name] = max(rhi, kw["routing_T_min"]) if v is None else v
    return ControllerConfig(**kw)


def shapes(max_layers: int = 4, max_experts: int = 8) -> SearchStrategy:
    """(num_layers, num_experts); one layer and one expert included."""
    return st.tuples(st.integers(1, max_layers), st.integers(1, max_experts))


def seeds() -> SearchStrategy:
    return st.integers(0, 2**32 - 1)


def kappas(min_value: float = -1.0, max_value: float = 1.0) -> SearchStrategy:
    """κ values in [min_value, max_value] ⊆ [-1, 1], with the endpoints and 0 favoured."""
    specials = [v for v in (-1.0, 0.0, 1.0) if min_value <= v <= max_value]
    return st.one_of(st.sampled_from(specials + [min_value, max_value]),
                     _f(min_value, max_value))


def invalid_kappas() -> SearchStrategy:
    """Values every κ entry point must reject with ValueError."""
    return st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf, True, False, "high", None, [0.5]]),
        st.floats(1.0, 1e300, exclude_min=True),
        st.floats(-1e300, -1.0, exclude_max=True),
    )


@st.composite
def observations(draw, num_layers: int, num_experts: int, with_loss: bool | None = None,
                 max_count: int = 1000, allow_empty_layers: bool = True,
                 with_scale: bool | None = None) -> RoutingObservation:
    """One valid ``RoutingObservation`` of shape [L, E]: integer token counts (zeros likely, so
    zero-token experts appear), possibly whole empty layers, gate-weight sums ≤ counts,
    (when ``with_loss`` is True, or drawn when None) per-expert loss sums, and (``with_scale``
    likewise) a logit scale per layer (zeros included)."""
    L, E = num_layers, num_experts
    counts = draw(hnp.arrays(np.float64, (L, E),
                             elements=st.integers(0, max_count).map(float)))
    if allow_empty_layers:
        empty = draw(hnp.arrays(np.bool_, (L,)))
        counts[empty, :] = 0.0
    w = draw(hnp.arrays(np.float64, (L, E), elements=_f(0.0, 1.0)))
    if with_loss is None:
        with_loss = draw(st.booleans())
    loss = None
    if with_loss:
        per_token = draw(hnp.arrays(np.float64, (L, E), elements=_f(0.0, 20.0)))
        loss = counts * per_token
    if with_scale is None:
        with_scale = draw(st.booleans())
    scale = draw(hnp.arrays(np.float64, (L,), elements=st.one_of(st.just(0.0), _f(0.0, 50.0)))
                 ) if with_scale else None
    return RoutingObservation(counts=counts, weight_sum=counts * w, loss_sum=loss,
                              logit_scale=scale)


def random_observation(rng: np.random.Generator, num_layers: int, num_experts: int, *,
                       tokens: int = 256, prefs_LE: np.ndarray | None = None,
                       p_empty_layer: float = 0.0, p_zero_expert: float = 0.0,
                       with_loss: bool = True, with_scale: bool = True) -> RoutingObservation:
    """An observation drawn with NumPy (for long sequences: cheap, and reproducible from the
    generator). Tokens per layer are multinomial over ``prefs_LE`` (rows summing to 1; uniform
    when None); experts are zeroed with probability ``p_zero_expert``, whole layers with
    ``p_empty_layer``; per-token losses are expert-dependent, so reliabilities differ; the logit
    scale of each layer is uniform in [0.5, 3] (``with_scale``)."""
    L, E = num_layers, num_experts
    if prefs_LE is None:
        prefs_LE = np.full((L, E), 1.0 / E)
    counts = np.stack([rng.multinomial(tokens, prefs_LE[i]) for i in range(L)]).astype(np.float64)
    counts[rng.random((L, E)) < p_zero_expert] = 0.0
    counts[rng.random(L) < p_empty_layer, :] = 0.0
    wsum = counts * rng.uniform(0.2, 1.0, (L, E))
    loss = counts * rng.uniform(0.5, 5.0, (L, E)) if with_loss else None
    scale = rng.uniform(0.5, 3.0, L) if with_scale else None
    return RoutingObservation(counts=counts, weight_sum=wsum, loss_sum=loss, logit_scale=scale)


@st.composite
def states(draw, config: ControllerConfig | SearchStrategy | None = None,
           num_layers: int | None = None, num_experts: int | None = None,
           max_steps: int = 60) -> ControllerState:
    """Reachable states: ``init_state`` followed by up to ``max_steps`` ticks of a random run
    (skewed routing so landscapes and lenses form, empty layers, zero-token experts, loss on or
    off, κ constant or a random walk). Hypothesis draws the run's structure and a NumPy seed
    for its details, which keeps examples small and shrinkable."""
    cfg = _resolve_config(draw, config)
    L = num_layers if num_layers is not None else draw(st.integers(1, 4))
    E = num_experts if num_experts is not None else draw(st.integers(1, 8))
    state = init_state(cfg, L, E, seed=draw(seeds()))
    n = draw(st.integers(0, max_steps))
    if n == 0:
        return state
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    skew = draw(st.sampled_from([0.0, 1.0, 5.0]))     # 0: uniform routing
    p_empty = draw(st.sampled_from([0.0, 0.1, 0.5]))
    p_zero = draw(st.sampled_from([0.0, 0.2]))
    loss_mode = draw(st.sampled_from(["loss", "proxy", "mixed"]))
    kappa = draw(kappas())
    kappa_walk = draw(st.booleans())
    prefs = rng.dirichlet(np.full(E, 1.0 / skew), size=L) if skew > 0 else None
    for _ in range(n):
        with_loss = loss_mode == "loss" or (loss_mode == "mixed" and rng.random() < 0.5)
        obs = random_observation(rng, L, E, prefs_LE=prefs, p_empty_layer=p_empty,
                                 p_zero_expert=p_zero, with_loss=with_loss,
                                 tokens=int(rng.integers(1, 512)))
        if kappa_walk:
            kappa = float(np.clip(kappa + rng.normal(0.0, 0.2), -1.0, 1.0))
        state = step(state, cfg, obs, kappa)
    return state


def _resolve_config(draw, config) -> ControllerConfig:
    if config is None:
        return ControllerConfig()
    if isinstance(config, SearchStrategy):
        return draw(config)
    return config


@st.composite
def config_and_state(draw, config: ControllerConfig | SearchStrategy | None = None,
                     max_steps: int = 60) -> tuple[ControllerConfig, ControllerState]:
    """(config, reachable state); ``config`` defaults to ``configs()``."""
    cfg = _resolve_config(draw, configs() if config is None else config)
    return cfg, draw(states(cfg, max_steps=max_steps))


def observations_for(case: tuple[ControllerConfig, ControllerState], **kw) -> SearchStrategy:
    """(config, state, observation) with an observation shaped for the state; use with
    ``config_and_state().flatmap(observations_for)``."""
    cfg, state = case
    return observations(state.num_layers, state.num_experts, **kw).map(
        lambda obs: (cfg, state, obs))


@st.composite
def invalid_observations(draw, num_layers: int, num_experts: int
                         ) -> tuple[RoutingObservation, str]:
    """(observation, field) where ``field`` is the one made invalid: a NaN or ±inf entry, a
    negative entry, a wrong shape, or a missing (None) ``counts``/``weight_sum``."""
    L, E = num_layers, num_experts
    good = draw(observations(L, E, with_loss=True, with_scale=True))
    arrays = {"counts": good.counts.copy(), "weight_sum": good.weight_sum.copy(),
              "loss_sum": good.loss_sum.copy(), "logit_scale": good.logit_scale.copy()}
    name = draw(st.sampled_from(sorted(arrays)))
    optional = name in ("loss_sum", "logit_scale")
    kind = draw(st.sampled_from(["nonfinite", "negative", "shape"] if optional
                                else ["nonfinite", "negative", "shape", "none"]))
    if kind == "none":
        arrays[name] = None
    elif kind == "shape":
        if name == "logit_scale":
            shape = draw(st.sampled_from([(L + 1,), (L, 1), (L, E) if E != 1 else (L, 2), ()]))
        else:
            shape = draw(st.sampled_from([(L, E + 1), (L + 1, E), (E, L) if E != L
                                          else (L, L, 1), (L * E,), ()]))
        arrays[name] = np.ones(shape)
    else:
        i, j = draw(st.integers(0, L - 1)), draw(st.integers(0, E - 1))
        bad = (draw(st.sampled_from([math.nan, math.inf, -math.inf])) if kind == "nonfinite"
               else -draw(st.floats(1e-300, 1e6)))
        if name == "logit_scale":
            arrays[name][i] = bad
        else:
            arrays[name][i, j] = bad
    keep = {n: (draw(st.booleans()) if n != name else True) for n in ("loss_sum", "logit_scale")}
    return (RoutingObservation(arrays["counts"], arrays["weight_sum"],
                               arrays["loss_sum"] if keep["loss_sum"] else None,
                               arrays["logit_scale"] if keep["logit_scale"] else None), name)


@st.composite
def adaptive_rules(draw) -> AdaptiveRule:
    lo, hi = sorted(draw(st.tuples(_f(0.0, 1.0), _f(0.0, 1.0))))
    return AdaptiveRule(R_low=lo, R_high=hi, variance_high=draw(_f(0.0, 1.0)),
                        rate=draw(_f(0.0, 0.2)), decay=draw(_f(0.0, 1.0)),
                        max_offset=draw(_f(0.0, 2.0)))


def adaptive_states(max_offset: float = 2.0) -> SearchStrategy:
    return st.builds(AdaptiveState, offset=_f(-max_offset, max_offset),
                     updates=st.integers(0, 10**6))


@st.composite
def schedules(draw, kinds: tuple[str, ...] = SCHEDULE_KINDS, max_total: int = 10**6
              ) -> KnobSchedule:
    """Valid ``KnobSchedule``s of the given kinds (warm-up may be 0)."""
    total = draw(st.integers(1, max_total))
    return KnobSchedule(kind=draw(st.sampled_from(kinds)), initial_kappa=draw(kappas()),
                        final_kappa=draw(kappas()), warmup_steps=draw(st.integers(0, total - 1)),
                        total_steps=total, rule=draw(adaptive_rules()))


# Values each ControllerConfig field must reject, besides non-numbers and non-finite values.
_OUT_OF_RANGE: dict[str, list] = {
    "micro_period": [0, -1, 2.5], "macro_period": [0, -3, 1.0],
    "usage_decay": [1.0, -0.1, 1.5], "reliability_sharpness": [0.0, -1.0],
    "coupling": [-0.1], "omega_disorder_std": [-1e-3], "phase_noise": [-0.5],
    "dt": [0.0, -1.0, 10.5, 11.0],
    "eta_structural_T_global": [-0.01, 1.01], "eta_structural_T_local": [-0.01, 1.01],
    "T_base": [0.0, -1.0], "beta_R": [-0.1], "beta_drift": [-0.1], "beta_reliability": [-0.1],
    "T_min": [0.0, -0.3], "T_max": [0.0, -3.0], "lens_rate": [-0.05], "lens_max": [-1.0],
    "beta_pressure": [-0.1, 10.5], "beta_temperature": [-0.1, 10.5], "beta_lens": [-0.1, 10.5],
    "kappa_smoothing": [0.0, 1.5, -0.3], "pressure_gain": [-0.1],
    "routing_T_min": [0.0, -1.0], "routing_T_max": [0.0, -10.0], "exploration_tau0": [-0.1],
    "beta_tau": [-0.1, 10.5], "logit_scale_floor": [0.0, -1e-3],
    "lens_clock": ["hourly", "Macro", 1], "landscape_threshold_std": [-0.5],
    "landscape_formed_variance": [-0.01], "unhealthy_reliability": [-0.1, 1.1],
}


def invalid_config_values() -> SearchStrategy:
    """(field, value) pairs that ``ControllerConfig(**{field: value})`` must reject."""
    names = [f.name for f in fields(ControllerConfig)]
    generic = st.sampled_from([math.nan, math.inf, -math.inf, "1.0", None, True, [1.0]])
    return st.sampled_from(names).flatmap(
        lambda n: st.tuples(st.just(n), st.one_of(generic, st.sampled_from(_OUT_OF_RANGE[n]))
                            if _OUT_OF_RANGE.get(n) else generic))


# ----------------------------------------------------------------------------------------------
# Invariant checker
# ----------------------------------------------------------------------------------------------

_TOL = 1e-12
"""Absolute slack for checks that compare recomputed floats (sums, products, recomputed targets).
Range and hull checks the law enforces with clips are exact."""


def bias_bound(config: ControllerConfig, kappa: float) -> float:
    """|bias| ≤ e^{β_p|κ|}·(k_P + lens_max): |P| ≤ 1 by its clip, |lens| ≤ lens_max by its
    clip, and e^{β_p κ} ≤ e^{β_p|κ|}."""
    return math.exp(config.beta_pressure * abs(kappa)) \
        * (config.pressure_gain + config.lens_max)


def tbar_bounds(config: ControllerConfig) -> tuple[float, float]:
    """Hull of the structural temperatures of any reachable state: they start at 1 and are EMAs
    of T_fast ∈ [T_min, T_max] (T̄_global of its layer mean), so they stay in
    [min(1, T_min), max(1, T_max)]."""
    return min(1.0, config.T_min), max(1.0, config.T_max)


def _outside(x: np.ndarray, lo, hi, tol: float = 0.0) -> np.ndarray:
    return (x < np.asarray(lo) - tol) | (x > np.asarray(hi) + tol)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _range(v: list, name: str, x: np.ndarray, lo, hi, tol: float = 0.0) -> None:
    bad = _outside(x, lo, hi, tol)
    if np.any(bad):
        idx = _first(bad)
        lo_i = np.broadcast_to(lo, x.shape)[idx]
        hi_i = np.broadcast_to(hi, x.shape)[idx]
        v.append(f"{name}{list(idx)}={x[idx]!r} outside [{lo_i!r}, {hi_i!r}] "
                 f"({int(bad.sum())} entries)")


def _unchanged(v: list, name: str, new: np.ndarray, old: np.ndarray, why: str) -> None:
    if not np.array_equal(new, old):
        v.append(f"{name} changed on a tick that is not a {why} tick")


def check_invariants(state: ControllerState, config: ControllerConfig,
                     prev: ControllerState | None = None, obs: RoutingObservation | None = None,
                     kappa: float | None = None) -> list[str]:
    """Violations of the controller's invariants, as messages (empty list: all hold).

    ``prev``: the state ``state`` was stepped from; ``obs``/``kappa``: that step's inputs (they
    are only used together with ``prev``)."""
    v: list[str] = []
    cfg = config
    L, E = state.theta_LE.shape if np.ndim(state.theta_LE) == 2 else (None, None)
    if L is None:
        return [f"theta_LE has shape {np.shape(state.theta_LE)}, expected [L, E]"]
    for f in fields(ControllerState):
        x = getattr(state, f.name)
        if isinstance(x, np.ndarray):
            want = (L,) if f.name == "logit_scale_L" else (L, E)
            if x.shape != want:
                v.append(f"{f.name} has shape {x.shape}, expected {want}")
            elif not np.all(np.isfinite(x)):
                v.append(f"{f.name} has non-finite entries at {_first(~np.isfinite(x))}")
        elif f.name not in ("tick", "seed") and not math.isfinite(x):
            v.append(f"{f.name}={x!r} is not finite")
    if v:
        return v  # shapes or NaNs: the checks below would only repeat them

    # Phases and coherence.
    _range(v, "theta_LE", state.theta_LE, 0.0, np.nextafter(TWO_PI, 0.0))
    if not 0.0 <= state.R <= 1.0:
        v.append(f"R={state.R!r} outside [0, 1]")
    if not -math.pi <= state.psi <= math.pi:
        v.append(f"psi={state.psi!r} outside [-π, π]")
    R_th, psi_th = order_parameter(state.theta_LE)
    if abs(R_th - state.R) > _TOL:
        v.append(f"R={state.R!r} but order_parameter(theta_LE) gives {R_th!r}")
    if R_th > 1e-6 and abs(math.remainder(psi_th - state.psi, TWO_PI)) > 1e-9:
        v.append(f"psi={state.psi!r} but order_parameter(theta_LE) gives {psi_th!r}")
    if not -1.0 <= state.dR <= 1.0:
        v.append(f"dR={state.dR!r} outside [-1, 1]")

    # Usage on the simplex, reliability a probability, drift bounded with zero row sums.
    u = state.usage_LE
    _range(v, "usage_LE", u, 0.0, 1.0)
    sums = u.sum(axis=1)
    if np.any(np.abs(sums - 1.0) > _TOL * E):
        i = int(np.argmax(np.abs(sums - 1.0)))
        v.append(f"usage_LE row {i} sums to {sums[i]!r}, not 1 (off the simplex)")
    _range(v, "reliability_LE", state.reliability_LE, 0.0, 1.0)
    _range(v, "logit_scale_L", state.logit_scale_L, 0.0, np.inf)

    # Pressure, lens, temperatures.
    _range(v, "pressure_LE", state.pressure_LE, -1.0, 1.0)
    _range(v, "lens_LE", state.lens_LE, -cfg.lens_max, cfg.lens_max)
    _range(v, "T_fast_LE", state.T_fast_LE, cfg.T_min, cfg.T_max)
    lo, hi = tbar_bounds(cfg)
    _range(v, "Tbar_local_LE", state.Tbar_local_LE, lo, hi)
    if not lo <= state.Tbar_global <= hi:
        v.append(f"Tbar_global={state.Tbar_global!r} outside [{lo!r}, {hi!r}]")
    T_eff = state.T_fast_LE * state.Tbar_global * state.Tbar_local_LE
    if not np.allclose(state.T_eff_LE, T_eff, rtol=_TOL, atol=0.0):
        v.append("T_eff_LE != T_fast_LE · Tbar_global · Tbar_local_LE")
    if not -1.0 <= state.kappa <= 1.0:
        v.append(f"kappa={state.kappa!r} outside [-1, 1]")

    # What the router receives.
    f = routing_fields(state, cfg)
    if not all(np.all(np.isfinite(x)) for x in f):
        v.append("routing_fields returned non-finite values")
    else:
        bb = bias_bound(cfg, state.kappa)
        _range(v, "bias", f.bias_LE, -bb * (1 + _TOL), bb * (1 + _TOL))
        _range(v, "temperature", f.temperature_LE, cfg.routing_T_min, cfg.routing_T_max)
        _range(v, "scale", f.scale_L, cfg.logit_scale_floor, np.inf)
        tau = cfg.exploration_tau0 * math.exp(cfg.beta_tau * state.kappa)
        if not f.tau == tau:
            v.append(f"tau={f.tau!r}, expected τ₀·e^(β_τ κ) = {tau!r}")

    if prev is not None:
        _check_transition(v, state, cfg, prev, obs, kappa)
    return v


def _check_transition(v: list, state: ControllerState, cfg: ControllerConfig,
                      prev: ControllerState, obs: RoutingObservation | None,
                      kappa: float | None) -> None:
    L, E = state.num_layers, state.num_experts
    if prev.theta_LE.shape != (L, E):
        v.append(f"prev has shape {prev.theta_LE.shape}, state {(L, E)}")
        return
    if state.tick != prev.tick + 1:
        v.append(f"tick went {prev.tick} -> {state.tick}, expected +1")
    if state.seed != prev.seed:
        v.append(f"seed changed {prev.seed} -> {state.seed}")
    if not np.array_equal(state.omega_disorder_LE, prev.omega_disorder_LE):
        v.append("omega_disorder_LE changed (it is fixed at init)")
    if state.dR != state.R - prev.R:
        v.append(f"dR={state.dR!r} != R - prev.R = {state.R - prev.R!r}")

    micro = state.tick % cfg.micro_period == 0
    macro = state.tick % cfg.macro_period == 0
    lens_tick = macro if cfg.lens_clock == "macro" else micro
    if not micro:
        for name in ("T_fast_LE", "pressure_LE", "Tbar_local_LE", "Tbar_global", "T_eff_LE"):
            _unchanged(v, name, getattr(state, name), getattr(prev, name), "micro")
    else:
        # T̄_global: EMA of the mean over layers and experts of the T_fast before this tick.
        inp = float(prev.T_fast_LE.mean())
        g_lo, g_hi = min(prev.Tbar_global, inp), max(prev.Tbar_global, inp)
        if not g_lo - _TOL <= state.Tbar_global <= g_hi + _TOL:
            v.append(f"Tbar_global={state.Tbar_global!r} outside the hull of its old value "
                     f"{prev.Tbar_global!r} and its input {inp!r}")
        _range(v, "Tbar_local_LE (hull of old value and T_fast)", state.Tbar_local_LE,
               np.minimum(prev.Tbar_local_LE, state.T_fast_LE),
               np.maximum(prev.Tbar_local_LE, state.T_fast_LE))
        # Under-used experts get positive pressure, over-used negative.
        gap = 1.0 / E - state.usage_LE / state.usage_LE.sum(axis=1, keepdims=True)
        wrong = (np.abs(gap) > _TOL) & (np.sign(state.pressure_LE) != np.sign(gap))
        if np.any(wrong):
            v.append(f"pressure_LE{list(_first(wrong))} has the wrong sign for its usage")
    if not lens_tick:
        _unchanged(v, "lens_LE", state.lens_LE, prev.lens_LE, f"lens ({cfg.lens_clock})")
    else:
        dl = state.lens_LE - prev.lens_LE
        step_max = cfg.lens_rate * math.exp(cfg.beta_lens * state.kappa) \
            * np.abs(state.pressure_LE)
        if np.any(np.abs(dl) > step_max * (1 + _TOL) + _TOL):
            v.append("lens_LE moved by more than lens_rate·e^{β_A κ}·|P| on a lens tick")
        if np.any(dl * state.pressure_LE < 0):
            v.append("lens_LE moved against the sign of the pressure")
    if kappa is not None:
        lo, hi = min(prev.kappa, kappa), max(prev.kappa, kappa)
        if not lo <= state.kappa <= hi:
            v.append(f"kappa={state.kappa!r} outside the hull of prev.kappa={prev.kappa!r} "
                     f"and the input {kappa!r}")
    if obs is not None:
        _check_observation_response(v, state, cfg, prev, obs)


def _check_observation_response(v: list, state: ControllerState, cfg: ControllerConfig,
                                prev: ControllerState, obs: RoutingObservation) -> None:
    E = state.num_experts
    counts = np.asarray(obs.counts, dtype=np.float64)
    tot = counts.sum(axis=1, keepdims=True)
    active = (tot > 0)[:, 0]
    for i in np.flatnonzero(~active):
        for name in ("usage_LE", "reliability_LE", "logit_scale_L"):
            if not np.array_equal(getattr(state, name)[i], getattr(prev, name)[i]):
                v.append(f"{name}[{i}] changed although layer {i} saw no tokens")
        if np.any(state.delta_LE[i] != 0.0):
            v.append(f"delta_LE[{i}] is nonzero although layer {i} saw no tokens")
    if obs.logit_scale is None and not np.array_equal(state.logit_scale_L, prev.logit_scale_L):
        v.append("logit_scale_L changed although the observation has no logit scale")
    if obs.logit_scale is not None:
        obs_s = np.asarray(obs.logit_scale, dtype=np.float64)
        for i in np.flatnonzero(active):
            old, new, x = prev.logit_scale_L[i], state.logit_scale_L[i], obs_s[i]
            if old == 0.0 and new != x:
                v.append(f"logit_scale_L[{i}]={new!r}: the first observation {x!r} must set it")
            elif old != 0.0 and not min(old, x) <= new <= max(old, x):
                v.append(f"logit_scale_L[{i}]={new!r} outside the hull of its old value "
                         f"{old!r} and the observed {x!r}")
    if not np.any(active):
        return
    n = tot[active]
    frac = counts[active] / n
    u_old, u_new = prev.usage_LE[active], state.usage_LE[active]
    _range(v, "usage_LE (hull of old value and routed fractions)", u_new,
           np.minimum(u_old, frac), np.maximum(u_old, frac))
    # z-scored drift, written from DESIGN.md §3.2 independently of the law's code
    want = (frac - u_old) / np.sqrt(np.maximum(u_old * (1.0 - u_old), 1.0 / E**2) / n)
    if not np.allclose(state.delta_LE[active], want, rtol=1e-12, atol=_TOL):
        v.append("delta_LE != (frac − u_old)/sqrt(max(u_old(1 − u_old), 1/E²)/n) on the layers "
                 "that saw tokens")

    # Reliability: experts without tokens keep s; the others move toward the target of
    # DESIGN.md §3.3 and stay in the hull of the old s and that target.
    seen = counts > 0
    s_old, s_new = prev.reliability_LE, state.reliability_LE
    if np.any((~seen) & (s_new != s_old)):
        v.append(f"reliability_LE{list(_first((~seen) & (s_new != s_old)))} changed although "
                 f"that expert got no tokens")
    target = _reliability_target(counts, obs.loss_sum, state.usage_LE, cfg.reliability_sharpness)
    lo, hi = np.minimum(s_old, target), np.maximum(s_old, target)
    bad = seen & _outside(s_new, lo, hi, _TOL)
    if np.any(bad):
        idx = _first(bad)
        v.append(f"reliability_LE{list(idx)}={s_new[idx]!r} outside the hull of its old value "
                 f"{s_old[idx]!r} and its target {target[idx]!r}")


def _reliability_target(counts: np.ndarray, loss, usage_new: np.ndarray,
                        sharpness: float) -> np.ndarray:
    """Target reliability, written from DESIGN.md §3.3 independently of the law's code:
    σ(sharp·(m̄ − m_e)/m̄) with m_e = loss_e/count_e and m̄ = Σloss/Σcount (0.5 when m̄ = 0), or
    the usage proxy u/max(u) on the updated usage."""
    if loss is None:
        return usage_new / usage_new.max(axis=1, keepdims=True)
    loss = np.asarray(loss, dtype=np.float64)
    out = np.full(counts.shape, 0.5)
    for i in range(counts.shape[0]):
        mbar = loss[i].sum() / counts[i].sum() if counts[i].sum() > 0 else 0.0
        for e in range(counts.shape[1]):
            if counts[i, e] > 0 and mbar > 0:
                x = sharpness * (mbar - loss[i, e] / counts[i, e]) / mbar
                out[i, e] = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else \
                    math.exp(x) / (1.0 + math.exp(x))
    return out


def assert_invariants(state: ControllerState, config: ControllerConfig,
                      prev: ControllerState | None = None, obs: RoutingObservation | None = None,
                      kappa: float | None = None) -> None:
    """Raise AssertionError listing every violated invariant (see ``check_invariants``)."""
    violations = check_invariants(state, config, prev=prev, obs=obs, kappa=kappa)
    if violations:
        raise AssertionError(f"{len(violations)} controller invariant(s) violated at tick "
                             f"{state.tick}:\n  - " + "\n  - ".join(violations))
