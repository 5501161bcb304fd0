"""simulate(): the Numba kernel against the NumPy reference (env.route/learn + law.step), the
pieces of the kernel against their references, the Trajectory, events, validation, and the
calibrated phases of the default run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chronomoe_dyn import (ControllerConfig, RoutingObservation, coherence_gate, init_state,
                           landscape, routing_fields, step)
from chronomoe_dyn import _kernels, rng
from chronomoe_dyn.env import STREAM_LOSS, EnvConfig, Event, init_env, learn, route
from chronomoe_dyn.schedule import AdaptiveRule, KnobSchedule
from chronomoe_dyn.simulate import Trajectory, _ctrl_params, default_schedule, simulate

SMALL = EnvConfig(num_layers=2, num_experts=5, top_k=2, tokens_per_tick=24, num_domains=3)
"""A small environment: every test run is milliseconds once the kernel is compiled."""

FIELDS = ("R_BT", "dR_BT", "kappa_BT", "gate_BT", "loss_BT", "Tbar_global_BTE",
          "variance_global_BT", "variance_local_BTL", "Tbar_local_BTLE", "T_fast_BTLE",
          "usage_BTLE", "reliability_BTLE")
MASKS = ("valley_global_BTE", "ridge_global_BTE", "valley_local_BTLE", "ridge_local_BTLE")


def assert_trajectories_close(a: Trajectory, b: Trajectory, atol: float) -> None:
    np.testing.assert_array_equal(a.tick_T, b.tick_T)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=atol,
                                   err_msg=name)
    for name in MASKS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for sa, sb in zip(a.final_states, b.final_states):
        assert sa.tick == sb.tick and sa.seed == sb.seed
        assert sa.allclose(sb, atol=atol), "final states differ"


# --- the kernel's pieces against their references --------------------------------------------

def _kernel_state(s):
    return [s.theta_LE.copy(), s.omega_disorder_LE.copy(), s.usage_LE.copy(),
            s.reliability_LE.copy(), s.delta_LE.copy(), s.pressure_LE.copy(), s.lens_LE.copy(),
            s.T_fast_LE.copy(), s.Tbar_local_LE.copy(), s.Tbar_global_E.copy(),
            s.T_eff_LE.copy()]


@pytest.mark.parametrize("with_loss", [True, False])
def test_controller_step_kernel_follows_law_step(with_loss):
    cfg = ControllerConfig(phase_noise=0.2, kappa_smoothing=0.3, micro_period=2, macro_period=3,
                           lens_max=0.05)
    L, E = 3, 6
    ref = init_state(cfg, L, E, seed=17)
    arrs = _kernel_state(ref)
    sc = np.array([ref.R, ref.psi, ref.dR, ref.kappa])
    tick = 0
    r = np.random.default_rng(0)
    for t in range(40):
        counts = r.integers(0, 30, (L, E)).astype(float)
        counts[t % L] = 0.0 if t % 7 == 0 else counts[t % L]      # now and then an empty layer
        loss = counts * r.uniform(0.5, 3.0, (L, E)) if with_loss else None
        kappa = float(np.clip(np.sin(t / 5.0), -1, 1))
        ref = step(ref, cfg, RoutingObservation(counts, 0.5 * counts, loss), kappa)
        tick = _kernels.controller_step(_ctrl_params(cfg), 17, tick, *arrs, sc, counts,
                                        np.zeros((L, E)) if loss is None else loss,
                                        with_loss, kappa, np.zeros(E))
        assert tick == ref.tick
        got = dict(zip(["theta_LE", "omega_disorder_LE", "usage_LE", "reliability_LE",
                        "delta_LE", "pressure_LE", "lens_LE", "T_fast_LE", "Tbar_local_LE",
                        "Tbar_global_E", "T_eff_LE"], arrs))
        for name, v in got.items():
            np.testing.assert_allclose(v, getattr(ref, name), rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(sc, [ref.R, ref.psi, ref.dR, ref.kappa], rtol=0, atol=1e-12)


def test_routing_fields_kernel_matches_law():
    cfg = ControllerConfig()
    s = init_state(cfg, 2, 4, seed=1)
    r = np.random.default_rng(1)
    P, lens, Teff = r.uniform(-1, 1, (2, 4)), r.uniform(-1, 1, (2, 4)), r.uniform(0.01, 20, (2, 4))
    s = type(s)(**{**s.__dict__, "pressure_LE": P, "lens_LE": lens, "T_eff_LE": Teff})
    bias, temp = np.empty((2, 4)), np.empty((2, 4))
    _kernels.routing_fields_into(_ctrl_params(cfg), 0.37, P, lens, Teff, bias, temp)
    rb, rt = routing_fields(s, cfg, 0.37)
    np.testing.assert_array_equal(bias, rb)
    np.testing.assert_array_equal(temp, rt)


def _route_kernel(env, es, bias, temp, seed, tick):
    L, E, D, T, K = (env.num_layers, env.num_experts, env.num_domains, env.tokens_per_tick,
                     env.top_k)
    counts, loss = np.zeros((L, E)), np.zeros((L, E))
    sumx, cnt = np.zeros((L, D, E)), np.zeros((L, D, E))
    ep = _kernels.EnvParams(T, K, env.loss_floor, env.loss_range, env.loss_noise,
                            env.token_noise, env.batch_noise, env.router_sharpness,
                            env.router_memory)
    mean = _kernels.env_route(
        ep, seed, tick, es.quality_LED, es.est_LDE, es.cum_D, bias, temp, counts, loss, sumx,
        cnt, np.zeros(T, dtype=np.int64), np.zeros((L, D, E)), np.zeros((L, E)), np.zeros(T),
        np.zeros(T, dtype=np.int64), np.zeros((K, T)), np.zeros((K, T), dtype=np.int64),
        np.zeros((K, T)), np.zeros((K, T)), np.zeros(T), np.zeros(T),
        np.zeros(T, dtype=np.int64))
    return counts, loss, sumx, cnt, mean


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_env_route_kernel_makes_the_numpy_choices(top_k):
    env = EnvConfig(num_layers=3, num_experts=6, top_k=top_k, tokens_per_tick=64, num_domains=3,
                    router_prior_count=2.0, batch_noise=0.5)
    es = init_env(env, seed=4)
    r = np.random.default_rng(2)
    es.est_LDE = r.uniform(1.0, 4.0, es.est_LDE.shape)           # a router with opinions
    bias, temp = r.uniform(-0.3, 0.3, (3, 6)), r.uniform(0.2, 3.0, (3, 6))
    for tick in (1, 2, 99):
        ref = route(env, es, bias, temp, 4, tick)
        counts, loss, sumx, cnt, mean = _route_kernel(env, es, bias, temp, 4, tick)
        np.testing.assert_array_equal(counts, ref.counts_LE)      # the same discrete choices
        np.testing.assert_array_equal(cnt, ref.cnt_LDE)
        np.testing.assert_allclose(loss, ref.loss_LE, rtol=1e-13, atol=0)
        np.testing.assert_allclose(sumx, ref.sumx_LDE, rtol=1e-13, atol=0)
        assert mean == pytest.approx(ref.mean_loss, rel=1e-13)
        assert counts.sum() == 3 * 64 * top_k


def _slot_experts(env, es, bias, temp, seed, tick, kernel):
    """[L, T, K] expert of every slot, read back from the per-slot loss sums: each slot has its
    own loss noise u[(l·T + t)·K + k], so with one token and one domain sumx[l, 0, e] identifies
    the slot expert e filled (tests below use T = D = 1)."""
    assert env.tokens_per_tick == 1 and env.num_domains == 1
    L, K = env.num_layers, env.top_k
    if kernel:
        _, _, sumx, cnt, _ = _route_kernel(env, es, bias, temp, seed, tick)
    else:
        ref = route(env, es, bias, temp, seed, tick)
        sumx, cnt = ref.sumx_LDE, ref.cnt_LDE
    # the expected slot loss of expert e in slot k (the reference's formula, same operations)
    u = rng.uniform(seed, STREAM_LOSS, tick, np.arange(L * K)).reshape(L, K)
    q = es.quality_LED[:, :, 0]                                            # [L, E]
    x_LEK = env.loss_floor + env.loss_range * (1.0 - q[:, :, None]) \
        + env.loss_noise * (2.0 * u[:, None, :] - 1.0)
    out = np.full((L, 1, K), -1)
    for li in range(L):
        for k in range(K):
            hit = np.flatnonzero((cnt[li, 0] == 1) & (sumx[li, 0] == x_LEK[li, :, k]))
            assert hit.size == 1, (li, k, hit)
            out[li, 0, k] = hit[0]
    return out


def test_env_route_kernel_breaks_exact_ties_like_the_stable_sort():
    """Regression: with a flat router and no noise, experts the controller treats alike get
    bit-identical scores. The kernel's top-k insertion compared with a plain '>', so an expert
    pushed down a slot by a better one lost its tie against the later expert below it: scores
    (s, s, s + 1) selected experts (2, 1) where the stable sort (ties to the lower index)
    selects (2, 0). The slot order matters too: slot k draws its own loss noise."""
    env = EnvConfig(num_layers=1, num_experts=3, top_k=2, tokens_per_tick=1, num_domains=1,
                    token_noise=0.0, batch_noise=0.0, router_sharpness=0.0,
                    router_prior_count=0.0, router_memory=1000.0)
    es = init_env(env, seed=0)
    bias, temp = np.array([[-0.25, -0.25, 0.5]]), np.array([[2.0, 2.0, 2.5]])
    for kernel in (False, True):
        np.testing.assert_array_equal(_slot_experts(env, es, bias, temp, 0, 2, kernel),
                                      [[[2, 0]]], err_msg=f"kernel={kernel}")
    # deeper: expert 4 pushes expert 0 down onto its tie with expert 2, and 2's push-down of
    # expert 1 meets 1's tie with expert 3 (the old kernel gave (4, 2, 0, 1))
    bias = np.array([[0.5, 0.0, 0.5, 0.0, 1.0]])
    env5 = EnvConfig(num_layers=1, num_experts=5, top_k=4, tokens_per_tick=1, num_domains=1,
                     token_noise=0.0, batch_noise=0.0, router_sharpness=0.0)
    es5 = init_env(env5, seed=3)
    for kernel in (False, True):
        np.testing.assert_array_equal(_slot_experts(env5, es5, bias, np.ones((1, 5)), 3, 7,
                                                    kernel), [[[4, 0, 2, 1]]],
                                      err_msg=f"kernel={kernel}")


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 6])
def test_env_route_kernel_makes_the_numpy_choices_among_many_ties(top_k):
    """Scores drawn from three values, so most tokens see ties at every rank (and pushed-down
    entries meet tied entries below them): the same experts in the same slots."""
    env = EnvConfig(num_layers=3, num_experts=6, top_k=top_k, tokens_per_tick=1, num_domains=1,
                    token_noise=0.0, batch_noise=0.0, router_sharpness=0.0)
    es = init_env(env, seed=11)
    r = np.random.default_rng(7)
    for tick in range(1, 41):
        bias = r.choice([-0.5, 0.0, 0.5], size=(3, 6))
        temp = np.ones((3, 6))
        ref = _slot_experts(env, es, bias, temp, 11, tick, kernel=False)
        got = _slot_experts(env, es, bias, temp, 11, tick, kernel=True)
        np.testing.assert_array_equal(got, ref, err_msg=f"tick {tick}")
        # and the reference is the documented rule: descending score, ties to the lower index
        expect = np.array([sorted(range(6), key=lambda e: (-bias[li, e], e))[:top_k]
                           for li in range(3)])
        np.testing.assert_array_equal(ref[:, 0], expect)


def test_env_route_counts_slots_and_domains():
    env = EnvConfig(num_layers=2, num_experts=4, top_k=2, tokens_per_tick=1000, num_domains=2,
                    domain_weights=(3.0, 1.0))
    es = init_env(env, seed=0)
    ref = route(env, es, np.zeros((2, 4)), np.ones((2, 4)), 0, 1)
    np.testing.assert_array_equal(ref.counts_LE.sum(axis=1), [2000, 2000])
    # domain 0 has 3/4 of the tokens (binomial sd ≈ 14 tokens of 1000)
    share0 = ref.cnt_LDE[0, 0].sum() / ref.cnt_LDE[0].sum()
    assert share0 == pytest.approx(0.75, abs=0.05)
    assert np.all(ref.loss_LE >= 0) and np.all(ref.wsum_LE <= ref.counts_LE + 1e-12)


def test_router_learns_the_hidden_quality():
    """With no controller (zero bias, unit temperature), the router's estimates converge on the
    expected slot losses and routing concentrates on each domain's best experts."""
    env = EnvConfig(num_layers=1, num_experts=6, top_k=2, tokens_per_tick=256, num_domains=3,
                    router_prior_count=2.0, router_memory=1e9, batch_noise=0.0)
    es = init_env(env, seed=5)
    for tick in range(1, 301):
        learn(env, es, route(env, es, np.zeros((1, 6)), np.ones((1, 6)), 5, tick))
    expected_LED = env.loss_floor + env.loss_range * (1.0 - es.quality_LED)
    seen = es.nobs_LDE[0] > 100
    np.testing.assert_allclose(es.est_LDE[0][seen], expected_LED[0].T[seen], atol=0.05)
    best2 = np.argsort(expected_LED[0], axis=0)[:2].T              # [D, 2]
    ref = route(env, es, np.zeros((1, 6)), np.ones((1, 6)), 5, 999)
    for d in range(3):
        top = ref.cnt_LDE[0, d][best2[d]].sum() / ref.cnt_LDE[0, d].sum()
        assert top > 0.8


