"""KnobScheduler, MetaKnob and the adaptive κ controller (on chronomoe_dyn.schedule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chronomoe_dyn import (AdaptiveRule, AdaptiveState, ControllerConfig, KnobSchedule,
                           adaptive_update, kappa_at, phase_label)
from chronomoe_torch.controller import PxTController
from chronomoe_torch.knob import AdaptiveKnobController, KnobScheduler, MetaKnob


def _run(sched: KnobScheduler, steps: int) -> list[float]:
    ks = [sched.get_kappa()]
    for _ in range(steps):
        ks.append(sched.step())
    return ks


@pytest.mark.parametrize("kind", ["linear", "cosine", "step", "constant"])
def test_schedules_follow_kappa_at_from_initial_to_final(kind):
    s = KnobScheduler(kind, initial_kappa=0.5, final_kappa=-0.3, warmup_steps=10,
                      total_steps=70)
    ks = _run(s, 80)
    sched = KnobSchedule(kind=kind, initial_kappa=0.5, final_kappa=-0.3, warmup_steps=10,
                         total_steps=70)
    assert ks == [float(kappa_at(sched, n)) for n in range(81)]
    assert ks[:11] == [0.5] * 11                                    # held during warm-up
    if kind == "constant":
        assert set(ks) == {0.5}
        return
    assert ks[70] == ks[80] == -0.3                                 # reaches final, stays
    assert all(a >= b for a, b in zip(ks, ks[1:])), "κ must move from initial toward final"
    if kind == "cosine":
        # Forward cosine: slow start near κ₀, fastest in the middle (the prototype ran backwards).
        assert ks[11] > 0.499 and ks[40] == pytest.approx(0.1, abs=1e-12)
        assert (ks[11] - ks[12]) < (ks[40] - ks[41])
    if kind == "step":
        assert sorted(set(ks)) == [-0.3, 0.1, 0.5]
        assert ks[29] == 0.5 and ks[30] == 0.1 and ks[50] == -0.3


def test_phase_labels():
    s = KnobScheduler("cosine", warmup_steps=3, total_steps=6)
    labels = [s.get_phase()] + [(s.step(), s.get_phase())[1] for _ in range(7)]
    assert labels == ["warmup_explore"] * 3 + ["cosine_anneal"] * 3 + ["final_exploit"] * 2
    sched = KnobSchedule(kind="linear", warmup_steps=3, total_steps=6)
    s = KnobScheduler(sched)
    for n in range(8):
        assert s.get_phase() == phase_label(sched, n)
        s.step()


def test_pushes_kappa_to_the_controller_and_ticks_use_it():
    ctrl = PxTController(2, 4)
    s = KnobScheduler("linear", ctrl, initial_kappa=1.0, final_kappa=-1.0, warmup_steps=0,
                      total_steps=4)
    assert float(ctrl.kappa_target) == 1.0
    for n in range(1, 5):
        ctrl.tick()
        k = s.step()
        assert float(ctrl.kappa_target) == k == pytest.approx(1.0 - 0.5 * n)
    assert ctrl.get_meta_knob_history().tolist() == pytest.approx([1.0, 0.5, 0.0, -0.5])


def test_state_dict_resumes_exactly():
    a = KnobScheduler("cosine", warmup_steps=5, total_steps=50)
    _run(a, 17)
    sd = a.state_dict()
    ctrl = PxTController(2, 4)
    b = KnobScheduler("cosine", ctrl, warmup_steps=5, total_steps=50)
    b.load_state_dict(sd)
    assert b.step_count == 17 and b.get_kappa() == a.get_kappa()
    assert float(ctrl.kappa_target) == pytest.approx(a.get_kappa())
    assert _run(a, 40) == _run(b, 40)
    with pytest.raises(ValueError, match="step_count"):
        b.load_state_dict({**sd, "step_count": -1})
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"step_count": 3})
    with pytest.raises(ValueError, match="kappa"):
        b.load_state_dict({**sd, "meta_knob": {**sd["meta_knob"], "kappa": 2.0}})


def test_constructor_validation():
    with pytest.raises(ValueError, match="schedule="):
        KnobScheduler("exponential")
    with pytest.raises(ValueError, match="either a KnobSchedule"):
        KnobScheduler(KnobSchedule(), initial_kappa=0.1)
    with pytest.raises(ValueError, match="final_kappa"):
        KnobScheduler("linear", final_kappa=-1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        KnobScheduler("linear", warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="adaptive_interval"):
        KnobScheduler("adaptive", adaptive_interval=-1)
    with pytest.raises(ValueError, match="set_knob"):
        KnobScheduler("linear", controller=object())
    with pytest.raises(ValueError, match="rule"):
        KnobScheduler("adaptive", rule="aggressive")
    with pytest.raises(TypeError, match="smoothing"):      # one κ smoothing: the controller's
        KnobScheduler("linear", smoothing=0.5)


# ---------------------------------------------------------------- MetaKnob

def test_meta_knob_validates_and_does_not_smooth():
    """One κ smoothing (the controller's ``kappa_smoothing``): MetaKnob passes κ through, so a
    smoothing controller sees one EMA, not two in series. Catches: a second EMA in MetaKnob."""
    k = MetaKnob()
    assert k.get() == 0.0
    for bad in (1.01, -2, math.nan, math.inf, None, "0.5"):
        with pytest.raises(ValueError, match="kappa"):
            k.set(bad)
    assert k.set(-1.0) == -1.0 and k.get() == -1.0 and k.target == -1.0
    with pytest.raises(ValueError, match="kappa"):
        MetaKnob(kappa=3.0)
    ctrl = PxTController(1, 2, ControllerConfig(kappa_smoothing=0.25))
    bound = MetaKnob(0.0, controller=ctrl)
    seen = []
    for _ in range(3):
        bound.set(1.0)
        ctrl.tick()
        seen.append(float(ctrl.kappa))
    assert seen == pytest.approx([0.25, 0.4375, 0.578125])     # one EMA of rate 0.25
    assert float(ctrl.kappa_target) == 1.0
    sd = bound.state_dict()
    other = MetaKnob()
    other.load_state_dict(sd)
    assert other.get() == 1.0
    other.load_state_dict({"kappa": 0.5, "target": 0.5, "smoothing": 1.0})   # old layout
    assert other.get() == 0.5
    with pytest.raises(ValueError, match="no longer smooths"):
        other.load_state_dict({"kappa": 0.5, "target": 0.9, "smoothing": 0.3})


def test_register_on_steps_kappa_in_the_optimizer_post_hook():
    """The κ step runs in the optimizer's step post-hook, after the controller's tick (pre-hook)
    used κ(n − 1); the handle removes it."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctrl = PxTController(1, 2)
    s = KnobScheduler("linear", ctrl, initial_kappa=1.0, final_kappa=-1.0, warmup_steps=0,
                      total_steps=4)
    ctrl.register_on(opt)
    handle = s.register_on(opt)
    for n in range(1, 4):
        opt.step()
        assert s.step_count == n and float(ctrl.kappa) == pytest.approx(1.0 - 0.5 * n)
    assert ctrl.get_meta_knob_history().tolist() == pytest.approx([1.0, 0.5, 0.0])
    handle.remove()
    opt.step()
    assert s.step_count == 3
    with pytest.raises(ValueError, match="register_step_post_hook"):
        s.register_on(object())


# ---------------------------------------------------------------- adaptive

def test_adaptive_rule_wrapper_matches_the_reference_rules():
    rule = AdaptiveRule(R_low=0.3, R_high=0.8, variance_high=0.1, rate=0.05, decay=0.5,
                        max_offset=0.12)
    a = AdaptiveKnobController(rule)
    assert a.update(0.1, 0.0, False) == pytest.approx(0.05)        # incoherent: explore
    assert a.update(0.1, 0.0, False) == pytest.approx(0.10)
    assert a.update(0.1, 0.0, False) == pytest.approx(0.12)        # clipped
    assert a.update(0.5, 0.0, False) == pytest.approx(0.06)        # nothing fires: decay
    assert a.update(0.9, 0.05, True) == pytest.approx(0.01)        # coherent + formed: exploit
    assert a.update(0.5, 0.5, False) == pytest.approx(0.06)        # over-differentiated
    assert a.state.updates == 6
    with pytest.raises(ValueError, match="R"):
        a.update(math.nan, 0.0, False)
    b = AdaptiveKnobController(rule)
    b.load_state_dict(a.state_dict())
    assert b.offset == a.offset and b.state.updates == 6
    with pytest.raises(ValueError, match="offset"):
        b.load_state_dict({"offset": 0.5, "updates": 1})
    with pytest.raises(ValueError, match="rule"):
        AdaptiveKnobController("x")


def test_adaptive_scheduler_offset_from_observe():
    rule = AdaptiveRule(rate=0.05)
    s = KnobScheduler("adaptive", initial_kappa=0.0, final_kappa=0.0, warmup_steps=0,
                      total_steps=100, rule=rule, adaptive_interval=0)
    sched = s.schedule
    s.observe(0.1, 0.0, False)                                     # R low: offset +0.05
    s.observe(0.1, 0.0, False)
    k = s.step()
    assert k == pytest.approx(float(kappa_at(sched, 1, s.adaptive.state)))
    assert k == pytest.approx((1 - 0.01) * 0.1)                   # faded by (1 − p)
    assert KnobScheduler("linear").observe(0.1, 0.0, False) == 0.0  # ignored when not adaptive


def test_adaptive_scheduler_reads_the_controller_on_its_cadence():
    ctrl = PxTController(2, 4, ControllerConfig())
    calls, seen = [], []
    real = ctrl.get_structural_temperature_diagnostics

    def spy():
        calls.append(ctrl.num_ticks)
        seen.append(real())
        return seen[-1]

    ctrl.get_structural_temperature_diagnostics = spy
    rule = AdaptiveRule(rate=0.05, R_low=0.99, R_high=1.0)         # R < R_low: explore
    s = KnobScheduler("adaptive", ctrl, initial_kappa=0.2, final_kappa=-0.2, warmup_steps=0,
                      total_steps=1000, rule=rule, adaptive_interval=5)
    for _ in range(12):
        ctrl.observe_all(torch.ones(2, 4), torch.ones(2, 4))
        ctrl.tick()
        s.step()
    assert calls == [5, 10] and s.adaptive.state.updates == 2
    want = AdaptiveState()
    for d in seen:
        want = adaptive_update(want, rule, d["R"], d["variance"], d["formed"])
    assert s.adaptive.offset == want.offset == pytest.approx(0.10)
    sched = KnobSchedule(kind="adaptive", initial_kappa=0.2, final_kappa=-0.2, warmup_steps=0,
                         total_steps=1000, rule=rule)
    assert s.get_kappa() == float(kappa_at(sched, 12, want))
    assert s.get_kappa() == pytest.approx(0.2 - 0.4 * 12 / 1000 + (1 - 12 / 1000) * 0.10)
    assert np.isclose(float(ctrl.kappa_target), s.get_kappa())
