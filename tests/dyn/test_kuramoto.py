"""simulate_kuramoto: the Numba kernel against the NumPy loop, its helpers against rng.py and
NumPy, input validation, and known answers of the mean-field Kuramoto model."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest

from chronomoe_dyn import _kernels, rng
from chronomoe_dyn.kuramoto import KuramotoResult, lorentzian_quantiles, simulate_kuramoto

TWO_PI = 2.0 * math.pi


# --- kernel helpers ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed,stream,tick", [(0, 0, 0), (2**32 - 1, 13, 2**32 - 1),
                                              (7, 11, 5), (123456789, 17, 42)])
def test_counter_rng_in_numba_gives_the_bits_of_rng_py(seed, stream, tick):
    idx = np.array([0, 1, 2, 3, 1000, 2**31, 2**32 - 1, 987654321], dtype=np.int64)
    h = np.empty(idx.size, dtype=np.uint64)
    _kernels.hash_into(seed, stream, tick, idx, h)
    np.testing.assert_array_equal(h, rng.hash_key(seed, stream, tick, idx))
    u = np.empty(idx.size)
    _kernels.uniform_into(seed, stream, tick, idx, u)
    np.testing.assert_array_equal(u, rng.uniform(seed, stream, tick, idx))
    z = np.empty(idx.size)
    _kernels.normal_into(seed, stream, tick, idx, z)
    # same uniforms; log/cos of libm vs NumPy may differ in the last bit
    np.testing.assert_allclose(z, rng.normal(seed, stream, tick, idx), rtol=4e-16, atol=4e-16)


def test_polynomial_sincos_is_within_an_ulp_of_numpy():
    x = np.concatenate([np.linspace(-60.0, 60.0, 400_001), np.linspace(0.0, TWO_PI, 100_001),
                        [0.0, -0.0, math.pi / 4, math.pi / 2, math.pi, 1e-300, 1e5]])
    s, c = np.empty_like(x), np.empty_like(x)
    _kernels.sincos_into(x, s, c)
    assert np.max(np.abs(s - np.sin(x))) <= 2.3e-16
    assert np.max(np.abs(c - np.cos(x))) <= 2.3e-16


def test_polynomial_exp_of_nonpositive_arguments():
    x = -np.concatenate([np.linspace(0.0, 708.0, 300_001), np.geomspace(1e-300, 1.0, 500)])
    out, bits = np.empty_like(x), np.empty(x.size, dtype=np.int64)
    _kernels.exp_nonpos_into(x, out, bits)
    ref = np.exp(x)
    assert np.max(np.abs(out - ref) / ref) <= 4.5e-16            # 2 ulp
    low = np.array([-708.5, -1e4, -np.inf])
    o = np.empty(3)
    _kernels.exp_nonpos_into(low, o, np.empty(3, dtype=np.int64))
    assert np.all((o > 0) & (o <= 4e-308))                     # clamped to exp(-708): ≈ 0


# --- shapes, records, reproducibility ------------------------------------------------------------

def test_shapes_and_ticks_for_one_system_and_a_batch():
    om = np.linspace(-0.1, 0.1, 50)
    one = simulate_kuramoto(om, 0.5, 0.1, 100, record_every=20)
    assert isinstance(one, KuramotoResult)
    assert one.R.shape == (6,) and one.psi.shape == (6,) and one.theta_final.shape == (50,)
    np.testing.assert_array_equal(one.ticks, [0, 20, 40, 60, 80, 100])
    batch = simulate_kuramoto(np.stack([om, 2 * om, 3 * om]), 0.5, 0.1, 100, record_every=30)
    assert batch.R.shape == (3, 4) and batch.theta_final.shape == (3, 50)
    np.testing.assert_array_equal(batch.ticks, [0, 30, 60, 90])


def test_R_psi_and_phases_stay_in_range():
    om = np.random.default_rng(1).standard_normal((4, 300)) * 2.0
    res = simulate_kuramoto(om, 1.0, 0.3, 400, noise=0.7, seed=3)
    assert np.all((res.R >= 0) & (res.R <= 1))
    assert np.all((res.psi > -math.pi - 1e-12) & (res.psi <= math.pi))
    assert np.all((res.theta_final >= 0) & (res.theta_final < TWO_PI))


def test_initial_record_is_the_order_parameter_of_theta0():
    th0 = np.random.default_rng(2).uniform(0, TWO_PI, 200)
    res = simulate_kuramoto(np.zeros(200), 0.3, 0.1, 10, theta0=th0)
    z = np.exp(1j * th0).mean()
    assert res.R[0] == pytest.approx(abs(z), abs=1e-14)
    assert res.psi[0] == pytest.approx(np.angle(z), abs=1e-13)


@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_numba_matches_the_numpy_mean_field_loop(noise):
    om = np.random.default_rng(0).standard_normal((3, 257)) * 0.2
    a = simulate_kuramoto(om, 0.6, 0.1, 300, noise=noise, seed=11, record_every=3)
    b = simulate_kuramoto(om, 0.6, 0.1, 300, noise=noise, seed=11, record_every=3,
                          backend="numpy")
    np.testing.assert_allclose(a.R, b.R, rtol=0, atol=1e-10)
    np.testing.assert_allclose(a.psi, b.psi, rtol=0, atol=1e-9)
    d = np.abs(np.angle(np.exp(1j * (a.theta_final - b.theta_final))))   # circular distance
    assert d.max() < 1e-9


def test_same_seed_same_bits_and_seed_matters_with_noise():
    om = np.linspace(-0.3, 0.3, 128)
    a = simulate_kuramoto(om, 0.4, 0.2, 200, noise=0.3, seed=5)
    b = simulate_kuramoto(om, 0.4, 0.2, 200, noise=0.3, seed=5)
    c = simulate_kuramoto(om, 0.4, 0.2, 200, noise=0.3, seed=6)
    np.testing.assert_array_equal(a.R, b.R)
    np.testing.assert_array_equal(a.theta_final, b.theta_final)
    assert not np.array_equal(a.theta_final, c.theta_final)


def test_batch_rows_are_independent_systems():
    r = np.random.default_rng(3)
    om = r.standard_normal((3, 64)) * 0.3
    th0 = r.uniform(0, TWO_PI, (3, 64))
    batch = simulate_kuramoto(om, 0.5, 0.2, 150, theta0=th0)
    for b in range(3):
        one = simulate_kuramoto(om[b], 0.5, 0.2, 150, theta0=th0[b])
        np.testing.assert_array_equal(one.R, batch.R[b])
        np.testing.assert_array_equal(one.theta_final, batch.theta_final[b])


def test_noise_of_a_one_system_run_is_the_controller_phase_noise():
    """Coupling and frequencies 0, one step: θ moves by σ·sqrt(dt)·rng.normal(seed, PHASE, 1,
    i)."""
    th0 = np.full(10, 1.0)
    res = simulate_kuramoto(np.zeros(10), 0.0, 0.25, 1, noise=0.2, theta0=th0, seed=9)
    want = np.mod(1.0 + 0.2 * 0.5 * rng.normal(9, rng.STREAM_PHASE, 1, np.arange(10)), TWO_PI)
    np.testing.assert_allclose(res.theta_final, want, rtol=0, atol=1e-15)


def test_results_do_not_depend_on_the_number_of_threads():
    om = np.random.default_rng(4).standard_normal((6, 200)) * 0.2
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = simulate_kuramoto(om, 0.5, 0.1, 200, noise=0.2, seed=1)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        b = simulate_kuramoto(om, 0.5, 0.1, 200, noise=0.2, seed=1)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(a.R, b.R)
    np.testing.assert_array_equal(a.theta_final, b.theta_final)


def test_stationary_R_averages_the_tail():
    res = KuramotoResult(R=np.array([0.0, 0.0, 1.0, 0.5]), psi=np.zeros(4),
                         theta_final=np.zeros(2), ticks=np.arange(4))
    assert res.stationary_R(0.5) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="discard"):
        res.stationary_R(1.0)


def test_lorentzian_quantiles_are_symmetric_with_the_right_median_spread():
    w = lorentzian_quantiles(1000, 0.3)
    np.testing.assert_allclose(w, -w[::-1], atol=1e-12)
    # half the mass within ±γ: the inter-quartile half-width of a Cauchy law is γ
    assert np.mean(np.abs(w) < 0.3) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="gamma"):
        lorentzian_quantiles(10, 0.0)


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(omega=[[[0.0]]]), "omega"), (dict(omega=[]), "omega"),
    (dict(omega=[0.0, np.nan]), "omega"),
    (dict(omega="abc"), "omega"), (dict(coupling=np.inf), "coupling"), (dict(dt=0.0), "dt"),
    (dict(dt=-1.0), "dt"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(noise=-0.1), "noise"), (dict(theta0=[0.0]), "theta0"),
    (dict(theta0=[0.0, np.inf, 1.0]), "theta0"), (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"), (dict(record_every=0), "record_every"),
    (dict(record_every=11), "record_every"), (dict(backend="cuda"), "backend"),
])
def test_bad_input_raises_a_value_error_naming_the_argument(kwargs, name):
    args = dict(omega=[0.1, 0.2, 0.3], coupling=0.5, dt=0.1, steps=10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        simulate_kuramoto(**args)


# --- known answers -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("gamma,K", [(0.1, 0.5), (0.25, 1.0)])
def test_lorentzian_stationary_R_above_threshold(gamma, K):
    """K > K_c = 2γ: R∞ = sqrt(1 − 2γ/K) (Kuramoto's self-consistency, N → ∞)."""
    om = lorentzian_quantiles(10_000, gamma)
    res = simulate_kuramoto(om, K, 0.05, 6000, record_every=10, seed=1)
    assert res.stationary_R(0.5) == pytest.approx(math.sqrt(1.0 - 2.0 * gamma / K), abs=0.01)


@pytest.mark.slow
def test_incoherent_R_shrinks_like_one_over_sqrt_N():
    """K = K_c/2: the finite system's R is Rayleigh-like with E[R²] = 1/(N(1 − K/K_c)), so
    E[R] = sqrt(π/4)·sqrt(2/N) = 1.25/sqrt(N)."""
    gamma, K = 0.5, 0.5
    Ns = [250, 1000, 4000, 16000]
    r = np.random.default_rng(0)
    means = []
    for N in Ns:
        om = gamma * np.tan(np.pi * (r.random((8, N)) - 0.5))       # i.i.d. Lorentzian
        res = simulate_kuramoto(om, K, 0.1, 4000, record_every=10, seed=N)
        means.append(float(res.R[:, 100:].mean()))
    slope = np.polyfit(np.log(Ns), np.log(means), 1)[0]
    assert -0.6 < slope < -0.4
    theory = math.sqrt(math.pi / 4.0) * math.sqrt(1.0 / (1.0 - K / (2.0 * gamma)))
    for N, m in zip(Ns, means):
        assert m * math.sqrt(N) == pytest.approx(theory, rel=0.2)


def test_noise_alone_decays_R_like_exp_minus_sigma2_t_over_2():
    """K = 0, ω = 0, all phases 0: E[e^{iθ}] = exp(−σ²t/2) (phase diffusion)."""
    N, sigma, dt = 40_000, 0.5, 0.01
    res = simulate_kuramoto(np.zeros(N), 0.0, dt, 400, noise=sigma, theta0=np.zeros(N),
                            record_every=100, seed=2)
    want = np.exp(-sigma**2 * res.ticks * dt / 2.0)
    np.testing.assert_allclose(res.R, want, atol=0.02)
