"""A Mixtral-style decoder-only MoE language model with the P×T controller in its routers.

    h_0 = Embed(ids)
    h   = h + Attn(RMSNorm(h))            grouped-query attention, rotary positions, causal
    h   = h + MoE(RMSNorm(h))             v2 top-k router (routing.py), SwiGLU experts (moe.py)
    logits = RMSNorm(h) Embedᵀ            LM head tied to the token embeddings

With ``enable_chronovisor=True`` the model owns a ``PxTController`` (``self.controller``): every
MoE layer routes with the controller's fields (bias, temperature, σ_L, exploration noise τ) and,
in training mode, reports its per-expert counts, gate sums and logit scale to it. With
``controller_fields=False`` the controller still observes and ticks but routing is the plain
top-k of the raw logits (the ablation every claim is measured against). With
``enable_chronovisor=False`` it is a plain sparse MoE (no controller at all). ``routing_stats``
(a ``routing.RoutingStats``) accumulates the run metrics' routing stats while enabled.

The architecture's constants are ``MixtralConfig`` (``model_config``, re-exported here).

Shape legend: B batch, S sequence, N = B·S tokens, E experts, K top-k, H hidden, V vocab,
nh query heads, nkv key/value heads, D head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed as _dist
from .loss import causal_lm_token_loss
from .model_config import MixtralConfig
from .moe import RouterOutput, SparseMoE
from .routing import RoutingStats

__all__ = ["MixtralConfig", "MoECausalLMOutput", "ChronovisorMixtralForCausalLM",
           "RMSNorm", "RotaryEmbedding", "GQAttention", "DecoderLayer"]


@dataclass
class MoECausalLMOutput:
    """What ``ChronovisorMixtralForCausalLM.forward`` returns (docs/CONTRACTS.md)."""
    logits: torch.Tensor
    """[B, S, V] next-token logits (position t predicts token t+1)."""
    router_logits: tuple[torch.Tensor, ...]
    """Per layer [N, E]: the raw router logits z, float32, differentiable (the controller moves
    the selection only; balance, z-loss and any aux loss read z)."""
    expert_indices: tuple[torch.Tensor, ...]
    """Per layer [N, K] int64 selected experts."""
    gate_weights: tuple[torch.Tensor, ...]
    """Per layer [N, K] float32 gate weights."""
    loss: torch.Tensor | None = None
    """Plain causal LM loss (0-d) when labels were given."""
    router_probs: tuple[torch.Tensor, ...] | None = None
    """Per layer [N, E]: softmax of ``router_logits`` (float32, differentiable), the router's
    own, so ``ChronoMoELoss`` need not recompute it. None from models that do not provide it."""



class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + ε) · w, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary positions (rotate-half form): pairs (x_i, x_{i+D/2}) turn by angle
    pos·θ^(-2i/D). Tables are float32 non-persistent buffers [S_max, D]."""

    def __init__(self, head_dim: int, max_seq_length: int, theta: float) -> None:
        super().__init__()
        inv_freq_D2 = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle_SD2 = torch.arange(max_seq_length, dtype=torch.float64)[:, None] * inv_freq_D2
        angle_SD = torch.cat([angle_SD2, angle_SD2], dim=-1)
        self.register_buffer("cos_SD", angle_SD.cos().float(), persistent=False)
        self.register_buffer("sin_SD", angle_SD.sin().float(), persistent=False)

    def forward(self, x_BhSD: torch.Tensor) -> torch.Tensor:
        S = x_BhSD.shape[-2]
        cos, sin = self.cos_SD[:S], self.sin_SD[:S]
        x1, x2 = x_BhSD.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x_BhSD.float() * cos + rotated * sin).to(x_BhSD.dtype)


