"""Sparse Mixture-of-Experts layer: a top-k router and SwiGLU experts dispatched by expert.

Routing (per token x, router weight W_r [E, H]): the raw logits z = W_r x (float32) go through
``routing.route``, the one v2 routing rule (docs/CONTRACTS.md "Version 2 contracts"): with the
P×T controller's fields the selection is the top-k of (z − mean z)/σ_L/T + b + τ·g (Gumbel noise
g in training), without them (``controller_fields=False`` or no controller) the plain top-k of z;
the gates are always the raw softmax(z) over the selected experts, renormalised (Mixtral) or not.
The controller moves the choice, never the mixture weights; the gradient flows through z.
Experts (SwiGLU): f_e(x) = (silu(x W_g[e]) ⊙ (x W_u[e])) W_d[e];  y = Σ_{k} g_k f_{e_k}(x).

Dispatch is sparse: the N·K routed slots are sorted by expert id, so each expert's tokens form a
contiguous slice; each expert runs on its own slice only (one `torch._grouped_mm` call per
projection where the backend has one, else a Python loop over experts), outputs are scaled by
their gates and summed back into token order with `index_add_`. Never every expert on every token
and never an [N, E, H] tensor: the largest activations are [N·K, I].

Host syncs: the grouped path is sync-free (offsets come from `searchsorted` on device). The loop
fallback must know each expert's slice length on the host (`counts.tolist()`), one sync per layer;
it is used where `_grouped_mm` is unavailable: float64, CUDA below sm90 or not bf16, strides not
16-byte aligned.

Auxiliary-loss-free balancing (DeepSeek-V3): each router keeps a bias b_free [E] used only in the
top-k selection (see ``routing``), and a load accumulator of the top-k slots it routed (training
mode) since the last update; `Router.update_aux_free_bias(u, valid)` applies
b_free += u·sign(mean(load) − load) (only where the 0-d bool `valid` is True, if given) and clears
the accumulator, once per optimizer step (an optimizer step hook, ``register_aux_free_hook`` of
the model), on device, without sync.

Shape legend: N tokens, E experts, K top-k, H hidden, I intermediate, M = N·K routed slots.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .routing import LayerFields, NoiseKey, RoutingStats, in_backward, route

__all__ = ["RouterOutput", "Router", "SparseMoE", "grouped_mm_available", "EXPERT_BACKENDS"]

EXPERT_BACKENDS = ("auto", "grouped_mm", "loop")
_GROUPED_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RouterOutput(NamedTuple):
    logits_NE: torch.Tensor
    """Raw router logits z = W_r x, float32, differentiable into the router weight."""
    probs_NE: torch.Tensor
    """softmax(z) (float32, differentiable): the Switch loss's router probabilities."""
    expert_idx_NK: torch.Tensor
    """Selected experts (int64), in descending score order."""
    gate_NK: torch.Tensor
    """Gate weights of the selected experts from softmax(z) (float32; renormalised if asked)."""
    stats_F: torch.Tensor
    """[3E + 4] detached routing stats of this call (``routing`` module docstring)."""


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_available(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether ``torch._grouped_mm`` can run the experts on this device in this dtype.

    CUDA: the CUTLASS kernel, sm90+ and bf16 only. CPU: torch's reference kernel (float32, bf16,
    fp16). Every row stride (the ``dims``: H and I) must be a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ok = dtype == torch.bfloat16 and _cuda_capability(index) >= (9, 0)
    elif device.type == "cpu":
        ok = dtype in _GROUPED_CPU_DTYPES
    else:
        ok = False
    return ok and all((d * dtype.itemsize) % 16 == 0 for d in dims)


