"""ChronovisorMixtralForCausalLM and MixtralConfig: config validation, the forward contract,
causality, padding, rotary, GQA, tied head, controller wiring, autocast, no host sync."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chronomoe_dyn import ControllerConfig
from chronomoe_torch.model import (ChronovisorMixtralForCausalLM, GQAttention, MixtralConfig,
                                   RotaryEmbedding)
from chronomoe_torch.routing import LayerFields
from _sync import SyncCounter

V, B, S = 64, 2, 12


def tiny_config(**kw) -> MixtralConfig:
    base = dict(vocab_size=V, hidden_dim=32, num_layers=2, num_experts=4, num_heads=4,
                num_kv_heads=2, top_k=2, max_seq_length=32, enable_chronovisor=False)
    base.update(kw)
    return MixtralConfig(**base)


def ids(seed: int = 0, b: int = B, s: int = S) -> torch.Tensor:
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


class StubController:
    """The contract's routing interface: layer_fields, noise_key and observe_stats."""

    def __init__(self, L: int, E: int):
        self.E = E
        self.bias_LE = torch.zeros(L, E)
        self.temperature_LE = torch.ones(L, E)
        self.calls = []

    def layer_fields(self, i):
        return LayerFields(self.bias_LE[i], self.temperature_LE[i], torch.tensor(1.0),
                           torch.tensor(0.0))

    def noise_key(self, i, n):
        return None

    def observe_stats(self, layer, stats_F):
        self.calls.append((layer, stats_F[:self.E], stats_F[self.E:2 * self.E]))


# --- config ---------------------------------------------------------------------------------

def test_config_seed_defaults():
    c = MixtralConfig()
    assert (c.vocab_size, c.hidden_dim, c.num_layers, c.num_experts) == (32000, 512, 8, 8)
    assert c.enable_chronovisor is True and c.top_k == 2
    assert c.intermediate_dim == 2 * c.hidden_dim
    assert isinstance(c.controller_config, ControllerConfig)
    assert MixtralConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("hidden_dim", -1), ("num_layers", 0), ("num_experts", 1.5),
    ("num_heads", 5), ("num_kv_heads", 3), ("top_k", 9), ("top_k", 0),
    ("max_seq_length", 0), ("rope_theta", 0.0), ("rms_norm_eps", float("nan")),
    ("init_std", -0.1), ("intermediate_dim", 0), ("aux_free_bias_rate", -1.0),
    ("expert_backend", "dense"), ("enable_chronovisor", 1), ("controller_config", {}),
    ("controller_seed", -1), ("init_seed", True), ("router_renormalize", "yes"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MixtralConfig(**{field: value})


def test_config_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="num_heads"):
        MixtralConfig(hidden_dim=24, num_heads=8, num_kv_heads=2)  # head dim 3


def test_config_unknown_key():
    with pytest.raises(ValueError, match="bogus"):
        MixtralConfig.from_dict({"bogus": 1})


# --- forward contract -------------------------------------------------------------------------

def test_forward_contract_shapes_and_dtypes():
    cfg = tiny_config()
    model = ChronovisorMixtralForCausalLM(cfg)
    assert model.controller is None
    out = model(ids())
    N = B * S
    assert out.logits.shape == (B, S, V) and out.loss is None
    assert len(out.router_logits) == len(out.expert_indices) == len(out.gate_weights) == 2
    for rl, ei, gw in zip(out.router_logits, out.expert_indices, out.gate_weights):
        assert rl.shape == (N, 4) and rl.dtype == torch.float32 and rl.requires_grad
        assert ei.shape == (N, 2) and ei.dtype == torch.int64
        assert gw.shape == (N, 2)
        torch.testing.assert_close(gw.sum(-1), torch.ones(N))
    # The routers' own softmax, exposed for the loss: same values, in the autograd graph.
    assert len(out.router_probs) == 2
    for rl, rp in zip(out.router_logits, out.router_probs):
        assert rp.shape == (N, 4) and rp.dtype == torch.float32 and rp.requires_grad
        assert torch.equal(rp, rl.softmax(-1))