# --- simulate: numba = the NumPy reference -------------------------------------------------------

def test_numba_matches_the_numpy_reference():
    cfg = ControllerConfig(phase_noise=0.1)
    events = (Event("collapse", 60, expert=1, layer=0, quality=0.0),
              Event("domain_shift", 150, weights=(1.0, 0.0, 3.0)))
    kw = dict(config=cfg, env=SMALL, num_systems=3, ticks=300, seed=5, record_every=1,
              events=events)
    a = simulate(**kw)
    b = simulate(**kw, backend="numpy")
    assert_trajectories_close(a, b, atol=1e-10)


def test_numba_matches_the_numpy_reference_on_exact_top_k_ties():
    """Regression (Hypothesis find): one token, a flat router (sharpness 0, prior count 0) and
    no logit noise, so the scores of experts the controller treats alike tie exactly. Before
    the fix the kernel broke a tie against an expert pushed down from the slot above, loss_BT
    differed by up to 0.22 from the first recorded point on."""
    env = EnvConfig(num_layers=1, num_experts=3, top_k=2, tokens_per_tick=1, num_domains=1,
                    domain_weights=None, quality_home=(0.75, 0.95), quality_other=(0.15, 0.55),
                    loss_floor=1.0, loss_range=3.0, loss_noise=0.5, token_noise=0.0,
                    batch_noise=0.0, router_sharpness=0.0, router_memory=1000.0,
                    router_prior_count=0.0, router_prior=None)
    cfg = ControllerConfig(micro_period=1, macro_period=1, drift_gain=0.0, phase_noise=0.0,
                           kappa_smoothing=1.0, lens_max=0.05)
    events = (Event("collapse", 50, expert=2, layer=None, quality=0.1),
              Event("domain_shift", 75, weights=(1.0,)))
    kw = dict(config=cfg, env=env, num_systems=2, ticks=150, seed=0, record_every=5,
              events=events)
    a = simulate(**kw)
    b = simulate(**kw, backend="numpy")
    assert_trajectories_close(a, b, atol=1e-10)