class Router(nn.Module):
    """Linear top-k router: the v2 routing rule (``routing.route``) and an aux-free bias."""

    def __init__(self, hidden_dim: int, num_experts: int, top_k: int,
                 renormalize: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_dim))  # W_r [E, H]
        # Auxiliary-loss-free balancing: kept in checkpoints; the load accumulator is transient.
        self.register_buffer("aux_free_bias_E", torch.zeros(num_experts), persistent=True)
        self.register_buffer("load_E", torch.zeros(num_experts), persistent=False)

    def forward(self, x_NH: torch.Tensor, fields: LayerFields | None = None,
                noise: NoiseKey | None = None, valid_N: torch.Tensor | None = None,
                full_stats: bool = False) -> RouterOutput:
        """``fields``: the controller's ``LayerFields`` (None: plain top-k of z); ``noise``: the
        Gumbel key (training only). The aux-free bias (zero unless updated) joins the
        selection."""
        # The router runs in float32 even under autocast: bf16 logits flip near-tied top-k
        # choices and the controller's bias is below bf16 resolution at |z| ~ 10.
        with torch.autocast(x_NH.device.type, enabled=False):
            z_NE = F.linear(x_NH.float(), self.weight.float())
            r = route(z_NE, self.top_k, fields=fields, renormalize=self.renormalize,
                      aux_free_bias_E=self.aux_free_bias_E,
                      training=self.training, valid_N=valid_N, noise=noise,
                      want_probs=True, full_stats=full_stats)
        return RouterOutput(z_NE, r.probs_NE, r.expert_idx_NK, r.gate_NK, r.stats_F)

    @torch.no_grad()
    def update_aux_free_bias(self, rate: float, valid: torch.Tensor | None = None) -> None:
        """b_free += rate·sign(mean(load) − load) on the loads since the last call; clears them.
        No routed tokens since the last call leaves the bias unchanged (sign(0) = 0).

        ``valid`` (0-d bool tensor, optional): where False the bias keeps its value bit for bit
        (a skipped optimizer step), chosen with ``torch.where``, without a host sync. The loads
        are cleared either way: they belong to the step just taken or skipped."""
        step_E = torch.sign(self.load_E.mean() - self.load_E)
        if valid is None:
            self.aux_free_bias_E.add_(step_E, alpha=rate)
        else:
            new_E = torch.add(self.aux_free_bias_E, step_E, alpha=rate)  # same rounding as add_
            torch.where(valid.to(new_E.device), new_E, self.aux_free_bias_E,
                        out=self.aux_free_bias_E)
        self.load_E.zero_()