def test_labels_give_the_shifted_causal_loss():
    model = ChronovisorMixtralForCausalLM(tiny_config())
    x = ids()
    labels = x.clone()
    labels[0, 5] = -100
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                          ignore_index=-100)
    torch.testing.assert_close(out.loss, ref)


def test_causality():
    model = ChronovisorMixtralForCausalLM(tiny_config()).eval()
    x = ids()
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    a, b = model(x).logits, model(y).logits
    # Not bit-equal: the changed token moves the others' places in the expert-sorted order,
    # which changes the GEMM blocking (differences ~1e-8).
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4


def test_right_padding_does_not_leak_and_left_padding_is_finite():
    model = ChronovisorMixtralForCausalLM(tiny_config()).eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[:, 9:] = 0
    y = x.clone()
    y[:, 9:] = 0
    a = model(x, attention_mask=mask).logits
    b = model(y, attention_mask=mask).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-6)
    # Without padding the explicit mask gives what is_causal gives.
    torch.testing.assert_close(model(x, attention_mask=torch.ones_like(x)).logits,
                               model(x).logits, rtol=1e-5, atol=1e-5)
    left = torch.ones_like(x)
    left[0, :4] = 0
    out = model(x, attention_mask=left, labels=x)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # Padding tokens change nothing for the real tokens of row 0.
    z = x.clone()
    z[0, :4] = 1
    torch.testing.assert_close(model(z, attention_mask=left).logits[0, 4:], out.logits[0, 4:],
                               rtol=1e-5, atol=1e-6)


def test_tied_embeddings():
    model = ChronovisorMixtralForCausalLM(tiny_config())
    assert model.lm_head_weight is model.embed_tokens.weight
    assert not any("lm_head" in n for n, _ in model.named_parameters())
    out = model(ids(), labels=ids())
    out.loss.backward()
    # The head's gradient reaches the embedding matrix rows of tokens never in the input.
    unused = torch.ones(V, dtype=torch.bool)
    unused[ids().unique()] = False
    assert model.embed_tokens.weight.grad[unused].abs().sum() > 0


def test_rotary_is_relative():
    rope = RotaryEmbedding(8, 16, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    qs = rope(q.expand(1, 1, 16, 8).contiguous())[0, 0]
    ks = rope(k.expand(1, 1, 16, 8).contiguous())[0, 0]
    dots = qs @ ks.T                       # [i, j] depends on j − i only
    for d in range(-3, 4):
        diag = torch.diagonal(dots, d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qs[0], q)   # position 0 is the identity
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(16))


def test_gqa_attention_matches_naive_reference():
    cfg = tiny_config()
    attn = GQAttention(cfg)
    rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_length, cfg.rope_theta)
    x = torch.randn(B, S, cfg.hidden_dim, generator=torch.Generator().manual_seed(3))
    y = attn(x, rope, None)
    nh, nkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = rope(attn.q_proj(x).view(B, S, nh, D).transpose(1, 2))
    k = rope(attn.k_proj(x).view(B, S, nkv, D).transpose(1, 2))
    v = attn.v_proj(x).view(B, S, nkv, D).transpose(1, 2)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(S, S).triu(1).bool(), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, nh * D)
    torch.testing.assert_close(y, attn.o_proj(ref), rtol=1e-5, atol=1e-6)


def test_init_is_seeded_and_independent_of_global_rng():
    torch.manual_seed(123)
    a = ChronovisorMixtralForCausalLM(tiny_config())
    torch.manual_seed(456)
    b = ChronovisorMixtralForCausalLM(tiny_config())
    c = ChronovisorMixtralForCausalLM(tiny_config(init_seed=1))
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
        if not n.endswith("norm.weight"):
            assert not torch.equal(pa, pc), n


def test_sequence_too_long_and_bad_shapes():
    model = ChronovisorMixtralForCausalLM(tiny_config(max_seq_length=8))
    with pytest.raises(ValueError, match="max_seq_length"):
        model(ids(s=9))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids()[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(s=8), attention_mask=torch.ones(B, 7))


