"""The routing rule of controller law v2, once, for every torch path (the native ``moe.Router``
and ``attach()``'s router hooks); docs/CONTRACTS.md "Version 2 contracts", DESIGN.md §3 step 8.

Per token with raw router logits z [E] and the layer's fields (bias b, temperature T, scale σ, τ):

    m = Σ_e z_e / E;   z̃ = (z − m) / σ;   s = z̃ / T + b          (this order of ops)
    score = s + τ·g,   g = −log(−log u) standard Gumbel           (training only)
    selected = top-k of score (+ the aux-free bias, if any, see below)
    gates = the model's own gate rule on softmax(z): renormalised over the selected experts
            (Mixtral) or not (Qwen2-MoE default), cast to ``gate_dtype`` (HF Qwen/OLMoE cast
            back to the logits' dtype). The controller moves the choice, never the weights.
    explored = selected experts not in the top-k of s (the noiseless score)

Without fields (``fields=None``: ``controller_fields=False`` or no controller) the selection is
the plain top-k of z: no centring, no temperature, no noise. The gradient flows through z only
(gates and the returned probabilities); the score is computed without autograd.

Auxiliary-loss-free bias (DeepSeek-V3), when given: it moves the selection only. Without fields
it is added to the probabilities softmax(z), DeepSeek-V3's affinity units (the aux-free baseline
as it has always been measured); with fields it is added to the score (and to the noiseless s that
defines "explored"). Its sign-rate update adapts to either scale.

Noise: g is the Gumbel draw of the call's ``NoiseKey`` (``_noise``: a pure function of (seed,
tick, layer, token position), so exact resume, gradient accumulation, activation-checkpoint
recompute and data-parallel ranks need no generator state).

Per call the function also returns a detached row ``stats_F`` [3E + 4] (float32, or float64 for a
float64 z), on device and without a host sync:
    [0, E)          counts: top-k slots per expert (padding excluded), the routed choice
    [E, 2E)         gate-weight sums per expert
    2E              Σ over tokens of the population std across experts of z (for σ_L)
    2E + 1          tokens (non-padding)
    [2E + 2, 3E + 2) noiseless counts c°: top-k slots per expert of the noiseless score (s, plus
                    the aux-free bias if any; z without fields), over the same tokens with the
                    same weights as counts: the router's choice before the exploration noise
                    (law v2.1, docs/CONTRACTS.md). Equal to counts without noise (eval mode,
                    τ = 0, no fields). Filled on every call (the controller reads it each tick).
    3E + 2          explored slots               (only with ``full_stats``; else 0)
    3E + 3          Σ over tokens of the entropy (nats) of softmax(s) with fields, softmax(z)
                    without                      (only with ``full_stats``; else 0)
The first ``obs_width(E)`` = 3E + 2 entries are the controller's per-layer observation (its
usage reads c°, its reliability the routed counts); the rest feed the run metrics
(``RoutingStats``), which read the routed counts (the load the experts really got).

Shape legend: N tokens, E experts, K top-k, L layers, F a stats row (3E + 4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._noise import NoiseKey, gumbel_from_uniform, gumbel_NE, in_backward

__all__ = ["LayerFields", "NoiseKey", "Routing", "route", "gumbel_NE", "gumbel_from_uniform",
           "obs_width", "stats_width", "stats_experts", "stats_row", "explored_slots",
           "RoutingStats",
           "in_backward", "FAST_CPU_SOFTMAX_BELOW"]

# On CPU, torch's last-dim softmax kernel is not vectorised for rows shorter than this: for E = 8
# it is ~6x slower than the same function taken another way. Below it, when the full probability
# table is not wanted, renormalised gates are taken as the softmax over the k selected logits
# (p_i / Σ_sel p_j = e^{z_i} / Σ_sel e^{z_j}: the same function, equal to float32 rounding, not
# bit for bit). 0 disables it.
FAST_CPU_SOFTMAX_BELOW = 16


def obs_width(E: int) -> int:
    """Entries of a stats row the controller observes: counts, gate sums, std sum, tokens,
    noiseless counts (3E + 2)."""
    return 3 * E + 2


def stats_width(E: int) -> int:
    """Entries of a full stats row (the controller's part + explored slots + entropy sum)."""
    return 3 * E + 4


def stats_experts(F: int) -> int:
    """E of a stats row of ``F`` = ``stats_width(E)`` entries."""
    E, rem = divmod(int(F) - 4, 3)
    if rem or E < 1:
        raise ValueError(f"a stats row has 3E + 4 entries (E >= 1), got {F}")
    return E


class LayerFields(NamedTuple):
    """One layer's routing fields (``PxTController.layer_fields``), device tensors."""
    bias_E: torch.Tensor
    """[E] bias b, in units of z̃."""
    temperature_E: torch.Tensor
    """[E] temperature T (> 0)."""
    scale: torch.Tensor
    """0-d σ_L, floored at ``logit_scale_floor`` (> 0)."""
    tau: torch.Tensor
    """0-d Gumbel noise scale τ = τ₀·e^{β_τ κ} (≥ 0)."""
    inv_scale_temperature_E: torch.Tensor | None = None
    """[E] 1/(σ·T), if precomputed (the controller does, at each refresh): then
    s = z̃·(1/(σ·T)) + b in one fused op, equal to the contract's (z − m)/σ/T + b to rounding;
    without it the contract's order of operations."""


class Routing(NamedTuple):
    expert_idx_NK: torch.Tensor
    """Selected experts (int64), in descending score order."""
    gate_NK: torch.Tensor
    """Gate weights from the raw logits (the model's rule), differentiable into z."""
    probs_NE: torch.Tensor | None
    """softmax(z) in float32 (differentiable; for the Switch loss), or None if not asked."""
    stats_F: torch.Tensor
    """[3E + 4] detached per-call accumulations (module docstring)."""
    explored_NK: torch.Tensor | None = None
    """bool, the slot's expert is not in the noiseless top-k (with ``full_stats`` and noise;
    None otherwise)."""


def _fast_cpu(z_NE: torch.Tensor) -> bool:
    return z_NE.device.type == "cpu" and z_NE.shape[-1] < FAST_CPU_SOFTMAX_BELOW


def route(z_NE: torch.Tensor, top_k: int, *, fields: LayerFields | None = None,
          renormalize: bool = True, gate_dtype: torch.dtype | None = None,
          aux_free_bias_E: torch.Tensor | None = None, training: bool = False,
          valid_N: torch.Tensor | None = None, noise: NoiseKey | torch.Tensor | None = None,
          want_probs: bool = True, full_stats: bool = False) -> Routing:
    """Route N tokens from their raw logits ``z_NE`` (any float dtype; computed in float32, or
    float64 for a float64 z). See the module docstring for the rule.

    Args:
        top_k: K experts per token.
        fields: the layer's ``LayerFields``; None routes by the plain top-k of z.
        renormalize: renormalise the gates over the selected experts.
        gate_dtype: dtype of the returned gates (default: the compute dtype).
        aux_free_bias_E: [E] aux-free balancing bias (selection only), or None.
        training: noise is drawn only in training (and only with fields).
        valid_N: [N] bool/float mask of the tokens that count in ``stats_F`` (padding: 0).
        noise: a ``NoiseKey``, or an [N, E] tensor of uniforms u in (0, 1) (tests: the same
            uniforms as the NumPy reference), or None for no noise.
        want_probs: also return softmax(z) (float32, differentiable).
        full_stats: also fill the explored-slot and entropy entries of ``stats_F``.
    """
    N, E = z_NE.shape
    K = int(top_k)
    cdt = torch.float64 if z_NE.dtype == torch.float64 else torch.float32
    x_NE = z_NE if z_NE.dtype == cdt else z_NE.to(cdt)
    probs_NE = F.softmax(x_NE, dim=-1) if want_probs else None
    noisy = fields is not None and training and noise is not None

    # Few ops on purpose: this runs for every layer of every forward, and at these sizes each
    # op costs its dispatch more than its arithmetic.
    with torch.no_grad():
        xd_NE = x_NE                    # no graph is recorded in here: no detach needed
        # Centred logits: the std for σ_L and (with fields) z̃'s numerator. ‖z − m‖/√E, not
        # torch.std: a last-dim std of E ~ 8 columns is a slow kernel on CPU (~20x here).
        c_NE = xd_NE - xd_NE.mean(dim=-1, keepdim=True)
        std_N = torch.linalg.vector_norm(c_NE, dim=-1) * E ** -0.5
        s_NE = None
        if fields is None:
            sel_NE = xd_NE
            if aux_free_bias_E is not None:
                p_NE = probs_NE.detach() if probs_NE is not None else F.softmax(xd_NE, dim=-1)
                sel_NE = p_NE + aux_free_bias_E
            clean_NE = sel_NE
        else:
            inv_E = fields.inv_scale_temperature_E
            if inv_E is not None and cdt == torch.float32:
                s_NE = torch.addcmul(fields.bias_E, c_NE, inv_E)
            else:
                s_NE = (c_NE / fields.scale.to(cdt)) / fields.temperature_E.to(cdt) \
                    + fields.bias_E.to(cdt)
            clean_NE = s_NE if aux_free_bias_E is None else s_NE + aux_free_bias_E
            sel_NE = clean_NE
            if noisy:
                if isinstance(noise, torch.Tensor):          # given uniforms (float64)
                    g_NE = gumbel_from_uniform(noise.to(torch.float64)).to(cdt)
                elif noise.gumbel_NE is not None:            # drawn for every layer at once
                    g_NE = noise.gumbel_NE
                else:
                    g_NE = gumbel_NE(noise, N, E, z_NE.device)
                sel_NE = torch.addcmul(clean_NE, fields.tau.to(cdt), g_NE.to(cdt))
        idx_NK = sel_NE.topk(K, dim=-1).indices
        # The router's choice before the noise (law v2.1): the controller's noiseless counts,
        # and what "explored" is measured against. Without noise it is the selection itself.
        clean_NK = clean_NE.topk(K, dim=-1).indices if noisy else idx_NK

    # Gates from the raw logits, with autograd.
    if probs_NE is None and renormalize and _fast_cpu(x_NE):
        gate_NK = F.softmax(x_NE.gather(-1, idx_NK), dim=-1)
    else:
        p_NE = probs_NE if probs_NE is not None else F.softmax(x_NE, dim=-1)
        gate_NK = p_NE.gather(-1, idx_NK)
        if renormalize:
            gate_NK = gate_NK / gate_NK.sum(dim=-1, keepdim=True)
    if gate_dtype is not None and gate_NK.dtype != gate_dtype:
        gate_NK = gate_NK.to(gate_dtype)

    explored_NK = explored_slots(idx_NK, clean_NE, clean_NK) if full_stats and noisy else None
    stats_F = stats_row(idx_NK, gate_NK, xd_NE, valid_N, full=full_stats,
                        std_N=std_N, explored_NK=explored_NK,
                        entropy_of_NE=xd_NE if s_NE is None else s_NE, noiseless_NK=clean_NK)
    return Routing(idx_NK, gate_NK, probs_NE, stats_F, explored_NK)


@torch.no_grad()
def explored_slots(idx_NK: torch.Tensor, clean_NE: torch.Tensor,
                   clean_NK: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] bool: the selected expert is not in the top-k of the noiseless score ``clean_NE``
    (``clean_NK``: that top-k, if already taken)."""
    if clean_NK is None:
        clean_NK = clean_NE.topk(idx_NK.shape[1], dim=-1).indices
    in_clean_NE = torch.zeros_like(clean_NE, dtype=torch.bool).scatter_(1, clean_NK, True)
    return ~in_clean_NE.gather(1, idx_NK)


_CONSTS: dict = {}


def _const(kind: str, n, like: torch.Tensor) -> torch.Tensor:
    """Cached constant tensors (no allocation per router call; never written), of ``like``'s
    dtype and device: "ones" [n], "zeros" [n], "value" (0-d n), or "offsets" for n = (N, K, E):
    the index offsets of ``stats_row``'s pieces, M = N·K entries 0, M entries 2E + 2, M entries
    E, N entries 2E, N entries 2E + 1."""
    key = (kind, n, like.device, like.dtype)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 256:
            _CONSTS.clear()
        kw = {"dtype": like.dtype, "device": like.device}
        if kind == "ones":
            t = torch.ones(n, **kw)
        elif kind == "zeros":
            t = torch.zeros(n, **kw)
        elif kind == "value":
            t = torch.full((), float(n), **kw)
        else:
            N, K, E = n
            M = N * K
            t = torch.cat([torch.full((M,), v, **kw) for v in (0, 2 * E + 2, E)]
                          + [torch.full((N,), v, **kw) for v in (2 * E, 2 * E + 1)])
        _CONSTS[key] = t
    return t


@torch.no_grad()
def stats_row(idx_NK: torch.Tensor, gate_NK: torch.Tensor, z_NE: torch.Tensor,
              valid_N: torch.Tensor | None = None, *, full: bool = False,
              std_N: torch.Tensor | None = None, explored_NK: torch.Tensor | None = None,
              entropy_of_NE: torch.Tensor | None = None,
              noiseless_NK: torch.Tensor | None = None) -> torch.Tensor:
    """The [3E + 4] stats row of a routing (module docstring) from its selection ``idx_NK``,
    its gates and the raw logits z. ``noiseless_NK``: the top-k of the noiseless score (the
    noiseless counts' slots; None: the selection, a routing without noise). With ``full``: the
    explored slots (``explored_NK``; 0 when not given: no noise) and the entropy of
    softmax(``entropy_of_NE``) (default z). ``std_N``: the per-token population std of z
    across experts, if known.

    One ``index_add_`` fills counts, noiseless counts, gate sums, Σ std and tokens: slot m
    adds 1 at idx_m, 1 at 2E + 2 + noiseless_m and its gate at E + idx_m, token n adds its std
    at 2E and 1 at 2E + 1 (each weighted by the token's validity)."""
    N, K = idx_NK.shape
    E = z_NE.shape[-1]
    dtype = torch.float64 if z_NE.dtype == torch.float64 else torch.float32
    if std_N is None:
        zf = z_NE.to(dtype)
        std_N = torch.linalg.vector_norm(zf - zf.mean(dim=-1, keepdim=True), dim=-1) * E ** -0.5
    M = N * K
    idx_M = idx_NK.reshape(-1)
    clean_M = idx_M if noiseless_NK is None else noiseless_NK.reshape(-1)
    # [idx | clean | idx | 0 (2N)] + the pieces' offsets (cached): two ops for the whole index.
    index = torch.cat([idx_M, clean_M, idx_M, _const("zeros", 2 * N, idx_M)]
                      ).add_(_const("offsets", (N, K, E), idx_M))
    gate_M = gate_NK.reshape(-1).to(dtype)
    if valid_N is None:
        src = torch.cat([_const("ones", 2 * M, gate_M), gate_M, std_N,
                         _const("ones", N, gate_M)])
    else:
        w_N = valid_N.to(dtype)
        w_M = w_N.repeat_interleave(K)
        src = torch.cat([w_M, w_M, gate_M * w_M, std_N * w_N, w_N])
    row = torch.zeros(3 * E + 4, dtype=dtype, device=z_NE.device).index_add_(0, index, src)
    if full:
        w_N = None if valid_N is None else valid_N.to(dtype)
        explored = _const("value", 0, std_N)
        if explored_NK is not None:
            per_N = explored_NK.sum(dim=-1, dtype=dtype)
            explored = per_N.sum() if w_N is None else per_N @ w_N
        x_NE = (z_NE if entropy_of_NE is None else entropy_of_NE).to(dtype)
        logp_NE = F.log_softmax(x_NE, dim=-1)
        h_N = -(logp_NE.exp() * logp_NE).sum(dim=-1)
        row[3 * E + 2:] = torch.stack([explored, h_N.sum() if w_N is None else h_N @ w_N])
    return row


class RoutingStats:
    """Per-layer accumulation of stats rows for the run metrics ([L, 3E + 4], on device).

    Off by default (``enabled``): the trainer / callback turns it on for the steps it logs and
    for evaluations, so ordinary steps pay nothing for the explored-slot and entropy entries.
    ``take()`` returns the accumulated rows and clears them (no sync; read them on the host on
    the log cadence, see ``metrics.routing_metrics``)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.enabled = False
        self.acc_LF: torch.Tensor | None = None

    def add(self, layer: int, stats_F: torch.Tensor) -> None:
        acc = self.acc_LF
        if acc is None or acc.device != stats_F.device:
            acc = self.acc_LF = torch.zeros(self.num_layers, stats_width(self.num_experts),
                                            dtype=torch.float64, device=stats_F.device)
        acc[layer].add_(stats_F)

    def start(self) -> None:
        """Clear and enable."""
        if self.acc_LF is not None:
            self.acc_LF.zero_()
        self.enabled = True

    def take(self, disable: bool = True) -> torch.Tensor | None:
        """The rows accumulated since ``start`` (a copy), cleared; None if nothing was routed."""
        acc = self.acc_LF
        self.enabled = self.enabled and not disable
        if acc is None:
            return None
        out = acc.clone()
        acc.zero_()
        return out
