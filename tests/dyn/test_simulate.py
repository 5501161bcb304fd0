"""simulate(): the Numba kernel against the NumPy reference (env.route/learn + law.step), the
pieces of the kernel against their references, the Trajectory (v2), events, validation, the
controller_fields ablation, and the default run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chronomoe_dyn import (ControllerConfig, RoutingObservation, coherence_gate, init_state,
                           landscape, routing_fields, step)
from chronomoe_dyn import _kernels, rng
from chronomoe_dyn.env import EnvConfig, Event, init_env, learn, raw_logits, route
from chronomoe_dyn.law import RoutingFields
from chronomoe_dyn.rng import STREAM_LOSS
from chronomoe_dyn.routing import route as route_layer
from chronomoe_dyn.routing import topk_stable
from chronomoe_dyn.schedule import AdaptiveRule, KnobSchedule
from chronomoe_dyn.simulate import Trajectory, default_schedule, simulate

_ctrl_params = _kernels.ctrl_params

SMALL = EnvConfig(num_layers=2, num_experts=5, top_k=2, tokens_per_tick=24, num_domains=3)
"""A small environment: every test run is milliseconds once the kernel is compiled."""

FIELDS = ("R_BT", "dR_BT", "kappa_BT", "gate_BT", "loss_BT", "Tbar_global_BT",
          "exploration_BT", "logit_scale_BTL", "maxvio_BTL", "variance_local_BTL",
          "Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE")
MASKS = ("valley_local_BTLE", "ridge_local_BTLE")
EXACT = ("exploration_BT", "maxvio_BTL")
"""Functions of the discrete choices only: equal bit for bit when the choices are."""


def assert_trajectories_close(a: Trajectory, b: Trajectory, atol: float) -> None:
    np.testing.assert_array_equal(a.tick_T, b.tick_T)
    for name in EXACT:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=0, atol=atol,
                                   err_msg=name)
    for name in MASKS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for sa, sb in zip(a.final_states, b.final_states):
        assert sa.tick == sb.tick and sa.seed == sb.seed
        assert sa.allclose(sb, atol=atol), "final states differ"


# --- the kernel's pieces against their references --------------------------------------------

def test_kernel_log_and_gumbel_are_bit_equal_to_numpy_and_close_to_libm():
    """The Gumbel noise decides discrete choices, so the kernel's log must give rng.log_poly's
    bits exactly (not just be close to np.log): over the whole normal range and densely on
    u in (0, 1) and on −log u. Mutations caught: a reordered polynomial in either copy, the
    kernel using math.log, an FMA-contracted (fastmath) kernel."""
    r = np.random.default_rng(5)
    x = np.concatenate([np.geomspace(2.3e-308, 1.7e308, 50_001), r.uniform(0, 1, 100_000),
                        r.uniform(1e-10, 23.0, 100_000), [1.0, math.sqrt(2.0), 0.5]])
    out, bits = np.empty_like(x), np.empty(x.size, dtype=np.int64)
    _kernels.log_into(x, out, bits)
    np.testing.assert_array_equal(out, rng.log_poly(x))
    ulp = np.abs(out - np.log(x)) / np.spacing(np.maximum(np.abs(np.log(x)), 1e-300))
    assert ulp.max() <= 2.0
    u = rng.uniform(3, rng.STREAM_GUMBEL, 7, np.arange(200_000))
    g = np.empty_like(u)
    _kernels.gumbel_into(u, g, np.empty(u.size, dtype=np.int64))
    np.testing.assert_array_equal(g, rng.gumbel_from_uniform(u))
    np.testing.assert_allclose(g, -np.log(-np.log(u)), rtol=0, atol=1e-12)


_STATE_ARRAYS = ["theta_LE", "omega_disorder_LE", "usage_LE", "reliability_LE", "delta_LE",
                 "pressure_LE", "lens_LE", "T_fast_LE", "Tbar_local_LE", "T_eff_LE",
                 "logit_scale_L"]


@pytest.mark.parametrize("with_loss, with_scale, lens_clock, with_noiseless", [
    (True, True, "macro", True), (False, True, "micro", True), (True, False, "macro", False),
    (True, True, "micro", False)])
def test_controller_step_kernel_follows_law_step(with_loss, with_scale, lens_clock,
                                                 with_noiseless):
    """The kernel against law.step tick by tick; with noiseless counts that differ from the
    counts (another split of the same slots, law v2.1) the kernel's usage/drift must read
    them and its reliability the counts. Mutation caught: the kernel's usage reading counts
    (or its reliability reading the noiseless counts)."""
    cfg = ControllerConfig(phase_noise=0.2, kappa_smoothing=0.3, micro_period=2, macro_period=3,
                           lens_max=0.05, drift_gain=0.7, lens_clock=lens_clock)
    L, E = 3, 6
    ref = init_state(cfg, L, E, seed=17)
    arrs = [getattr(ref, n).copy() for n in _STATE_ARRAYS]
    sc = np.array([ref.R, ref.psi, ref.dR, ref.kappa, ref.Tbar_global])
    tick = 0
    r = np.random.default_rng(0)
    for t in range(40):
        counts = r.integers(0, 30, (L, E)).astype(float)
        counts[t % L] = 0.0 if t % 7 == 0 else counts[t % L]      # now and then an empty layer
        loss = counts * r.uniform(0.5, 3.0, (L, E)) if with_loss else None
        scale = r.uniform(0.0, 3.0, L) if with_scale else None
        kappa = float(np.clip(np.sin(t / 5.0), -1, 1))
        clean = None
        if with_noiseless:      # the same slots, chosen more skewed (towards expert t % E)
            prefs = np.full(E, 0.5 / (E - 1))
            prefs[t % E] = 0.5
            clean = np.stack([r.multinomial(int(n), prefs) for n in counts.sum(axis=1)]
                             ).astype(float)
        ref = step(ref, cfg, RoutingObservation(counts, 0.5 * counts, loss, scale,
                                                noiseless_counts=clean), kappa)
        tick = _kernels.controller_step(_ctrl_params(cfg), 17, tick, *arrs, sc, counts,
                                        counts if clean is None else clean,
                                        np.zeros((L, E)) if loss is None else loss, with_loss,
                                        np.zeros(L) if scale is None else scale, with_scale,
                                        kappa, np.zeros(E))
        assert tick == ref.tick
        for name, v in zip(_STATE_ARRAYS, arrs):
            np.testing.assert_allclose(v, getattr(ref, name), rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(sc, [ref.R, ref.psi, ref.dR, ref.kappa, ref.Tbar_global],
                                   rtol=0, atol=1e-12)


def test_routing_fields_kernel_matches_law():
    cfg = ControllerConfig(pressure_gain=1.7, routing_T_min=0.3, routing_T_max=7.0)
    s = init_state(cfg, 2, 4, seed=1)
    r = np.random.default_rng(1)
    P, lens, Teff = r.uniform(-1, 1, (2, 4)), r.uniform(-1, 1, (2, 4)), r.uniform(0.01, 20, (2, 4))
    sigma = np.array([0.0, 2.5])
    s = type(s)(**{**s.__dict__, "pressure_LE": P, "lens_LE": lens, "T_eff_LE": Teff,
                   "logit_scale_L": sigma})
    bias, temp, scale = np.empty((2, 4)), np.empty((2, 4)), np.empty(2)
    tau = _kernels.routing_fields_into(_ctrl_params(cfg), 0.37, P, lens, Teff, sigma, bias, temp,
                                       scale)
    f = routing_fields(s, cfg, 0.37)
    np.testing.assert_array_equal(bias, f.bias_LE)
    np.testing.assert_array_equal(temp, f.temperature_LE)
    np.testing.assert_array_equal(scale, f.scale_L)
    assert tau == f.tau


def _route_kernel(env, es, fields, seed, tick, controller_fields=True):
    L, E, D, T, K = (env.num_layers, env.num_experts, env.num_domains, env.tokens_per_tick,
                     env.top_k)
    counts, loss, scale = np.zeros((L, E)), np.zeros((L, E)), np.zeros(L)
    clean = np.full((L, E), np.nan)                  # every entry must be written
    sumx, cnt = np.zeros((L, D, E)), np.zeros((L, D, E))
    mean, explored = _kernels.env_route(
        _kernels.env_params(env), seed, tick, controller_fields, es.quality_LED, es.est_LDE,
        es.cum_D, fields.bias_LE, fields.temperature_LE, fields.scale_L, fields.tau, counts,
        clean, loss, scale, sumx, cnt, *_kernels.route_scratch(L, D, E, T, K))
    return counts, loss, sumx, cnt, mean, scale, explored, clean


def _fields(bias, temp, scale=None, tau=0.0):
    L = bias.shape[0]
    return RoutingFields(bias, temp, np.ones(L) if scale is None else scale, tau)


@pytest.mark.parametrize("top_k, num_domains, controller_fields",
                         [(1, 3, True), (2, 3, True), (4, 3, True), (2, 6, True), (3, 5, True),
                          (2, 3, False), (2, 6, False)])
def test_env_route_kernel_makes_the_numpy_choices(top_k, num_domains, controller_fields):
    """Counts, noiseless counts, explored slots and the observed logit scale equal the NumPy
    reference bit for bit, with Gumbel noise, for every top-k path and both domain paths of
    the kernel (D ≤ 4: selects; D > 4: masked passes)."""
    env = EnvConfig(num_layers=3, num_experts=6, top_k=top_k, tokens_per_tick=64,
                    num_domains=num_domains, router_prior_count=2.0, batch_noise=0.5)
    es = init_env(env, seed=4)
    r = np.random.default_rng(2)
    es.est_LDE = r.uniform(1.0, 4.0, es.est_LDE.shape)           # a router with opinions
    f = _fields(r.uniform(-0.3, 0.3, (3, 6)), r.uniform(0.2, 3.0, (3, 6)),
                r.uniform(0.5, 3.0, 3), tau=0.4)
    explored_any = 0
    for tick in (1, 2, 99):
        ref = route(env, es, f, 4, tick, controller_fields)
        counts, loss, sumx, cnt, mean, scale, explored, clean = _route_kernel(
            env, es, f, 4, tick, controller_fields)
        np.testing.assert_array_equal(counts, ref.counts_LE)      # the same discrete choices
        np.testing.assert_array_equal(clean, ref.noiseless_counts_LE)
        np.testing.assert_array_equal(cnt, ref.cnt_LDE)
        assert explored == ref.explored_L.sum()
        np.testing.assert_array_equal(scale, ref.logit_scale_L)
        np.testing.assert_allclose(loss, ref.loss_LE, rtol=1e-13, atol=0)
        np.testing.assert_allclose(sumx, ref.sumx_LDE, rtol=1e-13, atol=0)
        assert mean == pytest.approx(ref.mean_loss, rel=1e-13)
        assert counts.sum() == 3 * 64 * top_k
        explored_any += explored
    assert (explored_any > 0) == (controller_fields and top_k < 6)   # the noise did act


def _noisy_env_and_fields(tau):
    env = EnvConfig(num_layers=3, num_experts=6, top_k=2, tokens_per_tick=64, num_domains=3,
                    router_prior_count=2.0, batch_noise=0.5)
    es = init_env(env, seed=8)
    r = np.random.default_rng(3)
    es.est_LDE = r.uniform(1.0, 4.0, es.est_LDE.shape)
    return env, es, _fields(r.uniform(-0.3, 0.3, (3, 6)), r.uniform(0.2, 3.0, (3, 6)),
                            r.uniform(0.5, 3.0, 3), tau=tau)


def test_env_noiseless_counts_are_the_routers_choice_without_the_noise():
    """Law v2.1: with noise (fields on, τ > 0) the NumPy environment's noiseless counts are
    the slots of the routing of the same tokens without the Gumbel noise (routing.route with
    no uniforms: what eval mode picks), its counts those of the noisy routing; they differ (the
    noise moves choices) over the same slots per layer. Mutations caught: noiseless counts
    taken from the noisy selection, or from the top-k of the raw logits."""
    env, es, f = _noisy_env_and_fields(tau=1.0)
    L, E, T, K = 3, 6, 64, 2
    moved = 0
    for tick in (1, 2, 3):
        got = route(env, es, f, 8, tick)
        _, z_LTE = raw_logits(env, es, 8, tick)
        u_LTE = rng.uniform(8, rng.STREAM_GUMBEL, tick, np.arange(L * T * E)).reshape(L, T, E)
        for li in range(L):
            clean = route_layer(z_LTE[li], f.layer(li), K).selected_NK
            noisy = route_layer(z_LTE[li], f.layer(li), K, u_LTE[li]).selected_NK
            np.testing.assert_array_equal(got.noiseless_counts_LE[li],
                                          np.bincount(clean.ravel(), minlength=E))
            np.testing.assert_array_equal(got.counts_LE[li],
                                          np.bincount(noisy.ravel(), minlength=E))
        np.testing.assert_array_equal(got.noiseless_counts_LE.sum(axis=1), T * K)
        assert got.noiseless_counts_LE is not got.counts_LE
        moved += int(np.abs(got.noiseless_counts_LE - got.counts_LE).sum())
    assert moved > 0


@pytest.mark.parametrize("controller_fields, tau", [(False, 1.0), (True, 0.0)])
def test_noiseless_counts_are_the_counts_without_noise(controller_fields, tau):
    """No exploration noise (fields off, or τ = 0): the noiseless counts are the counts, in
    NumPy and in the kernel (which must write every entry)."""
    env, es, f = _noisy_env_and_fields(tau=tau)
    for tick in (1, 5):
        ref = route(env, es, f, 8, tick, controller_fields)
        np.testing.assert_array_equal(ref.noiseless_counts_LE, ref.counts_LE)
        counts, *_, clean = _route_kernel(env, es, f, 8, tick, controller_fields)
        np.testing.assert_array_equal(clean, counts)
        np.testing.assert_array_equal(clean, ref.counts_LE)


def test_kernel_noiseless_counts_follow_numpy_over_a_run_and_differ_from_counts():
    """A short closed run of the environment (the router learning from each tick) with strong
    noise: the kernel's noiseless counts equal NumPy's every tick, have the counts' totals, and
    the noise moves choices (they differ from the counts somewhere in the run)."""
    env, es, f = _noisy_env_and_fields(tau=0.7)
    moved = 0
    for tick in range(1, 21):
        ref = route(env, es, f, 8, tick)
        counts, *_, clean = _route_kernel(env, es, f, 8, tick)
        np.testing.assert_array_equal(clean, ref.noiseless_counts_LE, err_msg=f"tick {tick}")
        np.testing.assert_array_equal(counts, ref.counts_LE)
        np.testing.assert_array_equal(clean.sum(axis=1), counts.sum(axis=1))
        moved += int((clean != counts).sum())
        learn(env, es, ref)
    assert moved > 0


def _slot_experts(env, es, fields, seed, tick, kernel):
    """[L, T, K] expert of every slot, read back from the per-slot loss sums: each slot has its
    own loss noise u[(l·T + t)·K + k], so with one token and one domain sumx[l, 0, e] identifies
    the slot expert e filled (tests below use T = D = 1)."""
    assert env.tokens_per_tick == 1 and env.num_domains == 1
    L, K = env.num_layers, env.top_k
    if kernel:
        _, _, sumx, cnt, *_ = _route_kernel(env, es, fields, seed, tick)
    else:
        ref = route(env, es, fields, seed, tick)
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
    bit-identical scores (z̃ = 0, so the score is the bias). The kernel's top-k insertion
    compared with a plain '>', so an expert pushed down a slot by a better one lost its tie
    against the later expert below it: scores (s, s, s + 1) selected experts (2, 1) where the
    stable sort (ties to the lower index) selects (2, 0). The slot order matters too: slot k
    draws its own loss noise."""
    env = EnvConfig(num_layers=1, num_experts=3, top_k=2, tokens_per_tick=1, num_domains=1,
                    token_noise=0.0, batch_noise=0.0, router_sharpness=0.0,
                    router_prior_count=0.0, router_memory=1000.0)
    es = init_env(env, seed=0)
    f = _fields(np.array([[-0.25, -0.25, 0.5]]), np.array([[2.0, 2.0, 2.5]]))
    for kernel in (False, True):
        np.testing.assert_array_equal(_slot_experts(env, es, f, 0, 2, kernel),
                                      [[[2, 0]]], err_msg=f"kernel={kernel}")
    # deeper: expert 4 pushes expert 0 down onto its tie with expert 2, and 2's push-down of
    # expert 1 meets 1's tie with expert 3 (the old kernel gave (4, 2, 0, 1))
    f5 = _fields(np.array([[0.5, 0.0, 0.5, 0.0, 1.0]]), np.ones((1, 5)))
    env5 = EnvConfig(num_layers=1, num_experts=5, top_k=4, tokens_per_tick=1, num_domains=1,
                     token_noise=0.0, batch_noise=0.0, router_sharpness=0.0)
    es5 = init_env(env5, seed=3)
    for kernel in (False, True):
        np.testing.assert_array_equal(_slot_experts(env5, es5, f5, 3, 7, kernel),
                                      [[[4, 0, 2, 1]]], err_msg=f"kernel={kernel}")


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
        f = _fields(bias, np.ones((3, 6)))
        ref = _slot_experts(env, es, f, 11, tick, kernel=False)
        got = _slot_experts(env, es, f, 11, tick, kernel=True)
        np.testing.assert_array_equal(got, ref, err_msg=f"tick {tick}")
        # and the reference is the documented rule: descending score, ties to the lower index
        expect = np.array([sorted(range(6), key=lambda e: (-bias[li, e], e))[:top_k]
                           for li in range(3)])
        np.testing.assert_array_equal(ref[:, 0], expect)


