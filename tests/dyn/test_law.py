"""Known-answer tests of the control law, version 2 (chronomoe_dyn.law, DESIGN.md §3), each on a
small hand-made state whose expected numbers are worked out in the test."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from chronomoe_dyn import (ControllerConfig, RoutingObservation, coherence_gate, init_state,
                           knob_factors, order_parameter, routing_fields, smooth_kappa, step)
from chronomoe_dyn import rng

SQRT_HALF = math.sqrt(0.5)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def frozen_phases(**kw) -> ControllerConfig:
    """A config whose phases never move (no frequency, coupling, drive or noise), so R is
    whatever the hand-made θ gives; micro and macro tick on every tick unless overridden. The
    hand computations below use the seed's T_fast gains (β_d 0.3, β_s 0.2, sharpness 4), pinned
    here so that a recalibrated default does not change the arithmetic being checked."""
    base = dict(coupling=0.0, omega0=0.0, drift_gain=0.0, phase_noise=0.0, micro_period=1,
                macro_period=1, beta_drift=0.3, beta_reliability=0.2, reliability_sharpness=4.0)
    base.update(kw)
    return ControllerConfig(**base)


def hand_state(cfg, theta=None, usage=None, reliability=None, **fields):
    """init_state(1 layer) with the given rows; R and ψ recomputed from θ; no frequency
    disorder."""
    E = len(usage if usage is not None else theta)
    s = init_state(cfg, 1, E, seed=0)
    th = np.zeros((1, E)) if theta is None else np.array([theta], dtype=float)
    R, psi = order_parameter(th)
    kw = dict(theta_LE=th, R=R, psi=psi, omega_disorder_LE=np.zeros((1, E)))
    if usage is not None:
        kw["usage_LE"] = np.array([usage], dtype=float)
    if reliability is not None:
        kw["reliability_LE"] = np.array([reliability], dtype=float)
    kw.update(fields)
    return dataclasses.replace(s, **kw)


def obs_of(counts, loss=None):
    c = np.array(counts, dtype=float)
    return RoutingObservation(c, 0.5 * c, None if loss is None else np.array(loss, dtype=float))


# --- pressure, drift, T_fast --------------------------------------------------------------------

def test_pressure_formula_on_hand_made_usage():
    """P = clip(2(1/E − u/Σu), −1, 1). Counts equal to the usage keep u fixed (frac = u)."""
    cfg = frozen_phases()
    s = hand_state(cfg, usage=[0.4, 0.3, 0.2, 0.1])
    new = step(s, cfg, obs_of([[400, 300, 200, 100]]))
    np.testing.assert_array_equal(new.usage_LE, [[0.4, 0.3, 0.2, 0.1]])
    np.testing.assert_allclose(new.pressure_LE, [[-0.3, -0.1, 0.1, 0.3]], rtol=0, atol=1e-15)
    # Clipped: 2(1/4 − 0.85) = −1.2 → −1; the others 2(0.25 − 0.05) = 0.4.
    s = hand_state(cfg, usage=[0.85, 0.05, 0.05, 0.05])
    new = step(s, cfg, obs_of([[850, 50, 50, 50]]))
    np.testing.assert_allclose(new.pressure_LE, [[-1.0, 0.4, 0.4, 0.4]], rtol=0, atol=1e-15)


def test_T_fast_formula_on_hand_made_state():
    """θ = (0, 0, π/2, π/2) gives R = √2/2; u = (.4, .3, .2, .1) gives d = (.15, .05, .05, .15),
    d̂ = (1, 1/3, 1/3, 1); s0 = (.2, .4, .6, .8) moves to 0.95·s0 + 0.05·(u/max u) =
    (.24, .4175, .595, .7725) before T_fast is computed."""
    cfg = frozen_phases()
    q = math.pi / 2
    s = hand_state(cfg, theta=[0, 0, q, q], usage=[0.4, 0.3, 0.2, 0.1],
                   reliability=[0.2, 0.4, 0.6, 0.8])
    assert s.R == pytest.approx(SQRT_HALF, abs=1e-15)
    new = step(s, cfg, obs_of([[400, 300, 200, 100]]))
    np.testing.assert_allclose(new.reliability_LE, [[0.24, 0.4175, 0.595, 0.7725]], atol=1e-15)
    f_R = 1 + 0.5 * (1 - SQRT_HALF)
    f_d = np.array([1.3, 1.1, 1.1, 1.3])
    f_s = np.array([1.152, 1.1165, 1.081, 1.0455])
    want = f_R * f_d * f_s
    np.testing.assert_allclose(new.T_fast_LE, [want], rtol=1e-14)
    # T̄_local: 0.99·1 + 0.01·T_fast; T̄_global: EMA of the *previous* T_fast (1.0 at init) → 1.
    np.testing.assert_allclose(new.Tbar_local_LE, [0.99 + 0.01 * want], rtol=1e-14)
    assert new.Tbar_global == 1.0
    np.testing.assert_allclose(new.T_eff_LE, [want * (0.99 + 0.01 * want)], rtol=1e-14)


def test_T_fast_is_clipped_to_its_range():
    """Same hand-made layer with R = 1: raw T_fast = T_base·(1.3, 1.1, 1.1, 1.3)·(1.095, 1.0975,
    1.1, 1.1025) (s after the update: .525, .5125, .5, .4875)."""
    raw = np.array([1.3 * 1.095, 1.1 * 1.0975, 1.1 * 1.1, 1.3 * 1.1025])
    for T_base, T_min, T_max in ((1.0, 1.3, 3.0), (2.8, 0.3, 3.0), (1.0, 0.3, 1.25)):
        cfg = frozen_phases(T_base=T_base, T_min=T_min, T_max=T_max)
        s = hand_state(cfg, usage=[0.4, 0.3, 0.2, 0.1], reliability=[0.5] * 4)
        new = step(s, cfg, obs_of([[400, 300, 200, 100]]))
        np.testing.assert_allclose(new.T_fast_LE, [np.clip(T_base * raw, T_min, T_max)],
                                   rtol=1e-14)
    assert np.all(np.clip(1.0 * raw, 1.3, 3.0)[[1, 2]] == 1.3)      # the clips are exercised
    assert np.all(np.clip(2.8 * raw, 0.3, 3.0) == 3.0)


@pytest.mark.parametrize("E", range(1, 65))
def test_uniform_routing_gives_no_drift_boost(E):
    """Exactly uniform usage has no drift: d̂ = 0 and
    T_fast = T_base(1 + β_R(1 − R))(1 + β_s(1 − s)) for every E. (u/Σu carries rounding noise for E = 6, 7, 12, ...; normalising that noise by its
    own maximum used to switch on the full β_d boost.)"""
    cfg = frozen_phases()
    s = init_state(cfg, 1, E, seed=1)
    s = dataclasses.replace(s, omega_disorder_LE=np.zeros((1, E)))
    new = step(s, cfg, obs_of(np.full((1, E), 7.0)))
    rel = new.reliability_LE[0, 0]
    assert rel == pytest.approx(0.95 * 0.5 + 0.05 * 1.0)     # usage proxy target u/max u = 1
    want = 1.0 * (1 + 0.5 * (1 - s.R)) * (1 + 0.2 * (1 - rel))
    np.testing.assert_allclose(new.T_fast_LE, np.full((1, E), want), rtol=1e-14)


# --- clocks -----------------------------------------------------------------------------------

def test_temperatures_move_only_on_micro_ticks_and_lens_only_on_macro_ticks():
    cfg = ControllerConfig(lens_clock="macro")                # micro 5, macro 20
    gen = np.random.default_rng(7)
    s = init_state(cfg, 2, 4, seed=5)
    T_moves, lens_moves = [], []
    for _ in range(45):
        counts = gen.multinomial(200, [0.55, 0.25, 0.15, 0.05], size=2).astype(float)
        new = step(s, cfg, obs_of(counts, loss=counts * gen.uniform(1, 3, (2, 4))))
        if not (np.array_equal(new.T_fast_LE, s.T_fast_LE)
                and np.array_equal(new.Tbar_local_LE, s.Tbar_local_LE)
                and new.Tbar_global == s.Tbar_global
                and np.array_equal(new.pressure_LE, s.pressure_LE)
                and np.array_equal(new.T_eff_LE, s.T_eff_LE)):
            T_moves.append(new.tick)
        if not np.array_equal(new.lens_LE, s.lens_LE):
            lens_moves.append(new.tick)
        # Usage, reliability and phases move on every tick.
        assert not np.array_equal(new.usage_LE, s.usage_LE)
        assert not np.array_equal(new.theta_LE, s.theta_LE)
        s = new
    assert T_moves == [5, 10, 15, 20, 25, 30, 35, 40, 45]
    assert lens_moves == [20, 40]


# --- usage, drift, empty layers, reliability -----------------------------------------------------

def test_usage_ema_and_z_scored_drift():
    """frac = (.75, .25) against u = (.5, .5) with n = 4 slots: sampling sd sqrt(u(1−u)/n) =
    0.25, so δ = ±.25/.25 = (1, −1); u ← .95u + .05 frac. The same shares from 400 slots are
    ten sd away: δ = (10, −10)."""
    cfg = frozen_phases(micro_period=7, macro_period=7)
    s = hand_state(cfg, usage=[0.5, 0.5])
    new = step(s, cfg, obs_of([[3, 1]]))
    np.testing.assert_allclose(new.delta_LE, [[1.0, -1.0]], atol=1e-15)
    np.testing.assert_allclose(new.usage_LE, [[0.5125, 0.4875]], atol=1e-15)
    new = step(s, cfg, obs_of([[300, 100]]))
    np.testing.assert_allclose(new.delta_LE, [[10.0, -10.0]], rtol=1e-14)


def test_drift_variance_is_floored_at_one_over_E_squared():
    """u = (0.98, 0.01, 0.01): u(1−u) = 0.0196 and 0.0099, both below 1/E² = 1/9, so the
    denominator is sqrt((1/9)/n) for every expert; with n = 10 slots (6, 2, 2):
    δ = (frac − u)·3·sqrt(10) = (−0.38, 0.19, 0.19)·9.4868."""
    cfg = frozen_phases(micro_period=7, macro_period=7)
    s = hand_state(cfg, usage=[0.98, 0.01, 0.01])
    new = step(s, cfg, obs_of([[6, 2, 2]]))
    want = (np.array([0.6, 0.2, 0.2]) - [0.98, 0.01, 0.01]) * 3.0 * math.sqrt(10.0)
    np.testing.assert_allclose(new.delta_LE, [want], rtol=1e-14)
    # Above the floor (1/16) the binomial variance is used: u = (.3, .3, .2, .2), n = 20.
    s = hand_state(cfg, usage=[0.3, 0.3, 0.2, 0.2])
    new = step(s, cfg, obs_of([[5, 5, 5, 5]]))
    sd = np.sqrt(np.array([0.21, 0.21, 0.16, 0.16]) / 20)
    np.testing.assert_allclose(new.delta_LE, [np.array([-0.05, -0.05, 0.05, 0.05]) / sd],
                               rtol=1e-13)
    # E = 2: u(1 − u) ≤ 1/4 = 1/E² always, the floor binds: u = (.3, .7), n = 10.
    s = hand_state(cfg, usage=[0.3, 0.7])
    new = step(s, cfg, obs_of([[5, 5]]))
    np.testing.assert_allclose(new.delta_LE, [[0.2 / math.sqrt(0.025), -0.2 / math.sqrt(0.025)]],
                               rtol=1e-14)


def test_logit_scale_first_observation_sets_then_ema():
    """σ_L starts at 0 (not observed); the first tick with tokens and a logit scale sets it;
    later ticks take the EMA with ρ = usage_decay; None, or a layer without tokens, keeps it."""
    cfg = frozen_phases(micro_period=7, macro_period=7)
    s = init_state(cfg, 2, 2)
    np.testing.assert_array_equal(s.logit_scale_L, [0.0, 0.0])
    c = np.array([[3.0, 1.0], [0.0, 0.0]])
    s1 = step(s, cfg, RoutingObservation(c, c, None, np.array([2.0, 5.0])))
    np.testing.assert_array_equal(s1.logit_scale_L, [2.0, 0.0])        # layer 1 has no tokens
    s2 = step(s1, cfg, RoutingObservation(c, c, None, np.array([4.0, 5.0])))
    np.testing.assert_allclose(s2.logit_scale_L, [0.95 * 2.0 + 0.05 * 4.0, 0.0], rtol=1e-15)
    s3 = step(s2, cfg, RoutingObservation(c, c))                         # no logit scale
    np.testing.assert_array_equal(s3.logit_scale_L, s2.logit_scale_L)


def test_empty_layer_keeps_usage_and_reliability(state_2x4, cfg):
    s = dataclasses.replace(state_2x4, usage_LE=np.array([[0.4, 0.3, 0.2, 0.1]] * 2),
                            reliability_LE=np.array([[0.1, 0.2, 0.3, 0.9]] * 2))
    counts = np.array([[10, 20, 30, 40], [0, 0, 0, 0]], dtype=float)
    new = step(s, cfg, obs_of(counts, loss=counts * 2.0))
    np.testing.assert_array_equal(new.usage_LE[1], s.usage_LE[1])
    np.testing.assert_array_equal(new.reliability_LE[1], s.reliability_LE[1])
    np.testing.assert_array_equal(new.delta_LE[1], np.zeros(4))
    assert not np.array_equal(new.usage_LE[0], s.usage_LE[0])


def test_equal_losses_give_reliability_target_one_half():
    cfg = frozen_phases(micro_period=9, macro_period=9)
    s = hand_state(cfg, usage=[1 / 3] * 3, reliability=[0.9, 0.1, 0.5])
    counts = [[10, 20, 30]]
    new = step(s, cfg, obs_of(counts, loss=[[25.0, 50.0, 75.0]]))      # 2.5 per token each
    np.testing.assert_allclose(new.reliability_LE, [[0.95 * 0.9 + 0.025, 0.95 * 0.1 + 0.025,
                                                     0.5]], atol=1e-15)


def test_lower_loss_gives_higher_reliability_and_unseen_experts_keep_theirs():
    """Per-token losses (1, 2, 3, –) with equal counts: m̄ = 2, targets σ(4·(2 − m)/2) =
    σ(2), σ(0), σ(−2); the fourth expert got no tokens and keeps s = 0.7."""
    cfg = frozen_phases(micro_period=9, macro_period=9)
    s = hand_state(cfg, usage=[0.25] * 4, reliability=[0.5, 0.5, 0.5, 0.7])
    new = step(s, cfg, obs_of([[10, 10, 10, 0]], loss=[[10.0, 20.0, 30.0, 0.0]]))
    want = [0.475 + 0.05 * sigmoid(2.0), 0.5, 0.475 + 0.05 * sigmoid(-2.0), 0.7]
    np.testing.assert_allclose(new.reliability_LE, [want], atol=1e-15)
    assert new.reliability_LE[0, 0] > new.reliability_LE[0, 1] > new.reliability_LE[0, 2]


def test_reliability_without_losses_uses_the_usage_proxy():
    """Target u/max(u) on the updated usage."""
    cfg = frozen_phases(micro_period=9, macro_period=9)
    s = hand_state(cfg, usage=[0.5, 0.5], reliability=[0.5, 0.5])
    new = step(s, cfg, obs_of([[3, 1]]))
    u = np.array([0.5125, 0.4875])
    np.testing.assert_allclose(new.reliability_LE, [0.475 + 0.05 * u / u.max()], atol=1e-15)


# --- law v2.1: usage reads the router's choice (noiseless counts), reliability the routing ------

def test_usage_drift_and_pressure_read_the_noiseless_counts_reliability_the_counts():
    """One layer, E = 2, u = s = (.5, .5), θ = 0, drive α = 0.5 only. The noise routed (3, 1)
    slots with losses (3, 3), the router chose (1, 3) (noiseless counts, the same 4 slots).
    Usage side (from the choice): frac = (.25, .75), δ = (−.25, .25)/sqrt(.25/4) = (−1, 1),
    u ← .95·.5 + .05·frac = (.4875, .5125), θ ← dt·α·δ = (−.25, .25) mod 2π, and on this micro
    tick P = 2(1/2 − u) = (.025, −.025), d̂ = (1, 1).
    Reliability side (from the routed counts): m = loss/counts = (1, 3), m̄ = 6/4 = 1.5,
    target σ(4·(1.5 − m)/1.5) = (σ(4/3), σ(−4)), s ← .95·.5 + .05·target.
    Read the other way round (usage from counts, or m = loss/noiseless) every one of these
    would differ: δ = (1, −1), P = (−.025, .025), m = (3, 1)."""
    cfg = frozen_phases(drift_gain=0.5)
    s = hand_state(cfg, usage=[0.5, 0.5], reliability=[0.5, 0.5])
    c = np.array([[3.0, 1.0]])
    obs = RoutingObservation(c, 0.5 * c, np.array([[3.0, 3.0]]),
                             noiseless_counts=np.array([[1.0, 3.0]]))
    new = step(s, cfg, obs)
    np.testing.assert_allclose(new.delta_LE, [[-1.0, 1.0]], rtol=0, atol=1e-15)
    np.testing.assert_allclose(new.usage_LE, [[0.4875, 0.5125]], rtol=0, atol=1e-15)
    dt = cfg.dt
    np.testing.assert_allclose(new.theta_LE, [[2 * math.pi - dt * 0.5, dt * 0.5]], rtol=0,
                               atol=1e-14)
    np.testing.assert_allclose(new.pressure_LE, [[0.025, -0.025]], rtol=0, atol=1e-15)
    target = np.array([sigmoid(4.0 / 3.0), sigmoid(-4.0)])
    np.testing.assert_allclose(new.reliability_LE, [0.475 + 0.05 * target], rtol=0, atol=1e-15)
    # T_fast: R after the update = cos(dt·α) (phases ±0.25), d̂ = 1 for both, the updated s
    assert new.R == pytest.approx(math.cos(dt * 0.5), rel=1e-14)
    want_T = (1 + 0.5 * (1 - math.cos(dt * 0.5))) * (1 + 0.3) \
        * (1 + 0.2 * (1 - new.reliability_LE[0]))
    np.testing.assert_allclose(new.T_fast_LE, [want_T], rtol=1e-14)


def test_noiseless_counts_drive_the_pressure_tick_after_tick():
    """The routing stays balanced, (2, 2), while the router's choice keeps preferring expert 0,
    (3, 1): usage converges on the choice, u₀ = .75 − .25·.95ⁿ, so pressure pushes against
    expert 0 (P₀ = 2(.5 − u₀) < 0) although the load the experts got is even. Without the
    noiseless counts (v2) the usage and pressure would stay at (.5, .5) and 0."""
    cfg = frozen_phases()
    s = hand_state(cfg, usage=[0.5, 0.5])
    even = np.array([[2.0, 2.0]])
    for n in range(1, 31):
        s = step(s, cfg, RoutingObservation(even, even, None,
                                            noiseless_counts=np.array([[3.0, 1.0]])))
        u0 = 0.75 - 0.25 * 0.95 ** n
        np.testing.assert_allclose(s.usage_LE, [[u0, 1 - u0]], rtol=0, atol=1e-14)
        np.testing.assert_allclose(s.pressure_LE, [[2 * (0.5 - u0), -2 * (0.5 - u0)]], rtol=0,
                                   atol=1e-14)
    assert s.pressure_LE[0, 0] < -0.3


@pytest.mark.parametrize("with_loss", [False, True])
def test_noiseless_counts_none_is_counts_bit_for_bit(state_2x4, cfg, with_loss):
    """``noiseless_counts=None`` means the counts: the same state, bit for bit, as passing the
    counts (a copy) explicitly, over a few ticks with an empty layer and zero-token experts."""
    r = np.random.default_rng(4)
    a = b = state_2x4
    for t in range(12):
        c = r.integers(0, 9, (2, 4)).astype(float)
        c[t % 2] = 0.0 if t % 5 == 0 else c[t % 2]
        loss = c * r.uniform(0.5, 2.0, (2, 4)) if with_loss else None
        scale = r.uniform(0.5, 2.0, 2)
        a = step(a, cfg, RoutingObservation(c, 0.5 * c, loss, scale), 0.2)
        b = step(b, cfg, RoutingObservation(c, 0.5 * c, loss, scale, noiseless_counts=c.copy()),
                 0.2)
        for name, v in a.to_dict().items():
            got = getattr(b, name)
            assert np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v, name


@pytest.mark.parametrize("noiseless, what", [
    (np.ones((2, 4)), "shape"), (np.ones((3, 2)), "shape"), (np.ones(6), "shape"),
    ([[np.nan, 2.0, 2.0], [1.0, 1.0, 1.0]], "non-finite"),
    ([[np.inf, 2.0, 2.0], [1.0, 1.0, 1.0]], "non-finite"),
    ([[-1.0, 3.0, 2.0], [1.0, 1.0, 1.0]], "negative"),
    ([["x", 2.0, 2.0], [1.0, 1.0, 1.0]], "numeric"),
    # layer 1 routed 3 slots: 4 (or 2.99) counted without the noise is not the same slots
    ([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]], r"layer 1 sums to .*?4\.0.*?counts to .*?3\.0"),
    ([[1.0, 1.0, 2.0], [1.0, 1.0, 0.99]], r"layer 1 sums to .*?2\.99"),
    ([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0]], r"layer 0 sums to .*?3\.0.*?counts to .*?4\.0"),
])
def test_bad_noiseless_counts_are_rejected_and_the_state_untouched(noiseless, what):
    """RoutingObservation.noiseless_counts: [L, E] finite, >= 0, each layer summing to the
    counts' slots (relative 1e-6); the error names the field (and the layer), nothing moves."""
    cfg = ControllerConfig()
    s = init_state(cfg, 2, 3)
    snap = s.to_dict()
    c = np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    obs = RoutingObservation(c, c, None, None, noiseless_counts=noiseless)
    with pytest.raises(ValueError, match=rf"RoutingObservation\.noiseless_counts\b.*{what}"):
        step(s, cfg, obs)
    for name, v in snap.items():
        got = getattr(s, name)
        assert np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v


