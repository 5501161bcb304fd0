"""CoherenceGatedOptimizer: the gate formula, gating of the update, exactness at 0 and 1, LR
schedulers, state dicts and hooks, on both paths: "snapshot" (any optimizer; here AdamW without
fused and SGD) and "lr" (fused AdamW, chosen automatically), and the two paths against each
other."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from chronomoe_dyn import ControllerConfig, coherence_gate
from chronomoe_torch.controller import PxTController
from chronomoe_torch.optim import (CoherenceGatedOptimizer, LrGatedAdamW, coherence_gate_tensor,
                                   lr_gating_supported)


def _model(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p0 = next(model.parameters())
    x = torch.randn(16, 6, generator=g, dtype=p0.dtype)
    y = torch.randn(16, 3, generator=g, dtype=p0.dtype)
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _state_tensors(opt):
    return {(i, k): v.clone() for i, p in enumerate(opt.param_groups[0]["params"])
            for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}[t.dtype])


def _r_for_gate(gate: float, min_coh=0.2, strength=0.5) -> float:
    """R that gives ``gate`` (inverse of the seed formula, for 1 − strength <= gate <= 1)."""
    g = 1.0 - (1.0 - gate) / strength
    return min_coh + g * (1.0 - min_coh)


def _adamw(model, **kw):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **kw)


# The wrapped AdamW of the path-parametrised tests: fused → the "lr" path, else "snapshot".
PATHS = pytest.mark.parametrize("fused", [False, True], ids=["snapshot", "lr"])


def _gated(inner, r_fn, **kw) -> CoherenceGatedOptimizer:
    """A gated optimizer, checked to be on the path its inner optimizer implies."""
    g = CoherenceGatedOptimizer(inner, r_fn, **kw)
    assert g.gate_via == ("lr" if inner.defaults.get("fused") else "snapshot")
    return g


# ---------------------------------------------------------------- the formula

@pytest.mark.parametrize("min_coh,strength", [(0.2, 0.5), (0.0, 1.0), (0.5, 0.3), (0.9, 1.0)])
def test_gate_formula_is_the_reference(min_coh, strength):
    Rs = np.concatenate([np.linspace(-0.5, 1.5, 401), [min_coh, np.nextafter(min_coh, 0)]])
    got = coherence_gate_tensor(torch.tensor(Rs, dtype=torch.float64), min_coh, strength)
    want = np.array([coherence_gate(r, min_coh, strength) for r in Rs])
    assert np.array_equal(got.numpy(), want)                      # bitwise in float64


def test_gate_of_non_finite_R():
    g = coherence_gate_tensor(torch.tensor([float("nan"), float("-inf"), float("inf")]))
    assert g.tolist() == [0.5, 0.5, 1.0]


@pytest.mark.parametrize("kw,match", [({"min_coherence": 1.0}, "min_coherence"),
                                      ({"min_coherence": -0.1}, "min_coherence"),
                                      ({"gating_strength": 1.5}, "gating_strength"),
                                      ({"gating_strength": float("nan")}, "gating_strength"),
                                      ({"enabled": 1}, "enabled")])
def test_constructor_validation(kw, match):
    m = _model()
    with pytest.raises(ValueError, match=match):
        CoherenceGatedOptimizer(_adamw(m), lambda: 1.0, **kw)


def test_bad_wrapped_optimizer_and_R_source():
    m = _model()
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        CoherenceGatedOptimizer(object(), lambda: 1.0)
    with pytest.raises(ValueError, match="controller_or_R_fn"):
        CoherenceGatedOptimizer(_adamw(m), 0.5)
    gated = CoherenceGatedOptimizer(_adamw(m), lambda: 1.0)
    with pytest.raises(ValueError, match="already"):
        CoherenceGatedOptimizer(gated, lambda: 1.0)


# ---------------------------------------------------------------- gating the update

@PATHS
@pytest.mark.parametrize("gate", [0.55, 0.7, 0.93])
def test_adamw_update_is_scaled_by_the_gate(gate, fused):
    plain_m, gated_m = _model(), _model()
    plain = _adamw(plain_m, fused=fused)
    gated = _gated(_adamw(gated_m, fused=fused), lambda: torch.tensor(_r_for_gate(gate),
                                                                       dtype=torch.float64))
    for step in range(4):
        # Same starting point and gradient each step: compare one step's change.
        gated_m.load_state_dict(plain_m.state_dict())
        _backward(plain_m, step)
        _backward(gated_m, step)
        before = _params(plain_m)
        plain.step()
        gated.step()
        assert float(gated.last_gate_value) == pytest.approx(gate, abs=1e-15)
        for p0, pp, pg in zip(before, plain_m.parameters(), gated_m.parameters()):
            d_plain, d_gated = pp.detach() - p0, pg.detach() - p0
            assert d_plain.abs().max() > 1e-4                      # a real update
            torch.testing.assert_close(d_gated, gate * d_plain, rtol=1e-12, atol=1e-15)
        # For 0 < gate < 1 the optimizer state advances as in a plain step.
        for (k, v), (k2, v2) in zip(_state_tensors(plain).items(), _state_tensors(gated).items()):
            assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opt_name", ["adamw", "adamw_foreach_off", "sgd_momentum", "adamw_fused",
                                      "adam_fused"])
def test_gate_one_is_the_plain_optimizer_bitwise(dtype, opt_name):
    def make(m):
        if opt_name == "adamw":
            return _adamw(m)
        if opt_name == "adamw_foreach_off":
            return _adamw(m, foreach=False)
        if opt_name == "adamw_fused":
            return _adamw(m, fused=True)
        if opt_name == "adam_fused":                     # L2 weight decay inside the gradient
            return torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)

    plain_m, gated_m = _model(dtype), _model(dtype)
    plain = make(plain_m)
    gated = CoherenceGatedOptimizer(make(gated_m), lambda: torch.tensor(1.0), gating_strength=1.0)
    assert gated.gate_via == ("lr" if "fused" in opt_name else "snapshot")
    for step in range(5):
        _backward(plain_m, step)
        _backward(gated_m, step)
        plain.step()
        gated.step()
        assert float(gated.last_gate_value) == 1.0
    for pp, pg in zip(plain_m.parameters(), gated_m.parameters()):
        assert torch.equal(_bits(pp.detach()), _bits(pg.detach()))
    sp, sg = _state_tensors(plain), _state_tensors(gated)
    assert sp.keys() == sg.keys() and all(torch.equal(sp[k], sg[k]) for k in sp)


@PATHS
def test_gate_zero_leaves_params_and_state_bitwise_untouched(fused):
    R = {"value": 1.0}
    m = _model()
    gated = _gated(_adamw(m, fused=fused), lambda: torch.tensor(R["value"]),
                   min_coherence=0.2, gating_strength=1.0)
    for step in range(3):                     # warm up: state exists and is non-trivial
        _backward(m, step)
        gated.step()
    params, state = _params(m), _state_tensors(gated)
    assert {k for (_, k) in state} == {"step", "exp_avg", "exp_avg_sq"}
    R["value"] = 0.1                          # below min_coherence, strength 1: gate 0
    for step in range(3, 6):
        _backward(m, step)
        gated.step()
        assert float(gated.last_gate_value) == 0.0
    for p0, p in zip(params, m.parameters()):
        assert torch.equal(_bits(p0), _bits(p.detach()))
    after = _state_tensors(gated)
    assert after.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], after[k]), k
    R["value"] = 1.0                          # opens again: a normal step
    _backward(m, 6)
    gated.step()
    assert not torch.equal(params[0], next(m.parameters()).detach())


@PATHS
def test_gate_zero_on_the_first_step_creates_no_state(fused):
    m = _model()
    gated = _gated(_adamw(m, fused=fused), lambda: 0.0, gating_strength=1.0)
    params = _params(m)
    _backward(m, 0)
    gated.step()
    assert len(gated.state) == 0
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, m.parameters()))


@PATHS
def test_disabled_and_zero_strength_are_the_plain_optimizer(fused):
    for kw in ({"enabled": False}, {"gating_strength": 0.0}):
        plain_m, gated_m = _model(), _model()
        plain = _adamw(plain_m, fused=fused)
        gated = _gated(_adamw(gated_m, fused=fused), lambda: 0.0, **kw)
        for step in range(3):
            _backward(plain_m, step)
            _backward(gated_m, step)
            plain.step()
            gated.step()
        assert float(gated.last_gate_value) == 1.0
        assert all(torch.equal(a, b) for a, b in zip(plain_m.parameters(), gated_m.parameters()))


@PATHS
def test_params_without_grad_are_untouched_and_closure_works(fused):
    m = _model()
    frozen = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = torch.optim.AdamW([{"params": list(m.parameters())}, {"params": [frozen]}], lr=1e-2,
                            fused=fused)
    gated = _gated(opt, lambda: torch.tensor(_r_for_gate(0.75), dtype=torch.float64))
    f0 = frozen.detach().clone()
    before = _params(m)
    plain_m = copy.deepcopy(m)
    plain = torch.optim.AdamW(plain_m.parameters(), lr=1e-2, fused=fused)

    def closure():
        _backward(m, 0)
        return torch.tensor(1.5)

    loss = gated.step(closure)
    assert float(loss) == 1.5 and torch.equal(frozen.detach(), f0)
    _backward(plain_m, 0)
    plain.step()
    for p0, pp, pg in zip(before, plain_m.parameters(), m.parameters()):
        torch.testing.assert_close(pg.detach() - p0, 0.75 * (pp.detach() - p0), rtol=1e-12,
                                   atol=1e-15)


# ---------------------------------------------------------------- LR schedulers

@PATHS
@pytest.mark.parametrize("sched", ["lambda", "cosine"])
def test_lr_schedulers_drive_the_wrapped_optimizer(sched, fused):
    def make_sched(o):
        if sched == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s))
        return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=1e-4)

    gate = 0.8
    plain_m, gated_m = _model(), _model()
    plain = _adamw(plain_m, fused=fused)
    gated = _gated(_adamw(gated_m, fused=fused), lambda: torch.tensor(_r_for_gate(gate),
                                                                       dtype=torch.float64))
    s_plain, s_gated = make_sched(plain), make_sched(gated)
    for step in range(6):
        gated_m.load_state_dict(plain_m.state_dict())
        _backward(plain_m, step)
        _backward(gated_m, step)
        before = _params(plain_m)
        plain.step()
        gated.step()
        s_plain.step()
        s_gated.step()
        assert gated.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
        assert gated.optimizer.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
        assert type(gated.param_groups[0]["lr"]) is float    # the lr path puts the float back
        for p0, pp, pg in zip(before, plain_m.parameters(), gated_m.parameters()):
            torch.testing.assert_close(pg.detach() - p0, gate * (pp.detach() - p0), rtol=1e-12,
                                       atol=1e-15)
    assert s_gated.get_last_lr() == s_plain.get_last_lr()
    assert gated.param_groups[0]["lr"] < 1e-2 * 0.5            # the schedule really moved


# ---------------------------------------------------------------- state dicts

@PATHS
def test_state_dict_roundtrip_resumes_exactly(fused):
    R = iter([0.3, 0.5, 0.9, 0.7, 0.4, 0.95, 0.6, 0.35])
    Rs = list(R)
    a_m = _model()
    a = _gated(_adamw(a_m, fused=fused), lambda: torch.tensor(Rs[a.num_steps % len(Rs)]),
               min_coherence=0.3, gating_strength=0.8)
    for step in range(3):
        _backward(a_m, step)
        a.step()
    sd = copy.deepcopy(a.state_dict())
    assert set(sd) == {"state", "param_groups", "coherence_gate"}
    assert sd["coherence_gate"]["min_coherence"] == 0.3 and sd["coherence_gate"]["num_steps"] == 3
    b_m = copy.deepcopy(a_m)
    b = _gated(_adamw(b_m, fused=fused), lambda: torch.tensor(Rs[b.num_steps % len(Rs)]))
    b.load_state_dict(sd)
    assert b.min_coherence == 0.3 and b.gating_strength == 0.8 and b.num_steps == 3
    assert torch.equal(b.last_gate_value, a.last_gate_value)
    for step in range(3, 7):
        _backward(a_m, step)
        _backward(b_m, step)
        a.step()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(a_m.parameters(), b_m.parameters()))
    # A plain optimizer state dict loads too (the gate state is kept).
    b.load_state_dict(_adamw(b_m, fused=fused).state_dict())
    assert b.min_coherence == 0.3
    bad = copy.deepcopy(sd)
    bad["coherence_gate"]["gating_strength"] = 2.0
    with pytest.raises(ValueError, match="gating_strength"):
        b.load_state_dict(bad)
    del bad["coherence_gate"]["num_steps"]
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict(bad)


# ---------------------------------------------------------------- hooks and the controller

@PATHS
def test_hooks_pass_through_and_the_controller_ticks_before_the_gate(fused):
    ctrl = PxTController(2, 4, ControllerConfig(coupling=2.0), dtype=torch.float64)
    m = _model()
    gated = _gated(_adamw(m, fused=fused), ctrl, min_coherence=0.1, gating_strength=1.0)
    calls = []
    ctrl.register_on(gated)
    h_pre = gated.register_step_pre_hook(lambda o, a, k: calls.append(("pre", ctrl.num_ticks)))
    h_post = gated.register_step_post_hook(
        lambda o, a, k: calls.append(("post", float(o.last_gate_value))))
    inner = []
    gated.optimizer.register_step_pre_hook(lambda o, a, k: inner.append(ctrl.num_ticks))
    for step in range(3):
        ctrl.observe_all(torch.full((2, 4), 3.0), torch.ones(2, 4))
        _backward(m, step)
        gated.step()
        want = coherence_gate(float(ctrl.R), 0.1, 1.0)             # R after this step's tick
        assert float(gated.last_gate_value) == pytest.approx(want, abs=1e-15)
        assert gated.last_gate_float() == pytest.approx(want, abs=1e-15)
    assert calls[0] == ("pre", 1) and calls[1][0] == "post" and len(calls) == 6
    assert inner == [1, 2, 3]
    h_pre.remove()
    h_post.remove()
    _backward(m, 9)
    gated.step()
    assert len(calls) == 6 and ctrl.num_ticks == 4


def test_passthrough_attributes():
    m = _model()
    inner = _adamw(m)
    gated = CoherenceGatedOptimizer(inner, lambda: 1.0)
    assert gated.param_groups is inner.param_groups and gated.state is inner.state
    assert gated.defaults is inner.defaults
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    gated.add_param_group({"params": [extra], "lr": 0.5})
    assert len(inner.param_groups) == 2 and inner.param_groups[1]["lr"] == 0.5
    _backward(m, 0)
    gated.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    assert "CoherenceGatedOptimizer" in repr(gated) and "AdamW" in repr(gated)
    assert float(gated.last_gate_value) == 1.0                    # before any step


# ---------------------------------------------------------------- the two paths

def test_gate_via_is_chosen_from_the_wrapped_optimizer():
    m = _model()
    assert lr_gating_supported(_adamw(m, fused=True))
    assert lr_gating_supported(torch.optim.Adam(m.parameters(), fused=True))
    assert not lr_gating_supported(_adamw(m))                      # foreach/single-tensor
    assert not lr_gating_supported(torch.optim.SGD(m.parameters(), lr=0.1))
    assert CoherenceGatedOptimizer(_adamw(m, fused=True), lambda: 1.0).gate_via == "lr"
    assert CoherenceGatedOptimizer(_adamw(m), lambda: 1.0).gate_via == "snapshot"
    forced = CoherenceGatedOptimizer(_adamw(m, fused=True), lambda: 1.0, gate_via="snapshot")
    assert forced.gate_via == "snapshot" and "gate_via='snapshot'" in repr(forced)
    with pytest.raises(ValueError, match="gate_via='lr' needs .*fused=True, got AdamW"):
        CoherenceGatedOptimizer(_adamw(m), lambda: 1.0, gate_via="lr")
    with pytest.raises(ValueError, match="gate_via='lerp': allowed values"):
        CoherenceGatedOptimizer(_adamw(m), lambda: 1.0, gate_via="lerp")
    assert LrGatedAdamW(_adamw(m, fused=True), lambda: 1.0).gate_via == "lr"
    with pytest.raises(ValueError, match="fused=True"):
        LrGatedAdamW(torch.optim.SGD(m.parameters(), lr=0.1), lambda: 1.0)


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lr_path_equals_the_snapshot_path(strength):
    """Same fused AdamW, same R sequence: the lr-scaled step and the snapshot blend agree (to
    rounding), with the same gates; a closed gate moves nothing on the lr path either."""
    Rs = iter([0.9, 0.5, 0.1, 1.0, 0.35] * 2)      # gates (strength 1): 0.875, 0.375, 0, 1, ...
    R = torch.zeros((), dtype=torch.float64)

    def make(gate_via):
        g = torch.Generator().manual_seed(0)
        ps = [nn.Parameter(torch.randn(40, 30, generator=g)),
              nn.Parameter(torch.randn(30, generator=g))]
        inner = torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1},
                                   {"params": ps[1:], "weight_decay": 0.0}], lr=1e-2, fused=True)
        opt = CoherenceGatedOptimizer(inner, lambda: R, min_coherence=0.2,
                                      gating_strength=strength, gate_via=gate_via)
        assert opt.gate_via == gate_via
        return ps, opt

    (pa, a), (pb, b) = make("snapshot"), make("lr")
    closed_seen = False
    for step in range(8):
        R.fill_(next(Rs))
        g = torch.Generator().manual_seed(100 + step)
        for p, q in zip(pa, pb):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        before = [q.detach().clone() for q in pb]
        st_before = [v.clone() for s in b.state.values() for v in s.values()]
        a.step()
        b.step()
        assert torch.equal(a.last_gate_value, b.last_gate_value)
        for p, q in zip(pa, pb):
            torch.testing.assert_close(q, p)
        if float(b.last_gate_value) == 0.0 and st_before:   # closed gate: nothing moves
            closed_seen = True
            assert all(torch.equal(x, y.detach()) for x, y in zip(before, pb))
            after = [v for s in b.state.values() for v in s.values()]
            assert all(torch.equal(x, y) for x, y in zip(st_before, after))
        assert b.param_groups[0]["lr"] == 1e-2 and not hasattr(b.optimizer, "found_inf")
    assert closed_seen == (strength == 1.0)
    assert a.state_dict()["coherence_gate"]["num_steps"] == b.state_dict()["coherence_gate"][
        "num_steps"] == 8


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_lr_path_keeps_the_optimizers_own_found_inf(strength):
    """The trainer skips bad steps through fused AdamW's ``found_inf``: the lr path honours it
    (with an open gate too) and leaves the attribute as it found it."""
    m = _model()
    inner = _adamw(m, fused=True)
    gated = CoherenceGatedOptimizer(inner, lambda: torch.tensor(1.0, dtype=torch.float64),
                                    gating_strength=strength)
    _backward(m, 0)
    gated.step()                                   # state exists
    params, state = _params(m), _state_tensors(gated)
    fi = torch.ones(())
    inner.found_inf, inner.grad_scale = fi, None
    _backward(m, 1)
    gated.step()
    assert inner.found_inf is fi and inner.grad_scale is None
    assert all(torch.equal(a, b.detach()) for a, b in zip(params, m.parameters()))
    after = _state_tensors(gated)
    assert all(torch.equal(state[k], after[k]) for k in state)
    inner.found_inf = torch.zeros(())              # a good step: it moves
    gated.step()
    assert not torch.equal(params[0], next(m.parameters()).detach())
