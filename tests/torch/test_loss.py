"""ChronoMoELoss: known answers for each term, a router gradient from each auxiliary term alone,
modes, the controller's loss feed, and no host sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chronomoe_dyn import ControllerConfig
from chronomoe_dyn.landscape import landscape
from chronomoe_torch.controller import PxTController
from chronomoe_torch.loss import (ChronoMoELoss, LossOutput, causal_lm_token_loss,
                                  unhealthy_valley_mask)
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig, MoECausalLMOutput
from _sync import SyncCounter

V, B, S, L, E, K = 48, 2, 10, 2, 4, 2


def tiny_model(enable_chronovisor: bool = True) -> ChronovisorMixtralForCausalLM:
    cfg = MixtralConfig(vocab_size=V, hidden_dim=32, num_layers=L, num_experts=E, num_heads=4,
                        num_kv_heads=2, top_k=K, max_seq_length=16,
                        enable_chronovisor=enable_chronovisor)
    return ChronovisorMixtralForCausalLM(cfg)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def with_unhealthy_valley(ctrl: PxTController, layer: int = 0, expert: int = 1) -> None:
    """T̄_local of ``layer`` gets a deep valley at ``expert`` whose reliability is 0.1."""
    with torch.no_grad():
        ctrl.Tbar_local_LE[layer] = 1.0
        ctrl.Tbar_local_LE[layer, expert] = 0.5
        ctrl.reliability_LE[layer, expert] = 0.1


def router_grads(model) -> list[torch.Tensor]:
    return [layer.moe.router.weight.grad for layer in model.layers]


# --- L_lm -------------------------------------------------------------------------------------

def test_lm_term_is_shifted_cross_entropy_with_ignore_and_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=g)
    labels = ids()
    labels[1, 3] = -100
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 7:] = 0
    tok, valid = causal_lm_token_loss(logits, labels, mask)
    target = labels[:, 1:].clone()
    target[0, 6:] = -100                         # positions whose next token is padding
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), target.reshape(-1), ignore_index=-100,
                          reduction="none").view(B, S - 1)
    torch.testing.assert_close(tok[:, :-1], ref)
    assert (tok[:, -1] == 0).all() and valid[:, -1].sum() == 0
    assert valid.sum() == (target != -100).sum()


# --- L_balance --------------------------------------------------------------------------------

def fake_output(router_logits, expert_indices) -> MoECausalLMOutput:
    logits = torch.zeros(1, router_logits[0].shape[0], V)
    return MoECausalLMOutput(logits=logits, router_logits=tuple(router_logits),
                             expert_indices=tuple(expert_indices),
                             gate_weights=tuple(torch.ones_like(i, dtype=torch.float32) / K
                                                for i in expert_indices))


def test_balance_known_answers():
    N = 8
    # Uniform probabilities and perfectly even slots: E·Σ (1/E)(1/E) = 1.
    idx = torch.arange(N * K).remainder(E).view(N, K)
    out = fake_output([torch.zeros(N, E)], [idx])
    lo = ChronoMoELoss()(out, torch.zeros(1, N, dtype=torch.long))
    torch.testing.assert_close(lo.balance, torch.tensor(1.0))
    # Everything on expert 0 with its probability → 1: E·(f_0 = 1/K... ) by hand.
    logits = torch.full((N, E), -30.0)
    logits[:, 0] = 30.0
    idx = torch.stack([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)], -1)
    lo = ChronoMoELoss()(fake_output([logits], [idx]), torch.zeros(1, N, dtype=torch.long))
    # f = [1/2, 1/2, 0, 0], p̄ ≈ [1, 0, 0, 0] → E·1/2 = 2.
    torch.testing.assert_close(lo.balance, torch.tensor(2.0))


def test_balance_matches_the_switch_formula_on_a_model():
    model = tiny_model(enable_chronovisor=False)
    out = model(ids())
    lo = ChronoMoELoss()(out, ids())
    vals = []
    for rl, idx in zip(out.router_logits, out.expert_indices):
        f = torch.bincount(idx.reshape(-1), minlength=E).float() / idx.numel()
        vals.append(E * (f * rl.softmax(-1).mean(0)).sum())
    torch.testing.assert_close(lo.balance, torch.stack(vals).mean())


def test_z_loss_known_answer():
    N = 4
    logits = torch.zeros(N, E)
    out = fake_output([logits], [torch.zeros(N, K, dtype=torch.long)])
    lo = ChronoMoELoss(lambda_z=1.0)(out, torch.zeros(1, N, dtype=torch.long))
    torch.testing.assert_close(lo.z, torch.tensor(math.log(E) ** 2))


def test_router_probs_are_reused_and_z_is_skipped_when_its_weight_is_zero():
    """With ``router_probs`` on the output the routing terms use them (not a softmax of the
    logits), and with λ_z = 0 the logits are not read at all: NaN logits change nothing."""
    N = 8
    idx = torch.arange(N * K).remainder(E).view(N, K)          # even slots: f_e = 1/E
    probs = torch.zeros(N, E)
    probs[:, 0] = 1.0                                           # p̄ = [1, 0, 0, 0]
    out = fake_output([torch.full((N, E), math.nan)], [idx])
    out.router_probs = (probs,)
    labels = torch.zeros(1, N, dtype=torch.long)
    lo = ChronoMoELoss()(out, labels)                           # λ_z = 0 by default
    torch.testing.assert_close(lo.balance, torch.tensor(1.0))   # E·(1/E)·1, from the probs
    assert lo.z == 0 and torch.isfinite(lo.total)
    assert torch.isnan(ChronoMoELoss(lambda_z=1e-3)(out, labels).z)   # computed when weighted


def test_model_router_probs_give_the_recomputed_softmax_loss():
    model = tiny_model()
    with_unhealthy_valley(model.controller)
    out = model.train()(ids())
    assert out.router_probs is not None
    loss = ChronoMoELoss(lambda_z=1e-3)
    a = loss(out, ids(), model.controller, observe=False)
    out.router_probs = None                                     # the fallback path
    b = loss(out, ids(), model.controller, observe=False)
    for k, v in a.as_dict().items():
        torch.testing.assert_close(v, b.as_dict()[k], msg=k)


@pytest.mark.parametrize("masked", [False, True])
def test_loss_under_bf16_autocast_is_the_float32_loss(masked):
    """Called inside ``torch.autocast`` (bf16) the loss runs (it used to fail in the balance
    term's scatter), every term is float32 and equal to the loss outside autocast, and each
    auxiliary term still reaches the routers."""
    model = tiny_model()
    with_unhealthy_valley(model.controller)
    mask = torch.ones(B, S, dtype=torch.long)
    if masked:
        mask[1, 6:] = 0
    kw = dict(lambda_z=1e-3, lambda_coherence=1.0, lambda_valley=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.train()(ids(), attention_mask=mask)
        assert out.logits.dtype == torch.bfloat16
        lo = ChronoMoELoss(**kw)(out, ids(), model.controller, attention_mask=mask,
                                 observe=False)
    ref = ChronoMoELoss(**kw)(out, ids(), model.controller, attention_mask=mask, observe=False)
    for k, v in lo.as_dict().items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert torch.equal(v, ref.as_dict()[k]), k
    assert lo.coherence > 0 and lo.valley > 0 and lo.z > 0
    (lo.balance + lo.coherence + lo.valley + lo.z).backward()
    for g in router_grads(model):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# --- gradients from each auxiliary term alone ---------------------------------------------------

@pytest.mark.parametrize("term", ["balance", "coherence", "valley", "z"])
def test_each_auxiliary_term_alone_reaches_the_router_weights(term):
    model = tiny_model()
    with_unhealthy_valley(model.controller, layer=0, expert=1)
    with_unhealthy_valley(model.controller, layer=1, expert=2)
    weights = dict(lambda_lm=0.0, lambda_balance=0.0, lambda_coherence=0.0, lambda_valley=0.0,
                   lambda_z=0.0)
    weights[f"lambda_{term}"] = 1.0
    out = model.train()(ids())
    lo = ChronoMoELoss(**weights)(out, ids(), model.controller)
    assert getattr(lo, term).requires_grad
    torch.testing.assert_close(lo.total, getattr(lo, term))
    lo.total.backward()
    for g in router_grads(model):
        assert g is not None and g.abs().sum() > 0
    # Only the routers and what feeds them get a gradient: the last layer's experts feed no
    # router, so the term alone leaves them without one.
    assert model.layers[-1].moe.w_down_EIH.grad is None


def test_lm_term_alone_does_not_reach_the_valley_or_coherence_paths():
    """The LM term's gradient does not pass through the coherence or valley paths: with
    λ_c = λ_v = λ_b = 0 the parameter gradients equal those of the plain LM loss bit for bit,
    and they do not move when the controller's state makes those paths large (R = 0, usage far
    from the batch, an unhealthy valley on every layer). The paths are live all the while
    (coherence and valley are non-zero and carry a router gradient of their own).
    Catches an LM term wired into those paths, even without changing its value: e.g.
    ``terms = [(self.lambda_lm, lm + valley - valley.detach()), ...]`` (or the same with
    ``coherence``) in ``ChronoMoELoss._terms``; the old test, which compared values only,
    passed on that mutation."""
    def grads(model, loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]

    model = tiny_model().eval()               # eval: no routing noise, the fields still apply
    ctrl = model.controller
    x = ids()
    lm_only = ChronoMoELoss(lambda_balance=0.0, lambda_coherence=0.0, lambda_valley=0.0)
    tok, valid = causal_lm_token_loss(model(x).logits, x)
    plain = grads(model, tok.sum() / valid.sum())
    first = grads(model, lm_only(model(x), x, ctrl).total)
    with torch.no_grad():                     # make both paths large
        ctrl.R.fill_(0.0)
        ctrl.usage_LE.copy_(torch.tensor([0.7, 0.1, 0.1, 0.1]).repeat(L, 1))
    for layer in range(L):
        with_unhealthy_valley(ctrl, layer=layer, expert=0)
    lo = lm_only(model(x), x, ctrl)
    assert lo.coherence > 0 and lo.valley > 0 and torch.equal(lo.total, lo.lm)
    second = grads(model, lo.total)
    for a, b, c in zip(plain, first, second):
        assert (a is None) == (b is None) == (c is None)
        if a is not None:
            assert torch.equal(a, b) and torch.equal(b, c)
    # The paths carry gradient when weighted: the test above is not vacuous.
    paths = grads(model, ChronoMoELoss(lambda_lm=0.0, lambda_balance=0.0)(model(x), x, ctrl)
                  .total)
    assert any(g is not None and g.abs().sum() > 0 for g in paths[-1:] + router_grads(model))


# --- coherence and valley ---------------------------------------------------------------------

def test_coherence_is_one_minus_R_weighted_drift_from_usage():
    model = tiny_model()
    ctrl = model.controller
    out = model(ids())
    lo = ChronoMoELoss()(out, ids(), ctrl)
    pbar = torch.stack([rl.softmax(-1).mean(0) for rl in out.router_logits])
    drift = (E * (pbar - ctrl.usage_LE.float())).pow(2).mean()
    torch.testing.assert_close(lo.coherence, (1 - ctrl.coherence().float()) * drift)
    with torch.no_grad():
        ctrl.R.fill_(1.0)
    assert ChronoMoELoss()(out, ids(), ctrl).coherence == 0
    with torch.no_grad():                    # usage equal to the batch distribution → 0
        ctrl.R.fill_(0.2)
        ctrl.usage_LE.copy_(pbar)
    torch.testing.assert_close(ChronoMoELoss()(out, ids(), ctrl).coherence, torch.tensor(0.0))


def test_valley_is_probability_mass_on_unhealthy_valleys():
    model = tiny_model()
    ctrl = model.controller
    out = model(ids())
    assert ChronoMoELoss()(out, ids(), ctrl).valley == 0     # fresh: flat landscape
    with_unhealthy_valley(ctrl, layer=1, expert=3)
    lo = ChronoMoELoss()(out, ids(), ctrl)
    p = out.router_logits[1].softmax(-1).mean(0)[3]
    torch.testing.assert_close(lo.valley, p / L)
    with torch.no_grad():                                     # a healthy valley: no penalty
        ctrl.reliability_LE[1, 3] = 0.9
    assert ChronoMoELoss()(out, ids(), ctrl).valley == 0


def test_valley_mask_matches_the_reference_landscape():
    """One rule for the valley mask (``chronomoe_dyn.landscape.landscape_masks``), including the
    v2 flat threshold: a layer whose T̄ differs only by rounding (variance ≤ 1e-12) has no
    valleys. Catches the torch mask without ``var > FLAT_VARIANCE`` (it then marks the
    rounding dips of a nearly flat layer as valleys)."""
    cfg = ControllerConfig()
    rng = np.random.default_rng(0)
    for _ in range(20):
        tbar = rng.uniform(0.5, 1.5, size=(3, 6))
        tbar[0] = 1.0                                         # a flat layer: no valleys
        tbar[2] = 1.0 + rng.uniform(-1e-9, 1e-9, 6)           # nearly flat: rounding only
        rel = rng.uniform(0.0, 0.6, size=(3, 6))
        mask = unhealthy_valley_mask(torch.tensor(tbar), torch.tensor(rel),
                                     cfg.landscape_threshold_std, cfg.unhealthy_reliability)
        for l in range(3):
            valleys = landscape(tbar[l], cfg.landscape_threshold_std).valleys
            want = [e for e in valleys if rel[l, e] < cfg.unhealthy_reliability]
            assert torch.nonzero(mask[l]).flatten().tolist() == want


# --- modes ------------------------------------------------------------------------------------

def test_modes_select_the_terms():
    model = tiny_model()
    with_unhealthy_valley(model.controller)
    out = model(ids())
    kw = dict(lambda_z=0.1)
    chrono = ChronoMoELoss(**kw)(out, ids(), model.controller)
    switch = ChronoMoELoss(mode="switch", **kw)(out, ids(), model.controller)
    free = ChronoMoELoss(mode="aux_free", **kw)(out, ids(), model.controller)
    assert chrono.coherence > 0 and chrono.valley > 0
    torch.testing.assert_close(switch.total, switch.lm + 0.01 * switch.balance + 0.1 * switch.z)
    assert switch.coherence == 0 and switch.valley == 0
    torch.testing.assert_close(free.total, free.lm + 0.1 * free.z)
    assert not free.balance.requires_grad
    torch.testing.assert_close(free.balance, chrono.balance.detach())


def test_without_controller_the_controller_terms_are_zero():
    model = tiny_model(enable_chronovisor=False)
    lo = ChronoMoELoss()(model(ids()), ids())
    assert lo.coherence == 0 and lo.valley == 0
    torch.testing.assert_close(lo.total, lo.lm + 0.01 * lo.balance)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ChronoMoELoss(mode="gshard")
    for name in ("lambda_balance", "lambda_coherence", "lambda_valley", "lambda_z", "lambda_lm"):
        with pytest.raises(ValueError, match=name):
            ChronoMoELoss(**{name: -1.0})
    with pytest.raises(ValueError, match="labels"):
        ChronoMoELoss()(tiny_model(False)(ids()), ids()[:, :5])


# --- controller loss feed, attention mask, syncs -------------------------------------------------

class LossRecorder:
    def __init__(self, ctrl):
        self.ctrl, self.calls = ctrl, []

    def __getattr__(self, name):
        return getattr(self.ctrl, name)

    def observe_loss_all(self, loss_LE):
        self.calls += [(layer, row.clone()) for layer, row in enumerate(loss_LE)]
        self.ctrl.observe_loss_all(loss_LE)


def test_per_expert_loss_sums_reach_the_controller():
    model = tiny_model()
    out = model(ids())
    rec = LossRecorder(model.controller)
    ChronoMoELoss()(out, ids(), rec)
    assert [c[0] for c in rec.calls] == list(range(L))
    tok, _ = causal_lm_token_loss(out.logits, ids())
    tok = tok.reshape(-1)
    for (layer, got), idx in zip(rec.calls, out.expert_indices):
        assert not got.requires_grad
        want = torch.zeros(E)
        for n in range(idx.shape[0]):
            for k in range(K):
                want[idx[n, k]] += tok[n]
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got.sum(), K * tok.sum())
    rec.calls.clear()
    ChronoMoELoss()(out, ids(), rec, observe=False)
    assert rec.calls == []


def test_attention_mask_weights_the_routing_terms():
    model = tiny_model(enable_chronovisor=False)
    x = ids()
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    out = model(x, attention_mask=mask)
    lo = ChronoMoELoss()(out, x, attention_mask=mask)
    keep = mask.reshape(-1).bool()
    vals = []
    for rl, idx in zip(out.router_logits, out.expert_indices):
        f = torch.bincount(idx[keep].reshape(-1), minlength=E).float() / idx[keep].numel()
        vals.append(E * (f * rl[keep].softmax(-1).mean(0)).sum())
    torch.testing.assert_close(lo.balance, torch.stack(vals).mean())




def test_loss_returns_tensors_without_host_sync():
    model = tiny_model()
    with_unhealthy_valley(model.controller)
    out = model.train()(ids())
    with SyncCounter() as sc:
        lo = ChronoMoELoss(lambda_z=1e-3)(out, ids(), model.controller,
                                          attention_mask=torch.ones(B, S))
        lo.total.backward()
    assert sc.count == 0
    assert isinstance(lo, LossOutput)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in lo.as_dict().values())


def test_a_training_step_ticks_the_real_controller():
    model = tiny_model().train()
    ctrl = model.controller
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctrl.register_on(opt)
    loss_fn = ChronoMoELoss()
    for _ in range(3):
        out = model(ids())
        lo = loss_fn(out, ids(), ctrl)
        opt.zero_grad()
        lo.total.backward()
        opt.step()
    assert ctrl.num_ticks == 3
    assert torch.isfinite(ctrl.usage_LE).all() and ctrl.skipped_ticks == 0
    assert not torch.allclose(ctrl.reliability_LE, torch.full((L, E), 0.5))