def test_noiseless_totals_within_the_tolerance_are_accepted():
    """The totals are sums of the same slot weights in another order: a relative difference
    up to 1e-6 passes (and the choice is what usage reads), 1e-5 does not."""
    cfg = ControllerConfig()
    s = init_state(cfg, 1, 2)
    c = np.array([[600.0, 400.0]])
    ok = step(s, cfg, RoutingObservation(c, c, noiseless_counts=np.array([[200.0, 800.0005]])))
    assert ok.usage_LE[0, 0] < 0.5 < ok.usage_LE[0, 1]           # the choice, not (.6, .4)
    with pytest.raises(ValueError, match=r"noiseless_counts: layer 0"):
        step(s, cfg, RoutingObservation(c, c, noiseless_counts=np.array([[200.0, 800.01]])))


# --- phases ----------------------------------------------------------------------------------

def test_kuramoto_update_one_tick_by_hand():
    """θ = (0, π/2): R = √2/2, ψ = π/4. With K = 0.25, dt = 0.5, ω₀ = 1, α = 0.5 and δ = (1, −1)
    (counts 3:1 against u = ½, n = 4): θ₀' = 0.5(1 + .5 + .25·½) = 0.8125,
    θ₁' = π/2 + 0.5(1 − .5 − .125)."""
    cfg = ControllerConfig(coupling=0.25, dt=0.5, omega0=1.0, drift_gain=0.5, phase_noise=0.0)
    s = hand_state(cfg, theta=[0.0, math.pi / 2], usage=[0.5, 0.5])
    assert (s.R, s.psi) == (pytest.approx(SQRT_HALF), pytest.approx(math.pi / 4))
    new = step(s, cfg, obs_of([[3, 1]]))
    np.testing.assert_allclose(new.theta_LE, [[0.8125, math.pi / 2 + 0.1875]], atol=1e-15)
    R, psi = order_parameter(new.theta_LE)
    assert (new.R, new.psi) == (R, psi)
    assert new.dR == new.R - s.R


