"""ChronoMoELoss: the language-model loss plus the routing terms (DESIGN.md §4).

    L = λ_lm L_lm + λ_b L_balance + λ_c L_coherence + λ_v L_valley + λ_z L_z
        (defaults 1.0, 0.01, 0.001, 0.0001, 0.0)

Per layer ℓ, over the tokens that count (attention_mask, all if none), with p = softmax of the
raw router logits z (law v2: the controller moves the selection only), p̄_ℓe their mean and
f_ℓe the fraction of top-k slots routed to e; every term is averaged over layers:
    L_lm        causal cross-entropy: logits at t predict labels at t+1; -100 and padding ignored
    L_balance   E·Σ_e f_ℓe·p̄_ℓe                          (Switch; f carries no gradient, p̄ does)
    L_coherence (1 − R)·mean_e δ̃_ℓe²,  δ̃ = E·(p̄_ℓe − u_ℓe)   u: the controller's usage EMA;
                R: its Kuramoto coherence, detached. The controller's own drift δ = E(frac − u),
                with the differentiable p̄ in place of the hard fractions.
    L_valley    Σ_e m_ℓe·p̄_ℓe                           m: unhealthy valleys of layer ℓ, i.e.
                T̄_local < mean − c·std (c = 0.5; none in a flat layer, variance ≤ 1e-12)
                and reliability < 0.3
    L_z         mean_n logsumexp(z_n)²                    router z-loss (ST-MoE); computed only
                when λ_z > 0 (else reported as 0)

Modes: "chronomoe" (all terms), "switch" (L_lm + balance + z: the standard Switch recipe),
"aux_free" (L_lm + z; balance comes from the routers' aux-free bias, see moe.py, and
``L_balance`` is still returned, detached, for comparison). Terms outside the mode, and the
controller terms when no controller is given, are returned as zeros.

Precision: every term is computed in float32 with autocast disabled, so calling the loss inside
``torch.autocast`` (e.g. bf16) gives the same values as outside it. p is the model's own router
softmax (``output.router_probs``) when the output carries it, else recomputed from the logits.

Nothing here synchronises with the host: every component is a 0-d tensor. With a controller
and ``observe=True`` the per-token losses are summed per expert and layer and passed to
``controller.observe_loss_all(loss_LE)`` (or ``observe_loss(layer, loss_sum_E)`` per layer;
detached), for the reliability signal.

Shape legend: B batch, S sequence, N = B·S tokens, L layers, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chronomoe_dyn.landscape import FLAT_VARIANCE

__all__ = ["LossOutput", "ChronoMoELoss", "LOSS_MODES", "causal_lm_token_loss",
           "unhealthy_valley_mask"]

LOSS_MODES = ("chronomoe", "switch", "aux_free")


@dataclass
class LossOutput:
    """The total loss and its (unweighted) components, all 0-d tensors."""
    total: torch.Tensor
    lm: torch.Tensor
    balance: torch.Tensor
    coherence: torch.Tensor
    valley: torch.Tensor
    z: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, "lm": self.lm, "balance": self.balance,
                "coherence": self.coherence, "valley": self.valley, "z": self.z}


def causal_lm_token_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor,
                         attention_mask_BS: torch.Tensor | None = None,
                         ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token cross-entropy [B, S] (float32; position t scores labels[t+1];
    0 at the last position and wherever the target is ignored or padding) and the float
    mask [B, S] of positions that carry a target."""
    B, S, V = logits_BSV.shape
    if labels_BS.shape != (B, S):
        raise ValueError(f"labels shape {tuple(labels_BS.shape)} != logits' [B, S] = {(B, S)}")
    target_BS = torch.full_like(labels_BS, ignore_index)
    target_BS[:, :-1] = labels_BS[:, 1:]
    if attention_mask_BS is not None:
        pad_next_BS = torch.ones_like(labels_BS, dtype=torch.bool)
        pad_next_BS[:, :-1] = attention_mask_BS[:, 1:] == 0
        target_BS = target_BS.masked_fill(pad_next_BS, ignore_index)
    tok_BS = F.cross_entropy(logits_BSV.reshape(B * S, V).float(), target_BS.reshape(-1),
                             ignore_index=ignore_index, reduction="none").view(B, S)
    return tok_BS, (target_BS != ignore_index).float()


def unhealthy_valley_mask(tbar_LE: torch.Tensor, reliability_LE: torch.Tensor,
                          threshold_std: float = 0.5, unhealthy_reliability: float = 0.3
                          ) -> torch.Tensor:
    """Bool [L, E]: per-layer valleys of T̄ (T̄ < mean − c·std, population std; a flat layer,
    variance ≤ ``FLAT_VARIANCE``, has none) whose reliability is below the threshold. The rule of
    ``chronomoe_dyn.landscape.landscape_masks``, on device, without a sync."""
    mean_L1 = tbar_LE.mean(dim=-1, keepdim=True)
    var_L1 = tbar_LE.var(dim=-1, unbiased=False, keepdim=True)
    valley_LE = (tbar_LE < mean_L1 - threshold_std * var_L1.sqrt()) & (var_L1 > FLAT_VARIANCE)
    return valley_LE & (reliability_LE < unhealthy_reliability)


def _check_weight(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"ChronoMoELoss.{name}={value!r}: expected a finite number >= 0")
    return float(value)