@pytest.mark.parametrize("num_experts", [6, 7])
def test_numba_matches_the_numpy_reference_on_uniform_usage(num_experts):
    """Regression: with top_k = E every expert gets every token, usage stays exactly 1/E and
    u/Σu carries only rounding noise (Σu ≠ 1 for E = 6, 7). law.step reads a drift up to
    DRIFT_EPS as none (d̂ = 0); the kernel divided by any max drift > 0, so d̂ became 1 and
    T_fast took the full β_drift boost (0.43 apart)."""
    env = EnvConfig(num_layers=2, num_experts=num_experts, top_k=num_experts,
                    tokens_per_tick=4, num_domains=2)
    kw = dict(env=env, num_systems=2, ticks=40, seed=1, record_every=1)
    a = simulate(**kw)
    b = simulate(**kw, backend="numpy")
    assert_trajectories_close(a, b, atol=1e-10)
    np.testing.assert_array_equal(a.usage_BTLE, 1.0 / num_experts)


def test_numba_matches_the_numpy_reference_with_smoothing_and_adaptive_schedule():
    cfg = ControllerConfig(kappa_smoothing=0.3)
    sched = KnobSchedule(kind="adaptive", initial_kappa=0.8, final_kappa=-0.5, warmup_steps=20,
                         total_steps=200, rule=AdaptiveRule(R_low=0.5, R_high=0.6, rate=0.05))
    kw = dict(config=cfg, env=SMALL, schedule=sched, num_systems=2, ticks=240, seed=9,
              record_every=4)
    a = simulate(**kw)
    b = simulate(**kw, backend="numpy")
    assert_trajectories_close(a, b, atol=1e-10)
    base = sched.progress(a.tick_T - 1) * (sched.final_kappa - sched.initial_kappa) \
        + sched.initial_kappa
    assert np.any(np.abs(a.kappa_BT - base) > 0.01)          # the adaptive offset did act