def test_env_route_counts_slots_and_domains():
    env = EnvConfig(num_layers=2, num_experts=4, top_k=2, tokens_per_tick=1000, num_domains=2,
                    domain_weights=(3.0, 1.0))
    es = init_env(env, seed=0)
    ref = route(env, es, _fields(np.zeros((2, 4)), np.ones((2, 4))), 0, 1)
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
    flat = _fields(np.zeros((1, 6)), np.ones((1, 6)))
    for tick in range(1, 301):
        learn(env, es, route(env, es, flat, 5, tick))
    expected_LED = env.loss_floor + env.loss_range * (1.0 - es.quality_LED)
    seen = es.nobs_LDE[0] > 100
    np.testing.assert_allclose(es.est_LDE[0][seen], expected_LED[0].T[seen], atol=0.05)
    best2 = np.argsort(expected_LED[0], axis=0)[:2].T              # [D, 2]
    ref = route(env, es, flat, 5, 999)
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
    assert tr.R_BT.shape == (B, T) and tr.Tbar_global_BT.shape == (B, T)
    assert tr.exploration_BT.shape == (B, T)
    assert tr.logit_scale_BTL.shape == tr.maxvio_BTL.shape == (B, T, L)
    assert tr.Tbar_local_BTLE.shape == (B, T, L, E) and tr.variance_local_BTL.shape == (B, T, L)
    assert tr.num_systems == 2 and len(tr.final_states) == 2
    assert tr.final_states[1].tick == 100 and tr.final_states[1].seed == 2
    assert tr.controller_fields is True
    np.testing.assert_array_equal(tr.variance_model_BT, tr.variance_local_BTL.mean(-1))
    for b in range(B):
        for t in range(T):
            assert tr.gate_BT[b, t] == coherence_gate(tr.R_BT[b, t], 0.2, 0.5)
            for li in range(L):
                lsl = landscape(tr.Tbar_local_BTLE[b, t, li])
                assert tuple(np.flatnonzero(tr.valley_local_BTLE[b, t, li])) == lsl.valleys
                assert tr.variance_local_BTL[b, t, li] == pytest.approx(lsl.variance,
                                                                        rel=1e-12, abs=1e-18)
    last = tr.final_states[0]
    assert tr.R_BT[0, -1] == last.R and np.array_equal(tr.usage_BTLE[0, -1], last.usage_LE)
    assert tr.Tbar_global_BT[0, -1] == last.Tbar_global
    # the controller saw the logit scale the trajectory records: its first observation set σ_L
    assert np.all(last.logit_scale_L > 0) and np.all(tr.logit_scale_BTL > 0)


