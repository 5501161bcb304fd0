"""Properties of the simulators: the Numba kernels equal the references for any small setup
(fields on and off, up to 6 domains so the kernel's D > 4 path runs), runs are reproducible bit
for bit (same seed, any thread count), a batch is B independent runs, and the state stays inside
its invariants."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chronomoe_dyn import ControllerConfig, _kernels, rng, routing_fields, step
from chronomoe_dyn import testing as kit
from chronomoe_dyn.env import EnvConfig, Event
from chronomoe_dyn.kuramoto import simulate_kuramoto
from chronomoe_dyn.landscape import FLAT_VARIANCE
from chronomoe_dyn.simulate import simulate

FEW = settings(max_examples=8, deadline=None)
"""Each example runs (and at first compiles) a simulation: few examples, no deadline."""

ARRAYS = ("R_BT", "dR_BT", "kappa_BT", "gate_BT", "loss_BT", "Tbar_global_BT",
          "exploration_BT", "logit_scale_BTL", "maxvio_BTL", "variance_local_BTL",
          "Tbar_local_BTLE", "T_fast_BTLE", "usage_BTLE", "reliability_BTLE",
          "valley_local_BTLE", "ridge_local_BTLE")
EXACT = ("exploration_BT", "maxvio_BTL")
"""Functions of the discrete choices alone: equal bit for bit between the backends."""
LANDSCAPES = (("Tbar_local_BTLE", "valley_local_BTLE", "ridge_local_BTLE"),)
"""T̄ records and the valley/ridge masks derived from them."""


def _margins(tbar: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distances of each T̄ from the valley and ridge thresholds (> 0: in the set), and
    the variance's distance from the flat threshold (> 0: shaped)."""
    mean = tbar.mean(axis=-1, keepdims=True)
    var = tbar.var(axis=-1, keepdims=True)
    std = np.sqrt(var)
    return (mean - c * std) - tbar, tbar - (mean + c * std), var - FLAT_VARIANCE


def assert_landscape_masks_agree(a, b, atol: float) -> None:
    """The valley/ridge masks of two trajectories whose T̄ agree to ``atol`` are equal except at
    near-ties. The masks are a step function of T̄ (T̄ < mean − c·std), so a difference of
    rounding can flip an entry that sits on its threshold: T̄ flat up to rounding (e.g. experts
    that are symmetric in exact arithmetic, whose T̄ differ by an ulp or two) has rounding-noise
    "valleys" in either backend. mean and std are 1-Lipschitz in the max-norm, so the margin
    T̄ − (mean ∓ c·std) of an entry moves by at most (2 + c)·atol between the two: an entry may
    differ only where its two margins (of opposite signs then) are that close, or where the
    row's variance is that close to the flat threshold (the variance moves by at most
    2·atol·range); any other difference fails."""
    c = a.config.landscape_threshold_std
    tol = (2.0 + c) * atol
    for vals, *masks in LANDSCAPES:
        ta, tb = getattr(a, vals), getattr(b, vals)
        (*mas, fa), (*mbs, fb) = _margins(ta, c), _margins(tb, c)
        near_flat = (np.abs(fa - fb) + np.abs(fa) <= 4 * atol * (1 + np.ptp(ta, axis=-1,
                                                                           keepdims=True)))
        for name, ma, mb in zip(masks, mas, mbs):
            xa, xb = getattr(a, name), getattr(b, name)
            np.testing.assert_array_equal(xa, (ma > 0) & (fa > 0), err_msg=name)  # own T̄
            np.testing.assert_array_equal(xb, (mb > 0) & (fb > 0), err_msg=name)
            bad = (xa != xb) & ~(np.abs(ma - mb) <= tol) & ~near_flat
            assert not np.any(bad), (f"{name} differs away from its threshold at "
                                     f"{np.argwhere(bad)[:5].tolist()}")


@st.composite
def envs(draw):
    """Small environments of every shape the kernel must handle."""
    E = draw(st.integers(1, 6))
    D = draw(st.integers(1, 6))                # > 4 runs the kernel's masked-pass branch
    weights = draw(st.none() | st.lists(st.floats(0.05, 1.0), min_size=D, max_size=D))
    return EnvConfig(
        num_layers=draw(st.integers(1, 3)), num_experts=E, top_k=draw(st.integers(1, E)),
        tokens_per_tick=draw(st.integers(1, 40)), num_domains=D,
        domain_weights=None if weights is None else tuple(weights),
        token_noise=draw(st.sampled_from([0.0, 0.5, 2.0])),
        batch_noise=draw(st.sampled_from([0.0, 1.0])),
        router_sharpness=draw(st.sampled_from([0.0, 2.0, 5.0])),
        router_prior_count=draw(st.sampled_from([0.0, 2.0, 500.0])), router_memory=1000.0)