def _swiglu_grouped(x_MH: torch.Tensor, w_gate_EHI: torch.Tensor, w_up_EHI: torch.Tensor,
                    w_down_EIH: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """All experts in three grouped GEMMs; ``offs_E`` (int32) ends each expert's slice."""
    h_MI = F.silu(torch._grouped_mm(x_MH, w_gate_EHI, offs=offs_E)) \
        * torch._grouped_mm(x_MH, w_up_EHI, offs=offs_E)
    return torch._grouped_mm(h_MI, w_down_EIH, offs=offs_E)


def _swiglu_loop(x_MH: torch.Tensor, w_gate_EHI: torch.Tensor, w_up_EHI: torch.Tensor,
                 w_down_EIH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One expert at a time on its own contiguous slice. Needs the slice lengths on the host:
    ``tolist()`` is a device sync on CUDA (the reason the grouped path is preferred)."""
    outs = []
    for e, x_CH in enumerate(torch.split(x_MH, counts_E.tolist())):
        if x_CH.shape[0] == 0:
            continue
        h_CI = F.silu(x_CH @ w_gate_EHI[e]) * (x_CH @ w_up_EHI[e])
        outs.append(h_CI @ w_down_EIH[e])
    if not outs:  # no tokens at all
        return x_MH.new_zeros(0, w_down_EIH.shape[-1])
    return torch.cat(outs, dim=0)


class SparseMoE(nn.Module):
    """Router + E SwiGLU experts with stacked weights ([E, H, I], [E, H, I], [E, I, H])."""

    def __init__(self, hidden_dim: int, intermediate_dim: int, num_experts: int, top_k: int,
                 renormalize: bool = True, backend: str = "auto") -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed values are {EXPERT_BACKENDS}")
        self.hidden_dim, self.intermediate_dim = hidden_dim, intermediate_dim
        self.num_experts, self.top_k, self.backend = num_experts, top_k, backend
        self.router = Router(hidden_dim, num_experts, top_k, renormalize)
        self.w_gate_EHI = nn.Parameter(torch.empty(num_experts, hidden_dim, intermediate_dim))
        self.w_up_EHI = nn.Parameter(torch.empty(num_experts, hidden_dim, intermediate_dim))
        self.w_down_EIH = nn.Parameter(torch.empty(num_experts, intermediate_dim, hidden_dim))

    def _use_grouped(self, device: torch.device, dtype: torch.dtype) -> bool:
        if self.backend == "loop":
            return False
        ok = grouped_mm_available(device, dtype, self.hidden_dim, self.intermediate_dim)
        if self.backend == "grouped_mm" and not ok:
            raise RuntimeError(f"SparseMoE backend='grouped_mm' is not available on {device} in "
                               f"{dtype} with H={self.hidden_dim}, I={self.intermediate_dim}")
        return ok

    def forward(self, x_NH: torch.Tensor, controller=None, layer: int = 0,
                valid_N: torch.Tensor | None = None, controller_fields: bool = True,
                stats: RoutingStats | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """Route, run each expert on its tokens, combine. ``controller`` (optional) supplies
        ``layer_fields(layer)`` and ``noise_key(layer, N)`` (unless ``controller_fields`` is False:
        then routing is the plain top-k of z) and, in training mode, receives the routing stats
        (``observe_stats``); ``valid_N`` (bool, optional) marks the tokens the stats include
        (padding excluded); ``stats`` (optional) accumulates them for the run metrics while
        enabled. Returns the output [N, H] and the router's output."""
        N, H = x_NH.shape
        E, K = self.num_experts, self.top_k
        fields = noise = None
        if controller is not None and controller_fields:
            fields = controller.layer_fields(layer)
            if self.training:
                noise = controller.noise_key(layer, N)
        full = stats is not None and stats.enabled
        r = self.router(x_NH, fields, noise, valid_N, full_stats=full)

        # Sort the N·K slots by expert: expert e's slots are sorted positions [ends[e-1], ends[e]).
        expert_M = r.expert_idx_NK.reshape(-1)
        expert_sorted_M, order_M = torch.sort(expert_M, stable=True)
        token_M = order_M // K                                   # source token of each slot
        ends_E = torch.searchsorted(expert_sorted_M, torch.arange(E, device=x_NH.device),
                                    right=True)                  # on device: no host sync

        compute_dtype = (torch.get_autocast_dtype(x_NH.device.type)
                         if torch.is_autocast_enabled(x_NH.device.type) else x_NH.dtype)
        x_MH = x_NH[token_M]
        if self._use_grouped(x_NH.device, compute_dtype):
            w = [p.to(compute_dtype) for p in (self.w_gate_EHI, self.w_up_EHI, self.w_down_EIH)]
            y_MH = _swiglu_grouped(x_MH.to(compute_dtype), *w, ends_E.to(torch.int32))
        else:
            counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
            y_MH = _swiglu_loop(x_MH, self.w_gate_EHI, self.w_up_EHI, self.w_down_EIH, counts_E)

        gate_M = r.gate_NK.reshape(-1)[order_M]
        yw_MH = y_MH * gate_M.unsqueeze(-1)                      # float32 (gates are float32)
        out_NH = yw_MH.new_zeros(N, H).index_add_(0, token_M, yw_MH)

        if in_backward():
            # An activation-checkpoint recompute repeats a forward already counted.
            return out_NH.to(x_NH.dtype), r
        if self.training:
            self.router.load_E.add_(r.stats_F[:E])       # the routed counts (the real load)
            if controller is not None:
                controller.observe_stats(layer, r.stats_F)
        if full:
            stats.add(layer, r.stats_F)
        return out_NH.to(x_NH.dtype), r
