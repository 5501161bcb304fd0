"""Landscape diagnostics on constructed T̄ vectors and states: valleys, ridges, formation,
valley health (unhealthy and at-risk valleys), per layer, and the whole-model aggregates over
layers (version 2: no landscape over expert indices across layers)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from chronomoe_dyn import (ControllerConfig, init_state, landscape, landscape_masks,
                           model_landscape, model_valley_health, state_landscape, valley_health)
from chronomoe_dyn.landscape import FLAT_VARIANCE


def test_valleys_and_ridges_of_a_constructed_vector():
    """T̄ = (0.8, 1, 1, 1.2): mean 1, var 0.02, std 0.1414; thresholds 1 ± 0.0707."""
    ls = landscape(np.array([0.8, 1.0, 1.0, 1.2]))
    assert ls.mean == pytest.approx(1.0)
    assert ls.variance == pytest.approx(0.02)
    assert ls.std == pytest.approx(math.sqrt(0.02))
    assert (ls.valleys, ls.ridges, ls.formed) == ((0,), (3,), True)
    assert ls.to_dict() == {"variance": ls.variance, "mean": ls.mean, "std": ls.std,
                            "valleys": [0], "ridges": [3], "formed": True}


def test_threshold_and_formation_parameters():
    t = np.array([0.95, 1.0, 1.0, 1.05, 0.9, 1.1])       # mean 1, var 0.025/6 < 0.01
    ls = landscape(t)
    assert not ls.formed
    assert ls.valleys == (0, 4) and ls.ridges == (3, 5)
    # A higher threshold keeps only the extremes; a lower formation variance forms it.
    ls2 = landscape(t, threshold_std=1.2, formed_variance=1e-3)
    assert ls2.valleys == (4,) and ls2.ridges == (5,) and ls2.formed


def test_flat_landscape_has_no_valleys_or_ridges():
    ls = landscape(np.full(8, 1.3))
    assert (ls.valleys, ls.ridges, ls.formed, ls.variance) == ((), (), False, 0.0)


def test_rounding_noise_is_flat_but_a_real_spread_is_not():
    """DESIGN.md §3: variance ≤ 1e-12 is flat. Experts alike in exact arithmetic whose T̄
    differ by an ulp have no valleys (version 1 reported rounding-noise valleys); a spread just
    above the threshold does. Mutation caught: dropping the ``var > FLAT_VARIANCE`` term of
    ``landscape_masks``."""
    t = np.full(6, 1.1)
    t[2] = np.nextafter(1.1, 0.0)
    t[4] = np.nextafter(1.1, 2.0)
    assert 0.0 < t.var() <= FLAT_VARIANCE
    assert (landscape(t).valleys, landscape(t).ridges) == ((), ())
    t = np.array([1.0, 1.0, 1.0 - 3e-6, 1.0 + 3e-6])
    assert t.var() > FLAT_VARIANCE
    assert (landscape(t).valleys, landscape(t).ridges) == ((2,), (3,))


def test_landscape_masks_is_the_vectorised_landscape():
    """Any leading axes; every row gives what ``landscape`` gives for it."""
    r = np.random.default_rng(4)
    tbar = r.uniform(0.8, 1.2, (3, 2, 5))
    tbar[1, 0] = 1.0                                      # a flat row
    m = landscape_masks(tbar, 0.5)
    assert m.valley.shape == tbar.shape and m.variance.shape == (3, 2)
    for idx in np.ndindex(3, 2):
        ls = landscape(tbar[idx])
        assert tuple(np.flatnonzero(m.valley[idx])) == ls.valleys
        assert tuple(np.flatnonzero(m.ridge[idx])) == ls.ridges
        assert m.variance[idx] == ls.variance


@pytest.mark.parametrize("bad", [np.ones((2, 2)), np.array([]), np.array([1.0, np.nan])])
def test_bad_vectors_raise(bad):
    with pytest.raises(ValueError, match="landscape"):
        landscape(bad)


def _state_with_landscape(cfg):
    s = init_state(cfg, 2, 4, seed=0)
    tbar = np.array([[0.8, 1.0, 1.0, 1.2], [1.2, 1.0, 1.0, 0.8]])
    return dataclasses.replace(s, Tbar_local_LE=tbar, Tbar_global=0.9)


def test_state_landscape_per_layer(cfg):
    s = _state_with_landscape(cfg)
    assert state_landscape(s, cfg, layer=0).valleys == (0,)
    assert state_landscape(s, cfg, layer=1).valleys == (3,)
    assert state_landscape(s, cfg, layer=-1).valleys == (3,)
    for bad in (2, -3, True, 1.0, None):
        with pytest.raises(ValueError, match="layer"):
            state_landscape(s, cfg, layer=bad)


def test_valley_health_unhealthy_and_at_risk(cfg):
    """Layer 0's valley is expert 0. With s = 0.2 < 0.3 it is unhealthy; with T_fast above the
    layer's mean T_fast it is at risk (hot now, cold in T̄: being filled in)."""
    s = _state_with_landscape(cfg)
    s = dataclasses.replace(s, reliability_LE=np.array([[0.2, 0.9, 0.9, 0.9], [0.9] * 4]),
                            T_fast_LE=np.array([[1.5, 1.0, 1.0, 1.0], [1.0] * 4]))
    vh = valley_health(s, cfg, layer=0)
    assert (vh.valleys, vh.unhealthy, vh.healthy, vh.at_risk, vh.layer) == ((0,), (0,), (), (0,), 0)
    assert vh.reliability == (pytest.approx(0.2),)
    assert not vh.all_healthy
    # Layer 1's valley (expert 3) is reliable and cool: healthy, not at risk.
    vh1 = valley_health(s, cfg, layer=1)
    assert (vh1.valleys, vh1.healthy, vh1.unhealthy, vh1.at_risk) == ((3,), (3,), (), ())
    assert vh1.all_healthy
    # The threshold is the config's.
    lenient = ControllerConfig(unhealthy_reliability=0.1)
    assert valley_health(s, lenient, layer=0).healthy == (0,)


def test_model_summaries_aggregate_over_layers(cfg):
    """Layer 0's valley is expert 0, layer 1's expert 3: the model has 2 valleys (one per
    layer), not a valley 'expert 0 of the model'. Reliabilities 0.1 (layer 0's valley) and 0.9
    (layer 1's): half the model's valleys are healthy."""
    s = _state_with_landscape(cfg)
    s = dataclasses.replace(s, reliability_LE=np.array([[0.1, 0.9, 0.9, 0.9],
                                                        [0.9, 0.9, 0.9, 0.9]]))
    ml = model_landscape(s, cfg)
    assert [ls.valleys for ls in ml.layers] == [(0,), (3,)]
    assert ml.valleys_mean == 1.0 and ml.ridges_mean == 1.0
    assert ml.variance_mean == pytest.approx(0.02) and ml.formed_fraction == 1.0
    mh = model_valley_health(s, cfg)
    assert mh.valleys == 2 and mh.healthy_fraction == 0.5 and not mh.all_healthy
    assert [vh.unhealthy for vh in mh.layers] == [(0,), ()]
    assert mh.to_dict()["layers"][1]["healthy"] == [3]
    flat = init_state(cfg, 2, 4)
    assert model_valley_health(flat, cfg).healthy_fraction is None
    with pytest.raises(ValueError, match="layer"):
        valley_health(s, cfg, None)