@st.composite
def configs(draw):
    return ControllerConfig(
        phase_noise=draw(st.sampled_from([0.0, 0.3])),
        drift_gain=draw(st.sampled_from([0.0, 0.3, 1.0])),
        kappa_smoothing=draw(st.sampled_from([1.0, 0.3])),
        micro_period=draw(st.integers(1, 5)), macro_period=draw(st.integers(1, 20)),
        lens_max=draw(st.sampled_from([0.05, 1.0])),
        lens_clock=draw(st.sampled_from(["macro", "micro"])),
        exploration_tau0=draw(st.sampled_from([0.0, 0.1, 1.0])),
        pressure_gain=draw(st.sampled_from([0.0, 1.0, 3.0])))


def _events(env: EnvConfig, ticks: int) -> tuple[Event, ...]:
    return (Event("collapse", ticks // 3, expert=env.num_experts - 1, layer=None, quality=0.1),
            Event("domain_shift", ticks // 2, weights=tuple(range(1, env.num_domains + 1))))


def _digest(tr) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        h.update(np.ascontiguousarray(getattr(tr, name)).tobytes())
    return h.hexdigest()


# --- numba = reference ---------------------------------------------------------------------------

_TIES = dict(num_experts=3, top_k=2, tokens_per_tick=1, num_domains=1, token_noise=0.0,
             batch_noise=0.0, router_sharpness=0.0, router_prior_count=0.0, router_memory=1000.0)
"""Hypothesis finds: one token, a flat router and no logit noise make exact score ties."""
_TIES_CFG = ControllerConfig(micro_period=1, macro_period=1, drift_gain=0.0, phase_noise=0.0,
                             kappa_smoothing=1.0, lens_max=0.05)


@FEW
@given(env=envs(), cfg=configs(), seed=st.integers(0, 2**32 - 8),
       controller_fields=st.booleans())
# an expert pushed down a slot lost its tie against a later expert in the kernel (loss_BT 0.22)
@example(env=EnvConfig(num_layers=1, **_TIES), cfg=_TIES_CFG, seed=0, controller_fields=True)
# T̄ flat up to rounding: the masks flip on rounding-noise "valleys" (near-ties only)
@example(env=EnvConfig(num_layers=2, **{**_TIES, "num_experts": 4}), cfg=_TIES_CFG, seed=0,
         controller_fields=True)
# more than 4 domains: the kernel's masked-pass branch, with noise
@example(env=EnvConfig(num_layers=2, num_experts=5, top_k=2, tokens_per_tick=20, num_domains=6,
                       router_prior_count=2.0, router_memory=1000.0),
         cfg=ControllerConfig(exploration_tau0=1.0), seed=3, controller_fields=True)
def test_numba_equals_the_numpy_reference(env, cfg, seed, controller_fields):
    kw = dict(config=cfg, env=env, num_systems=2, ticks=150, seed=seed, record_every=5,
              events=_events(env, 150), controller_fields=controller_fields)
    a = simulate(**kw)
    b = simulate(**kw, backend="numpy")
    for name in EXACT:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        if x.dtype != bool:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-10, err_msg=name)
    assert_landscape_masks_agree(a, b, atol=1e-10)
    for sa, sb in zip(a.final_states, b.final_states):
        assert sa.allclose(sb, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), stream=st.integers(0, 2**32 - 1),
       tick=st.integers(0, 2**32 - 1),
       index=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_kernel_counter_rng_bits_equal_rng_py(seed, stream, tick, index):
    idx = np.array(index, dtype=np.int64)
    out = np.empty(idx.size, dtype=np.uint64)
    _kernels.hash_into(seed, stream, tick, idx, out)
    np.testing.assert_array_equal(out, rng.hash_key(seed, stream, tick, idx))
    u = np.empty(idx.size)
    _kernels.uniform_into(seed, stream, tick, idx, u)
    np.testing.assert_array_equal(u, rng.uniform(seed, stream, tick, idx))


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 70), K=st.floats(0.0, 3.0),
       dt=st.floats(0.01, 0.5), noise=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 1000))
def test_kuramoto_numba_equals_the_numpy_loop(B, N, K, dt, noise, seed):
    om = np.random.default_rng(seed).standard_normal((B, N))
    a = simulate_kuramoto(om, K, dt, 60, noise=noise, seed=seed, record_every=3)
    b = simulate_kuramoto(om, K, dt, 60, noise=noise, seed=seed, record_every=3,
                          backend="numpy")
    np.testing.assert_allclose(a.R, b.R, rtol=0, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(2, 60), shift=st.floats(-10.0, 10.0), seed=st.integers(0, 1000))