def test_phases_wrap_into_zero_two_pi():
    cfg = ControllerConfig(coupling=0.0, dt=1.0, omega0=1.0, drift_gain=0.0, phase_noise=0.0)
    s = hand_state(cfg, theta=[2 * math.pi - 0.25, 0.1])
    new = step(s, cfg, obs_of([[1, 1]]))
    np.testing.assert_allclose(new.theta_LE, [[0.75, 1.1]], atol=1e-14)


def test_phase_noise_follows_the_counter_rng_contract():
    """θ' − θ'_noiseless = σ·sqrt(dt)·ξ with ξ = rng.normal(seed, STREAM_PHASE, tick, arange(L·E))
    reshaped to [L, E] (docs/CONTRACTS.md), tick being the tick after the increment."""
    L, E, sigma, dt = 2, 3, 0.3, 0.5
    quiet = ControllerConfig(phase_noise=0.0, dt=dt)
    noisy = ControllerConfig(phase_noise=sigma, dt=dt)
    s = init_state(noisy, L, E, seed=1234)
    counts = np.arange(1.0, 7.0).reshape(L, E)
    for _ in range(3):
        s = step(s, noisy, obs_of(counts))
    a, b = step(s, quiet, obs_of(counts)), step(s, noisy, obs_of(counts))
    xi = rng.normal(1234, rng.STREAM_PHASE, 4, np.arange(L * E)).reshape(L, E)
    diff = np.mod(b.theta_LE - a.theta_LE + math.pi, 2 * math.pi) - math.pi
    np.testing.assert_allclose(diff, sigma * math.sqrt(dt) * xi, atol=1e-12)