# --- controller wiring ------------------------------------------------------------------------

def test_controller_fields_route_and_observations_flow():
    cfg = tiny_config(enable_chronovisor=True)
    ctrl = StubController(2, 4)
    ctrl.bias_LE[1, 2] = 50.0
    model = ChronovisorMixtralForCausalLM(cfg, controller=ctrl)
    assert model.controller is ctrl
    out = model.eval()(ids())
    assert ctrl.calls == []                            # eval: no observations
    assert (out.expert_indices[1][:, 0] == 2).all()    # layer 1 follows its bias
    assert not (out.expert_indices[0][:, 0] == 2).all()
    model.train()(ids())
    assert [c[0] for c in ctrl.calls] == [0, 1]
    for _, counts, wsum in ctrl.calls:
        assert counts.sum() == B * S * 2 and not wsum.requires_grad


def test_controller_needs_enable_chronovisor():
    with pytest.raises(ValueError, match="enable_chronovisor"):
        ChronovisorMixtralForCausalLM(tiny_config(), controller=StubController(2, 4))


def test_padding_is_not_observed():
    cfg = tiny_config(enable_chronovisor=True)
    ctrl = StubController(2, 4)
    model = ChronovisorMixtralForCausalLM(cfg, controller=ctrl).train()
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    model(ids(), attention_mask=mask)
    assert ctrl.calls[0][1].sum() == (B * S - 6) * 2


def test_update_aux_free_bias_on_every_layer():
    model = ChronovisorMixtralForCausalLM(tiny_config(aux_free_bias_rate=0.01)).train()
    out = model(ids())
    model.update_aux_free_bias()
    for layer, idx in zip(model.layers, out.expert_indices):
        load = torch.bincount(idx.reshape(-1), minlength=4).float()
        torch.testing.assert_close(layer.moe.router.aux_free_bias_E,
                                   0.01 * torch.sign(load.mean() - load))
    before = [layer.moe.router.aux_free_bias_E.clone() for layer in model.layers]
    model.update_aux_free_bias(rate=0.5)      # nothing routed since: unchanged
    for layer, b in zip(model.layers, before):
        assert torch.equal(layer.moe.router.aux_free_bias_E, b)


def test_update_aux_free_bias_valid_flag():
    """valid=False (a skipped step): biases bit-for-bit unchanged, loads cleared; valid=True
    is the unflagged update bit for bit."""
    a = ChronovisorMixtralForCausalLM(tiny_config(aux_free_bias_rate=0.01)).train()
    b = ChronovisorMixtralForCausalLM(tiny_config(aux_free_bias_rate=0.01)).train()
    biases = lambda m: [l.moe.router.aux_free_bias_E.clone() for l in m.layers]  # noqa: E731
    for step in range(3):
        a(ids(step))
        b(ids(step))
        a.update_aux_free_bias()
        b.update_aux_free_bias(valid=torch.tensor(True))
        assert all(torch.equal(x, y) for x, y in zip(biases(a), biases(b)))
    assert any(x.abs().sum() > 0 for x in biases(b))
    before = biases(b)
    b(ids(9))
    b.update_aux_free_bias(valid=torch.tensor(False))
    assert all(torch.equal(x, y) for x, y in zip(before, biases(b)))
    assert all(l.moe.router.load_E.sum() == 0 for l in b.layers)
    for bad in (torch.tensor([True]), torch.tensor(1.0), True):
        with pytest.raises(ValueError, match="valid must be a 0-d bool tensor"):
            b.update_aux_free_bias(valid=bad)


def test_real_controller_is_built_lazily():
    pytest.importorskip("chronomoe_torch.controller")
    from chronomoe_torch.controller import PxTController
    model = ChronovisorMixtralForCausalLM(tiny_config(enable_chronovisor=True))
    assert isinstance(model.controller, PxTController)
    out = model.train()(ids(), labels=ids())
    out.loss.backward()
    model.controller.tick()
    bias_E, temp_E, scale, tau, _ = model.controller.layer_fields(0)
    assert bias_E.shape == temp_E.shape == (4,) and scale.shape == tau.shape == ()
    assert float(scale) > 0.0 and float(tau) == pytest.approx(0.1)