def test_trajectory_records_the_ticks_routing_by_hand():
    """Re-run the reference tick by tick (env.route + step with the tick's noiseless counts)
    and compare what the trajectory records at each tick: MaxVio of the tick's (routed) counts
    (max/mean − 1 per layer), the explored share of its slots, its observed logit scale; the
    env's logit scale is the mean over tokens of the std across experts of env.raw_logits; and
    the final states are equal (mutation caught: simulate not passing the noiseless counts)."""
    from chronomoe_dyn.simulate import _kappa_inputs
    cfg = ControllerConfig()
    tr = simulate(cfg, SMALL, num_systems=1, ticks=12, seed=3, record_every=1,
                  backend="numpy")
    kappa_T, _ = _kappa_inputs(tr.schedule, 12)
    state, es = init_state(cfg, SMALL.num_layers, SMALL.num_experts, 3), init_env(SMALL, 3)
    K, T = SMALL.top_k, SMALL.tokens_per_tick
    for t in range(1, 13):
        f = routing_fields(state, cfg, float(kappa_T[t - 1]))
        if t == 1:
            np.testing.assert_array_equal(f.scale_L, cfg.logit_scale_floor)   # not observed
        _, z_LTE = raw_logits(SMALL, es, 3, t)
        got = route(SMALL, es, f, 3, t)
        np.testing.assert_allclose(got.logit_scale_L, z_LTE.std(axis=-1).mean(axis=-1),
                                   rtol=1e-12)
        c = got.counts_LE
        np.testing.assert_allclose(tr.maxvio_BTL[0, t - 1], c.max(1) / c.mean(1) - 1, rtol=1e-15)
        assert tr.exploration_BT[0, t - 1] == got.explored_L.sum() / (SMALL.num_layers * T * K)
        np.testing.assert_array_equal(tr.logit_scale_BTL[0, t - 1], got.logit_scale_L)
        state = step(state, cfg, RoutingObservation(c, got.wsum_LE, got.loss_LE,
                                                    got.logit_scale_L,
                                                    noiseless_counts=got.noiseless_counts_LE),
                     float(kappa_T[t - 1]))
        learn(SMALL, es, got)
    assert tr.exploration_BT.max() > 0                       # τ₀ = 0.1: some slots explore
    # the simulator's controller is the one fed the noiseless counts (law v2.1), bit for bit
    assert state.allclose(tr.final_states[0])


