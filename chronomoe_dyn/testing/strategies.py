"""Hypothesis strategies of the test kit (``chronomoe_dyn.testing`` re-exports them)."""

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

from ..config import ControllerConfig
from ..law import step
from ..schedule import SCHEDULE_KINDS, AdaptiveRule, AdaptiveState, KnobSchedule
from ..state import ControllerState, RoutingObservation, init_state

__all__ = ["configs", "shapes", "seeds", "kappas", "invalid_kappas", "observations",
           "invalid_observations", "random_observation", "states", "config_and_state",
           "observations_for", "schedules", "adaptive_rules", "adaptive_states",
           "invalid_config_values", "split_totals"]

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


def split_totals(counts_LE: np.ndarray, weights_LE: np.ndarray) -> np.ndarray:
    """[L, E] non-negative integers with the row sums of ``counts_LE`` (integer-valued), split
    in proportion to ``weights_LE`` (>= 0) by largest remainders (ties to the lower index); a
    row with zero weight keeps its counts. A different routing of the same slots: what the
    noiseless top-k makes of the tokens the noisy top-k routed (law v2.1)."""
    counts = np.asarray(counts_LE, dtype=np.float64)
    w = np.asarray(weights_LE, dtype=np.float64)
    out = counts.copy()
    for i in range(counts.shape[0]):
        n, ws = int(round(counts[i].sum())), w[i].sum()
        if n == 0 or not ws > 0:
            continue
        share = w[i] / ws * n
        base = np.floor(share)
        rest = n - int(base.sum())
        order = np.argsort(-(share - base), kind="stable")
        base[order[:rest]] += 1.0
        out[i] = base
    return out


@st.composite
def _noiseless_counts(draw, counts: np.ndarray, max_count: int) -> np.ndarray:
    """Noiseless counts for ``counts``: the same array's values (no noise moved a choice) or a
    different integer split of each layer's slots (``split_totals``), skewed or not."""
    if draw(st.booleans()):
        return counts.copy()
    w = draw(hnp.arrays(np.float64, counts.shape,
                        elements=st.integers(0, max_count).map(float)))
    return split_totals(counts, w)


@st.composite
def observations(draw, num_layers: int, num_experts: int, with_loss: bool | None = None,
                 max_count: int = 1000, allow_empty_layers: bool = True,
                 with_scale: bool | None = None, with_noiseless: bool | None = None
                 ) -> RoutingObservation:
    """One valid ``RoutingObservation`` of shape [L, E]: integer token counts (zeros likely, so
    zero-token experts appear), possibly whole empty layers, gate-weight sums ≤ counts,
    (when ``with_loss`` is True, or drawn when None) per-expert loss sums, (``with_scale``
    likewise) a logit scale per layer (zeros included), and (``with_noiseless`` likewise)
    noiseless counts: equal to the counts or another integer split of each layer's slots
    (None: the field left None, which means counts)."""
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
    if with_noiseless is None:
        with_noiseless = draw(st.booleans())
    noiseless = draw(_noiseless_counts(counts, max_count)) if with_noiseless else None
    return RoutingObservation(counts=counts, weight_sum=counts * w, loss_sum=loss,
                              logit_scale=scale, noiseless_counts=noiseless)


