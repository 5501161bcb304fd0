"""routing.route: the v2 routing rule in torch. Equivalence with the NumPy reference
(chronomoe_dyn.routing) for the same uniforms, the Gumbel noise key, one rule for the native
router and attach(), κ as an exploration lever, the stats row (with the noiseless counts of law
v2.1), eval mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from chronomoe_dyn import ControllerConfig
from chronomoe_dyn import rng as ref_rng
from chronomoe_dyn.law import LayerFields as RefLayerFields
from chronomoe_dyn.routing import route as ref_route
from chronomoe_dyn.routing import topk_stable
from chronomoe_torch import _rng
from chronomoe_torch.controller import PxTController
from chronomoe_torch.moe import Router
from chronomoe_torch.routing import (LayerFields, NoiseKey, gumbel_NE, obs_width, route,
                                     stats_experts, stats_row, stats_width)

N, E, K = 512, 8, 2


def _case(seed: int, tau: float = 0.4):
    g = np.random.default_rng(seed)
    z = g.normal(0.0, 2.0, (N, E))
    bias = g.normal(0.0, 0.5, E)
    temp = g.uniform(0.3, 3.0, E)
    scale = float(g.uniform(0.5, 2.0))
    u = g.uniform(1e-12, 1.0, (N, E))
    return z, RefLayerFields(bias, temp, scale, tau), u


def _torch_fields(f: RefLayerFields, dtype=torch.float64) -> LayerFields:
    return LayerFields(torch.tensor(f.bias_E, dtype=dtype), torch.tensor(f.temperature_E,
                       dtype=dtype), torch.tensor(f.scale, dtype=dtype),
                       torch.tensor(f.tau, dtype=dtype))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("controller_fields", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_route_matches_the_numpy_reference(renormalize, controller_fields, seed):
    """Same logits, fields and uniforms (float64): the same selection in the same order, the
    same explored slots and gates, and stats rows that sum the reference's logit std, slot
    counts and gate weights, and count the top-k of its noiseless score (law v2.1's c°; the
    selection itself without fields). Catches: the v1 order (z̃ + b)/T, gates from the score
    instead of the raw z, explored slots measured against the noisy top-k
    (``clean_NK = idx_NK``), noiseless counts of the noisy selection."""
    z, f, u = _case(seed)
    ref = ref_route(z, f, K, u, renormalize=renormalize, controller_fields=controller_fields)
    got = route(torch.from_numpy(z), K, fields=_torch_fields(f) if controller_fields else None,
                renormalize=renormalize, training=True, noise=torch.from_numpy(u),
                full_stats=True)
    assert torch.equal(got.expert_idx_NK, torch.from_numpy(ref.selected_NK))
    np.testing.assert_allclose(got.gate_NK.numpy(), ref.gates_NK, rtol=0, atol=1e-14)
    if controller_fields:
        assert ref.explored_NK.any()                 # τ = 0.4: the noise does move slots
        assert torch.equal(got.explored_NK, torch.from_numpy(ref.explored_NK))
    else:
        assert got.explored_NK is None and not ref.explored_NK.any()
    row = got.stats_F.numpy()
    counts = np.bincount(ref.selected_NK.ravel(), minlength=E)
    wsum = np.bincount(ref.selected_NK.ravel(), weights=ref.gates_NK.ravel(), minlength=E)
    np.testing.assert_array_equal(row[:E], counts)
    np.testing.assert_allclose(row[E:2 * E], wsum, rtol=1e-12)
    np.testing.assert_allclose(row[2 * E], ref.logit_std_N.sum(), rtol=1e-12)
    noiseless = np.bincount(topk_stable(ref.score_NE, K).ravel(), minlength=E)
    np.testing.assert_array_equal(row[2 * E + 2:3 * E + 2], noiseless)
    if controller_fields:
        assert not np.array_equal(noiseless, counts)   # the noise moved the load: not vacuous
    else:
        np.testing.assert_array_equal(noiseless, counts)
    assert row.shape == (stats_width(E),) and stats_experts(row.shape[0]) == E
    assert row[2 * E + 1] == N and row[3 * E + 2] == ref.explored_NK.sum()
    p = torch.softmax(torch.from_numpy(ref.score_NE), -1)
    np.testing.assert_allclose(row[3 * E + 3], float(-(p * p.log()).sum()), rtol=1e-10)


def test_float32_route_agrees_with_the_reference_on_clear_choices():
    """float32 logits (the models' case): the same selection wherever the reference's scores
    are not within float32 rounding of a tie."""
    z, f, u = _case(7)
    ref = ref_route(z, f, K, u)
    got = route(torch.from_numpy(z).float(), K, fields=_torch_fields(f, torch.float32),
                training=True, noise=torch.from_numpy(u))
    score = np.sort(ref.score_NE + f.tau * -np.log(-np.log(u)), axis=-1)[:, ::-1]
    clear = (score[:, K - 1] - score[:, K]) > 1e-4
    assert clear.mean() > 0.99
    assert np.array_equal(got.expert_idx_NK.numpy()[clear], ref.selected_NK[clear])
    np.testing.assert_allclose(got.gate_NK.numpy()[clear], ref.gates_NK[clear], atol=1e-6)


def test_gumbel_key_is_the_counter_rng_extended_by_the_layer():
    """prefix = hash(seed, STREAM_GUMBEL, tick, layer) of the reference chain; u of token n at
    position p = offset + n comes from h = mix32((p·E + e) ^ prefix), as the reference hashes an
    index, keeping its top 23 bits: u = ((h >> 9) + 0.5)/2²³. All layers drawn at once equal
    each layer drawn alone. Catches a key that ignores the position offset (``base = 0``)."""
    seed, tick, layer = 12345, 77, 3
    prefix = _rng.gumbel_prefix(seed, tick, layer)
    assert prefix == int(ref_rng.hash_key(seed, ref_rng.STREAM_GUMBEL, tick, np.array([layer]))[0])
    g = gumbel_NE(NoiseKey(prefix, offset=40), 16, E, torch.device("cpu"))
    idx = (np.arange(40, 56)[:, None] * E + np.arange(E)).astype(np.uint64)
    h = ref_rng.mix32(idx ^ np.uint64(prefix))
    u = ((h >> np.uint64(9)).astype(np.float64) + 0.5) / 2.0 ** 23
    np.testing.assert_allclose(g.numpy(), -np.log(-np.log(u)), rtol=2e-6, atol=2e-6)
    ctrl = PxTController(5, E, seed=seed)
    for _ in range(tick):
        ctrl.tick()
    keys = [ctrl.noise_key(li, 16) for li in range(5)]
    assert keys[layer].prefix == prefix and all(k.gumbel_NE is not None for k in keys)
    torch.testing.assert_close(keys[layer].gumbel_NE, gumbel_NE(NoiseKey(prefix), 16, E,
                                                                 torch.device("cpu")),
                               rtol=0, atol=0)
    # Ranks interleave positions: rank r of 2 draws positions 2p + r; together, all of them.
    r0 = gumbel_NE(NoiseKey(prefix, 20, 0, 2), 8, E, torch.device("cpu"))
    r1 = gumbel_NE(NoiseKey(prefix, 20, 1, 2), 8, E, torch.device("cpu"))
    torch.testing.assert_close(torch.stack([r0, r1], 1).reshape(16, E), g, rtol=0, atol=0)


@pytest.mark.parametrize("offset,rank,world", [(0, 0, 1), (40, 0, 1), (20, 1, 2),
                                                (2 ** 29 + 5, 2, 3), (2 ** 31, 0, 1)])
def test_cpu_noise_kernel_equals_the_tensor_path_bit_for_bit(offset, rank, world):
    """On CPU the uniforms come from one Numba pass (``_noise._uniform23_cpu``), elsewhere
    from int64 tensor ops (``_uniform23_tensor``): the same u, bit for bit, for one prefix and
    for a batch of layers, past the 32-bit wrap of the index and over several ranks; and the
    draws (``gumbel_NE``) agree too. Mutations caught (checked), in ``libm.uniform23_into``:
    rank and world swapped in the index; the key combined by ``+`` instead of ``^``."""
    from chronomoe_torch._noise import _uniform23_cpu, _uniform23_tensor
    cpu = torch.device("cpu")
    prefixes = [0, 12345, 2 ** 32 - 1, _rng.gumbel_prefix(7, 3, 1)]
    key = NoiseKey(prefixes[1], offset, rank, world)
    u_cpu = _uniform23_cpu(key, 16, E, None)
    u_ten = _uniform23_tensor(key, 16, E, cpu, None)
    assert u_cpu.dtype == u_ten.dtype == torch.float32
    assert torch.equal(u_cpu.reshape(-1), u_ten.reshape(-1))
    batch_cpu = _uniform23_cpu(key, 16, E, prefixes)
    batch_ten = _uniform23_tensor(key, 16, E, cpu, torch.tensor(prefixes).unsqueeze(1))
    assert batch_cpu.shape == (4, 16 * E) and torch.equal(batch_cpu, batch_ten)
    g_cpu = gumbel_NE(key, 16, E, cpu, np.array(prefixes, dtype=np.uint64))
    g_ten = gumbel_NE(key, 16, E, cpu, torch.tensor(prefixes).unsqueeze(1))
    assert torch.equal(g_cpu, g_ten)


def test_noise_keys_continue_positions_over_micro_batches_and_repeat_in_recompute():
    """Gradient accumulation: two calls of N/2 tokens draw what one call of N draws; a call
    inside backward (an activation-checkpoint recompute) repeats the last forward's key; the
    next tick draws new noise. Catches a recompute that takes the next offset."""
    ctrl = PxTController(2, E, seed=5)
    a, b = ctrl.noise_key(1, 10), ctrl.noise_key(1, 6)
    assert (a.offset, b.offset) == (0, 10) and a.prefix == b.prefix
    assert ctrl.noise_key(0, 4).offset == 0                    # positions are per layer
    x = torch.ones(1, requires_grad=True)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(ctrl.noise_key(1, 6))                 # inside backward
            return grad

    Probe.apply(x).sum().backward()
    assert [k[:4] for k in seen] == [b[:4]] and torch.equal(seen[0].gumbel_NE, b.gumbel_NE)
    assert ctrl.noise_key(1, 6).offset == 16
    ctrl.tick()
    c = ctrl.noise_key(1, 10)
    assert c.offset == 0 and c.prefix != a.prefix
    assert PxTController(2, E, ControllerConfig(exploration_tau0=0.0)).noise_key(0, 3) is None


def test_a_device_move_or_group_change_mid_tick_keeps_the_noise_positions():
    """``.to()`` or ``set_distributed`` between two micro-batches of one step must not restart
    the token positions (caught: both reset them, so the second micro-batch redrew the first's
    noise), but the device/group-dependent caches are made again."""
    ctrl = PxTController(2, E, seed=5)
    a = ctrl.noise_key(1, 10)
    ctrl.to(torch.float32)
    b = ctrl.noise_key(1, 6)
    ctrl.set_distributed(False)
    c = ctrl.noise_key(1, 4)
    assert (a.offset, b.offset, c.offset) == (0, 10, 16)
    assert a.prefix == b.prefix == c.prefix


def _same_weights(router: Router, module: nn.Module) -> None:
    with torch.no_grad():
        module.proj.weight.copy_(router.weight)


def test_native_router_and_attach_route_alike():
    """One rule: the native Router and an attached router of the same weights, each with its
    own controller of the same seed and state, select the same experts (with the noise of the
    same key), with the same gates (to float32 rounding: attach takes the faster softmax over
    the selected logits) and the same stats rows. Catches either path routing from other
    logits or fields than the other (e.g. ``route(z_NE * 1.01, ...)`` in the hook)."""
    import _attach_models as M
    from chronomoe_torch.attach import attach
    H = 16
    cfg = ControllerConfig(exploration_tau0=0.5, pressure_gain=3.0, micro_period=1)
    ctrls = [PxTController(2, E, cfg, seed=9) for _ in range(2)]
    for c in ctrls:                                   # the same skewed history: real fields
        for _ in range(3):
            c.observe_all(torch.arange(1.0, 2 * E + 1).reshape(2, E), torch.ones(2, E),
                          logit_scale_L=torch.tensor([1.5, 0.7]))
            c.tick()
    torch.manual_seed(0)
    native = Router(H, E, K).train()
    nn.init.normal_(native.weight, std=0.5)
    lm = M.HandLM(tuple_router=True, H=H, num_experts=E, top_k=K).train()
    _same_weights(native, lm.blocks[0].router)
    handle = attach(lm, routers=lm.routers(), controller=ctrls[1], record_routing=True)
    handle.routing_stats.start()
    ids = M.tokens(B=4, S=16)
    h = lm.embed(ids).reshape(-1, H)
    lm(ids)
    rec = handle.routing_output()
    n = h.shape[0]
    r = native(h, ctrls[0].layer_fields(0), ctrls[0].noise_key(0, n), full_stats=True)
    assert torch.equal(r.expert_idx_NK, rec.expert_indices[0])
    torch.testing.assert_close(r.gate_NK, rec.gate_weights[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.stats_F.double(), handle.routing_stats.take()[0],
                               rtol=1e-6, atol=1e-5)
    assert r.stats_F[3 * E + 2] > 0                        # the noise explored: not vacuous
    # ... and moved the load: the noiseless counts (compared above) are not the counts.
    assert not torch.equal(r.stats_F[:E], r.stats_F[2 * E + 2:3 * E + 2])
    handle.detach()


def test_kappa_raises_exploration_and_routing_entropy_monotonically():
    """A unit-level check on a fixed batch: κ through set_knob scales τ = τ₀·e^{β_τ κ} and the
    temperature e^{β_T κ}, so the explored share of slots and the routing entropy both rise
    with κ (not the real-text claim of issue 9, which needs training). Catches a τ that
    ignores κ (``f_tau * 0 + τ₀`` in ``TickKernel.fields``)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4096, E, generator=g) * 2.0
    rates, entropies = [], []
    for kappa in (-1.0, -0.3, 0.0, 0.5, 1.0):
        ctrl = PxTController(1, E, seed=4)
        ctrl.observe_all(torch.full((1, E), 10.0), torch.ones(1, E),
                         logit_scale_L=torch.tensor([2.0]))
        ctrl.tick()
        ctrl.set_knob(kappa)
        r = route(z, K, fields=ctrl.layer_fields(0), training=True,
                  noise=ctrl.noise_key(0, z.shape[0]), full_stats=True)
        rates.append(float(r.stats_F[3 * E + 2] / (K * z.shape[0])))
        entropies.append(float(r.stats_F[3 * E + 3] / z.shape[0]))
    assert all(a < b for a, b in zip(rates, rates[1:])), rates
    assert all(a < b for a, b in zip(entropies, entropies[1:])), entropies
    assert rates[-1] >= 3 * rates[0]


