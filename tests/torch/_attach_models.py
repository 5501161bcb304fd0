"""Tiny models for the attach / HF-callback / distributed tests: one transformers MoE per supported
architecture (random weights from a config, no downloads), a hand-written MoE for the generic
path, and a controller double with fixed routing fields.

Shape legend: B batch, S sequence, N = B·S tokens, H hidden, E experts, K top-k, L layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 64
E, K = 4, 2
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_config(arch: str, **over):
    """A tiny config: 2 routed layers (Qwen2-MoE gets a third, dense, layer in the middle)."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=K, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=48, num_hidden_layers=2, num_local_experts=E,
                               **common)
    elif arch == "qwen2_moe":
        # norm_topk_prob=False (the Qwen2-MoE default) and a shared expert; layer 1 is dense.
        cfg = tf.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_hidden_layers=3,
                                mlp_only_layers=[1], num_experts=E, **common)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                num_hidden_layers=2, num_experts=E, norm_topk_prob=True,
                                **common)
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(intermediate_size=16, num_hidden_layers=2, num_experts=E, **common)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def make_hf(arch: str, seed: int = 0, **over) -> nn.Module:
    """A tiny transformers CausalLM of ``arch`` with seeded random weights, in train mode."""
    import transformers as tf
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM}[arch]
    torch.manual_seed(seed)
    cfg = hf_config(arch, **over)
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    # Routers start at zero in some families; give them spread so top-k is not a tie.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    return model.train()


def tokens(B: int = 2, S: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, S), generator=g)


def hf_routers(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate")]


def all_hooks(model: nn.Module) -> dict[str, tuple]:
    """Every module's hook dict keys (forward, forward-pre, with-kwargs, backward), by name."""
    out = {}
    for n, m in model.named_modules():
        out[n] = (tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                  tuple(m._forward_hooks_with_kwargs), tuple(m._forward_pre_hooks_with_kwargs),
                  tuple(m._backward_hooks), tuple(getattr(m, "_backward_pre_hooks", {})))
    return out


class FixedFields(nn.Module):
    """Controller double with constant v2 fields per layer (bias, temperature, scale σ; τ = 0:
    no noise). It keeps the controller's observation interface (``observe_stats``,
    ``observe_loss``, ``observation_buffer`` [L, 4E + 2], ``tick``) and records the observation
    each tick consumed in ``fed``."""

    def __init__(self, num_layers: int, num_experts: int, bias_LE=None, temperature_LE=None,
                 scale: float = 1.0):
        super().__init__()
        self.num_layers, self.num_experts = num_layers, num_experts
        self.config = None
        self.register_buffer("bias_LE", torch.zeros(num_layers, num_experts)
                             if bias_LE is None else torch.as_tensor(bias_LE, dtype=torch.float32))
        self.register_buffer("temperature_LE", torch.ones(num_layers, num_experts)
                             if temperature_LE is None
                             else torch.as_tensor(temperature_LE, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("obs_LF", torch.zeros(num_layers, 3 * num_experts + 2))
        self.fed: list[torch.Tensor] = []

    def layer_fields(self, i):
        from chronomoe_torch.routing import LayerFields
        return LayerFields(self.bias_LE[i], self.temperature_LE[i], self.scale,
                           torch.tensor(0.0))

    def noise_key(self, i, n):
        return None

    def observe_stats(self, layer, stats_F):
        w = 2 * self.num_experts + 2
        self.obs_LF[layer, :w] += stats_F[:w]

    def observe_loss(self, layer, loss_E):
        self.obs_LF[layer, 2 * self.num_experts + 2:] += loss_E

    def observe_loss_all(self, loss_LE):
        self.obs_LF[:, 2 * self.num_experts + 2:] += loss_LE

    def observation_buffer(self):
        return self.obs_LF

    def clear_observations(self):
        self.obs_LF.zero_()

    def tick(self):
        self.fed.append(self.obs_LF.clone())
        self.obs_LF.zero_()


# ---------------------------------------------------------------------------------------------
# A hand-written MoE (the generic path)
# ---------------------------------------------------------------------------------------------
class TupleRouter(nn.Module):
    """Returns (logits, gates, indices) like the transformers routers, with a top_k attribute."""

    def __init__(self, H: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.proj = nn.Linear(H, num_experts, bias=False)

    def forward(self, x_NH):
        logits_NE = self.proj(x_NH)
        p_NE = logits_NE.float().softmax(-1)
        g_NK, i_NK = p_NE.topk(self.top_k, dim=-1)
        return logits_NE, g_NK / g_NK.sum(-1, keepdim=True), i_NK


class HandMoE(nn.Module):
    """Router + E linear experts. ``tuple_router``: the router routes; else the router is a bare
    nn.Linear giving logits and this block routes (softmax → top-k → renormalise)."""

    def __init__(self, H: int, num_experts: int, top_k: int, tuple_router: bool) -> None:
        super().__init__()
        self.top_k, self.tuple_router = top_k, tuple_router
        self.router = (TupleRouter(H, num_experts, top_k) if tuple_router
                       else nn.Linear(H, num_experts, bias=False))
        self.experts = nn.ModuleList(nn.Linear(H, H) for _ in range(num_experts))
        self.last_idx_NK = None

    def forward(self, x_NH):
        if self.tuple_router:
            _, g_NK, i_NK = self.router(x_NH)
        else:
            p_NE = self.router(x_NH).float().softmax(-1)
            g_NK, i_NK = p_NE.topk(self.top_k, dim=-1)
            g_NK = g_NK / g_NK.sum(-1, keepdim=True)
        self.last_idx_NK = i_NK
        y_NH = torch.zeros_like(x_NH)
        for e, expert in enumerate(self.experts):
            w_N = (g_NK * (i_NK == e)).sum(-1)            # 0 for tokens not routed to e
            y_NH = y_NH + w_N[:, None].to(x_NH.dtype) * expert(x_NH)
        return y_NH


class HandLM(nn.Module):
    """Embedding → 2 MoE blocks (residual) → head: the user's own MoE language model."""

    def __init__(self, tuple_router: bool = False, H: int = 16, num_experts: int = E,
                 top_k: int = K, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, H)
        self.blocks = nn.ModuleList(HandMoE(H, num_experts, top_k, tuple_router)
                                    for _ in range(2))
        self.head = nn.Linear(H, VOCAB, bias=False)

    def forward(self, input_ids):
        B, S = input_ids.shape
        h_NH = self.embed(input_ids).reshape(B * S, -1)
        for blk in self.blocks:
            h_NH = h_NH + blk(h_NH)
        return self.head(h_NH).reshape(B, S, -1)

    def routers(self):
        return [b.router for b in self.blocks]


def lm_loss(logits_BSV: torch.Tensor, ids_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]),
                           ids_BS[:, 1:].reshape(-1))