class GQAttention(nn.Module):
    """Causal grouped-query self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.D = config.num_heads, config.num_kv_heads, config.head_dim
        H = config.hidden_dim
        self.q_proj = nn.Linear(H, self.nh * self.D, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * self.D, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * self.D, bias=False)
        self.o_proj = nn.Linear(self.nh * self.D, H, bias=False)

    def forward(self, x_BSH: torch.Tensor, rope: RotaryEmbedding,
                mask_B1SS: torch.Tensor | None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(B, S, self.nh, self.D).transpose(1, 2)   # [B, nh, S, D]
        k = self.k_proj(x_BSH).view(B, S, self.nkv, self.D).transpose(1, 2)  # [B, nkv, S, D]
        v = self.v_proj(x_BSH).view(B, S, self.nkv, self.D).transpose(1, 2)
        q, k = rope(q), rope(k)
        enable_gqa = self.nkv != self.nh
        if mask_B1SS is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1SS, enable_gqa=enable_gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.nh * self.D))


class DecoderLayer(nn.Module):
    """Pre-norm block: h + Attn(norm(h)), then h + MoE(norm(h))."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self.attn = GQAttention(config)
        self.moe_norm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self.moe = SparseMoE(config.hidden_dim, config.intermediate_dim, config.num_experts,
                             config.top_k, config.router_renormalize, config.expert_backend)

    def forward(self, h_BSH: torch.Tensor, rope: RotaryEmbedding, mask_B1SS, controller,
                layer: int, valid_N, controller_fields: bool = True,
                stats: RoutingStats | None = None) -> tuple[torch.Tensor, RouterOutput]:
        h_BSH = h_BSH + self.attn(self.attn_norm(h_BSH), rope, mask_B1SS)
        B, S, H = h_BSH.shape
        y_NH, r = self.moe(self.moe_norm(h_BSH).reshape(B * S, H), controller, layer, valid_N,
                           controller_fields, stats)
        return h_BSH + y_NH.view(B, S, H), r


def _attention_mask(attention_mask_BS: torch.Tensor, S: int) -> torch.Tensor:
    """Boolean [B, 1, S, S]: causal and key not padding. Every query also sees itself, so a
    padding query (e.g. under left padding) never has an empty softmax row (NaN)."""
    idx = torch.arange(S, device=attention_mask_BS.device)
    causal_SS = idx[None, :] <= idx[:, None]
    keep_BSS = causal_SS & attention_mask_BS.bool()[:, None, :]
    keep_BSS = keep_BSS | torch.eye(S, dtype=torch.bool, device=attention_mask_BS.device)
    return keep_BSS[:, None]