def _strong_fields(ctrl) -> None:
    """Give the controller fields that move the selection: a lens of ±1 per expert and cold /
    hot temperatures, then refresh them as a tick would."""
    with torch.no_grad():
        ctrl.lens_LE.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]).repeat(ctrl.num_layers, 1))
        ctrl.T_eff_LE.copy_(torch.tensor([0.3, 3.0, 0.3, 3.0]).repeat(ctrl.num_layers, 1))
    ctrl._refresh_fields()


def test_controller_fields_false_routes_by_plain_top_k_and_still_ticks():
    """controller_fields=False: the same routing as the model without a controller, bit for bit,
    even with fields that move the selection when on; the controller still observes (counts,
    gate sums, logit scale) and ticks. Catches: the MoE layer applying the fields regardless of
    the switch (``fields = controller.layer_fields(layer)`` without the ``controller_fields``
    test), or not observing when the fields are off."""
    x = ids()
    plain = ChronovisorMixtralForCausalLM(tiny_config()).train()
    off = ChronovisorMixtralForCausalLM(tiny_config(enable_chronovisor=True,
                                                    controller_fields=False)).train()
    on = ChronovisorMixtralForCausalLM(tiny_config(enable_chronovisor=True)).train()
    _strong_fields(off.controller)
    _strong_fields(on.controller)
    ref, got, moved = plain(x), off(x), on(x)
    assert torch.equal(got.logits, ref.logits)
    for a, b in zip(got.expert_indices, ref.expert_indices):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(moved.expert_indices, ref.expert_indices))
    ctrl = off.controller
    counts = ctrl.observation_views()["counts_LE"].clone()
    assert torch.equal(counts[0], torch.bincount(ref.expert_indices[0].reshape(-1),
                                                 minlength=4).float())
    ctrl.tick()
    assert ctrl.num_ticks == 1 and bool((ctrl.logit_scale_L > 0).all())
    assert not torch.equal(ctrl.usage_LE, torch.full_like(ctrl.usage_LE, 0.25))


# --- numerics, training, syncs ----------------------------------------------------------------

def test_backends_agree_in_the_full_model():
    x = ids()
    a = ChronovisorMixtralForCausalLM(tiny_config(expert_backend="grouped_mm"))(x, labels=x)
    b = ChronovisorMixtralForCausalLM(tiny_config(expert_backend="loop"))(x, labels=x)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_backward():
    model = ChronovisorMixtralForCausalLM(tiny_config())
    x = ids()
    ref = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - ref.item()) < 0.02 * ref.item()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.layers[0].moe.w_down_EIH.grad.abs().sum() > 0


def test_a_few_steps_fit_a_fixed_batch():
    model = ChronovisorMixtralForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids()
    first = None
    for _ in range(12):
        loss = model(x, labels=x).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first




@pytest.mark.parametrize("real_controller", [False, True])
def test_training_forward_backward_has_no_host_sync(real_controller):
    cfg = tiny_config(enable_chronovisor=True, expert_backend="grouped_mm")
    if real_controller:
        pytest.importorskip("chronomoe_torch.controller")
        model = ChronovisorMixtralForCausalLM(cfg)
    else:
        model = ChronovisorMixtralForCausalLM(cfg, controller=StubController(2, 4))
    model.train()
    x = ids()
    mask = torch.ones_like(x)
    with SyncCounter() as sc:
        out = model(x, attention_mask=mask, labels=x)
        out.loss.backward()
        model.update_aux_free_bias()
    assert sc.count == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_step():
    cfg = tiny_config(hidden_dim=64, vocab_size=256)
    model = ChronovisorMixtralForCausalLM(cfg).cuda()
    x = torch.randint(0, 256, (B, S), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.device.type == "cuda"