def test_kuramoto_R_is_blind_to_a_global_phase_shift_and_to_relabelling(N, shift, seed):
    r = np.random.default_rng(seed)
    om, th0 = r.standard_normal(N) * 0.5, r.uniform(0, 2 * math.pi, N)
    base = simulate_kuramoto(om, 0.8, 0.1, 80, theta0=th0)
    shifted = simulate_kuramoto(om, 0.8, 0.1, 80, theta0=th0 + shift)
    perm = r.permutation(N)
    relabelled = simulate_kuramoto(om[perm], 0.8, 0.1, 80, theta0=th0[perm])
    np.testing.assert_allclose(shifted.R, base.R, atol=1e-9)
    np.testing.assert_allclose(relabelled.R, base.R, atol=1e-9)


# --- reproducibility ---------------------------------------------------------------------------

@FEW
@given(env=envs(), seed=st.integers(0, 2**32 - 8))
def test_same_seed_same_bits(env, seed):
    a = simulate(env=env, num_systems=2, ticks=80, seed=seed, events=_events(env, 80))
    b = simulate(env=env, num_systems=2, ticks=80, seed=seed, events=_events(env, 80))
    assert _digest(a) == _digest(b)


@FEW
@given(env=envs(), seed=st.integers(0, 2**32 - 8), B=st.integers(2, 4))
def test_a_batch_is_B_runs_of_one(env, seed, B):
    batch = simulate(env=env, num_systems=B, ticks=60, seed=seed, record_every=3)
    for b in range(B):
        one = simulate(env=env, num_systems=1, ticks=60, seed=seed + b, record_every=3)
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(one, name)[0], getattr(batch, name)[b],
                                          err_msg=name)
        assert one.final_states[0].allclose(batch.final_states[b])


def test_one_or_two_threads_give_the_same_bits():
    env = EnvConfig(num_layers=2, num_experts=6, tokens_per_tick=48)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = simulate(env=env, num_systems=5, ticks=200, seed=3)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = simulate(env=env, num_systems=5, ticks=200, seed=3)
    finally:
        numba.set_num_threads(before)
    assert _digest(a) == _digest(b)


_CHILD = """
import hashlib, numba, numpy as np
from chronomoe_dyn.env import EnvConfig
from chronomoe_dyn.simulate import simulate
tr = simulate(env=EnvConfig(num_layers=2, num_experts=6, tokens_per_tick=48), num_systems=5,
              ticks=200, seed=3)
h = hashlib.sha256()
for name in {names!r}:
    h.update(np.ascontiguousarray(getattr(tr, name)).tobytes())
print(numba.get_num_threads(), h.hexdigest())
"""


@pytest.mark.slow
def test_fresh_processes_with_one_and_two_threads_agree():
    """NUMBA_NUM_THREADS fixes the pool size at start-up: two fresh interpreters, same bits."""
    out = {}
    for n in (1, 2):
        res = subprocess.run([sys.executable, "-c", _CHILD.format(names=list(ARRAYS))],
                             env={**os.environ, "NUMBA_NUM_THREADS": str(n)},
                             capture_output=True, text=True, check=True, timeout=600)
        threads, digest = res.stdout.split()
        out[int(threads)] = digest
    assert set(out) == {1, 2}
    assert out[1] == out[2]
    env = EnvConfig(num_layers=2, num_experts=6, tokens_per_tick=48)
    assert _digest(simulate(env=env, num_systems=5, ticks=200, seed=3)) == out[1]


# --- invariants ----------------------------------------------------------------------------------

@FEW
@given(env=envs(), cfg=configs(), seed=st.integers(0, 2**32 - 8))
def test_state_stays_inside_its_invariants(env, cfg, seed):
    tr = simulate(cfg, env, num_systems=2, ticks=120, seed=seed, record_every=1,
                  events=_events(env, 120))
    assert np.all((tr.R_BT >= 0) & (tr.R_BT <= 1))
    np.testing.assert_allclose(tr.dR_BT[:, 1:], np.diff(tr.R_BT, axis=1), atol=1e-15)
    assert np.all((tr.kappa_BT >= -1) & (tr.kappa_BT <= 1))
    assert np.all((tr.gate_BT >= 0) & (tr.gate_BT <= 1))
    assert np.all((tr.T_fast_BTLE >= cfg.T_min) & (tr.T_fast_BTLE <= cfg.T_max))
    assert np.all((tr.reliability_BTLE >= 0) & (tr.reliability_BTLE <= 1))
    assert np.all(tr.usage_BTLE >= 0)
    np.testing.assert_allclose(tr.usage_BTLE.sum(-1), 1.0, atol=1e-12)
    assert np.all(tr.variance_local_BTL >= 0) and np.all(np.isfinite(tr.loss_BT))
    assert not np.any(tr.valley_local_BTLE & tr.ridge_local_BTLE)
    assert np.all((tr.exploration_BT >= 0) & (tr.exploration_BT <= 1))
    assert np.all(tr.maxvio_BTL >= 0) and np.all(tr.logit_scale_BTL >= 0)
    assert np.all((tr.Tbar_global_BT >= min(1.0, cfg.T_min)) &
                  (tr.Tbar_global_BT <= max(1.0, cfg.T_max)))
    for s in tr.final_states:
        assert np.all((s.theta_LE >= 0) & (s.theta_LE < 2 * math.pi))
        assert np.all(np.abs(s.lens_LE) <= cfg.lens_max)
        assert np.all((s.pressure_LE >= -1) & (s.pressure_LE <= 1))