class ChronoMoELoss(nn.Module):
    """Callable ``loss(output, labels, controller=None, attention_mask=None) -> LossOutput``."""

    def __init__(self, lambda_balance: float = 0.01, lambda_coherence: float = 0.001,
                 lambda_valley: float = 0.0001, lambda_z: float = 0.0, lambda_lm: float = 1.0,
                 mode: str = "chronomoe", ignore_index: int = -100) -> None:
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"ChronoMoELoss.mode={mode!r}: allowed values are {LOSS_MODES}")
        self.lambda_lm = _check_weight("lambda_lm", lambda_lm)
        self.lambda_balance = _check_weight("lambda_balance", lambda_balance)
        self.lambda_coherence = _check_weight("lambda_coherence", lambda_coherence)
        self.lambda_valley = _check_weight("lambda_valley", lambda_valley)
        self.lambda_z = _check_weight("lambda_z", lambda_z)
        self.mode = mode
        self.ignore_index = ignore_index

    def forward(self, output, labels: torch.Tensor, controller=None,
                attention_mask: torch.Tensor | None = None, observe: bool = True) -> LossOutput:
        """``output``: a ``MoECausalLMOutput`` (``router_probs`` optional); ``labels`` [B, S]
        aligned with the inputs (pass ``input_ids`` for plain LM training); ``controller``
        supplies R, usage, the valley mask and receives the per-expert loss sums when
        ``observe`` (pass False at evaluation). Safe to call inside ``torch.autocast``."""
        dev = output.logits.device.type
        # float32 throughout: under CPU autocast the einsum below would run in bf16 and the
        # scatter in ``_balance`` would then mix dtypes.
        no_autocast = (torch.autocast(dev, enabled=False)
                       if torch.amp.is_autocast_available(dev) else contextlib.nullcontext())
        with no_autocast:
            return self._terms(output, labels, controller, attention_mask, observe)

    def _terms(self, output, labels: torch.Tensor, controller,
               attention_mask: torch.Tensor | None, observe: bool) -> LossOutput:
        tok_BS, target_BS = causal_lm_token_loss(output.logits, labels, attention_mask,
                                                 self.ignore_index)
        lm = tok_BS.sum() / target_BS.sum().clamp_min(1.0)

        probs = getattr(output, "router_probs", None)
        probs_LNE = (torch.stack(probs).float() if probs is not None
                     else torch.stack(output.router_logits).float().softmax(dim=-1))
        idx_LNK = torch.stack(output.expert_indices)
        L, N, E = probs_LNE.shape
        K = idx_LNK.shape[-1]
        w_N = (torch.ones(N, device=probs_LNE.device) if attention_mask is None
               else attention_mask.reshape(-1).float())
        w_sum = w_N.sum().clamp_min(1.0)
        pbar_LE = torch.einsum("lne,n->le", probs_LNE, w_N) / w_sum

        balance = self._balance(pbar_LE, idx_LNK, w_N, w_sum)
        zero = lm.new_zeros(())
        z = zero
        if self.lambda_z:            # only term that needs the logits themselves
            logits_LNE = torch.stack(output.router_logits).float()
            z = (torch.logsumexp(logits_LNE, dim=-1).pow(2) * w_N).sum(-1).mean() / w_sum
        coherence = valley = zero
        if controller is not None and self.mode == "chronomoe":
            u_LE = controller.usage_LE.detach().to(pbar_LE.dtype)
            R = controller.coherence().detach().to(pbar_LE.dtype)
            coherence = (1.0 - R) * (E * (pbar_LE - u_LE)).pow(2).mean()
            cfg = controller.config
            mask_LE = unhealthy_valley_mask(controller.Tbar_local_LE.detach(),
                                            controller.reliability_LE.detach(),
                                            cfg.landscape_threshold_std,
                                            cfg.unhealthy_reliability)
            valley = (pbar_LE * mask_LE).sum(-1).mean()

        # A term whose weight is 0 stays out of the graph entirely (0·x would still backprop
        # zeros into every parameter it touches).
        terms = [(self.lambda_lm, lm), (self.lambda_z, z)]
        if self.mode in ("chronomoe", "switch"):
            terms.append((self.lambda_balance, balance))
        if self.mode == "chronomoe":
            terms += [(self.lambda_coherence, coherence), (self.lambda_valley, valley)]
        total = zero
        for weight, term in terms:
            if weight:
                total = total + weight * term
        if self.mode == "aux_free":
            balance = balance.detach()

        if controller is not None and observe:
            self._observe_loss(controller, tok_BS.detach().reshape(-1), idx_LNK, K, E)
        return LossOutput(total=total, lm=lm, balance=balance, coherence=coherence,
                          valley=valley, z=z)

    @staticmethod
    def _balance(pbar_LE: torch.Tensor, idx_LNK: torch.Tensor, w_N: torch.Tensor,
                 w_sum: torch.Tensor) -> torch.Tensor:
        """Switch loss E·Σ_e f_e·p̄_e averaged over layers; f_e counts top-k slots / (N·K)."""
        L, N, K = idx_LNK.shape
        E = pbar_LE.shape[-1]
        w_LM = w_N.repeat_interleave(K).expand(L, N * K)
        f_LE = torch.zeros_like(pbar_LE).scatter_add_(1, idx_LNK.reshape(L, N * K), w_LM)
        f_LE = f_LE / (w_sum * K)
        return E * (f_LE * pbar_LE).sum(-1).mean()

    @staticmethod
    def _observe_loss(controller, tok_N: torch.Tensor, idx_LNK: torch.Tensor,
                      K: int, E: int) -> None:
        """Per layer, the sum of the token losses of the slots routed to each expert."""
        L, N, _ = idx_LNK.shape
        loss_LM = tok_N.repeat_interleave(K).expand(L, N * K)
        loss_LE = tok_N.new_zeros(L, E).scatter_add_(1, idx_LNK.reshape(L, N * K), loss_LM)
        observe_all = getattr(controller, "observe_loss_all", None)
        if observe_all is not None:
            observe_all(loss_LE)
            return
        for layer in range(L):
            controller.observe_loss(layer, loss_LE[layer])
