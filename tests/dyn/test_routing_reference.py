"""Known answers of the v2 routing rule (chronomoe_dyn.routing, DESIGN.md §3.8) and of the
Gumbel noise it uses (rng.log_poly). The statistical and invariance properties are in
tests/properties/test_routing_props.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chronomoe_dyn import rng
from chronomoe_dyn.law import LayerFields
from chronomoe_dyn.routing import route, sum_experts, topk_stable


def fields(bias=(0.0, 0.0, 0.0), temperature=(1.0, 1.0, 1.0), scale=1.0, tau=0.0):
    return LayerFields(np.array(bias, dtype=float), np.array(temperature, dtype=float),
                       float(scale), float(tau))


def test_score_is_centred_scaled_then_tempered_then_biased():
    """z = (1, 2, 6): m = 3, z − m = (−2, −1, 3); scale 2 → z̃ = (−1, −0.5, 1.5);
    temperatures (0.5, 1, 3) → (−2, −0.5, 0.5); bias (0.25, 0, −1) → s = (−1.75, −0.5, −0.5).
    Top-2 by (s desc, index asc): experts 1 then 2 (a tie, the lower index first)."""
    f = fields(bias=(0.25, 0.0, -1.0), temperature=(0.5, 1.0, 3.0), scale=2.0)
    r = route(np.array([[1.0, 2.0, 6.0]]), f, 2)
    np.testing.assert_array_equal(r.score_NE, [[-1.75, -0.5, -0.5]])
    np.testing.assert_array_equal(r.selected_NK, [[1, 2]])
    np.testing.assert_array_equal(r.explored_NK, [[False, False]])     # no noise
    # gates from the raw logits (2, 6), renormalised: e^-4/(1 + e^-4), 1/(1 + e^-4)
    np.testing.assert_allclose(r.gates_NK, [[math.exp(-4) / (1 + math.exp(-4)),
                                             1 / (1 + math.exp(-4))]], rtol=1e-15)
    # population std of (−2, −1, 3): sqrt(14/3)
    np.testing.assert_allclose(r.logit_std_N, [math.sqrt(14 / 3)], rtol=1e-15)


def test_a_hotter_expert_with_a_negative_centred_logit_is_not_favoured():
    """Version 1 divided raw, uncentred logits: a negative logit divided by a larger
    temperature rose, so a hot (over-used) expert could win more. Centred, z̃ < 0 divided by a
    larger T moves towards 0 from below: here z = (−3, −1, −2) for every token, expert 0 is the
    worst (z̃ = −1) and stays last at any temperature: hot expert 0 never enters the top-2."""
    z = np.array([[-3.0, -1.0, -2.0]])
    for T0 in (1.0, 3.0, 10.0):
        r = route(z, fields(temperature=(T0, 1.0, 1.0)), 2)
        assert 0 not in r.selected_NK[0], T0


def test_gumbel_noise_with_given_uniforms_and_the_explored_slots():
    """τ = 0.5, u given: score = s + τ·(−log(−log u)); u = (0.99, 0.01, 0.5) gives g =
    (4.600, −1.527, 0.3665). With s = (0, 1, 0.5) the noisy order is 0, 2, 1: expert 0 is
    selected though it is not in the noiseless top-2 (1, 2): slot 0 explored, slot 1 not."""
    u = np.array([[0.99, 0.01, 0.5]])
    f = fields(bias=(0.0, 1.0, 0.5), tau=0.5)
    r = route(np.zeros((1, 3)), f, 2, u)
    g = -np.log(-np.log(u[0]))
    np.testing.assert_allclose(g, [4.600149226776579, -1.5271796258079011, 0.36651292058166435],
                               rtol=1e-12)
    np.testing.assert_array_equal(r.score_NE, [[0.0, 1.0, 0.5]])       # noiseless
    np.testing.assert_array_equal(r.selected_NK, [[0, 2]])
    np.testing.assert_array_equal(r.explored_NK, [[True, False]])
    # τ = 0 or no uniforms: deterministic, nothing explored
    for ff, uu in ((fields(bias=(0.0, 1.0, 0.5)), u), (f, None)):
        r0 = route(np.zeros((1, 3)), ff, 2, uu)
        np.testing.assert_array_equal(r0.selected_NK, [[1, 2]])
        assert not r0.explored_NK.any()


def test_controller_fields_false_is_the_plain_top_k_of_z():
    """Bias, temperature, scale and noise are ignored: top-k of the raw logits, score = z."""
    z = np.array([[0.3, 2.0, -1.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    f = LayerFields(np.array([9.0, -9.0, 9.0, -9.0]), np.array([0.1, 10.0, 0.1, 10.0]), 0.01, 5.0)
    u = np.full((2, 4), 0.3)
    r = route(z, f, 2, u, controller_fields=False)
    np.testing.assert_array_equal(r.selected_NK, [[1, 3], [0, 1]])
    np.testing.assert_array_equal(r.score_NE, z)
    assert not r.explored_NK.any()


def test_gates_not_renormalised_are_the_full_softmax_at_the_selected_experts():
    z = np.array([[1.0, 2.0, 3.0]])
    r = route(z, fields(), 2, renormalize=False)
    p = np.exp(z[0]) / np.exp(z[0]).sum()
    np.testing.assert_array_equal(r.selected_NK, [[2, 1]])
    np.testing.assert_allclose(r.gates_NK, [[p[2], p[1]]], rtol=1e-15)


def test_ties_go_to_the_lower_index_and_negative_zero_ties_zero():
    s = np.array([[0.0, -0.0, 1.0, 1.0, -0.0]])
    np.testing.assert_array_equal(topk_stable(s, 4), [[2, 3, 0, 1]])


def test_sum_experts_runs_in_index_order():
    """x = (1e16, 1, −1e16, 1): in index order ((1e16 + 1) − 1e16) + 1 = 1 (1e16 + 1 rounds to
    1e16); NumPy's pairwise sum of 8+ values, or any other order, may give 0 or 2."""
    x = np.array([[1e16, 1.0, -1e16, 1.0]])
    assert sum_experts(x)[0] == ((1e16 + 1.0) - 1e16) + 1.0 == 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(z=np.array([1.0, 2.0])), "z must be"),
    (dict(z=np.array([[1.0, np.nan, 0.0]])), "non-finite"),
    (dict(k=0), "k=0"), (dict(k=4), "k=4"),
    (dict(f=fields(temperature=(1.0, 0.0, 1.0))), "temperature_E"),
    (dict(f=fields(bias=(0.0, 0.0))), "bias_E"),
    (dict(f=fields(scale=0.0)), "scale"), (dict(f=fields(tau=-1.0)), "tau"),
    (dict(u=np.full((1, 3), 1.0)), "u must be"), (dict(u=np.full((2, 3), 0.5)), "u must be"),
])
def test_bad_routing_inputs_raise(kw, match):
    z = kw.get("z", np.zeros((1, 3)))
    with pytest.raises(ValueError, match=match):
        route(z, kw.get("f", fields()), kw.get("k", 2), kw.get("u"))