def test_order_parameter_known_values():
    assert order_parameter(np.full(5, 1.3)) == (pytest.approx(1.0), pytest.approx(1.3))
    R, _ = order_parameter(np.array([0.0, math.pi]))
    assert R == pytest.approx(0.0, abs=1e-15)
    R, psi = order_parameter(np.array([[0.0, math.pi / 2]]))
    assert (R, psi) == (pytest.approx(SQRT_HALF), pytest.approx(math.pi / 4))
    with pytest.raises(ValueError, match="empty"):
        order_parameter(np.array([]))


# --- lens, κ, outputs ----------------------------------------------------------------------

def test_lens_update_on_a_macro_tick():
    """Frozen phases give ΔR = 0, σ(0) = ½: lens += 0.05·e^{0.7κ}·½·P, clipped to ±lens_max."""
    cfg = frozen_phases()
    kappa = 0.5
    s = hand_state(cfg, usage=[0.4, 0.3, 0.2, 0.1],
                   lens_LE=np.array([[0.0, 0.0, 0.0, 0.999]]))
    new = step(s, cfg, obs_of([[400, 300, 200, 100]]), kappa)
    P = np.array([-0.3, -0.1, 0.1, 0.3])
    want = 0.05 * math.exp(0.35) * 0.5 * P
    want[3] = 1.0                                      # 0.999 + 0.0106… clipped to lens_max
    np.testing.assert_allclose(new.lens_LE, [want], atol=1e-15)


