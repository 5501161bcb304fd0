"""PxTController (law v2.1): equivalence with the NumPy reference law (noiseless counts ≠ counts
on most ticks), bad input, state, hooks, diagnostics."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from chronomoe_dyn import (ControllerConfig, ControllerState, RoutingObservation, init_state,
                           routing_fields, step)
from chronomoe_dyn.landscape import model_landscape, state_landscape, valley_health
from chronomoe_dyn.law import knob_factors
from chronomoe_torch._rng import hash_key, normal, uniform
from chronomoe_torch.controller import PxTController
from chronomoe_dyn import rng as ref_rng

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
L, E = 3, 8


def _obs_sequence(ticks: int, seed: int, with_loss: str, num_layers: int = L,
                  num_experts: int = E):
    """Random observations (counts, wsum, loss, κ, logit scale, noiseless counts): some empty
    layers, losses always / never / on some ticks, a logit scale on most ticks (None on some:
    σ_L then stays), noiseless counts c° (law v2.1) on most ticks (None on some: = counts),
    drawn with the counts' totals from a skewed choice, so they differ from the counts and may
    fall on experts the counts left empty."""
    rng = np.random.default_rng(seed)
    out = []
    skew = np.linspace(0.2, 2.0, num_experts) ** 2
    for t in range(ticks):
        counts = rng.integers(0, 40, (num_layers, num_experts)).astype(np.float64)
        counts[:, rng.integers(num_experts)] = 0.0                # an expert with no tokens
        if t % 7 == 3:
            counts[t % num_layers] = 0.0                           # an empty layer
        if t % 23 == 5:
            counts[:] = 0.0                                        # an empty tick
        wsum = counts * rng.uniform(0.05, 0.95, counts.shape)
        use_loss = with_loss == "always" or (with_loss == "some" and t % 3 != 0)
        loss = counts * rng.uniform(0.5, 4.0, counts.shape) if use_loss else None
        kappa = float(np.clip(1.2 * math.sin(t / 17.0), -1.0, 1.0))
        scale = None if t % 5 == 2 else rng.uniform(0.2, 3.0, num_layers)
        noiseless = None
        if t % 4 != 1:
            noiseless = np.stack([rng.multinomial(int(n), rng.permutation(skew) / skew.sum())
                                  for n in counts.sum(axis=1)]).astype(np.float64)
        out.append((counts, wsum, loss, kappa, scale, noiseless))
    return out


def _observe(ctrl: PxTController, counts, wsum, loss, scale, noiseless=None) -> None:
    ctrl.observe_all(torch.from_numpy(counts), torch.from_numpy(wsum),
                     None if loss is None else torch.from_numpy(loss),
                     None if scale is None else torch.from_numpy(scale),
                     None if noiseless is None else torch.from_numpy(noiseless))


def _max_diffs(a: ControllerState, b: ControllerState) -> dict[str, float]:
    """Largest absolute difference per field; phases compared modulo 2π."""
    d = {}
    for f in fields(ControllerState):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("theta_LE", "psi"):
            diff = np.angle(np.exp(1j * (np.asarray(x) - np.asarray(y))))
        else:
            diff = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
        d[f.name] = float(np.max(np.abs(diff)))
    return d


def _assert_state_close(ctrl: PxTController, ref: ControllerState, tol: float, where: str):
    got = ctrl.to_reference_state()
    d = _max_diffs(got, ref)
    bad = {k: v for k, v in d.items() if not v <= tol}
    assert not bad, f"{where}: fields beyond {tol}: {bad}"
    assert got.tick == ref.tick and got.seed == ref.seed


CONFIGS = {
    "default": ControllerConfig(),
    "noise": ControllerConfig(phase_noise=0.3),
    "smoothing": ControllerConfig(kappa_smoothing=0.3),
    "noise_smoothing_fast_clock": ControllerConfig(phase_noise=0.1, kappa_smoothing=0.5,
                                                   micro_period=3, macro_period=7),
    "micro_lens_gains": ControllerConfig(lens_clock="micro", pressure_gain=0.7,
                                         exploration_tau0=0.3, beta_tau=0.9, drift_gain=1.5),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("with_loss", ["never", "always", "some"])
def test_equivalence_with_reference(dtype, cfg_name, with_loss):
    cfg = CONFIGS[cfg_name]
    ticks = 200                       # 10 macro periods of the default clock
    ctrl = PxTController(L, E, cfg, seed=11, dtype=dtype)
    ref = init_state(cfg, L, E, seed=11)
    tol = TOL[dtype]
    _assert_state_close(ctrl, ref, tol, "init")
    seq = _obs_sequence(ticks, 3, with_loss)
    assert sum(x[5] is not None and not np.array_equal(x[5], x[0]) for x in seq) > ticks // 2
    for t, (counts, wsum, loss, kappa, scale, noiseless) in enumerate(seq):
        ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, noiseless), kappa)
        _observe(ctrl, counts, wsum, loss, scale, noiseless)
        ctrl.set_knob(kappa)
        ctrl.tick()
        _assert_state_close(ctrl, ref, tol, f"tick {t + 1}")
        got = ctrl.routing_fields()
        want = routing_fields(ref, cfg)
        assert all(f.dtype == torch.float32 for f in got)
        # The fields are float32 by contract: a float64 state gives them to float32 rounding;
        # a float32 state to the float32 bound of the state itself (relative for σ and τ).
        ftol = 1e-6 if dtype == torch.float64 else tol
        for name, g, w in zip(("bias", "temperature", "scale", "tau"), got, want):
            np.testing.assert_allclose(g.numpy(), w, rtol=ftol, atol=ftol, err_msg=name)
    assert ctrl.num_ticks == ticks and int(ctrl.skipped_ticks) == 0


def test_equivalence_micro_batches_sum_to_one_tick():
    """n observe() calls per layer between ticks equal one reference step on their sum."""
    cfg = ControllerConfig(phase_noise=0.2)
    ctrl = PxTController(L, E, cfg, seed=2, dtype=torch.float64)
    ref = init_state(cfg, L, E, seed=2)
    rng = np.random.default_rng(7)
    for t in range(60):
        parts = [rng.integers(0, 20, (L, E)).astype(np.float64) for _ in range(3)]
        losses = [p * rng.uniform(1, 3, p.shape) for p in parts]
        for p, lo in zip(parts, losses):
            for layer in range(L):
                ctrl.observe(layer, torch.from_numpy(p[layer]), torch.from_numpy(0.5 * p[layer]),
                             torch.from_numpy(lo[layer]))
        ref = step(ref, cfg, RoutingObservation(sum(parts), 0.5 * sum(parts), sum(losses)), 0.25)
        # (no logit scale here: σ_L stays 0 on both sides)
        ctrl.set_knob(0.25)
        ctrl.tick()
    _assert_state_close(ctrl, ref, 1e-10, "after 60 accumulated ticks")


def test_observe_loss_on_some_layers_only():
    """Layers with losses use the loss-based reliability, the others the usage proxy; the
    reliability of a layer depends only on its own observations, so each row matches the
    corresponding reference run."""
    cfg = ControllerConfig()
    ctrl = PxTController(L, E, cfg, seed=4, dtype=torch.float64)
    ref_loss, ref_proxy = init_state(cfg, L, E, 4), init_state(cfg, L, E, 4)
    for counts, wsum, loss, kappa, _, _ in _obs_sequence(40, 9, "always"):
        for layer in range(L):
            ctrl.observe(layer, torch.from_numpy(counts[layer]), torch.from_numpy(wsum[layer]))
        ctrl.observe_loss(1, torch.from_numpy(loss[1]))
        ctrl.tick()
        ref_loss = step(ref_loss, cfg, RoutingObservation(counts, wsum, loss))
        ref_proxy = step(ref_proxy, cfg, RoutingObservation(counts, wsum, None))
    rel = ctrl.reliability_LE.numpy()
    np.testing.assert_allclose(rel[1], ref_loss.reliability_LE[1], atol=1e-12, rtol=0)
    np.testing.assert_allclose(rel[[0, 2]], ref_proxy.reliability_LE[[0, 2]], atol=1e-12, rtol=0)
    assert not np.allclose(ref_loss.reliability_LE[1], ref_proxy.reliability_LE[1], atol=1e-3)


# ---------------------------------------------------------------- counter RNG port

def test_rng_port_bitwise():
    idx = np.array([0, 1, 2, 1000, 2**31 - 1, 2**32 - 1, 12345678], dtype=np.uint64)
    ti = torch.from_numpy(idx.astype(np.int64))
    for seed, stream, tick in [(0, 0, 1), (2**32 - 1, 3, 10**9), (17, 0, 2**40 + 5)]:
        want = ref_rng.hash_key(seed, stream, tick, idx).astype(np.int64)
        assert np.array_equal(hash_key(seed, stream, tick, ti).numpy(), want)
        as_tensors = hash_key(torch.tensor(seed), stream, torch.tensor(tick), ti)
        assert np.array_equal(as_tensors.numpy(), want)
        assert np.array_equal(uniform(seed, stream, tick, ti).numpy(),
                              ref_rng.uniform(seed, stream, tick, idx))
        n_idx = np.arange(4096)
        np.testing.assert_allclose(normal(seed, stream, tick, torch.from_numpy(n_idx)).numpy(),
                                   ref_rng.normal(seed, stream, tick, n_idx), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 1e308])
@pytest.mark.parametrize("where", ["counts", "wsum", "loss", "scale", "noiseless"])
def test_bad_observation_leaves_state_untouched(bad, where):
    cfg = ControllerConfig(phase_noise=0.1)
    ctrl = PxTController(L, E, cfg, seed=1, dtype=torch.float64)
    ref = init_state(cfg, L, E, 1)
    seq = _obs_sequence(25, 5, "always")
    for counts, wsum, loss, kappa, scale, nl in seq[:19]:   # stop before a micro and a macro tick
        _observe(ctrl, counts, wsum, loss, scale, nl)
        ctrl.set_knob(kappa)
        ctrl.tick()
        ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, nl), kappa)
    before = {k: v.clone() for k, v in ctrl.state_dict().items()}
    fields_before = [f.clone() for f in ctrl.routing_fields()]
    counts, wsum, loss, _, scale, nl = seq[19]
    assert nl is not None
    arrays = {"counts": counts.copy(), "wsum": wsum.copy(), "loss": loss.copy(),
              "scale": np.full(L, 1.5), "noiseless": nl.copy()}
    if where == "scale":
        arrays["scale"][1] = bad
    else:
        arrays[where][1, 2] = bad
    _observe(ctrl, *(arrays[k] for k in ("counts", "wsum", "loss", "scale", "noiseless")))
    ctrl.tick()                                   # tick 20: micro and macro
    after = ctrl.state_dict()
    for k, v in before.items():
        if k in ("tick_counter", "skipped_ticks", "coherence_history", "meta_knob_history"):
            continue
        assert torch.equal(after[k], v), f"{k} changed on a bad tick"
    assert int(after["tick_counter"]) == 20 and int(after["skipped_ticks"]) == 1
    for f0, f1 in zip(fields_before, ctrl.routing_fields()):
        assert torch.equal(f0, f1)
    # The next good tick continues from the untouched state with the clock advanced.
    ref = ControllerState(**{**ref.to_dict(), "tick": ref.tick + 1})
    counts, wsum, loss, kappa, scale, nl = seq[20]
    _observe(ctrl, counts, wsum, loss, scale, nl)
    ctrl.set_knob(kappa)
    ctrl.tick()
    ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, nl), kappa)
    _assert_state_close(ctrl, ref, 1e-10, "after the skipped tick")
    assert int(ctrl.skipped_ticks) == 1


def _skewed_run(ctrl: PxTController, ticks: int = 19):
    """Drive a float64 controller and the reference over ``ticks`` ticks of ``_obs_sequence``
    (noiseless counts on most); returns the reference state and the rest of the sequence."""
    cfg = ctrl.config
    ref = init_state(cfg, L, E, int(ctrl.seed))
    seq = _obs_sequence(ticks + 5, 5, "always")
    for counts, wsum, loss, kappa, scale, nl in seq[:ticks]:
        _observe(ctrl, counts, wsum, loss, scale, nl)
        ctrl.set_knob(kappa)
        ctrl.tick()
        ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, nl), kappa)
    return ref, seq[ticks:]


@pytest.mark.parametrize("total", [1e2, 4e6])
def test_noiseless_total_mismatch_skips_the_tick_like_the_reference_raises(total):
    """Law v2.1: a layer whose noiseless counts do not sum to its counts' total (relative 1e-6
    of max(totals, 1), ``state.NOISELESS_TOTAL_RTOL``) is a bad observation: the reference
    raises ValueError, the tick is skipped with the law state untouched and ``skipped_ticks``
    + 1; just inside the tolerance both accept it. Catches a tick that never compares the
    totals, one that compares them without the relative scale (rejecting rounding), and one
    that reads the usage from the routed counts (the accepted tick then differs)."""
    cfg = ControllerConfig(phase_noise=0.1)
    ctrl = PxTController(L, E, cfg, seed=1, dtype=torch.float64)
    ref, rest = _skewed_run(ctrl)
    counts, wsum, loss, kappa, scale, nl = rest[0]
    counts = np.full((L, E), total / E)
    wsum, loss = 0.5 * counts, 2.0 * counts
    inside = 0.5e-6 * total if total > 1 else 0.5e-6
    for off, bad in ((1e-6 * total * 2.0, True), (inside, False)):
        nl = counts.copy()
        nl[1] = np.linspace(0.5, 1.5, E) * total / E             # the same total, skewed
        nl[1, 3] += off
        obs = RoutingObservation(counts, wsum, loss, scale, nl)
        before = {k: v.clone() for k, v in ctrl.state_dict().items()}
        _observe(ctrl, counts, wsum, loss, scale, nl)
        ctrl.set_knob(kappa)
        ctrl.tick()
        if bad:
            with pytest.raises(ValueError, match="noiseless_counts: layer 1"):
                step(ref, cfg, obs, kappa)
            ref = ControllerState(**{**ref.to_dict(), "tick": ref.tick + 1})
            after = ctrl.state_dict()
            for k, v in before.items():
                if k not in ("tick_counter", "skipped_ticks", "coherence_history",
                             "meta_knob_history"):
                    assert torch.equal(after[k], v), f"{k} changed on a bad tick"
        else:
            ref = step(ref, cfg, obs, kappa)
        assert int(ctrl.skipped_ticks) == 1
        _assert_state_close(ctrl, ref, 1e-10, f"offset {off}")


def test_observe_with_noiseless_counts_matches_the_reference():
    """``observe(..., noiseless_counts_E=)`` per layer and micro-batch equals one reference step
    on the sums with ``RoutingObservation(noiseless_counts=)``; None adds the counts there.
    Usage follows c° (the pressure corrects the router's choice), reliability the routed counts.
    Catches c° dropped (usage from the counts) and c° added to the counts' slots."""
    cfg = ControllerConfig(micro_period=2)
    ctrl = PxTController(L, E, cfg, seed=2, dtype=torch.float64)
    ref = init_state(cfg, L, E, seed=2)
    ref_counts = init_state(cfg, L, E, seed=2)          # the same run reading the routed counts
    rng = np.random.default_rng(8)
    choice = np.linspace(1.0, 3.0, E) / np.linspace(1.0, 3.0, E).sum()   # a skewed router
    for t in range(30):
        parts = [rng.integers(0, 20, (L, E)).astype(np.float64) for _ in range(2)]
        clean = [np.stack([rng.multinomial(int(n), choice) for n in p.sum(axis=1)]
                          ).astype(np.float64) for p in parts]
        losses = [p * rng.uniform(1, 3, p.shape) for p in parts]
        for i, (p, c, lo) in enumerate(zip(parts, clean, losses)):
            for layer in range(L):
                ctrl.observe(layer, torch.from_numpy(p[layer]), torch.from_numpy(0.5 * p[layer]),
                             torch.from_numpy(lo[layer]),
                             noiseless_counts_E=None if i == 1 and layer == 2 else
                             torch.from_numpy(c[layer]))
        clean[1][2] = parts[1][2]                        # the None: c° = counts
        args = (sum(parts), 0.5 * sum(parts), sum(losses))
        ref = step(ref, cfg, RoutingObservation(*args, noiseless_counts=sum(clean)))
        ref_counts = step(ref_counts, cfg, RoutingObservation(*args))
        ctrl.tick()
    _assert_state_close(ctrl, ref, 1e-10, "after 30 ticks with noiseless counts")
    assert np.abs(ref.usage_LE - ref_counts.usage_LE).max() > 1e-2
    v = ctrl.observation_views()
    assert set(v) == {"counts_LE", "wsum_LE", "logit_std_sum_L", "tokens_L", "noiseless_LE",
                      "loss_LE"} and ctrl.observation_buffer().shape == (L, 4 * E + 2)
    with pytest.raises(ValueError, match=r"observe\(layer=0\): noiseless_counts_E has shape"):
        ctrl.observe(0, torch.ones(E), torch.ones(E), noiseless_counts_E=torch.ones(E + 1))
    with pytest.raises(ValueError, match="observe_all: noiseless_counts_LE has shape"):
        ctrl.observe_all(torch.ones(L, E), torch.ones(L, E), noiseless_counts_LE=torch.ones(E))
    assert torch.count_nonzero(ctrl.observation_buffer()) == 0


def test_observe_stats_reads_the_noiseless_counts_of_the_row():
    """``observe_stats`` adds the row's first obs_width(E) = 3E + 2 entries: the noiseless
    counts land in ``noiseless_LE``, the row's explored/entropy entries nowhere."""
    from chronomoe_torch.routing import obs_width, stats_width
    ctrl = PxTController(2, 4, dtype=torch.float64)
    row = torch.arange(1.0, stats_width(4) + 1, dtype=torch.float64)
    ctrl.observe_stats(1, row)
    v = ctrl.observation_views()
    assert v["noiseless_LE"][1].tolist() == row[10:14].tolist() and obs_width(4) == 14
    assert v["counts_LE"][1].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert float(v["tokens_L"][1]) == 10.0 and float(v["loss_LE"].abs().sum()) == 0.0
    assert float(ctrl.observation_buffer()[0].abs().sum()) == 0.0


def test_overflowing_mean_loss_is_skipped():
    ctrl = PxTController(1, 4, dtype=torch.float64)
    before = ctrl.reliability_LE.clone()
    ctrl.observe(0, torch.tensor([1e-300, 1.0, 1.0, 1.0], dtype=torch.float64), torch.ones(4),
                 torch.tensor([1e10, 1.0, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="overflows"):
        step(init_state(ControllerConfig(), 1, 4), ControllerConfig(),
             RoutingObservation(np.array([[1e-300, 1, 1, 1.0]]), np.ones((1, 4)),
                                np.array([[1e10, 1, 1, 1.0]])))
    ctrl.tick()
    assert int(ctrl.skipped_ticks) == 1 and torch.equal(ctrl.reliability_LE, before)


def test_shape_and_layer_errors_name_the_problem():
    ctrl = PxTController(2, 4)
    with pytest.raises(ValueError, match=r"observe\(layer=1\): counts_E has shape \(5,\)"):
        ctrl.observe(1, torch.ones(5), torch.ones(4))
    with pytest.raises(ValueError, match=r"weight_sum_E has shape \(2, 2\), expected \(4,\)"):
        ctrl.observe(0, torch.ones(4), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"observe_loss\(layer=0\): loss_sum_E"):
        ctrl.observe_loss(0, torch.ones(3))
    with pytest.raises(ValueError, match=r"layer=2: expected an integer in \[0, 2\)"):
        ctrl.observe(2, torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"layer=1.5"):
        ctrl.observe_loss(1.5, torch.ones(4))
    with pytest.raises(ValueError, match=r"observe_all: counts_LE has shape \(4, 2\), expected "
                                         r"\(2, 4\)"):
        ctrl.observe_all(torch.ones(4, 2), torch.ones(2, 4))
    with pytest.raises(ValueError, match="layer"):
        ctrl.layer_fields(-3)
    # Nothing was accumulated by the failed calls.
    assert torch.count_nonzero(ctrl.observation_buffer()) == 0


def test_constructor_validation():
    with pytest.raises(ValueError, match="dtype"):
        PxTController(2, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="history_length"):
        PxTController(2, 4, history_length=0)
    with pytest.raises(ValueError, match="num_experts"):
        PxTController(2, 0)
    with pytest.raises(ValueError, match="seed"):
        PxTController(2, 4, seed=-1)
    with pytest.raises(ValueError, match="config"):
        PxTController(2, 4, config={"coupling": 1.0})


# ---------------------------------------------------------------- meta-knob

def test_set_knob_validation_and_tensor_path():
    ctrl = PxTController(2, 4)
    for bad in (1.5, -1.01, math.nan, math.inf, "x", True):
        with pytest.raises(ValueError, match="kappa"):
            ctrl.set_knob(bad)
    with pytest.raises(ValueError, match="single value"):
        ctrl.set_knob(torch.zeros(2))
    ctrl.set_knob(torch.tensor(3.0))                     # tensors are clamped, not validated
    assert float(ctrl.kappa_target) == 1.0 and float(ctrl.kappa) == 1.0
    ctrl.set_knob(torch.tensor(math.nan))                # non-finite: target unchanged
    assert float(ctrl.kappa_target) == 1.0
    ctrl.set_knob(torch.tensor([-0.25], dtype=torch.float64))
    assert float(ctrl.kappa_target) == -0.25


def test_set_knob_refreshes_fields_without_smoothing():
    cfg = ControllerConfig(beta_pressure=0.5)   # the seed's β_p (default 0): κ moves the bias too
    ctrl = PxTController(2, 4, cfg, dtype=torch.float64)
    for t in range(20):
        ctrl.observe_all(torch.arange(8.0).reshape(2, 4), torch.ones(2, 4))
        ctrl.tick()
    bias0, temp0, _, tau0 = (f.clone() for f in ctrl.routing_fields())
    ctrl.set_knob(0.8)
    rb, rt, _, rtau = routing_fields(ctrl.to_reference_state(), cfg, 0.8)
    np.testing.assert_allclose(ctrl.routing_fields()[0].numpy(), rb, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ctrl.routing_fields()[1].numpy(), rt, rtol=1e-6, atol=0)
    assert float(ctrl.routing_fields()[3]) == pytest.approx(rtau, rel=1e-6)
    assert not torch.equal(bias0, ctrl.routing_fields()[0])
    assert not torch.equal(temp0, ctrl.routing_fields()[1])
    assert not torch.equal(tau0, ctrl.routing_fields()[3])
    # With smoothing, κ moves only at ticks.
    sm = PxTController(2, 4, cfg.replace(kappa_smoothing=0.5))
    f0 = [f.clone() for f in sm.routing_fields()]
    sm.set_knob(0.8)
    assert float(sm.kappa) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(f0, sm.routing_fields()))
    sm.tick()
    assert float(sm.kappa) == pytest.approx(0.4)


def test_get_knob_state():
    cfg = ControllerConfig(kappa_smoothing=0.5)
    ctrl = PxTController(2, 4, cfg)
    ctrl.set_knob(0.6)
    ctrl.tick()
    ks = ctrl.get_knob_state()
    f = knob_factors(0.3, cfg)
    assert ks["kappa"] == pytest.approx(0.3) and ks["kappa_target"] == pytest.approx(0.6)
    assert ks["pressure_factor"] == pytest.approx(f.pressure, rel=1e-6)
    assert ks["temperature_factor"] == pytest.approx(f.temperature, rel=1e-6)
    assert ks["lens_factor"] == pytest.approx(f.lens, rel=1e-6)
    assert ks["kappa_smoothing"] == 0.5


def test_eta_parameters_exposed():
    cfg = ControllerConfig(eta_structural_T_global=0.002, eta_structural_T_local=0.03)
    ctrl = PxTController(2, 4, cfg)
    assert ctrl.eta_structural_T_global == 0.002 and ctrl.eta_structural_T_local == 0.03


# ---------------------------------------------------------------- state and histories

def _drive(ctrl: PxTController, seq) -> None:
    for counts, wsum, loss, kappa, scale, nl in seq:
        _observe(ctrl, counts, wsum, loss, scale, nl)
        ctrl.set_knob(kappa)
        ctrl.tick()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_dict_resume_is_exact(dtype):
    cfg = ControllerConfig(phase_noise=0.2, kappa_smoothing=0.7)
    seq = _obs_sequence(90, 8, "some")
    a = PxTController(L, E, cfg, seed=3, dtype=dtype, history_length=32)
    _drive(a, seq[:43])                       # mid micro period
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    assert "_obs_LF" not in sd and "tick_counter" in sd and "coherence_history" in sd
    assert "logit_scale_L" in sd and sd["Tbar_global"].shape == ()
    b = PxTController(L, E, cfg, seed=99, dtype=dtype, history_length=32)
    b.load_state_dict(sd)
    assert b.num_ticks == 43
    _drive(a, seq[43:])
    _drive(b, seq[43:])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    for x, y in zip(a.routing_fields(), b.routing_fields()):
        assert torch.equal(x, y)


def test_load_state_dict_through_a_parent_module_resyncs_the_clock():
    cfg = ControllerConfig(phase_noise=0.1)
    parent = torch.nn.Module()
    parent.controller = PxTController(2, 4, cfg, seed=5)
    _drive(parent.controller, _obs_sequence(7, 1, "never", 2, 4))
    sd = parent.state_dict()
    other = torch.nn.Module()
    other.controller = PxTController(2, 4, cfg, seed=5)
    other.load_state_dict(sd)
    assert other.controller.num_ticks == 7
    seq = _obs_sequence(20, 2, "never", 2, 4)
    _drive(parent.controller, seq)
    _drive(other.controller, seq)
    assert torch.equal(parent.controller.T_eff_LE, other.controller.T_eff_LE)
    assert torch.equal(parent.controller.theta_LE, other.controller.theta_LE)


def test_reference_state_roundtrip():
    cfg = ControllerConfig(phase_noise=0.1)
    ref = init_state(cfg, L, E, 6)
    for counts, wsum, loss, kappa, scale, nl in _obs_sequence(33, 4, "always"):
        ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, nl), kappa)
    ctrl = PxTController(L, E, cfg, seed=0, dtype=torch.float64)
    ctrl.load_reference_state(ref)
    assert ctrl.to_reference_state().allclose(ref)          # exact
    assert ctrl.num_ticks == 33 and int(ctrl.seed) == 6
    seq = _obs_sequence(30, 12, "always")
    for counts, wsum, loss, kappa, scale, nl in seq:
        ref = step(ref, cfg, RoutingObservation(counts, wsum, loss, scale, nl), kappa)
    _drive(ctrl, seq)
    _assert_state_close(ctrl, ref, 1e-10, "after load_reference_state")
    with pytest.raises(ValueError, match="layers, experts"):
        ctrl.load_reference_state(init_state(cfg, 2, E))
    with pytest.raises(ValueError, match="ControllerState"):
        ctrl.load_reference_state({"tick": 0})