def random_observation(rng: np.random.Generator, num_layers: int, num_experts: int, *,
                       tokens: int = 256, prefs_LE: np.ndarray | None = None,
                       p_empty_layer: float = 0.0, p_zero_expert: float = 0.0,
                       with_loss: bool = True, with_scale: bool = True,
                       noiseless: bool = False, noiseless_prefs_LE: np.ndarray | None = None
                       ) -> RoutingObservation:
    """An observation drawn with NumPy (for long sequences: cheap, and reproducible from the
    generator). Tokens per layer are multinomial over ``prefs_LE`` (rows summing to 1; uniform
    when None); experts are zeroed with probability ``p_zero_expert``, whole layers with
    ``p_empty_layer``; per-token losses are expert-dependent, so reliabilities differ; the logit
    scale of each layer is uniform in [0.5, 3] (``with_scale``). ``noiseless``: also draw
    noiseless counts, each layer's slots (the counts' total) multinomial over
    ``noiseless_prefs_LE`` (default ``prefs_LE``): the router's choice, routed apart from the
    counts by the noise. The draws for the other fields come first, so an observation without
    noiseless counts is the one the same generator gave before the option existed."""
    L, E = num_layers, num_experts
    if prefs_LE is None:
        prefs_LE = np.full((L, E), 1.0 / E)
    counts = np.stack([rng.multinomial(tokens, prefs_LE[i]) for i in range(L)]).astype(np.float64)
    counts[rng.random((L, E)) < p_zero_expert] = 0.0
    counts[rng.random(L) < p_empty_layer, :] = 0.0
    wsum = counts * rng.uniform(0.2, 1.0, (L, E))
    loss = counts * rng.uniform(0.5, 5.0, (L, E)) if with_loss else None
    scale = rng.uniform(0.5, 3.0, L) if with_scale else None
    clean = None
    if noiseless:
        p = prefs_LE if noiseless_prefs_LE is None else noiseless_prefs_LE
        n_L = counts.sum(axis=1).astype(np.int64)
        clean = np.stack([rng.multinomial(n_L[i], p[i]) for i in range(L)]).astype(np.float64)
    return RoutingObservation(counts=counts, weight_sum=wsum, loss_sum=loss, logit_scale=scale,
                              noiseless_counts=clean)


@st.composite
def states(draw, config: ControllerConfig | SearchStrategy | None = None,
           num_layers: int | None = None, num_experts: int | None = None,
           max_steps: int = 60) -> ControllerState:
    """Reachable states: ``init_state`` followed by up to ``max_steps`` ticks of a random run
    (skewed routing so landscapes and lenses form, empty layers, zero-token experts, loss on or
    off, noiseless counts apart from the counts or none, κ constant or a random walk).
    Hypothesis draws the run's structure and a NumPy seed for its details, which keeps examples
    small and shrinkable."""
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
    # the router's choice (noiseless counts), when drawn: more skewed than the noisy routing
    noiseless = draw(st.booleans())
    clean_prefs = rng.dirichlet(np.full(E, 0.5), size=L) if noiseless else None
    for _ in range(n):
        with_loss = loss_mode == "loss" or (loss_mode == "mixed" and rng.random() < 0.5)
        obs = random_observation(rng, L, E, prefs_LE=prefs, p_empty_layer=p_empty,
                                 p_zero_expert=p_zero, with_loss=with_loss,
                                 tokens=int(rng.integers(1, 512)), noiseless=noiseless,
                                 noiseless_prefs_LE=clean_prefs)
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
    negative entry, a wrong shape, a missing (None) ``counts``/``weight_sum``, or noiseless
    counts whose layer total is not the counts' (by at least half a slot)."""
    L, E = num_layers, num_experts
    good = draw(observations(L, E, with_loss=True, with_scale=True, with_noiseless=True))
    arrays = {"counts": good.counts.copy(), "weight_sum": good.weight_sum.copy(),
              "loss_sum": good.loss_sum.copy(), "logit_scale": good.logit_scale.copy(),
              "noiseless_counts": good.noiseless_counts.copy()}
    optional_fields = ("loss_sum", "logit_scale", "noiseless_counts")
    name = draw(st.sampled_from(sorted(arrays)))
    optional = name in optional_fields
    kinds = ["nonfinite", "negative", "shape"] if optional else \
        ["nonfinite", "negative", "shape", "none"]
    if name == "noiseless_counts":
        kinds.append("total")
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        arrays[name] = None
    elif kind == "total":
        # one layer's slots off by >= half a slot (1e6 slots at most: far above rtol 1e-6),
        # up or down (down only where that entry can go without turning negative)
        i, j = draw(st.integers(0, L - 1)), draw(st.integers(0, E - 1))
        d = draw(st.sampled_from([0.5, 1.0, 7.0]))
        down = draw(st.booleans()) and arrays[name][i, j] >= d
        arrays[name][i, j] += -d if down else d
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
    keep = {n: (draw(st.booleans()) if n != name else True) for n in optional_fields}
    return (RoutingObservation(arrays["counts"], arrays["weight_sum"],
                               arrays["loss_sum"] if keep["loss_sum"] else None,
                               arrays["logit_scale"] if keep["logit_scale"] else None,
                               arrays["noiseless_counts"] if keep["noiseless_counts"] else None),
            name)


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