# --- trajectory contents -------------------------------------------------------------------------

def test_trajectory_shapes_and_derived_fields():
    tr = simulate(env=SMALL, num_systems=2, ticks=100, seed=1, record_every=10)
    B, T, L, E = 2, 10, SMALL.num_layers, SMALL.num_experts
    np.testing.assert_array_equal(tr.tick_T, np.arange(10, 101, 10))
    np.testing.assert_array_equal(tr.seeds_B, [1, 2])
    assert tr.R_BT.shape == (B, T) and tr.Tbar_global_BTE.shape == (B, T, E)
    assert tr.Tbar_local_BTLE.shape == (B, T, L, E) and tr.variance_local_BTL.shape == (B, T, L)
    assert tr.num_systems == 2 and len(tr.final_states) == 2
    assert tr.final_states[1].tick == 100 and tr.final_states[1].seed == 2
    for b in range(B):
        for t in range(T):
            assert tr.gate_BT[b, t] == coherence_gate(tr.R_BT[b, t], 0.2, 0.5)
            ls = landscape(tr.Tbar_global_BTE[b, t])
            assert tr.variance_global_BT[b, t] == ls.variance
            assert tuple(np.flatnonzero(tr.valley_global_BTE[b, t])) == ls.valleys
            assert tuple(np.flatnonzero(tr.ridge_global_BTE[b, t])) == ls.ridges
            for li in range(L):
                lsl = landscape(tr.Tbar_local_BTLE[b, t, li])
                assert tuple(np.flatnonzero(tr.valley_local_BTLE[b, t, li])) == lsl.valleys
                assert tr.variance_local_BTL[b, t, li] == pytest.approx(lsl.variance,
                                                                        rel=1e-12, abs=1e-18)
    last = tr.final_states[0]
    assert tr.R_BT[0, -1] == last.R and np.array_equal(tr.usage_BTLE[0, -1], last.usage_LE)


