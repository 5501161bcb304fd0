"""Sparse MoE layer: routing equations, sparse dispatch, aux-free bias, controller feed, syncs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from chronomoe_torch.moe import Router, SparseMoE, grouped_mm_available
from chronomoe_torch.routing import LayerFields
from _sync import SyncCounter

N, H, I, E, K = 48, 16, 32, 8, 2


def make_moe(backend: str = "auto", renormalize: bool = True, seed: int = 0,
             dtype=torch.float32, **kw) -> SparseMoE:
    moe = SparseMoE(H, I, E, K, renormalize=renormalize, backend=backend, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe.to(dtype)


def make_x(seed: int = 1, n: int = N, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class FieldsController:
    """Supplies fixed v2 fields (bias, temperature, scale σ, τ = 0: no noise) and records the
    observed stats rows as (layer, counts, gate sums)."""

    def __init__(self, bias_E=None, temperature_E=None, scale=1.0):
        self.fields = LayerFields(torch.zeros(E) if bias_E is None else bias_E,
                                  torch.ones(E) if temperature_E is None else temperature_E,
                                  torch.tensor(float(scale)), torch.tensor(0.0))
        self.observed = []

    def layer_fields(self, i):
        return self.fields

    def noise_key(self, i, n):
        return None

    def observe_stats(self, layer, stats_F):
        self.observed.append((layer, stats_F[:E].clone(), stats_F[E:2 * E].clone()))


def reference_moe(moe: SparseMoE, x_NH: torch.Tensor, bias_E=None, temperature_E=None,
                  scale: float = 1.0):
    """Token by token, the v2 rule: select the top-k of ((z − mean z)/σ)/T + b, gates from the
    raw softmax(z) (renormalised over the selected or not), SwiGLU of each chosen expert.
    Written independently of the module's dispatch."""
    W = moe.router.weight
    out = torch.zeros_like(x_NH)
    for n in range(x_NH.shape[0]):
        logits = W @ x_NH[n]
        score = logits
        if bias_E is not None:
            score = (logits - logits.mean()) / scale / temperature_E + bias_E
        p = logits.softmax(-1)
        top = torch.topk(score, K).indices
        g = p[top] / p[top].sum() if moe.router.renormalize else p[top]
        for k in range(K):
            e = top[k]
            h = F.silu(x_NH[n] @ moe.w_gate_EHI[e]) * (x_NH[n] @ moe.w_up_EHI[e])
            out[n] += g[k] * (h @ moe.w_down_EIH[e])
    return out


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_token_by_token_reference(backend, renormalize):
    moe = make_moe(backend, renormalize)
    x = make_x()
    bias = torch.linspace(-0.5, 0.5, E)
    temp = torch.linspace(0.5, 2.0, E)
    ctrl = FieldsController(bias, temp, scale=0.7)
    y, r = moe.eval()(x, ctrl)
    ref = reference_moe(moe, x, bias, temp, scale=0.7)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # The router's logits output is the raw z: the fields move the selection only.
    torch.testing.assert_close(r.logits_NE, x @ moe.router.weight.T)
    assert not torch.equal(r.expert_idx_NK, r.logits_NE.topk(K).indices)


def test_grouped_and_loop_agree_in_values_and_gradients():
    x1 = make_x().requires_grad_()
    x2 = make_x().requires_grad_()
    a, b = make_moe("grouped_mm"), make_moe("loop")
    ya, _ = a(x1)
    yb, _ = b(x2)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(5))
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None and pa.grad.abs().sum() > 0, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_backward_accepts_an_expanded_output_gradient():
    # y.sum() hands backward a stride-0 gradient; _grouped_mm's backward rejects those, so the
    # layer must never feed it one directly.
    moe = make_moe("grouped_mm")
    y, _ = moe(make_x())
    y.sum().backward()
    assert moe.w_gate_EHI.grad.abs().sum() > 0