def test_controller_fields_false_routes_by_the_plain_top_k_and_still_ticks():
    """The ablation: every tick's counts are those of the top-k of the raw logits (whatever the
    controller's fields), nothing is explored, and the controller still observes and ticks
    (its state moves exactly as in a run with fields, tick for tick, given those counts)."""
    env = EnvConfig(num_layers=2, num_experts=5, top_k=2, tokens_per_tick=32, num_domains=2)
    es = init_env(env, 6)
    state = init_state(ControllerConfig(), 2, 5, 6)
    f = routing_fields(state, ControllerConfig(), 1.0)
    f = RoutingFields(f.bias_LE + np.arange(5.0), f.temperature_LE, f.scale_L, 2.0)
    got = route(env, es, f, 6, 1, controller_fields=False)
    _, z_LTE = raw_logits(env, es, 6, 1)
    want = np.zeros((2, 5))
    for li in range(2):
        np.add.at(want[li], topk_stable(z_LTE[li], 2).ravel(), 1.0)
    np.testing.assert_array_equal(got.counts_LE, want)
    assert got.explored_L.sum() == 0
    kw = dict(env=SMALL, num_systems=2, ticks=150, seed=2, record_every=5)
    off = simulate(**kw, controller_fields=False)
    on = simulate(**kw)
    assert off.controller_fields is False and np.all(off.exploration_BT == 0)
    assert off.final_states[0].tick == 150 and np.any(off.final_states[0].lens_LE != 0)
    assert np.all(off.final_states[0].logit_scale_L > 0)
    assert not np.array_equal(off.maxvio_BTL, on.maxvio_BTL)  # the fields moved the choices