def test_record_layers_false_drops_the_layer_fields_only():
    full = simulate(env=SMALL, num_systems=2, ticks=60, seed=3)
    lean = simulate(env=SMALL, num_systems=2, ticks=60, seed=3, record_layers=False)
    for name in ("Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE",
                 "valley_local_BTLE", "ridge_local_BTLE"):
        assert getattr(lean, name) is None
    for name in ("R_BT", "kappa_BT", "Tbar_global_BTE", "variance_local_BTL", "loss_BT"):
        np.testing.assert_array_equal(getattr(lean, name), getattr(full, name))


def test_default_schedule_runs_from_initial_to_final_kappa():
    tr = simulate(env=SMALL, ticks=400, record_every=1)
    assert tr.schedule == default_schedule(400)
    assert tr.schedule.warmup_steps == 100
    assert tr.kappa_BT[0, 0] == 0.5 and tr.kappa_BT[0, 99] == 0.5
    assert tr.kappa_BT[0, -1] == pytest.approx(-0.3, abs=1e-4)
    assert np.all(np.diff(tr.kappa_BT[0]) <= 1e-15)


def test_progress_bar_chunks_do_not_change_the_result():
    a = simulate(env=SMALL, num_systems=2, ticks=230, seed=4)
    b = simulate(env=SMALL, num_systems=2, ticks=230, seed=4, progress=True)
    assert_trajectories_close(a, b, atol=0.0)