def test_histories_are_ring_buffers():
    ctrl = PxTController(2, 4, ControllerConfig(kappa_smoothing=0.5), history_length=8,
                         dtype=torch.float64)
    Rs, ks = [], []
    for t, obs in enumerate(_obs_sequence(13, 3, "never", 2, 4)):
        _drive(ctrl, [obs])
        Rs.append(float(ctrl.R))
        ks.append(float(ctrl.kappa))
        if t == 4:
            assert torch.equal(ctrl.get_coherence_history(), torch.tensor(Rs, dtype=torch.float64))
    assert ctrl.coherence_history.shape == (8,)
    assert torch.equal(ctrl.get_coherence_history(), torch.tensor(Rs[-8:], dtype=torch.float64))
    assert torch.equal(ctrl.get_meta_knob_history(), torch.tensor(ks[-8:], dtype=torch.float64))


def test_dtype_is_kept_under_module_to():
    ctrl = PxTController(2, 4, dtype=torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.controller = ctrl
    model.to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert ctrl.T_eff_LE.dtype == torch.float32 and ctrl.theta_LE.dtype == torch.float64
    assert ctrl.routing_fields()[0].dtype == torch.float32
    assert ctrl.tick_counter.dtype == torch.int64
    ctrl.double()
    assert ctrl.Tbar_global.dtype == torch.float32 and ctrl.logit_scale_L.dtype == torch.float32
    ctrl.tick()                                           # still works after the conversions
    assert ctrl.num_ticks == 1


def test_layer_fields_are_live_views_updated_in_place_by_ticks():
    """v2 routing reads the fields without autograd, so they are updated in place: the views a
    router holds see each tick's values (no new tensors per tick), and a snapshot is a clone.
    Catches a refresh that rebinds new tensors while routers keep the old views."""
    ctrl = PxTController(1, 4)
    f = ctrl.layer_fields(0)
    before = [t.clone() for t in f[:4]]
    for _ in range(5):
        ctrl.observe(0, torch.tensor([5.0, 1.0, 0.0, 2.0]), torch.ones(4),
                     logit_std_sum=torch.tensor(7.0), tokens=torch.tensor(4.0))
        ctrl.tick()
    g = ctrl.layer_fields(0)
    assert all(a is b for a, b in zip(f, g))
    assert not torch.equal(before[1], g.temperature_E) and not torch.equal(before[2], g.scale)
    torch.testing.assert_close(g.inv_scale_temperature_E, 1.0 / (g.scale * g.temperature_E))
    assert float(g.scale) == pytest.approx(7.0 / 4.0)


# ---------------------------------------------------------------- optimizer hook

def test_register_on_ticks_in_the_step_pre_hook():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctrl = PxTController(2, 4)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(ctrl.num_ticks))
    handle = ctrl.register_on(opt)
    with pytest.raises(ValueError, match="already"):
        ctrl.register_on(opt)
    for _ in range(3):                                       # 3 accumulated micro-batches
        ctrl.observe_all(torch.ones(2, 4), torch.ones(2, 4))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert ctrl.num_ticks == 1 and seen == [0]
    np.testing.assert_allclose(ctrl.usage_LE.numpy(), 0.25)
    handle.remove()
    opt.step()
    assert ctrl.num_ticks == 1
    ctrl.register_on(opt)
    ctrl.remove_hooks()
    opt.step()
    assert ctrl.num_ticks == 1
    with pytest.raises(ValueError, match="register_step_pre_hook"):
        ctrl.register_on(object())