# --- the log behind the Gumbel noise -----------------------------------------------------------

def test_log_poly_is_within_two_ulp_of_numpy_log():
    """Over the whole normal range and densely where the Gumbel noise evaluates it (u in
    (2⁻³³, 1), −log u in (1e-10, 23))."""
    r = np.random.default_rng(0)
    x = np.concatenate([np.geomspace(2.3e-308, 1.7e308, 100_001), r.uniform(0, 1, 200_000),
                        r.uniform(1e-10, 23, 200_000), r.uniform(0.5, 2.0, 200_000),
                        [1.0, 2.0, 0.5, math.sqrt(2.0), np.nextafter(math.sqrt(2.0), 2),
                         np.nextafter(1.0, 0), np.nextafter(1.0, 2)]])
    got, want = rng.log_poly(x), np.log(x)
    ulp = np.abs(got - want) / np.spacing(np.maximum(np.abs(want), 1e-300))
    assert ulp.max() <= 2.0
    assert rng.log_poly(np.array([1.0]))[0] == 0.0


def test_gumbel_draws_have_the_standard_gumbel_moments():
    """Mean γ = 0.5772, variance π²/6 = 1.6449; 10⁶ counter-RNG draws (sd of the mean 0.0013,
    of the variance ≈ 0.005)."""
    g = rng.gumbel(7, rng.STREAM_GUMBEL, 3, np.arange(1_000_000))
    assert g.mean() == pytest.approx(0.5772156649, abs=0.006)
    assert g.var() == pytest.approx(math.pi ** 2 / 6, abs=0.025)


def test_stream_ids_are_distinct_and_phase_is_zero():
    ids = list(rng.STREAMS.values())
    assert len(set(ids)) == len(ids)
    assert rng.STREAMS["phase"] == rng.STREAM_PHASE == 0
    assert rng.STREAMS["gumbel"] == rng.STREAM_GUMBEL