def test_npz_round_trip(tmp_path):
    ev = (Event("domain_shift", 30, weights=(1.0, 2.0, 3.0)),)
    tr = simulate(env=SMALL, num_systems=2, ticks=50, seed=2, events=ev)
    path = tr.to_npz(tmp_path / "trajectory.npz")
    back = Trajectory.from_npz(path)
    assert_trajectories_close(tr, back, atol=0.0)
    assert back.config == tr.config and back.env == tr.env and back.schedule == tr.schedule
    assert back.events == tr.events
    lean = simulate(env=SMALL, ticks=20, record_layers=False)
    assert Trajectory.from_npz(lean.to_npz(tmp_path / "lean.npz")).usage_BTLE is None


def test_invariants_along_a_run():
    cfg = ControllerConfig()
    tr = simulate(cfg, EnvConfig(), num_systems=2, ticks=600, seed=8)
    assert np.all((tr.R_BT >= 0) & (tr.R_BT <= 1))
    assert np.all((tr.gate_BT >= 0.5) & (tr.gate_BT <= 1))
    assert np.all((tr.T_fast_BTLE >= cfg.T_min) & (tr.T_fast_BTLE <= cfg.T_max))
    assert np.all((tr.reliability_BTLE >= 0) & (tr.reliability_BTLE <= 1))
    np.testing.assert_allclose(tr.usage_BTLE.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.isfinite(tr.loss_BT)) and np.all(tr.loss_BT > 0)
    for s in tr.final_states:
        assert np.all(np.abs(s.lens_LE) <= cfg.lens_max)
        assert np.all((s.theta_LE >= 0) & (s.theta_LE < 2 * math.pi))


# --- events --------------------------------------------------------------------------------------

def test_collapse_changes_nothing_before_its_tick_and_hurts_after():
    env = EnvConfig(num_layers=2, num_experts=4, num_domains=2, tokens_per_tick=64)
    base = simulate(env=env, ticks=300, seed=3, record_every=1)
    ev = Event("collapse", 101, expert=2, layer=None, quality=0.0)
    hit = simulate(env=env, ticks=300, seed=3, record_every=1, events=(ev,))
    np.testing.assert_array_equal(hit.R_BT[0, :100], base.R_BT[0, :100])
    np.testing.assert_array_equal(hit.loss_BT[0, :100], base.loss_BT[0, :100])
    assert hit.loss_BT[0, 100:].mean() > base.loss_BT[0, 100:].mean()
    # expert 2 keeps getting tokens (the router is slow to learn) whose losses are now high
    assert np.all(hit.reliability_BTLE[0, -1, :, 2] < base.reliability_BTLE[0, -1, :, 2])


def test_collapse_in_one_layer_leaves_the_other_layer_quality_alone():
    env = EnvConfig(num_layers=2, num_experts=4, num_domains=2, tokens_per_tick=64)
    hit = simulate(env=env, ticks=200, seed=3, record_every=1,
                   events=(Event("collapse", 50, expert=1, layer=1, quality=0.0),))
    base = simulate(env=env, ticks=200, seed=3, record_every=1)
    assert hit.reliability_BTLE[0, -1, 1, 1] < base.reliability_BTLE[0, -1, 1, 1]
    assert hit.reliability_BTLE[0, -1, 0, 1] == pytest.approx(base.reliability_BTLE[0, -1, 0, 1],
                                                              abs=0.05)