# ---------------------------------------------------------------- diagnostics

def test_diagnostics_match_the_reference_functions():
    cfg = ControllerConfig(eta_structural_T_local=0.2, eta_structural_T_global=0.2)
    ctrl = PxTController(L, E, cfg, dtype=torch.float64)
    rng = np.random.default_rng(0)
    skew = np.linspace(1, 12, E)
    for _ in range(100):
        counts = rng.poisson(skew, (L, E)).astype(np.float64)
        loss = counts * np.linspace(3.0, 0.5, E)
        ctrl.observe_all(torch.from_numpy(counts), torch.from_numpy(counts), torch.from_numpy(loss))
        ctrl.tick()
    st = ctrl.to_reference_state()
    d = ctrl.get_structural_temperature_diagnostics()
    g = model_landscape(st, cfg)
    assert d["variance"] == g.variance_mean and d["valleys"] == g.valleys_mean
    assert d["ridges"] == g.ridges_mean and d["formed"] == (g.formed_fraction > 0)
    assert len(d["local"]) == L
    assert d["local"][1] == state_landscape(st, cfg, 1).to_dict()
    assert d["R"] == st.R and d["tick"] == 100 and d["Tbar_global"] == st.Tbar_global
    assert d["valleys"] > 0, "the test environment should form valleys"
    for layer in (0, 2):
        vh = ctrl.get_valley_health_diagnostics(layer)
        want = valley_health(st, cfg, layer)
        assert vh["valleys"] == list(want.valleys) and vh["unhealthy"] == list(want.unhealthy)
        assert vh["all_healthy"] == want.all_healthy and vh["layer"] == layer
    whole = ctrl.get_valley_health_diagnostics()
    assert whole["num_valleys"] == sum(len(valley_health(st, cfg, li).valleys)
                                       for li in range(L))
    with pytest.raises(ValueError, match="layer"):
        ctrl.get_valley_health_diagnostics(7)