def test_lens_clock_micro_moves_the_lens_on_micro_ticks_only():
    """lens_clock="micro": the lens moves on every micro tick (here every 2nd tick), with the
    pressure of that micro tick, and never between them; "macro" (macro_period 6) at 6, 12."""
    gen = np.random.default_rng(3)
    for clock, want in (("micro", [2, 4, 6, 8, 10, 12]), ("macro", [6, 12])):
        cfg = ControllerConfig(micro_period=2, macro_period=6, lens_clock=clock)
        s = init_state(cfg, 1, 3, seed=2)
        moved = []
        for _ in range(12):
            new = step(s, cfg, obs_of(gen.multinomial(90, [0.6, 0.3, 0.1], size=1)))
            if not np.array_equal(new.lens_LE, s.lens_LE):
                moved.append(new.tick)
            s = new
        assert moved == want, clock


def test_kappa_smoothing_ema():
    cfg = ControllerConfig(kappa_smoothing=0.3)
    s = init_state(cfg, 1, 2)
    s1 = step(s, cfg, obs_of([[1, 1]]), 1.0)
    s2 = step(s1, cfg, obs_of([[1, 1]]), 1.0)
    assert (s1.kappa, s2.kappa) == (pytest.approx(0.3), pytest.approx(0.51))
    s3 = step(s2, ControllerConfig(), obs_of([[1, 1]]), -0.2)     # no smoothing: jumps
    assert s3.kappa == -0.2


