"""κ schedules at known steps, their validation, and the adaptive controller's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chronomoe_dyn import (AdaptiveRule, AdaptiveState, KnobSchedule, adaptive_update, kappa_at,
                           phase_label)
from chronomoe_dyn.schedule import adaptive_offset_update


def sched(kind, k0=0.5, k1=-0.3, warmup=100, total=400, **kw):
    return KnobSchedule(kind=kind, initial_kappa=k0, final_kappa=k1, warmup_steps=warmup,
                        total_steps=total, **kw)


# --- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    ({"kind": "exponential"}, "kind"),
    ({"initial_kappa": 1.5}, "initial_kappa"),
    ({"final_kappa": -1.01}, "final_kappa"),
    ({"final_kappa": math.nan}, "final_kappa"),
    ({"initial_kappa": True}, "initial_kappa"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.0}, "warmup_steps"),
    ({"total_steps": 0}, "total_steps"),
    ({"warmup_steps": 500, "total_steps": 500}, "warmup_steps"),
])
def test_schedule_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        KnobSchedule(**kw)


@pytest.mark.parametrize("kw, field", [
    ({"R_low": -0.1}, "R_low"), ({"R_high": 1.2}, "R_high"), ({"rate": math.inf}, "rate"),
    ({"decay": 1.5}, "decay"), ({"max_offset": 3.0}, "max_offset"),
    ({"R_low": 0.9, "R_high": 0.5}, "R_low"),
])
def test_adaptive_rule_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveRule(**kw)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step"):
        kappa_at(sched("linear"), -1)


# --- values at known steps ----------------------------------------------------------------------

def test_warmup_holds_initial_and_the_end_holds_final():
    for kind in ("linear", "cosine", "step", "adaptive"):
        s = sched(kind)
        assert kappa_at(s, 0) == kappa_at(s, 100) == 0.5
        assert kappa_at(s, 400) == kappa_at(s, 10**9) == -0.3


def test_linear_values():
    s = sched("linear")                                    # progress (t − 100)/300
    assert kappa_at(s, 250) == pytest.approx(0.1)          # midpoint
    assert kappa_at(s, 175) == pytest.approx(0.5 - 0.8 * 0.25)


def test_cosine_runs_from_initial_to_final_and_its_midpoint_is_the_mean():
    s = sched("cosine")
    assert kappa_at(s, 250) == pytest.approx(0.1)          # (0.5 + −0.3)/2
    # At p = 1/4: κ₁ + (κ₀ − κ₁)(1 + cos π/4)/2 = −0.3 + 0.8·0.853553 = 0.382843.
    assert kappa_at(s, 175) == pytest.approx(-0.3 + 0.8 * (1 + math.sqrt(0.5)) / 2)
    assert kappa_at(s, 175) == pytest.approx(0.3828427, abs=1e-7)
    # Not backwards: early in the anneal κ is still near the initial value.
    assert kappa_at(s, 110) > 0.49
    assert kappa_at(s, 390) < -0.29


def test_step_kind_switches_at_one_third_and_two_thirds():
    s = sched("step", warmup=0, total=300)
    assert [kappa_at(s, t) for t in (0, 99, 100, 199, 200, 299, 300)] == \
        [0.5, 0.5, pytest.approx(0.1), pytest.approx(0.1), -0.3, -0.3, -0.3]


def test_constant_kind_never_moves():
    s = sched("constant")
    assert np.all(kappa_at(s, np.arange(0, 1000, 7)) == 0.5)
    assert phase_label(s, 500) == "constant"


def test_array_input_returns_an_array():
    s = sched("linear")
    ks = kappa_at(s, np.array([0, 250, 400]))
    assert isinstance(ks, np.ndarray)
    np.testing.assert_allclose(ks, [0.5, 0.1, -0.3])


def test_phase_labels():
    s = sched("cosine")
    assert [phase_label(s, t) for t in (0, 99, 100, 399, 400)] == \
        ["warmup_explore", "warmup_explore", "cosine_anneal", "cosine_anneal", "final_exploit"]
    assert phase_label(sched("adaptive"), 200) == "adaptive"


# --- adaptive controller ------------------------------------------------------------------------

RULE = AdaptiveRule(R_low=0.3, R_high=0.8, variance_high=0.1, rate=0.02, decay=0.9,
                    max_offset=0.3)


@pytest.mark.parametrize("R, var, formed, want", [
    (0.1, 0.05, True, 0.12),     # incoherent: explore (+rate)
    (0.9, 0.05, True, 0.08),     # coherent and formed: exploit (−rate)
    (0.9, 0.05, False, 0.09),    # coherent but not formed: no rule fires, decay
    (0.5, 0.2, False, 0.12),     # over-differentiated: explore
    (0.5, 0.05, True, 0.09),     # nothing fires: decay 0.9·0.1
    (0.1, 0.5, True, 0.12),      # R_low wins over the variance rule (applied once)
])
def test_adaptive_offset_rules(R, var, formed, want):
    new = adaptive_update(AdaptiveState(offset=0.1, updates=4), RULE, R, var, formed)
    assert new.offset == pytest.approx(want)
    assert new.updates == 5


def test_adaptive_offset_is_clipped():
    assert adaptive_offset_update(0.29, 0.0, 0.0, False, 0.3, 0.8, 0.1, 0.02, 0.9, 0.3) == 0.3
    assert adaptive_offset_update(-0.29, 0.9, 0.0, True, 0.3, 0.8, 0.1, 0.02, 0.9, 0.3) == -0.3


def test_adaptive_update_rejects_non_finite_inputs():
    for R, var in ((math.nan, 0.0), (0.5, math.inf)):
        with pytest.raises(ValueError, match="not finite"):
            adaptive_update(AdaptiveState(), RULE, R, var, True)


def test_adaptive_kappa_is_linear_base_plus_faded_offset():
    s = sched("adaptive")
    ad = AdaptiveState(offset=0.2)
    assert kappa_at(s, 250, ad) == pytest.approx(0.1 + 0.5 * 0.2)      # p = ½
    assert kappa_at(s, 100, ad) == pytest.approx(0.5 + 0.2)            # p = 0: full offset
    assert kappa_at(s, 400, ad) == -0.3                                 # p = 1: faded out
    assert kappa_at(s, 250) == pytest.approx(0.1)                       # no state: offset 0
    big = sched("adaptive", k0=0.95)
    assert kappa_at(big, 0, AdaptiveState(offset=0.3)) == 1.0           # clipped to [-1, 1]