def test_expert_flops_are_sparse():
    # Loop path: the FLOP counter sees every matmul; only N·K token-expert pairs are computed.
    moe = make_moe("loop")
    with FlopCounterMode(display=False) as fc:
        moe(make_x())
    router = 2 * N * H * E
    experts = 2 * N * K * 3 * H * I
    assert fc.get_total_flops() == router + experts


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.grouped_rows, self.max_numel = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._grouped_mm.default:
            a, b = args[0], args[1]
            # The jagged (token) dimension: rows of A against a stacked [E, ., .] weight; the
            # shared inner dimension for the 2D × 2D weight gradient.
            self.grouped_rows.append(a.shape[0] if b.dim() == 3 else a.shape[1])
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_grouped_path_is_sparse_and_never_dense():
    moe = make_moe("grouped_mm")
    x = make_x().requires_grad_()
    with ShapeRecorder() as rec:
        y, _ = moe(x)
        y.sum().backward()
    assert rec.grouped_rows and all(rows == N * K for rows in rec.grouped_rows)
    # Largest tensors: the stacked weights [E, H, I] and the [N·K, I] activations; never
    # [N, E, H] or [N, E, I].
    assert rec.max_numel == max(E * H * I, N * K * I)
    assert rec.max_numel < N * E * I


def test_bias_and_temperature_steer_the_selection_not_the_gates():
    moe = make_moe()
    bias = torch.zeros(E)
    bias[3] = 100.0
    _, r = moe.eval()(make_x(), FieldsController(bias_E=bias))
    assert (r.expert_idx_NK[:, 0] == 3).all()
    p = r.probs_NE.gather(-1, r.expert_idx_NK)
    torch.testing.assert_close(r.gate_NK, p / p.sum(-1, keepdim=True))   # raw-logit gates
    # A huge temperature flattens z̃/T: the (small) bias alone decides the selection.
    ramp = torch.linspace(0.0, 0.07, E)
    _, r = moe(make_x(), FieldsController(bias_E=ramp, temperature_E=torch.full((E,), 1e6)))
    assert (r.expert_idx_NK == torch.tensor([E - 1, E - 2])).all()


def test_gates_are_renormalised_probabilities():
    moe = make_moe()
    _, r = moe(make_x())
    torch.testing.assert_close(r.gate_NK.sum(-1), torch.ones(N))
    moe_raw = make_moe(renormalize=False)
    _, r = moe_raw(make_x())
    torch.testing.assert_close(r.gate_NK, r.probs_NE.gather(-1, r.expert_idx_NK))
    assert (r.gate_NK.sum(-1) < 1).all()


def test_aux_free_bias_moves_selection_not_gates():
    moe = make_moe().eval()
    x = make_x()
    _, r0 = moe(x)
    moe.router.aux_free_bias_E[5] = 10.0
    _, r1 = moe(x)
    assert (r1.expert_idx_NK[:, 0] == 5).all()
    torch.testing.assert_close(r1.logits_NE, r0.logits_NE)   # the logits are untouched
    p = r1.probs_NE.gather(-1, r1.expert_idx_NK)
    torch.testing.assert_close(r1.gate_NK, p / p.sum(-1, keepdim=True))


def test_aux_free_update_rule_and_accumulation():
    moe = make_moe()
    router = moe.router
    moe.eval()(make_x())
    assert router.load_E.sum() == 0          # eval mode accumulates nothing
    moe.train()
    _, r1 = moe(make_x(1))
    _, r2 = moe(make_x(2))
    idx = torch.cat([r1.expert_idx_NK, r2.expert_idx_NK]).reshape(-1)
    load = torch.bincount(idx, minlength=E).float()
    torch.testing.assert_close(router.load_E, load)
    router.update_aux_free_bias(1e-3)
    torch.testing.assert_close(router.aux_free_bias_E, 1e-3 * torch.sign(load.mean() - load))
    assert router.load_E.sum() == 0
    before = router.aux_free_bias_E.clone()
    router.update_aux_free_bias(1e-3)        # nothing routed since: no change
    torch.testing.assert_close(router.aux_free_bias_E, before, rtol=0, atol=0)
    assert "aux_free_bias_E" in router.state_dict() and "load_E" not in router.state_dict()


