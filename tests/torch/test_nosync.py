"""No host–device sync from the controller and the gating in a training step, nor from
``attach()``; and the guard sees the syncs of the MoE's "loop" expert backend.

``_sync.SyncGuard`` records every call that would make the host wait for device data (its lists
and one test per entry: test_sync_guard.py). The wrapped AdamW itself reads its step count with
``.item()`` on CPU (torch's non-capturable path), so counting pauses inside it, using the wrapped
optimizer's own step hooks; with SGD and with fused AdamW (the gate's "lr" path) nothing is
paused at all.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chronomoe_dyn import ControllerConfig
from chronomoe_torch.controller import PxTController
from chronomoe_torch.optim import CoherenceGatedOptimizer
from chronomoe_torch.routing import route
from _sync import SyncCounter, SyncGuard





class TinyMoE(nn.Module):
    """One-file MoE of L layers routed by ``routing.route`` with the controller's fields and
    Gumbel noise (the real sparse model lives elsewhere), a dense expert mix; the routing stats
    go to the controller with ``observe_stats`` (no sync)."""

    def __init__(self, controller: PxTController, dim: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.controller = controller
        L, E = controller.num_layers, controller.num_experts
        self.top_k = top_k
        self.routers = nn.ModuleList(nn.Linear(dim, E, bias=False) for _ in range(L))
        self.experts = nn.ModuleList(nn.Linear(dim, dim * E) for _ in range(L))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        idx_per_layer = []
        ctrl = self.controller
        for li, (router, experts) in enumerate(zip(self.routers, self.experts)):
            z = router(x)
            r = route(z, self.top_k, fields=ctrl.layer_fields(li), training=self.training,
                      noise=ctrl.noise_key(li, z.shape[0]) if self.training else None, full_stats=True)
            idx, w = r.expert_idx_NK, r.gate_NK
            E = z.shape[-1]
            gates = torch.zeros_like(z).scatter(-1, idx, w)                   # [N, E]
            out = experts(x).view(x.shape[0], E, -1)                           # [N, E, D]
            x = x + (gates.unsqueeze(-1) * out).sum(1)
            if self.training:
                ctrl.observe_stats(li, r.stats_F)
            idx_per_layer.append(idx)
        return self.head(x), idx_per_layer


def _train_steps(model, gated, steps: int, counter: SyncCounter, micro_batches: int = 2):
    g = torch.Generator().manual_seed(0)
    ctrl = model.controller
    for s in range(steps):
        for _ in range(micro_batches):
            x = torch.randn(16, 8, generator=g)
            y = torch.randint(0, 4, (16,), generator=g)
            logits, idx_per_layer = model(x)
            tok_loss = nn.functional.cross_entropy(logits, y, reduction="none")       # [N]
            for li, idx in enumerate(idx_per_layer):
                loss_E = torch.zeros(ctrl.num_experts).scatter_add_(
                    0, idx.flatten(), tok_loss.detach().repeat_interleave(idx.shape[1],
                                                                          output_size=idx.numel()))
                ctrl.observe_loss(li, loss_E)
            tok_loss.mean().backward()
        gated.step()                      # controller.tick() runs in its step pre-hook
        gated.zero_grad()
        ctrl.set_knob(torch.tensor(0.5 - 0.1 * s))
        ctrl.coherence()
        ctrl.get_coherence_history()


def test_counter_sees_syncs():
    """The counter is not vacuous: .item(), bool() and float() are counted."""
    t = torch.tensor([1.0, 2.0])
    with SyncCounter() as c:
        t.sum().item()
        bool(t[0] > 0)
        float(t[1])
    assert len(c.syncs) == 3


@pytest.mark.parametrize("inner_name,strength", [("sgd", 0.5), ("adamw", 0.5), ("adamw", 1.0),
                                                 ("adamw_fused", 0.5), ("adamw_fused", 1.0)])
def test_training_step_has_no_sync(inner_name, strength):
    ctrl = PxTController(2, 4, ControllerConfig(phase_noise=0.1, kappa_smoothing=0.5))
    model = TinyMoE(ctrl)
    if inner_name == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=inner_name == "adamw_fused")
    gated = CoherenceGatedOptimizer(inner, ctrl, min_coherence=0.2, gating_strength=strength)
    assert gated.gate_via == ("lr" if inner_name == "adamw_fused" else "snapshot")
    ctrl.register_on(gated)
    counter = SyncCounter()
    if inner_name == "adamw":
        inner.register_step_pre_hook(lambda *a: setattr(counter, "paused", True))
        inner.register_step_post_hook(lambda *a: setattr(counter, "paused", False))
    # With gating_strength 1 the step that creates optimizer state reads the gate once
    # (documented); warm up past it before counting.
    _train_steps(model, gated, 1, SyncCounter())
    with counter:
        _train_steps(model, gated, 20, counter)       # past micro and macro ticks
    assert counter.syncs == [], f"host syncs: {counter.syncs}"
    assert ctrl.num_ticks == 21 and not counter.paused


@pytest.mark.parametrize("full_stats", [False, True])
def test_noiseless_counts_and_their_tick_check_add_no_sync(full_stats):
    """Law v2.1: the noiseless top-k of every noisy router call (with and without the run
    metrics' ``full_stats``), its counts in the observation and the tick's comparison of the
    noiseless and routed totals (a bad-observation flag on the device) make no host sync."""
    E, N = 8, 256
    ctrl = PxTController(2, E, ControllerConfig(exploration_tau0=0.5, micro_period=1))
    z = torch.randn(N, E, generator=torch.Generator().manual_seed(0)) * 2.0

    def step():
        rows = []
        for li in range(2):
            r = route(z, 2, fields=ctrl.layer_fields(li), training=True,
                      noise=ctrl.noise_key(li, N), full_stats=full_stats)
            ctrl.observe_stats(li, r.stats_F)
            rows.append(r.stats_F)
        ctrl.tick()
        return rows

    step()                                            # warm-up outside the counter
    with SyncCounter() as c:
        rows = [step() for _ in range(6)]
    assert c.syncs == [], c.report()
    assert any(not torch.equal(r[:E], r[2 * E + 2:3 * E + 2]) for rs in rows for r in rs)
    assert int(ctrl.skipped_ticks) == 0 and ctrl.num_ticks == 7


def test_adamw_syncs_are_only_inside_the_wrapped_step():
    """Control: without pausing, the syncs seen are AdamW's own (same count as plain AdamW)."""
    def count(gated_or_plain):
        torch.manual_seed(0)
        ctrl = PxTController(2, 4)
        model = TinyMoE(ctrl)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt = CoherenceGatedOptimizer(inner, ctrl) if gated_or_plain else inner
        ctrl.register_on(opt)
        _train_steps(model, opt, 1, SyncCounter())
        with SyncCounter() as c:
            _train_steps(model, opt, 3, c)
        return len(c.syncs)

    plain, gated = count(False), count(True)
    assert plain == gated


def test_first_step_with_full_strength_reads_the_gate_once():
    ctrl = PxTController(2, 4)
    model = TinyMoE(ctrl)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gated = CoherenceGatedOptimizer(inner, ctrl, gating_strength=1.0)
    ctrl.register_on(gated)
    with SyncCounter() as c:
        _train_steps(model, gated, 1, c)
    assert c.syncs == ["__bool__"], c.report()


# ----------------------------------------------------------------------------------------
# the MoE's "loop" backend syncs, and the guard sees it; attach() does not sync
# ----------------------------------------------------------------------------------------
def _tiny_lm(backend: str):
    from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
    torch.manual_seed(0)
    return ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=32, hidden_dim=16, num_layers=2, num_experts=4, num_heads=2, num_kv_heads=1,
        top_k=2, max_seq_length=16, expert_backend=backend)).train()


