"""Property tests of the κ schedules (chronomoe_dyn.schedule): every kind starts at the initial
κ, ends at the final κ, stays in [-1, 1], anneals monotonically in the right direction (the
prototype's cosine ran backwards), and the adaptive controller keeps its offset bounded."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chronomoe_dyn import (AdaptiveState, KnobSchedule, adaptive_update, kappa_at, phase_label)
from chronomoe_dyn.testing import adaptive_rules, adaptive_states, kappas, schedules

FLOAT = dict(allow_nan=False, allow_infinity=False)
ANNEALING = ("linear", "cosine", "step", "adaptive")


@given(schedules(), st.data())
def test_starts_at_initial_kappa_through_warmup(s, data):
    """κ(step) = initial κ exactly for every step ≤ warm-up, for every kind (the adaptive one with
    a fresh controller state, whose offset is 0)."""
    t = data.draw(st.integers(0, s.warmup_steps))
    assert kappa_at(s, t) == s.initial_kappa
    assert kappa_at(s, t, AdaptiveState()) == s.initial_kappa
    assert kappa_at(s, 0) == s.initial_kappa


@given(schedules(), adaptive_states(), st.integers(0, 10**7))
def test_ends_at_final_kappa(s, ad, extra):
    """From total_steps on κ = final κ exactly (the adaptive offset is faded out by (1 − p));
    the constant kind never leaves the initial κ."""
    t = s.total_steps + extra
    want = s.initial_kappa if s.kind == "constant" else s.final_kappa
    assert kappa_at(s, t) == want
    assert kappa_at(s, t, ad) == want


@given(schedules(), adaptive_states(), st.lists(st.integers(0, 2 * 10**6), min_size=1,
                                                max_size=20))
def test_kappa_stays_in_unit_interval_and_arrays_match_scalars(s, ad, steps):
    ks = kappa_at(s, np.array(steps), ad)
    assert ks.shape == (len(steps),)
    assert np.all((ks >= -1.0) & (ks <= 1.0))
    for t, k in zip(steps, ks):
        assert kappa_at(s, t, ad) == k


@given(schedules(kinds=("linear", "cosine", "step", "constant")),
       st.lists(st.integers(0, 2 * 10**6), min_size=2, max_size=30))
def test_anneal_is_monotone_from_initial_to_final(s, steps):
    """Without the adaptive offset, κ moves monotonically from initial to final and never leaves
    the interval between them: the direction is initial → final, never backwards."""
    ts = np.sort(np.array(steps))
    ks = kappa_at(s, ts)
    lo, hi = sorted((s.initial_kappa, s.final_kappa))
    assert np.all((ks >= lo) & (ks <= hi))
    d = np.diff(ks)
    if s.final_kappa <= s.initial_kappa:
        assert np.all(d <= 0)
    else:
        assert np.all(d >= 0)


@given(schedules(kinds=("step",)), st.integers(0, 2 * 10**6))
def test_step_kind_takes_only_its_three_levels(s, t):
    k0, k1 = s.initial_kappa, s.final_kappa
    assert kappa_at(s, t) in (k0, 0.5 * (k0 + k1), k1)


@given(kappas(), kappas(), st.integers(0, 10**5), st.integers(1, 10**5))
def test_cosine_midpoint_is_the_mean_of_the_ends(k0, k1, warmup, half):
    s = KnobSchedule(kind="cosine", initial_kappa=k0, final_kappa=k1, warmup_steps=warmup,
                     total_steps=warmup + 2 * half)
    assert kappa_at(s, warmup + half) == pytest.approx(0.5 * (k0 + k1), abs=1e-15)


@given(schedules(kinds=("adaptive",)), adaptive_states(), st.integers(0, 2 * 10**6))
def test_adaptive_offset_is_faded_by_one_minus_progress(s, ad, t):
    p = s.progress(t)
    base = kappa_at(s, t)
    assert kappa_at(s, t, ad) == pytest.approx(float(np.clip(base + (1 - p) * ad.offset, -1, 1)),
                                               abs=1e-15)


@given(adaptive_rules(), st.lists(st.tuples(st.floats(0, 1, **FLOAT), st.floats(0, 1, **FLOAT),
                                            st.booleans()), max_size=50))
def test_adaptive_offset_stays_bounded_and_follows_its_rules(rule, observations):
    state = AdaptiveState()
    for R, var, formed in observations:
        new = adaptive_update(state, rule, R, var, formed)
        assert abs(new.offset) <= rule.max_offset
        assert new.updates == state.updates + 1
        unclipped = abs(new.offset) < rule.max_offset
        if R < rule.R_low and unclipped:
            assert new.offset == pytest.approx(state.offset + rule.rate, abs=1e-15)
        elif R > rule.R_high and formed and unclipped:
            assert new.offset == pytest.approx(state.offset - rule.rate, abs=1e-15)
        state = new


@given(schedules(kinds=ANNEALING), st.integers(0, 2 * 10**6))
def test_phase_label_matches_the_schedule_position(s, t):
    label = phase_label(s, t)
    if t < s.warmup_steps:
        assert label == "warmup_explore"
    elif t >= s.total_steps:
        assert label == "final_exploit"
    else:
        assert label.endswith("anneal") or label == "adaptive"


@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda x: not (-1.0 <= x <= 1.0)), st.sampled_from([True, "0.1", None])),
    st.sampled_from(["initial_kappa", "final_kappa"]))
def test_bad_schedule_kappa_raises_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        KnobSchedule(**{field: bad})


@given(st.integers(0, 10**6), st.integers(0, 10**6))
def test_warmup_must_precede_total(warmup, total):
    if warmup < total and total >= 1:
        s = KnobSchedule(warmup_steps=warmup, total_steps=total)
        assert math.isclose(s.progress(total), 1.0)
    else:
        with pytest.raises(ValueError):
            KnobSchedule(warmup_steps=warmup, total_steps=total)