def test_knob_factors_known_values(cfg):
    # the calibrated default β_p is 0 (law v2.1): κ leaves the bias factor at 1
    assert knob_factors(1.0, cfg).pressure == 1.0 and knob_factors(-1.0, cfg).pressure == 1.0
    cfg = ControllerConfig(beta_pressure=0.5)          # the seed's β_p, to tell the factors apart
    f = knob_factors(1.0, cfg)
    assert tuple(f) == pytest.approx((math.exp(0.5), math.exp(0.4), math.exp(0.7),
                                      math.exp(1.5)))
    assert tuple(knob_factors(-1.0, cfg)) == pytest.approx((math.exp(-0.5), math.exp(-0.4),
                                                            math.exp(-0.7), math.exp(-1.5)))


def test_routing_fields_formula_and_clamp():
    """bias = e^{β_p κ}(k_P·P + lens), temperature = clip(T_eff·e^{β_T κ}, T_lo, T_hi),
    scale = max(σ_L, floor), τ = τ₀·e^{β_τ κ}; k_P = 2 so that P and lens are told apart, and
    the seed's β_p 0.5 (the default is 0) so that κ's factor on the bias shows."""
    cfg = ControllerConfig(pressure_gain=2.0, routing_T_min=0.2, routing_T_max=8.0,
                           beta_pressure=0.5)
    s = hand_state(cfg, usage=[0.25] * 4, pressure_LE=np.array([[0.5, -0.5, 0.0, 1.0]]),
                   lens_LE=np.array([[0.1, 0.2, -0.3, 1.0]]),
                   T_eff_LE=np.array([[1.0, 2.0, 20.0, 0.01]]), kappa=0.25,
                   logit_scale_L=np.array([2.5]))
    f = routing_fields(s, cfg, 1.0)
    np.testing.assert_allclose(f.bias_LE, math.exp(0.5) * np.array([[1.1, -0.8, -0.3, 3.0]]),
                               rtol=1e-15)
    np.testing.assert_allclose(f.temperature_LE, [[math.exp(0.4), 2 * math.exp(0.4), 8.0, 0.2]],
                               rtol=1e-15)
    np.testing.assert_array_equal(f.scale_L, [2.5])
    assert f.tau == pytest.approx(0.1 * math.exp(1.5), rel=1e-15)
    # Default κ: the one in effect in the state. σ_L = 0 (not observed) routes with the floor.
    f0 = routing_fields(dataclasses.replace(s, logit_scale_L=np.array([0.0])), cfg)
    np.testing.assert_allclose(f0.bias_LE, math.exp(0.125) * np.array([[1.1, -0.8, -0.3, 3.0]]),
                               rtol=1e-15)
    assert f0.temperature_LE[0, 0] == pytest.approx(math.exp(0.1))
    np.testing.assert_array_equal(f0.scale_L, [cfg.logit_scale_floor])
    assert f0.tau == pytest.approx(0.1 * math.exp(0.375), rel=1e-15)
    lf = f0.layer(0)
    assert lf.scale == cfg.logit_scale_floor and lf.tau == f0.tau
    np.testing.assert_array_equal(lf.bias_E, f0.bias_LE[0])