def test_the_guard_sees_the_loop_backends_syncs():
    """``expert_backend="loop"`` needs each expert's slice length on the host: one
    ``counts.tolist()`` per MoE layer and forward (``moe._swiglu_loop``). The old guard (aten
    ops only) reported 0 here. Mutation caught: "tolist" dropped from ``SYNC_METHODS``."""
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    for backend, want in (("loop", ["tolist", "tolist"]), ("grouped_mm", [])):
        model = _tiny_lm(backend)
        with SyncGuard() as g:
            model(x, labels=x).loss.backward()
        assert g.syncs == want, g.report()
        assert all(w.startswith("moe.py:") for w in g.where), g.report()


def _attach_steps(model, handle, opt, steps: int, guard) -> None:
    import _attach_models as M
    for s in range(steps):
        x = M.tokens(seed=10 + s)
        M.lm_loss(model(x) if not hasattr(model, "config") else model(x).logits, x).backward()
        opt.step()                       # the handle's tick runs in its step pre-hook
        opt.zero_grad()
        handle.controller.set_knob(torch.tensor(0.3 - 0.1 * s))


@pytest.mark.parametrize("kind", ["hand", "mixtral"])
def test_attach_adds_no_host_sync(kind):
    """attach(): the routing hooks in the forward, their backward, the observation flush and
    the tick in the optimizer's step pre-hook make no host sync (past micro and macro ticks).
    The hand-written MoE syncs nowhere; transformers' Mixtral loops over the experts it hit
    (its own syncs), so there no sync may come from chronomoe_torch. Re-run on the v2 attach
    after the merge."""
    import _attach_models as M
    from chronomoe_torch.attach import attach
    if kind == "hand":
        model = M.HandLM()
        kw = dict(routers=model.routers(), top_k=M.K)
    else:
        pytest.importorskip("transformers")
        model = M.make_hf("mixtral")
        kw = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    handle = attach(model, ControllerConfig(phase_noise=0.1, kappa_smoothing=0.5), optimizer=opt,
                    **kw)
    _attach_steps(model, handle, opt, 1, None)        # warm-up outside the guard
    with SyncGuard() as g:
        _attach_steps(model, handle, opt, 12, g)
    ours = [f"{n} at {w}" for n, w, f in zip(g.syncs, g.where, g.files)
            if "chronomoe_torch" in f or f.endswith(("_attach_models.py", "test_nosync.py"))]
    assert ours == [], g.report()
    if kind == "hand":
        assert g.syncs == [], g.report()
    assert handle.controller.num_ticks == 13