def test_eval_mode_draws_no_noise_but_applies_the_fields():
    torch.manual_seed(1)
    router = Router(16, E, K)
    nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, 16)
    bias = torch.zeros(E)
    bias[5] = 50.0
    f = LayerFields(bias, torch.ones(E), torch.tensor(1.0), torch.tensor(5.0))
    key = NoiseKey(_rng.gumbel_prefix(0, 0, 0))
    r = router.eval()(x, f, key)
    assert (r.expert_idx_NK[:, 0] == 5).all()             # the fields apply in eval
    clean = router(x, f, None)
    assert torch.equal(r.expert_idx_NK, clean.expert_idx_NK)   # the key is ignored in eval
    assert torch.equal(r.stats_F[:E], r.stats_F[2 * E + 2:3 * E + 2])   # no noise: c° = counts
    noisy = router.train()(x, f, key, full_stats=True)
    assert noisy.stats_F[3 * E + 2] > 0
    # Training with noise: c° is the eval-mode choice of the same tokens (the noise is the only
    # difference), over the same slots.
    torch.testing.assert_close(noisy.stats_F[2 * E + 2:3 * E + 2], r.stats_F[:E], rtol=0,
                               atol=0)
    assert not torch.equal(noisy.stats_F[:E], r.stats_F[:E])


