"""Landscape diagnostics on constructed T̄ vectors and states: valleys, ridges, formation,
valley health (unhealthy and at-risk valleys)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from chronomoe_dyn import ControllerConfig, init_state, landscape, state_landscape, valley_health


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


@pytest.mark.parametrize("bad", [np.ones((2, 2)), np.array([]), np.array([1.0, np.nan])])
def test_bad_vectors_raise(bad):
    with pytest.raises(ValueError, match="landscape"):
        landscape(bad)


def _state_with_landscape(cfg):
    s = init_state(cfg, 2, 4, seed=0)
    tbar = np.array([[0.8, 1.0, 1.0, 1.2], [1.2, 1.0, 1.0, 0.8]])
    return dataclasses.replace(s, Tbar_local_LE=tbar, Tbar_global_E=np.array([1.0, 0.7, 1.0, 1.3]))


def test_state_landscape_global_and_per_layer(cfg):
    s = _state_with_landscape(cfg)
    assert state_landscape(s, cfg).valleys == (1,)
    assert state_landscape(s, cfg, layer=0).valleys == (0,)
    assert state_landscape(s, cfg, layer=1).valleys == (3,)
    assert state_landscape(s, cfg, layer=-1).valleys == (3,)
    for bad in (2, -3, True, 1.0):
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


def test_global_valley_health_uses_layer_means(cfg):
    """Global valley: expert 1 (T̄_global 0.7). Its reliability is the mean over layers,
    (0.1 + 0.4)/2 = 0.25 < 0.3."""
    s = _state_with_landscape(cfg)
    s = dataclasses.replace(s, reliability_LE=np.array([[0.9, 0.1, 0.9, 0.9],
                                                        [0.9, 0.4, 0.9, 0.9]]))
    vh = valley_health(s, cfg)
    assert vh.layer is None
    assert (vh.valleys, vh.unhealthy) == ((1,), (1,))
    assert vh.reliability == (pytest.approx(0.25),)
    assert vh.to_dict()["unhealthy"] == [1]