def test_numba_matches_the_numpy_reference_without_controller_fields():
    kw = dict(env=SMALL, num_systems=2, ticks=200, seed=7, record_every=4,
              controller_fields=False, events=(Event("collapse", 60, expert=1, quality=0.0),))
    assert_trajectories_close(simulate(**kw), simulate(**kw, backend="numpy"), atol=1e-10)


def test_record_layers_false_drops_the_layer_fields_only():
    full = simulate(env=SMALL, num_systems=2, ticks=60, seed=3)
    lean = simulate(env=SMALL, num_systems=2, ticks=60, seed=3, record_layers=False)
    for name in ("Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE",
                 "valley_local_BTLE", "ridge_local_BTLE"):
        assert getattr(lean, name) is None
    for name in ("R_BT", "kappa_BT", "Tbar_global_BT", "variance_local_BTL", "loss_BT",
                 "exploration_BT", "maxvio_BTL", "logit_scale_BTL"):
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
    assert back.events == tr.events and back.controller_fields is True
    lean = simulate(env=SMALL, ticks=20, record_layers=False, controller_fields=False)
    back = Trajectory.from_npz(lean.to_npz(tmp_path / "lean.npz"))
    assert back.usage_BTLE is None and back.controller_fields is False


def test_a_version_1_npz_is_refused_with_a_clear_error(tmp_path):
    """A file written by version 1 (format chronomoe_dyn.Trajectory/1, Tbar_global_BTE) must not
    load into a v2 Trajectory (whose fields mean other things): ValueError naming the version."""
    import json
    tr = simulate(env=SMALL, ticks=20)
    path = tr.to_npz(tmp_path / "v2.npz")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta_json"]))
    meta["format"] = "chronomoe_dyn.Trajectory/1"
    data["meta_json"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "v1.npz", **data)
    with pytest.raises(ValueError, match=r"version-1 trajectory"):
        Trajectory.from_npz(tmp_path / "v1.npz")
    meta["format"] = "something/else"
    data["meta_json"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "odd.npz", **data)
    with pytest.raises(ValueError, match="unknown trajectory format"):
        Trajectory.from_npz(tmp_path / "odd.npz")