def test_trajectory_json_config_survives_npz(tmp_path):
    """The saved metadata is plain JSON (no pickles): readable without chronomoe_dyn."""
    tr = simulate(env=EnvConfig(num_layers=1, num_experts=3, tokens_per_tick=8), ticks=20)
    with np.load(tr.to_npz(tmp_path / "t.npz"), allow_pickle=False) as z:
        meta = json.loads(str(z["meta_json"]))
    assert meta["env"]["num_experts"] == 3 and meta["schedule"]["kind"] == "cosine"


# --- every config field reaches the kernel and means the same there -----------------------------

_ARRAYS_LE = ["theta_LE", "omega_disorder_LE", "usage_LE", "reliability_LE", "delta_LE",
              "pressure_LE", "lens_LE", "T_fast_LE", "Tbar_local_LE", "T_eff_LE",
              "logit_scale_L"]


@settings(max_examples=40, deadline=None)
@given(case=kit.config_and_state(config=kit.configs(coupling=st.floats(0.0, 0.5),
                                                   dt=st.floats(0.01, 0.5)), max_steps=5),
       data=st.data())
def test_controller_kernel_equals_the_law_for_any_config(case, data):
    """controller_step and routing_fields_into against law.step and routing_fields for configs
    drawn over every ControllerConfig field (the kit's ``configs()``), 12 ticks of random
    observations with and without losses, logit scales and noiseless counts (law v2.1).
    dt·K ≤ 0.25 keeps the growth of rounding differences in the phases (≤ 1 + dt·K per tick)
    far below the tolerance over the ≤ 17 ticks. Mutations caught: a kernel ignoring a field
    (e.g. reading 1.0 for pressure_gain, or the macro clock for lens_clock="micro"), a field
    read under another field's name in the derived record, the kernel's usage reading the
    counts instead of the noiseless counts."""
    cfg, ref = case
    L, E = ref.num_layers, ref.num_experts
    cp = _kernels.ctrl_params(cfg)
    arrs = [np.array(getattr(ref, n), dtype=np.float64) for n in _ARRAYS_LE]
    sc = np.array([ref.R, ref.psi, ref.dR, ref.kappa, ref.Tbar_global])
    tick = ref.tick
    for _ in range(12):
        obs = data.draw(kit.observations(L, E))
        kappa = data.draw(kit.kappas())
        ref = step(ref, cfg, obs, kappa)
        tick = _kernels.controller_step(
            cp, ref.seed, tick, *arrs, sc, obs.counts,
            obs.counts if obs.noiseless_counts is None else obs.noiseless_counts,
            np.zeros((L, E)) if obs.loss_sum is None else obs.loss_sum, obs.loss_sum is not None,
            np.zeros(L) if obs.logit_scale is None else obs.logit_scale,
            obs.logit_scale is not None, kappa, np.zeros(E))
        assert tick == ref.tick
        for name, v in zip(_ARRAYS_LE, arrs):
            # phases: rounding differences of the mean field grow by at most (1 + dt·K) per tick
            np.testing.assert_allclose(v, getattr(ref, name), rtol=1e-9, atol=1e-9,
                                       err_msg=name)
        np.testing.assert_allclose(sc, [ref.R, ref.psi, ref.dR, ref.kappa, ref.Tbar_global],
                                   rtol=1e-9, atol=1e-9)
        k2 = data.draw(kit.kappas())
        bias, temp, scale = np.empty((L, E)), np.empty((L, E)), np.empty(L)
        tau = _kernels.routing_fields_into(cp, k2, arrs[5], arrs[6], arrs[9], arrs[10], bias,
                                           temp, scale)
        f = routing_fields(ref, cfg, k2)
        np.testing.assert_allclose(bias, f.bias_LE, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(temp, f.temperature_LE, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(scale, f.scale_L, rtol=1e-9, atol=1e-9)
        assert tau == pytest.approx(f.tau, rel=1e-12)
