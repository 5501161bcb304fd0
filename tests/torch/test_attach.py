"""attach(): the P×T controller (law v2 routing) on transformers MoE models and on a hand-written
MoE, through torch hooks only. One tiny random model per supported architecture (built from a
config)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import _attach_models as M  # noqa: E402
from chronomoe_dyn import ControllerConfig  # noqa: E402
from chronomoe_torch import routing as routing_mod  # noqa: E402
from chronomoe_torch.attach import AttachError, attach, find_routers  # noqa: E402
from chronomoe_torch.checkpoint import load_state, save_state  # noqa: E402
from chronomoe_torch.controller import PxTController  # noqa: E402


def _n_routers(model) -> int:
    return len(M.hf_routers(model))


def _big_bias(L: int, experts=(M.E - 1,), value: float = 30.0) -> torch.Tensor:
    b = torch.zeros(L, M.E)
    b[:, list(experts)] = value
    return b


def _counts(handle) -> torch.Tensor:
    """[L, E] top-k slot counts of the pending observation."""
    return handle.observation_buffer[:, :M.E]


def _state(handle) -> dict:
    return {k: v.clone() for k, v in handle.controller.state_dict().items()}


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# Routing: identity fields reproduce the router; large bias changes the selection
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_identity_fields_reproduce_the_model_bit_for_bit(arch, monkeypatch):
    """With b = 0, T = 1 (z̃ is monotone in z: the same selection) and torch's own softmax
    kernel, the hook's gates are the router's rule op for op: the model is unchanged bit for
    bit (each family's renormalisation and dtype handling replicated exactly)."""
    monkeypatch.setattr(routing_mod, "FAST_CPU_SOFTMAX_BELOW", 0)
    model = M.make_hf(arch)
    x = M.tokens()
    ref = model(x, output_router_logits=True)
    handle = attach(model, controller=M.FixedFields(_n_routers(model), M.E))
    out = model(x, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a, b)
    handle.detach()


@pytest.mark.parametrize("arch", M.ARCHS)
def test_identity_fields_with_the_fast_small_e_softmax(arch):
    """The default CPU path for E < 16 takes the softmax along the other axis (a faster kernel,
    equal to within float32 rounding): same selections, outputs equal to rounding."""
    assert M.E < routing_mod.FAST_CPU_SOFTMAX_BELOW
    model = M.make_hf(arch)
    x = M.tokens()
    ref_idx = []
    hooks = [r.register_forward_hook(lambda m, a, out: ref_idx.append(out[2]))
             for r in M.hf_routers(model)]
    ref = model(x)
    for h in hooks:
        h.remove()
    handle = attach(model, controller=M.FixedFields(_n_routers(model), M.E),
                    record_routing=True)
    out = model(x)
    for got, want in zip(handle.routing_output().expert_indices, ref_idx, strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(out.logits, ref.logits)
    handle.detach()


@pytest.mark.parametrize("arch", M.ARCHS)
def test_large_bias_changes_the_selected_experts(arch):
    model = M.make_hf(arch)
    L = _n_routers(model)
    x = M.tokens()
    ref = model(x, output_router_logits=True)
    raw_sel = [r.topk(M.K, dim=-1).indices for r in ref.router_logits]
    # Unattached, some tokens route away from the last expert.
    assert any(not (s == M.E - 1).any(-1).all() for s in raw_sel)

    handle = attach(model, controller=M.FixedFields(L, M.E, bias_LE=_big_bias(L)),
                    record_routing=True)
    out = model(x, output_router_logits=True)
    rec = handle.routing_output()
    for i in range(L):
        # The experts got a top-k that always holds the biased expert.
        assert (rec.expert_indices[i] == M.E - 1).any(-1).all()
        # The model's output changed because the experts consumed the new routing.
    assert not torch.allclose(out.logits, ref.logits)
    # The observation counts the modified selection: every token sends a slot to expert E-1.
    N = x.numel()
    counts_LE = _counts(handle)
    assert torch.equal(counts_LE[:, M.E - 1], torch.full((L,), float(N)))
    assert torch.equal(counts_LE.sum(-1), torch.full((L,), float(N * M.K)))
    handle.detach()


def _capture_raw(model):
    """Record each router's own output with a hook that runs before everything else (ours
    included): the raw logits of *this* forward, whose deeper layers depend on our routing."""
    raw, handles = {}, []
    for i, r in enumerate(M.hf_routers(model)):
        def hook(mod, args, out, i=i):
            raw[i] = out[0].detach().clone()
        handles.append(r.register_forward_hook(hook, prepend=True))
    return raw, handles


@pytest.mark.parametrize("arch", M.ARCHS)
@pytest.mark.parametrize("capture_first", [False, True])
def test_recorded_router_logits_are_the_raw_ones(arch, capture_first):
    """v2: the hook moves the selection only. transformers records router logits with its own
    forward hook (installed lazily on the first output_router_logits=True call), and our
    recorded routing holds them too: both are the router's raw z of this forward."""
    model = M.make_hf(arch)
    L = _n_routers(model)
    x = M.tokens()
    if capture_first:
        model(x, output_router_logits=True)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(L, M.E, generator=g)
    temp = torch.rand(L, M.E, generator=g) + 0.5
    handle = attach(model, controller=M.FixedFields(L, M.E, bias, temp), record_routing=True)
    raw, hooks = _capture_raw(model)
    out = model(x, output_router_logits=True)
    rec = handle.routing_output()
    for i in range(L):
        assert torch.equal(out.router_logits[i], raw[i])
        assert torch.equal(rec.router_logits[i], raw[i])
    for h in hooks:
        h.remove()
    handle.detach()


def _expected_routing(handle, raw_NE: torch.Tensor, layer: int, renormalize: bool):
    return routing_mod.route(raw_NE, M.K, fields=handle.controller.layer_fields(layer),
                             renormalize=renormalize, want_probs=False)


@pytest.mark.parametrize("arch", M.ARCHS)
def test_real_controller_fields_are_applied(arch):
    """After some ticks with a strong pressure the controller's own fields shape routing: the
    selection is ``routing.route`` of the raw logits with the controller's fields (eval mode:
    no noise), and some selections differ from the router's own."""
    model = M.make_hf(arch)
    cfg = ControllerConfig(pressure_gain=20.0, micro_period=1)
    handle = attach(model, cfg, record_routing=True)
    for s in range(3):
        model(M.tokens(seed=s))
        handle.tick()
    model.eval()
    raw, hooks = _capture_raw(model)
    model(M.tokens(seed=9))
    rec = handle.routing_output()
    changed = False
    for i in range(handle.num_layers):
        f = handle.controller.layer_fields(i)
        assert not torch.equal(f.temperature_E, torch.ones_like(f.temperature_E))
        renorm = arch in ("mixtral", "qwen3_moe")
        want = _expected_routing(handle, raw[i], i, renorm)
        assert torch.equal(rec.expert_indices[i], want.expert_idx_NK)
        changed |= not torch.equal(raw[i].topk(M.K, -1).indices.sort(-1).values,
                                   want.expert_idx_NK.sort(-1).values)
    assert changed
    for h in hooks:
        h.remove()
    handle.detach()


@pytest.mark.parametrize("arch", M.ARCHS)
def test_controller_fields_false_leaves_routing_as_the_model_s(arch):
    """controller_fields=False: even with fields that move the selection, the model runs bit
    for bit as unattached; the controller still observes (counts, gate sums, logit scale) and
    ticks. Catches: the hook applying the fields regardless of the switch."""
    model = M.make_hf(arch)
    L = _n_routers(model)
    x = M.tokens()
    ref = model(x, output_router_logits=True)
    handle = attach(model, controller=M.FixedFields(L, M.E, bias_LE=_big_bias(L)),
                    controller_fields=False, record_routing=True)
    out = model(x, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    counts = _counts(handle)
    for i in range(L):
        idx = handle.routing_output().expert_indices[i].reshape(-1)
        assert torch.equal(counts[i], torch.bincount(idx, minlength=M.E).float())
    E = M.E
    assert bool((handle.observation_buffer[:, 2 * E] > 0).all())        # Σ logit std
    assert torch.equal(handle.observation_buffer[:, 2 * E + 1],
                       torch.full((L,), float(x.numel())))            # tokens
    handle.tick()
    assert len(handle.controller.fed) == 1
    handle.detach()


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_gradient_reaches_router_weight_through_the_raw_logits(arch, monkeypatch):
    """v2 gates are the router's own rule on the raw z: with fields that keep the router's
    selection (zero bias, T = 1) the router weight's gradient is the unattached model's bit for
    bit (torch's own softmax kernel); with a bias that moves the selection the router still
    gets a gradient (through the raw-logit gates of the new selection)."""
    monkeypatch.setattr(routing_mod, "FAST_CPU_SOFTMAX_BELOW", 0)
    model = M.make_hf(arch)
    L = _n_routers(model)
    clone = copy.deepcopy(model)
    handle = attach(model, controller=M.FixedFields(L, M.E, scale=0.5))
    x = M.tokens()
    out_a = model(x, labels=x, output_router_logits=True)
    out_b = clone(x, labels=x, output_router_logits=True)
    assert torch.equal(out_a.logits, out_b.logits)
    out_a.loss.backward()
    out_b.loss.backward()
    for ra, rb in zip(M.hf_routers(model), M.hf_routers(clone)):
        assert ra.weight.grad is not None and ra.weight.grad.abs().sum() > 0
        assert torch.equal(ra.weight.grad, rb.weight.grad)
    handle.detach()
    model.zero_grad()
    handle = attach(model, controller=M.FixedFields(L, M.E, bias_LE=_big_bias(L)))
    model(x, labels=x).loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in M.hf_routers(model))
    handle.detach()


# ------------------------------------------------------------------------------------------------
# Detach
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_detach_restores_the_model_exactly(arch):
    model = M.make_hf(arch)
    L = _n_routers(model)
    x = M.tokens()
    ref = model(x, output_router_logits=True)       # also installs transformers' capture hooks
    hooks_before = M.all_hooks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach(model, controller=M.FixedFields(L, M.E, bias_LE=_big_bias(L)),
                    optimizer=opt)
    assert M.all_hooks(model) != hooks_before
    assert not torch.equal(model(x, output_router_logits=True).logits, ref.logits)
    handle.detach()
    assert M.all_hooks(model) == hooks_before
    assert not opt._optimizer_step_pre_hooks
    out = model(x, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    for a, b in zip(out.router_logits, ref.router_logits):
        assert torch.equal(a, b)
    assert not handle.attached
    handle.detach()                                  # idempotent
    # A detached model can be attached again.
    attach(model).detach()


# ------------------------------------------------------------------------------------------------
# Ticks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_one_tick_per_optimizer_step_under_gradient_accumulation(arch):
    """4 micro-batches per step, 3 steps: 3 ticks, and the controller equals one fed the whole
    batch per step (lr = 0 keeps the routers fixed so both see the same routing)."""
    accum, steps, B = 4, 3, 2
    model = M.make_hf(arch)
    full = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt_full = torch.optim.SGD(full.parameters(), lr=0.0)
    h = attach(model, optimizer=opt)
    h_full = attach(full, optimizer=opt_full)
    for step in range(steps):
        batch = M.tokens(B * accum, seed=step)
        for mb in batch.split(B):
            (model(mb, labels=mb).loss / accum).backward()
            assert h.controller.num_ticks == step
        opt.step()
        opt.zero_grad()
        full(batch, labels=batch).loss.backward()
        opt_full.step()
        opt_full.zero_grad()
    assert h.ticks == steps and h.controller.num_ticks == steps
    assert int(h.controller.tick_counter) == steps
    a, b = h.controller.state_dict(), h_full.controller.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    h.detach()
    h_full.detach()


def test_without_optimizer_the_user_ticks():
    model = M.make_hf("mixtral")
    h = attach(model)
    for _ in range(3):
        model(M.tokens())
    assert h.controller.num_ticks == 0
    assert _counts(h).sum() == 3 * M.tokens().numel() * M.K * h.num_layers
    h.tick()
    assert h.controller.num_ticks == 1 and h.ticks == 1
    assert h.observation_buffer.abs().sum() == 0
    h.detach()


# ------------------------------------------------------------------------------------------------
# Observation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", M.ARCHS)
def test_observation_counts_and_weights_match_the_routing(arch):
    model = M.make_hf(arch)
    L = _n_routers(model)
    handle = attach(model, controller=M.FixedFields(L, M.E), record_routing=True)
    x = M.tokens()
    model(x)
    rec = handle.routing_output()
    acc = handle.observation_buffer
    for i in range(L):
        idx = rec.expert_indices[i].reshape(-1)
        w = rec.gate_weights[i].reshape(-1).float()
        assert torch.equal(acc[i, :M.E], torch.bincount(idx, minlength=M.E).float())
        torch.testing.assert_close(acc[i, M.E:2 * M.E], torch.zeros(M.E).index_add_(0, idx, w))
    handle.detach()


def test_padding_is_not_observed():
    model = M.make_hf("mixtral")
    handle = attach(model, controller=M.FixedFields(2, M.E))
    x = M.tokens(B=2, S=8)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    mask[1, 7:] = 0
    model(x, attention_mask=mask)
    want = torch.full((2,), float(mask.sum() * M.K))
    assert torch.equal(_counts(handle).sum(-1), want)
    assert torch.equal(handle.observation_buffer[:, 2 * M.E + 1], want / M.K)   # tokens
    model(x, mask)                                 # positional, as forward(input_ids, mask)
    assert torch.equal(_counts(handle).sum(-1), 2 * want)
    handle.detach()


def test_eval_mode_is_not_observed_but_is_routed():
    model = M.make_hf("mixtral")
    handle = attach(model, controller=M.FixedFields(2, M.E, bias_LE=_big_bias(2)),
                    record_routing=True)
    model.eval()
    with torch.no_grad():
        model(M.tokens())
    assert handle.observation_buffer.abs().sum() == 0
    assert (handle.routing_output().expert_indices[0] == M.E - 1).any(-1).all()
    handle.detach()


def test_activation_checkpointing_does_not_observe_twice():
    model = M.make_hf("mixtral")
    model.activation_checkpointing_enable()
    handle = attach(model, controller=M.FixedFields(2, M.E))
    x = M.tokens()
    model(x, labels=x).loss.backward()
    assert torch.equal(_counts(handle).sum(-1), torch.full((2,), float(x.numel() * M.K)))
    assert M.hf_routers(model)[0].weight.grad.abs().sum() > 0
    handle.detach()


# ------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------
def _train_ticks(model, handle, seeds):
    for s in seeds:
        x = M.tokens(seed=s)
        model(x, labels=x)
        handle.tick()


def test_state_dict_round_trip_through_checkpoint_io(tmp_path):
    cfg = ControllerConfig(micro_period=1, macro_period=2)
    a = M.make_hf("qwen2_moe")
    b = M.make_hf("qwen2_moe")
    ha, hb = attach(a, cfg, seed=5), attach(b, cfg, seed=5)
    _train_ticks(a, ha, range(6))
    ha.save(tmp_path / "ctl")
    hb.load(tmp_path / "ctl")
    _assert_states_equal(_state(ha), _state(hb))
    assert hb.ticks == 6 and hb.controller.num_ticks == 6
    # Both go on identically.
    _train_ticks(a, ha, range(6, 9))
    _train_ticks(b, hb, range(6, 9))
    _assert_states_equal(_state(ha), _state(hb))
    # The plain tree works with save_state/load_state too.
    save_state(tmp_path / "tree", ha.state_dict(), kind="attach")
    hb.load_state_dict(load_state(tmp_path / "tree"))
    _assert_states_equal(_state(ha), _state(hb))


def test_load_state_dict_refuses_another_model(tmp_path):
    ha = attach(M.make_hf("mixtral"))
    hq = attach(M.make_hf("qwen2_moe"))        # 2 routers, different module paths
    with pytest.raises(AttachError, match="routers"):
        hq.load_state_dict(ha.state_dict())
    hm = attach(M.make_hf("mixtral", num_local_experts=8), num_experts=8)
    with pytest.raises(AttachError, match=r"\(2, 4\).*\(2, 8\)"):
        hm.load_state_dict(ha.state_dict())


# ------------------------------------------------------------------------------------------------
# Errors leave the model untouched
# ------------------------------------------------------------------------------------------------
def test_no_recognised_router():
    import transformers as tf
    dense = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2))
    for model in (dense, torch.nn.Sequential(torch.nn.Linear(4, 4))):
        before = M.all_hooks(model)
        with pytest.raises(AttachError, match="no supported router") as ei:
            attach(model)
        assert "MixtralTopKRouter" in str(ei.value) and "routers=" in str(ei.value)
        assert M.all_hooks(model) == before


def test_expert_count_mismatch():
    model = M.make_hf("mixtral")
    before = M.all_hooks(model)
    with pytest.raises(AttachError, match=r"expected 8 experts.*'model.layers.0.mlp.gate': 4"):
        attach(model, num_experts=8)
    assert M.all_hooks(model) == before
    with pytest.raises(AttachError, match=r"\(layers, experts\)=\(2, 8\).*\(2, 4\)"):
        attach(model, controller=PxTController(2, 8))
    assert M.all_hooks(model) == before
    hand = M.HandLM()
    hand.blocks[1].router = torch.nn.Linear(16, 3, bias=False)
    before = M.all_hooks(hand)
    with pytest.raises(AttachError, match=r"expected 4 experts.*'blocks.1.router': 3"):
        attach(hand, routers=hand.routers(), top_k=M.K)
    assert M.all_hooks(hand) == before


def test_attaching_twice():
    model = M.make_hf("olmoe")
    first = attach(model)
    hooks = M.all_hooks(model)
    with pytest.raises(AttachError, match="already attached"):
        attach(model)
    with pytest.raises(AttachError, match="already attached"):
        attach(model, routers=M.hf_routers(model)[:1])
    assert M.all_hooks(model) == hooks
    model(M.tokens())
    assert _counts(first).sum() > 0
    first.detach()
    attach(model).detach()


def test_optimizer_without_step_hooks_is_refused():
    class Wrapper:                        # a wrapper that skipped torch.optim.Optimizer.__init__
        def step(self):
            pass

    model = M.make_hf("mixtral")
    before = M.all_hooks(model)
    with pytest.raises(AttachError, match="step-hook"):
        attach(model, optimizer=Wrapper())
    assert M.all_hooks(model) == before
    attach(model).detach()                # nothing was left registered


def test_routers_must_belong_to_the_model():
    model = M.make_hf("mixtral")
    with pytest.raises(AttachError, match="not a submodule"):
        attach(model, routers=[torch.nn.Linear(4, 4)])


def test_find_routers_names_layers_in_order():
    names = [n for n, _ in find_routers(M.make_hf("qwen2_moe"))]
    assert names == ["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]


# ------------------------------------------------------------------------------------------------
# The generic path: a hand-written MoE
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tuple_router", [False, True])
def test_generic_router_routing_observation_gradient_and_detach(tuple_router):
    model = M.HandLM(tuple_router=tuple_router)
    x = M.tokens()
    ref = model(x)
    ref_idx = [b.last_idx_NK.clone() for b in model.blocks]
    before = M.all_hooks(model)
    handle = attach(model, routers=model.routers(),
                    controller=M.FixedFields(2, M.E, bias_LE=_big_bias(2, experts=(1,))),
                    top_k=None if tuple_router else M.K)
    out = model(x)
    assert not torch.equal(out, ref)
    for i, blk in enumerate(model.blocks):
        assert not torch.equal(blk.last_idx_NK, ref_idx[i])
        assert (blk.last_idx_NK == 1).any(-1).all()
        # Observed = what the block actually selected.
        assert torch.equal(_counts(handle)[i],
                           torch.bincount(blk.last_idx_NK.reshape(-1), minlength=M.E).float())
    M.lm_loss(out, x).backward()
    for r in model.routers():
        w = r.proj.weight if tuple_router else r.weight
        assert w.grad is not None and w.grad.abs().sum() > 0
    handle.detach()
    assert M.all_hooks(model) == before
    assert torch.equal(model(x), ref)


def test_generic_logits_router_needs_top_k():
    model = M.HandLM()
    with pytest.raises(AttachError, match="top-k.*top_k="):
        attach(model, routers=model.routers())
    assert attach(model, routers=model.routers(), top_k=M.K).num_layers == 2


def test_gated_optimizer_sees_r_after_this_steps_tick():
    from chronomoe_torch.optim import CoherenceGatedOptimizer, coherence_gate_tensor
    model = M.make_hf("mixtral")
    handle = attach(model, ControllerConfig(micro_period=1))
    gated = CoherenceGatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                    handle.controller, gating_strength=0.9)
    handle.register_optimizer(gated)
    for s in range(3):
        x = M.tokens(seed=s)
        r_before = handle.controller.coherence()
        model(x, labels=x).loss.backward()
        gated.step()
        gated.zero_grad()
        assert handle.controller.num_ticks == s + 1
        assert not torch.equal(handle.controller.coherence(), r_before)
        assert torch.equal(gated.last_gate_value,
                           coherence_gate_tensor(handle.controller.coherence(), 0.2, 0.9))
    handle.detach()
    assert not gated._optimizer_step_pre_hooks


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_bfloat16_model(arch, monkeypatch):
    """bf16 logits: the score is computed in float32, the logits stay the router's, the gates
    keep each family's dtype; identity fields still reproduce the model exactly."""
    monkeypatch.setattr(routing_mod, "FAST_CPU_SOFTMAX_BELOW", 0)
    model = M.make_hf(arch).to(torch.bfloat16)
    x = M.tokens()
    ref = model(x, output_router_logits=True)
    handle = attach(model, controller=M.FixedFields(2, M.E), record_routing=True)
    out = model(x, output_router_logits=True)
    assert torch.equal(out.logits, ref.logits)
    rec = handle.routing_output()
    assert rec.router_logits[0].dtype == torch.bfloat16
    want = torch.float32 if arch == "mixtral" else torch.bfloat16
    assert rec.gate_weights[0].dtype == want
    handle.detach()


# ------------------------------------------------------------------------------------------------
# Issue 11: the README's import, and a model left in eval mode
# ------------------------------------------------------------------------------------------------
def test_package_attach_is_the_function_even_after_the_submodule_import():
    """``from chronomoe_torch import attach`` is the function, also when something imported
    the submodule ``chronomoe_torch.attach`` first (before: the submodule import rebound the
    package attribute, and the README's ``attach(model, ...)`` failed with "'module' object is
    not callable"). Run in a fresh interpreter: this process has imported both already.
    Catches: dropping the eager ``from .attach import ... attach`` in the package __init__."""
    import subprocess
    import sys
    code = ("import chronomoe_torch.attach, chronomoe_torch.hf_callback\n"
            "from chronomoe_torch import attach, AttachHandle\n"
            "import chronomoe_torch as ct\n"
            "assert callable(attach) and attach.__name__ == 'attach', attach\n"
            "assert ct.attach is attach and AttachHandle.__name__ == 'AttachHandle'\n"
            "from chronomoe_torch.attach import AttachError\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_stepping_with_a_model_in_eval_mode_warns_once_naming_model_train():
    """from_pretrained returns eval mode: routers run, nothing is observed, and the controller
    would tick on zeros silently. The first such optimizer step warns (naming model.train());
    later ones do not repeat it; a model in training mode never warns."""
    model = M.make_hf("mixtral").eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = attach(model, optimizer=opt)
    x = M.tokens()
    model(x, labels=x).loss.backward()
    with pytest.warns(UserWarning, match=r"model\.train\(\)") as rec:
        opt.step()
    assert "eval mode" in str(rec[0].message)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, labels=x).loss.backward()
        opt.step()                                   # once only
        handle.detach()
        model2 = M.make_hf("mixtral")                 # train mode: observed, no warning
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.0)
        h2 = attach(model2, optimizer=opt2)
        model2(x, labels=x).loss.backward()
        opt2.step()
        h2.detach()


def test_attach_adds_no_host_sync():
    """A training step of an attached model (routing with noise, observation, the tick in the
    optimizer's pre-hook, routing stats on) makes exactly the host syncs of the same step
    unattached (transformers' experts loop syncs on its own). Catches a sync on the attach
    path, e.g. ``handle._observed = bool(row.sum() > 0)`` in the router hook."""
    from _sync import SyncCounter

    def count(attached: bool) -> int:
        model = M.make_hf("mixtral")
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        handle = None
        if attached:
            handle = attach(model, ControllerConfig(micro_period=1, macro_period=2),
                            optimizer=opt)
            handle.routing_stats.start()
        x = M.tokens()
        model(x, labels=x).loss.backward()             # warm-up (lazy state, hooks)
        opt.step()
        opt.zero_grad()
        with SyncCounter() as c:
            for s in range(3):
                model(x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad()
        if handle is not None:
            assert handle.ticks == 4
            handle.detach()
        return c.count

    assert count(True) == count(False)