def test_stats_row_masks_padding():
    idx = torch.tensor([[0, 1], [2, 3], [1, 0]])
    gates = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3]])
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0], [3.0, 1.0, 1.0, 1.0]])
    row = stats_row(idx, gates, z, torch.tensor([True, False, True]), full=True)
    assert row.shape == (stats_width(4),) == (3 * 4 + 4,) and obs_width(4) == 3 * 4 + 2
    assert row[:4].tolist() == [2.0, 2.0, 0.0, 0.0] and row[2 * 4 + 1] == 2.0
    torch.testing.assert_close(row[4:8], torch.tensor([0.9, 1.1, 0.0, 0.0]))
    std = z.var(-1, unbiased=False).sqrt()
    torch.testing.assert_close(row[8], std[0] + std[2])
    assert row[10:14].tolist() == [2.0, 2.0, 0.0, 0.0]    # no noiseless top-k given: = counts
    assert row[3 * 4 + 2] == 0.0                          # no noise: nothing explored
    clean = torch.tensor([[3, 1], [0, 0], [2, 1]])        # the padded token's slots not counted
    row2 = stats_row(idx, gates, z, torch.tensor([1.0, 0.0, 1.0]), full=True,
                     noiseless_NK=clean)
    assert row2[10:14].tolist() == [0.0, 2.0, 1.0, 1.0]
    torch.testing.assert_close(torch.cat([row2[:10], row2[14:]]),
                               torch.cat([row[:10], row[14:]]))
    assert stats_experts(stats_width(4)) == 4
    with pytest.raises(ValueError, match="3E \\+ 4"):
        stats_experts(2 * 4 + 4)                          # a version-2.0 row
    with pytest.raises(ValueError, match="logit_std_sum and tokens"):
        PxTController(1, 4).observe(0, torch.ones(4), torch.ones(4), logit_std_sum=1.0)
    assert math.isfinite(float(row[-1]))