def test_aux_free_update_with_valid_flag_and_no_sync():
    moe = make_moe().train()
    router = moe.router
    moe(make_x(1))
    load = router.load_E.clone()
    before = router.aux_free_bias_E.clone()
    with SyncCounter() as sc:
        router.update_aux_free_bias(1e-3, valid=torch.tensor(False))
    assert sc.count == 0
    assert torch.equal(router.aux_free_bias_E, before) and router.load_E.sum() == 0
    moe(make_x(1))
    assert torch.equal(router.load_E, load)
    router.update_aux_free_bias(1e-3, valid=torch.tensor(True))
    torch.testing.assert_close(router.aux_free_bias_E, 1e-3 * torch.sign(load.mean() - load),
                               rtol=0, atol=0)


def test_controller_observes_in_training_only():
    moe = make_moe()
    ctrl = FieldsController()
    moe.eval()(make_x(), ctrl)
    assert ctrl.observed == []
    _, r = moe.train()(make_x(), ctrl, layer=4)
    (layer, counts, wsum), = ctrl.observed
    assert layer == 4 and not counts.requires_grad and not wsum.requires_grad
    torch.testing.assert_close(counts, torch.bincount(r.expert_idx_NK.reshape(-1),
                                                      minlength=E).float())
    ref = torch.zeros(E).index_add_(0, r.expert_idx_NK.reshape(-1),
                                    r.gate_NK.detach().reshape(-1))
    torch.testing.assert_close(wsum, ref)
    assert counts.sum() == N * K


def test_observations_exclude_invalid_tokens():
    moe = make_moe()
    ctrl = FieldsController()
    valid = torch.arange(N) % 3 != 0
    _, r = moe.train()(make_x(), ctrl, valid_N=valid)
    _, counts, _ = ctrl.observed[0]
    ref = torch.bincount(r.expert_idx_NK[valid].reshape(-1), minlength=E).float()
    torch.testing.assert_close(counts, ref)
    torch.testing.assert_close(moe.router.load_E, ref)




def test_grouped_path_has_no_host_sync():
    moe = make_moe("grouped_mm").train()
    ctrl = FieldsController()
    with SyncCounter() as sc:
        y, _ = moe(make_x(), ctrl)
        y.sum().backward()
        moe.router.update_aux_free_bias(1e-3)
    assert sc.count == 0


def test_grouped_mm_availability():
    cpu = torch.device("cpu")
    assert grouped_mm_available(cpu, torch.float32, 16, 32)
    assert grouped_mm_available(cpu, torch.bfloat16, 16, 32)
    assert not grouped_mm_available(cpu, torch.float64, 16, 32)
    assert not grouped_mm_available(cpu, torch.bfloat16, 12, 32)   # 24-byte rows
    with pytest.raises(RuntimeError, match="grouped_mm"):
        make_moe("grouped_mm", dtype=torch.float64)(make_x(dtype=torch.float64))
    y, _ = make_moe("auto", dtype=torch.float64)(make_x(dtype=torch.float64))  # falls back
    assert y.dtype == torch.float64
    with pytest.raises(ValueError, match="backend"):
        SparseMoE(H, I, E, K, backend="dense")


def test_bf16_autocast_close_to_float32():
    moe = make_moe()
    x = make_x()
    y32, r32 = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, r16 = moe(x)
    assert y16.dtype == torch.float32 and r16.logits_NE.dtype == torch.float32
    torch.testing.assert_close(r16.logits_NE, r32.logits_NE)  # the router stays in float32
    err = (y16 - y32).abs().max() / y32.abs().max()
    assert err < 2e-2
    y16.sum().backward()
    assert torch.isfinite(moe.w_up_EHI.grad).all()


def test_empty_and_single_token_batches():
    moe = make_moe()
    y, r = moe(make_x(n=1))
    torch.testing.assert_close(y, reference_moe(moe, make_x(n=1)), rtol=1e-5, atol=1e-5)
    y, r = make_moe("loop")(make_x(n=0))
    assert y.shape == (0, H)


def test_router_state():
    r = Router(H, E, K)
    assert r.weight.shape == (E, H)
    assert set(r.state_dict()) == {"weight", "aux_free_bias_E"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu_reference():
    moe = make_moe()
    x = make_x()
    ref, _ = moe(x)
    moe_cuda = make_moe().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, r = moe_cuda(x.cuda())
    y.sum().backward()
    err = (y.float().cpu() - ref).abs().max() / ref.abs().max()
    assert err < 3e-2
    assert torch.isfinite(moe_cuda.w_gate_EHI.grad).all()