def test_coherence_gate_closed_form():
    assert coherence_gate(0.6, 0.2, 0.5) == pytest.approx(0.75)     # g = 0.4/0.8
    assert coherence_gate(0.1, 0.2, 0.5) == 0.5                     # below min: 1 − strength
    assert coherence_gate(0.2, 0.2, 0.5) == 0.5                     # g(min) = 0
    assert coherence_gate(1.0, 0.2, 0.5) == 1.0
    assert coherence_gate(0.5, 0.0, 1.0) == pytest.approx(0.5)      # g = R
    assert coherence_gate(0.0, 0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="min_coherence"):
        coherence_gate(0.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="strength"):
        coherence_gate(0.5, 0.2, 1.5)
    # vectorised: elementwise, the same values as the scalar calls
    R = np.array([0.0, 0.1, 0.2, 0.6, 1.0, 1.2])
    np.testing.assert_array_equal(coherence_gate(R, 0.2, 0.5),
                                  [coherence_gate(float(r), 0.2, 0.5) for r in R])
    assert isinstance(coherence_gate(0.6), float)


def test_smooth_kappa_is_the_hull_clipped_ema():
    assert smooth_kappa(0.0, 1.0, 0.3) == pytest.approx(0.3)
    assert smooth_kappa(0.5, -0.2, 1.0) == -0.2
    k = smooth_kappa(np.array([0.0, 1.0, -1.0]), np.array([1.0, -1.0, -1.0]), 0.25)
    np.testing.assert_allclose(k, [0.25, 0.5, -1.0], rtol=1e-15)