@pytest.mark.parametrize("full_stats", [False, True])
def test_noiseless_counts_are_the_top_k_of_the_noiseless_score(full_stats):
    """Law v2.1's c° in the stats row [2E + 2, 3E + 2): the top-k slots of the score without the
    noise (s + the aux-free bias), weighted by the tokens' validity like the counts, on every
    call (not only with ``full_stats``: the controller reads it each tick); its total is the
    counts' total; with τ = 0 (a key, but no noise to speak of) it equals the counts. Catches
    c° filled only with ``full_stats``, c° counting padding, the aux-free bias left out of the
    noiseless score."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(256, E, generator=g, dtype=torch.float64) * 2.0
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.3
    temp = torch.rand(E, generator=g, dtype=torch.float64) + 0.5
    aux = torch.zeros(E, dtype=torch.float64)
    aux[3] = 0.8
    valid = torch.rand(256, generator=g) > 0.25
    u = torch.rand(256, E, generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    f = LayerFields(bias, temp, torch.tensor(1.3, dtype=torch.float64),
                    torch.tensor(0.6, dtype=torch.float64))
    r = route(z, K, fields=f, aux_free_bias_E=aux, training=True, valid_N=valid, noise=u,
              full_stats=full_stats)
    s = (z - z.mean(-1, keepdim=True)) / 1.3 / temp + bias + aux
    top = topk_stable(s.numpy(), K)[valid.numpy()]
    want = np.bincount(top.ravel(), minlength=E)
    row = r.stats_F.numpy()
    np.testing.assert_array_equal(row[2 * E + 2:3 * E + 2], want)
    counts = np.bincount(r.expert_idx_NK[valid].numpy().ravel(), minlength=E)
    np.testing.assert_array_equal(row[:E], counts)
    assert not np.array_equal(want, counts)
    assert row[2 * E + 2:3 * E + 2].sum() == row[:E].sum() == K * int(valid.sum())
    assert (row[3 * E + 2] > 0) == full_stats
    # No noise: τ = 0 with the same uniforms, fields off, eval mode: c° = counts.
    f0 = f._replace(tau=torch.tensor(0.0, dtype=torch.float64))
    for kw in (dict(fields=f0, training=True), dict(fields=None, training=True),
               dict(fields=f, training=False)):
        r0 = route(z, K, aux_free_bias_E=aux, valid_N=valid, noise=u, full_stats=full_stats,
                   **kw)
        assert torch.equal(r0.stats_F[:E], r0.stats_F[2 * E + 2:3 * E + 2]), kw


def test_route_observe_tick_matches_the_reference_end_to_end():
    """Law v2.1 through the whole torch path: each tick two layers route 512 tokens with the
    controller's live fields and given uniforms (``route``), observe their rows
    (``observe_stats``) and tick; the reference routes the same tokens with the same fields
    (``chronomoe_dyn.routing.route``: the same selection, and the row's noiseless counts are
    the top-k of its noiseless score) and steps on a ``RoutingObservation`` built from the
    torch rows, noiseless counts included. The states agree to 1e-10 over 40 ticks in which
    the noiseless counts differ from the counts. Catches a row whose c° is the noisy
    selection and a tick whose usage reads the routed counts."""
    from chronomoe_dyn import RoutingObservation, init_state, step
    cfg = ControllerConfig(exploration_tau0=0.5, micro_period=2, pressure_gain=2.0)
    L = 2
    ctrl = PxTController(L, E, cfg, seed=4, dtype=torch.float64)
    ref = init_state(cfg, L, E, seed=4)
    g = np.random.default_rng(5)
    differ = 0
    for t in range(40):
        bias, temp, scale, tau = (x.double().numpy() for x in ctrl.routing_fields())
        rows = []
        for li in range(L):
            z = g.normal(0.0, 2.0, (N, E)) + np.linspace(0.0, 1.5, E)   # a skewed router
            u = g.uniform(1e-12, 1.0, (N, E))
            want = ref_route(z, RefLayerFields(bias[li], temp[li], float(scale[li]), float(tau)),
                             K, u)
            r = route(torch.from_numpy(z), K, fields=ctrl.layer_fields(li), training=True,
                      noise=torch.from_numpy(u))
            assert torch.equal(r.expert_idx_NK, torch.from_numpy(want.selected_NK))
            row = r.stats_F.numpy().copy()
            np.testing.assert_array_equal(
                row[2 * E + 2:3 * E + 2],
                np.bincount(topk_stable(want.score_NE, K).ravel(), minlength=E))
            ctrl.observe_stats(li, r.stats_F)
            rows.append(row)
        a = np.stack(rows)
        obs = RoutingObservation(a[:, :E], a[:, E:2 * E], None, a[:, 2 * E] / a[:, 2 * E + 1],
                                 noiseless_counts=a[:, 2 * E + 2:3 * E + 2])
        differ += not np.array_equal(obs.counts, obs.noiseless_counts)
        ref = step(ref, cfg, obs)
        ctrl.tick()
        got = ctrl.to_reference_state()
        for name in ("usage_LE", "delta_LE", "reliability_LE", "pressure_LE", "T_eff_LE",
                     "lens_LE", "logit_scale_L", "R"):
            np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=0,
                                       atol=1e-10, err_msg=f"tick {t + 1}: {name}")
        assert np.allclose(np.angle(np.exp(1j * (got.theta_LE - ref.theta_LE))), 0.0,
                           atol=1e-10)
    assert differ == 40 and int(ctrl.skipped_ticks) == 0