def test_coherence_is_a_copy():
    ctrl = PxTController(2, 4)
    r = ctrl.coherence()
    assert r.shape == () and float(r) == float(ctrl.R)
    r0 = float(r)
    for _ in range(3):
        ctrl.observe_all(torch.ones(2, 4), torch.ones(2, 4))
        ctrl.tick()
    assert float(r) == r0 != float(ctrl.R)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cfg = ControllerConfig(phase_noise=0.2, kappa_smoothing=0.5)
    seq = _obs_sequence(100, 3, "some")
    cpu = PxTController(L, E, cfg, dtype=torch.float64)
    gpu = PxTController(L, E, cfg, dtype=torch.float64, device="cuda")
    _drive(cpu, seq)
    for counts, wsum, loss, kappa, scale, nl in seq:
        gpu.observe_all(torch.from_numpy(counts).cuda(), torch.from_numpy(wsum).cuda(),
                        None if loss is None else torch.from_numpy(loss).cuda(),
                        None if scale is None else torch.from_numpy(scale).cuda(),
                        None if nl is None else torch.from_numpy(nl).cuda())
        gpu.set_knob(torch.tensor(kappa, device="cuda"))
        gpu.tick()
    d = _max_diffs(cpu.to_reference_state(), gpu.to_reference_state())
    assert max(d.values()) <= 1e-10, d


def test_mix32_wrap_matches_the_reference_hash_bit_for_bit():
    """The routing noise's hash relies on int64 products wrapping around (they pass 2⁶³);
    it must equal the reference lowbias32 on the whole 32-bit range. Catches a kernel that
    saturates or traps on overflow."""
    from chronomoe_torch._rng import mix32_wrap
    idx = np.concatenate([np.arange(0, 4096), np.array([2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]),
                          np.random.default_rng(0).integers(0, 2**32, 4096)]).astype(np.uint64)
    got = mix32_wrap(torch.from_numpy(idx.astype(np.int64))).numpy()
    assert np.array_equal(got, ref_rng.mix32(idx).astype(np.int64))