# --- purity and rejected input -------------------------------------------------------------

def test_step_never_writes_into_the_old_state(state_2x4, cfg):
    snap = state_2x4.to_dict()
    step(state_2x4, cfg, obs_of([[1, 2, 3, 4], [0, 0, 0, 0]], loss=[[1, 1, 1, 1], [0] * 4]), 0.4)
    for name, v in snap.items():
        got = getattr(state_2x4, name)
        assert np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v


@pytest.mark.parametrize("counts, loss, field", [
    # Finite entries whose layer sum overflows: frac would become 0 and u leave the simplex.
    ([[1e308, 1e308]], None, "counts"),
    # Loss sums overflow: the mean loss would be inf and the reliability NaN.
    ([[1.0, 1.0]], [[1e308, 1e308]], "loss_sum"),
    # Tiny counts: loss/counts overflows although every entry is finite.
    ([[1e-300, 1e-300]], [[1e10, 1e10]], "loss_sum"),
    ([[1.0, "x"]], None, "counts"),
    ([[1.0], [1.0, 2.0]], None, "counts"),
])
def test_observations_that_would_produce_nan_are_rejected(counts, loss, field):
    cfg = ControllerConfig()
    s = init_state(cfg, 1, 2)
    obs = RoutingObservation(counts, np.zeros((1, 2)), loss)
    with pytest.raises(ValueError, match=rf"RoutingObservation\.{field}\b"):
        step(s, cfg, obs)


@pytest.mark.parametrize("scale, what", [
    ([np.nan], "non-finite"), ([np.inf], "non-finite"), ([-0.5], "negative"),
    ([1.0, 2.0], "shape"), ([[1.0]], "shape"), (["x"], "numeric"), (1.0, "shape"),
])
def test_bad_logit_scale_is_rejected_and_the_state_untouched(scale, what):
    """RoutingObservation.logit_scale: [L] finite, >= 0; the error names the field."""
    cfg = ControllerConfig()
    s = init_state(cfg, 1, 2)
    snap = s.to_dict()
    obs = RoutingObservation(np.ones((1, 2)), np.ones((1, 2)), None, scale)
    with pytest.raises(ValueError, match=rf"RoutingObservation\.logit_scale\b.*{what}"):
        step(s, cfg, obs)
    for name, v in snap.items():
        got = getattr(s, name)
        assert np.array_equal(got, v) if isinstance(v, np.ndarray) else got == v


def test_step_rejects_a_non_observation(state_2x4, cfg):
    with pytest.raises(TypeError, match="RoutingObservation"):
        step(state_2x4, cfg, {"counts": np.ones((2, 4))})


def test_init_state_known_values_and_validation(cfg):
    s = init_state(cfg, 3, 5, seed=9)
    np.testing.assert_array_equal(s.usage_LE, np.full((3, 5), 0.2))
    np.testing.assert_array_equal(s.reliability_LE, np.full((3, 5), 0.5))
    assert s.Tbar_global == 1.0
    np.testing.assert_array_equal(s.logit_scale_L, np.zeros(3))
    assert s.tick == 0 and s.kappa == 0.0 and s.dR == 0.0
    assert (s.R, s.psi) == order_parameter(s.theta_LE)
    assert np.std(s.omega_disorder_LE) > 0              # disorder drawn with std 0.05
    for kw, name in (({"num_layers": 0}, "num_layers"), ({"num_experts": 2.0}, "num_experts"),
                     ({"seed": -1}, "seed"), ({"seed": 2**32}, "seed")):
        args = dict(num_layers=2, num_experts=2, seed=0)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            init_state(cfg, **args)