def test_domain_shift_moves_usage():
    env = EnvConfig(num_layers=1, num_experts=4, num_domains=2, tokens_per_tick=128,
                    domain_weights=(1.0, 1.0), router_prior_count=200.0)
    base = simulate(env=env, ticks=400, seed=2, record_every=1)
    shift = simulate(env=env, ticks=400, seed=2, record_every=1,
                     events=(Event("domain_shift", 200, weights=(1.0, 0.0)),))
    np.testing.assert_array_equal(shift.usage_BTLE[0, :199], base.usage_BTLE[0, :199])
    moved = np.abs(shift.usage_BTLE[0, -1] - base.usage_BTLE[0, -1]).sum()
    assert moved > 0.2


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(config="x"), "config"), (dict(env=None), "env"), (dict(num_systems=0), "num_systems"),
    (dict(ticks=0), "ticks"), (dict(ticks=1.5), "ticks"), (dict(seed=-1), "seed"),
    (dict(seed=2**32 - 1, num_systems=2), "seed"), (dict(record_every=0), "record_every"),
    (dict(record_every=11), "record_every"), (dict(schedule="cosine"), "schedule"),
    (dict(events=(1,)), "events"), (dict(backend="gpu"), "backend"),
    (dict(progress="yes"), "progress"), (dict(record_layers=1), "record_layers"),
    (dict(events=(Event("collapse", 5, expert=9),)), "expert"),
    (dict(events=(Event("collapse", 5, expert=0, layer=7),)), "layer"),
    (dict(events=(Event("domain_shift", 5, weights=(1.0, 2.0)),)), "weights"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    args = dict(env=SMALL, ticks=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        simulate(**args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(kind="explode", tick=3), "kind"), (dict(kind="collapse", tick=0), "tick"),
    (dict(kind="collapse", tick=3, quality=1.5), "quality"),
    (dict(kind="collapse", tick=3, expert=-1), "expert"),
    (dict(kind="domain_shift", tick=3), "weights"),
    (dict(kind="domain_shift", tick=3, weights=(0.0, 0.0)), "weights"),
    (dict(kind="domain_shift", tick=3, weights=(1.0, -1.0)), "weights"),
])
def test_bad_events_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Event(**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_layers=0), "num_layers"), (dict(top_k=9), "top_k"),
    (dict(tokens_per_tick=0), "tokens_per_tick"),
    (dict(domain_weights=(1.0, 2.0)), "domain_weights"),
    (dict(quality_home=(0.9, 0.1)), "quality_home"),
    (dict(quality_other=(0.0, 2.0)), "quality_other"),
    (dict(loss_noise=2.0), "loss_floor"), (dict(token_noise=-1.0), "token_noise"),
    (dict(batch_noise=np.nan), "batch_noise"), (dict(router_memory=0.5), "router_memory"),
    (dict(router_prior_count=1e9), "router_prior_count"), (dict(router_sharpness=-1.0),
                                                           "router_sharpness"),
])
def test_bad_env_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EnvConfig(**kwargs)


def test_env_config_dict_round_trip():
    env = EnvConfig(domain_weights=(1.0, 2.0, 3.0, 4.0), router_prior=2.0)
    assert EnvConfig.from_dict(env.to_dict()) == env
    with pytest.raises(ValueError, match="unknown"):
        EnvConfig.from_dict({"bogus": 1})


# --- the calibrated default run ---------------------------------------------------------------

@pytest.mark.slow
def test_default_run_shows_the_three_phases():
    """The calibration (simulate module docstring): exploration with low R and a flat landscape,
    then formation, then exploitation with high R, a formed per-layer landscape and healthy
    valleys. Means over 8 systems of the default environment and schedule."""
    tr = simulate(num_systems=8, ticks=4000, seed=0, record_every=10)
    t = tr.tick_T
    early, late = t <= 800, t > 2800
    var_local = tr.variance_local_BTL.mean(axis=-1)                  # mean over layers
    assert tr.R_BT[:, early].mean() < 0.35
    assert tr.R_BT[:, late].mean() > 0.75
    assert var_local[:, early].mean() < 0.01
    assert var_local[:, late].mean() > 0.01
    assert tr.kappa_BT[:, early].mean() == pytest.approx(0.5)
    assert tr.kappa_BT[:, -1].mean() == pytest.approx(-0.3, abs=1e-3)
    valleys = tr.valley_local_BTLE[:, late]
    assert valleys.any(axis=-1).all()                                  # every layer has valleys
    rel = tr.reliability_BTLE[:, late][valleys]
    assert np.mean(rel < ControllerConfig().unhealthy_reliability) < 0.05
    assert tr.loss_BT[:, late].mean() < tr.loss_BT[:, early].mean()   # the router learned