class ChronovisorMixtralForCausalLM(nn.Module):
    """Mixtral-style MoE causal LM; ``controller`` is a ``PxTController`` or None."""

    def __init__(self, config: MixtralConfig, controller: nn.Module | None = None) -> None:
        """``controller`` (optional) replaces the one built from the config; only allowed with
        ``enable_chronovisor=True``. It must provide ``layer_fields(i)`` and ``observe(...)``."""
        super().__init__()
        if not isinstance(config, MixtralConfig):
            raise TypeError(f"config must be a MixtralConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_length, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self._init_weights()
        if controller is not None and not config.enable_chronovisor:
            raise ValueError("a controller was given but MixtralConfig.enable_chronovisor=False")
        if config.enable_chronovisor and controller is None:
            from chronomoe_torch.controller import PxTController  # lazy: baseline needs none
            controller = PxTController(config.num_layers, config.num_experts,
                                       config=config.controller_config,
                                       seed=config.controller_seed)
        self.controller = controller
        self.routing_stats = RoutingStats(config.num_layers, config.num_experts)
        # DDP broadcasts rank 0's buffers into every rank at each forward: that would overwrite
        # each rank's own routing accumulations (the controller's observation, the aux-free
        # loads) before the controller's and the aux-free update's all-reduce sum them. The
        # controller's state needs no broadcast (every rank ticks on the same global sum).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, [
            n for n, _ in self.named_buffers()
            if n.startswith("controller.") or n.endswith(".load_E")])

    @torch.no_grad()
    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(self.config.init_seed)
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.num_layers)  # residual branches add up
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "w_down_EIH")):
                p.normal_(0.0, out_std, generator=g)
            else:
                p.normal_(0.0, std, generator=g)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, H]: the token embedding (tied)."""
        return self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MoECausalLMOutput:
        """``input_ids`` [B, S] int; ``attention_mask`` [B, S] (1 = token, 0 = padding);
        ``labels`` [B, S] aligned with ``input_ids`` (shifted inside; -100 ignored)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.config.max_seq_length:
            raise ValueError(f"sequence length {S} exceeds MixtralConfig.max_seq_length="
                             f"{self.config.max_seq_length}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                             f"shape {tuple(input_ids.shape)}")
        mask_B1SS = None if attention_mask is None else _attention_mask(attention_mask, S)
        valid_N = None if attention_mask is None else attention_mask.reshape(-1).bool()

        h_BSH = self.embed_tokens(input_ids)
        routers = []
        fields = self.config.controller_fields
        for i, layer in enumerate(self.layers):
            h_BSH, r = layer(h_BSH, self.rope, mask_B1SS, self.controller, i, valid_N, fields,
                             self.routing_stats)
            routers.append(r)
        logits_BSV = F.linear(self.norm(h_BSH), self.embed_tokens.weight)

        loss = None
        if labels is not None:
            tok_BS, valid_BS = causal_lm_token_loss(logits_BSV, labels, attention_mask)
            loss = tok_BS.sum() / valid_BS.sum().clamp_min(1)
        return MoECausalLMOutput(
            logits=logits_BSV,
            router_logits=tuple(r.logits_NE for r in routers),
            expert_indices=tuple(r.expert_idx_NK for r in routers),
            gate_weights=tuple(r.gate_NK for r in routers),
            loss=loss,
            router_probs=tuple(r.probs_NE for r in routers),
        )

    @torch.no_grad()
    def update_aux_free_bias(self, rate: float | None = None,
                             valid: torch.Tensor | None = None) -> None:
        """One auxiliary-loss-free balancing step in every router (once per optimizer step:
        ``register_aux_free_hook``): b += u·sign(mean − load) on the loads routed in training
        mode since the last call, then clear them. On device, no sync. Under data parallelism
        (a process group with more than one rank) the loads are summed over the ranks first,
        in one collective, so every rank applies the same update. ``rate`` (u) defaults to
        ``config.aux_free_bias_rate``. ``valid`` (0-d bool tensor): when False the biases stay
        bit-for-bit unchanged (``torch.where``, no sync), e.g. on a skipped optimizer step; the
        loads are cleared either way."""
        u = self.config.aux_free_bias_rate if rate is None else float(rate)
        if valid is not None and (not isinstance(valid, torch.Tensor) or valid.dim() != 0
                                  or valid.dtype != torch.bool):
            got = (f"a {valid.dtype} tensor of shape {list(valid.shape)}"
                   if isinstance(valid, torch.Tensor) else type(valid).__name__)
            raise ValueError(f"update_aux_free_bias: valid must be a 0-d bool tensor, got {got}")
        routers = [layer.moe.router for layer in self.layers]
        if _dist.is_distributed():
            load_LE = torch.stack([r.load_E for r in routers])
            _dist.all_reduce_observation(load_LE)
            for r, load_E in zip(routers, load_LE):
                r.load_E.copy_(load_E)
        for r in routers:
            r.update_aux_free_bias(u, valid)

    def register_aux_free_hook(self, optimizer: torch.optim.Optimizer,
                               valid: Any = None) -> Any:
        """Run ``update_aux_free_bias`` in ``optimizer``'s step post-hook (as torchtitan
        updates its MoE bias); ``valid`` is a callable returning the step's 0-d bool validity
        (or None). Returns the hook's handle (keep it to remove the hook)."""
        def _aux_free_post_hook(opt: Any, args: Any, kwargs: Any) -> None:
            self.update_aux_free_bias(valid=None if valid is None else valid())

        return optimizer.register_step_post_hook(_aux_free_post_hook)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active`` counts only K of the E experts per layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            c = self.config
            per_expert = 3 * c.hidden_dim * c.intermediate_dim
            total -= c.num_layers * (c.num_experts - c.top_k) * per_expert
        return total