def cfg_E(tr):
    return tr.env.num_experts


def test_invariants_along_a_run():
    cfg = ControllerConfig()
    tr = simulate(cfg, EnvConfig(), num_systems=2, ticks=600, seed=8)
    assert np.all((tr.R_BT >= 0) & (tr.R_BT <= 1))
    assert np.all((tr.gate_BT >= 0.5) & (tr.gate_BT <= 1))
    assert np.all((tr.T_fast_BTLE >= cfg.T_min) & (tr.T_fast_BTLE <= cfg.T_max))
    assert np.all((tr.reliability_BTLE >= 0) & (tr.reliability_BTLE <= 1))
    np.testing.assert_allclose(tr.usage_BTLE.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.isfinite(tr.loss_BT)) and np.all(tr.loss_BT > 0)
    assert np.all((tr.exploration_BT >= 0) & (tr.exploration_BT <= 1))
    assert np.all(tr.maxvio_BTL >= 0) and np.all(tr.maxvio_BTL <= cfg_E(tr) - 1)
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


# --- the default run ------------------------------------------------------------------------

@pytest.mark.slow
def test_default_run_learns_settles_and_forms_healthy_valleys():
    """The default environment and schedule, 8 systems, 4000 ticks (means over systems).

    Re-measured at the calibrated defaults (drift_gain 0.1, pressure_gain 2, beta_drift 0.1,
    beta_reliability 0.8, reliability_sharpness 8) on 2026-12-05. What holds: the loss falls
    (2.19 → 1.44), κ follows the schedule, exploration falls with κ (0.330 → 0.103 of the slots:
    3.2×, close to the 3× asserted; it was 0.36 → 0.07 at the provisional constants), every
    layer has valleys late (2.9 per layer) and they are healthy (none below reliability 0.3;
    96 % above 0.5, issue 9 asks ≥ 70 %), and, new with these constants, the landscape forms:
    var(T̄_local) late 0.0127 > 0.01 (layer and system mean; close to the threshold: 5 of the 8
    systems pass on their own, the others sit at 0.0081–0.0095; provisional constants: 0.0086).
    R locks at once and stays near its ceiling (R_∞ 0.978 for perfectly stable routing, study
    ``kuramoto``): from the incoherent level at tick 0 (0.16 ≈ 1/sqrt(L·E)) to 0.88 by tick 60,
    0.905 over ticks ≤ 800, 0.968 after 2800.
    Law v2.1 (noiseless counts, β_p 0; re-measured 2026-12-05): exploration 0.337 → 0.141
    (2.39×; v2: 3.2×, asserted > 3×, now > 2.2×: with the bias balancing the router's own
    choice, more tokens sit near a decision boundary late, where the noise flips them); R 0.154
    at tick 0, 0.914 over ticks 100–800, 0.955 late; var(T̄_local) late 0.0132 (6 of 8 systems
    above 0.01 on their own); 2.8 valleys per layer, none unhealthy, 98 % above 0.5; loss 2.19
    → 1.47.
    What does not hold (asserted as the finding, so a change of the law that brings it back
    shows up): "R rises as the router settles" in the v1 sense, R(late) > R(early) + 0.2
    (0.968 vs 0.905, +0.063; provisional constants: 0.42 → 0.84), and v1's R < 0.35 over
    ticks ≤ 800 (0.905): with α = 0.1 the simulator's z-scored drift is far below what breaks
    locking (α·std(δ) ≪ K; see ``ControllerConfig.drift_gain``)."""
    tr = simulate(num_systems=8, ticks=4000, seed=0, record_every=10)
    t = tr.tick_T
    early, late = t <= 800, t > 2800
    R_early, R_late = tr.R_BT[:, early].mean(), tr.R_BT[:, late].mean()
    assert tr.R_BT[:, 0].mean() < 0.35                                 # starts incoherent
    assert tr.R_BT[:, (t >= 100) & early].mean() > 0.85                # locked within ~100 ticks
    assert R_late > R_early and R_late > 0.9                           # and settles near 0.978
    assert not R_late > R_early + 0.2                                  # the finding (docstring)
    assert tr.kappa_BT[:, early].mean() == pytest.approx(0.5)
    assert tr.kappa_BT[:, -1].mean() == pytest.approx(-0.3, abs=1e-3)
    assert tr.exploration_BT[:, early].mean() > 2.2 * tr.exploration_BT[:, late].mean()
    assert tr.variance_local_BTL[:, late].mean() > 0.01                # the landscape forms
    valleys = tr.valley_local_BTLE[:, late]
    assert valleys.any(axis=-1).all()                                  # every layer has valleys
    rel = tr.reliability_BTLE[:, late][valleys]
    assert np.mean(rel < ControllerConfig().unhealthy_reliability) < 0.05
    assert np.mean(rel > 0.5) >= 0.7                                   # issue 9's valley health
    assert tr.loss_BT[:, late].mean() < tr.loss_BT[:, early].mean()   # the router learned
