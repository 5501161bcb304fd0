"""``MixtralConfig``: the architecture of ``ChronovisorMixtralForCausalLM`` (``model``), frozen and
validated (a bad field raises ``ValueError`` naming the field, the value and what is allowed),
with its controller settings (``enable_chronovisor``, ``controller_fields``, the
``ControllerConfig``) and the aux-free balancing rate. Re-exported by ``chronomoe_torch.model``.

Shape names in the field docs: V vocab, H hidden, L layers, E experts, K top-k, S sequence,
I expert width, nh / nkv heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from chronomoe_dyn import ControllerConfig

from .moe import EXPERT_BACKENDS

__all__ = ["MixtralConfig"]


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"MixtralConfig.{name}={value!r}: expected an integer >= {lo}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"MixtralConfig.{name}={value!r}: expected a finite number > 0")


@dataclass(frozen=True)
class MixtralConfig:
    """Architecture of ``ChronovisorMixtralForCausalLM``. Frozen and validated."""

    vocab_size: int = 32000
    """Token vocabulary V. 256 suffices for the byte-level corpus (data.py). Seed: 32000."""
    hidden_dim: int = 512
    """Residual width H. Seed: 512."""
    num_layers: int = 8
    """Decoder blocks L, each with attention and a MoE layer. Seed: 8."""
    num_experts: int = 8
    """Experts E per MoE layer. Seed: 8."""
    enable_chronovisor: bool = True
    """Route with a P×T controller (True) or as a plain MoE (False, the baseline). Seed: True."""
    intermediate_dim: int | None = None
    """Expert SwiGLU width I. None → 2·H, so top-2 routing gives each token 4·H of FFN width,
    a dense transformer's."""
    num_heads: int = 8
    """Query heads nh; H must divide by it and the head dim H/nh must be even (rotary)."""
    num_kv_heads: int = 2
    """Key/value heads nkv of grouped-query attention; nh must divide by it."""
    top_k: int = 2
    """Experts per token K (1 ≤ K ≤ E)."""
    max_seq_length: int = 2048
    """Longest sequence S the rotary tables cover."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    rms_norm_eps: float = 1e-5
    """ε of RMSNorm."""
    init_std: float = 0.02
    """Std of the normal initialisation; residual output projections use init_std/sqrt(2L)."""
    init_seed: int = 0
    """Seed of the parameter initialisation (a private generator; global RNG untouched)."""
    router_renormalize: bool = True
    """Renormalise the gate weights over the top-k (Mixtral). False keeps raw probabilities
    (Switch style; with K = 1 only this gives the router a gradient from the LM loss)."""
    aux_free_bias_rate: float = 1e-3
    """u of the auxiliary-loss-free balancing update b += u·sign(mean − load) (DeepSeek-V3)."""
    expert_backend: str = "auto"
    """How experts run: "grouped_mm" (torch._grouped_mm), "loop" (one expert at a time on its
    slice), or "auto" (grouped where available, see moe.grouped_mm_available)."""
    controller_config: ControllerConfig = field(default_factory=ControllerConfig)
    """Constants of the P×T controller (used when enable_chronovisor)."""
    controller_seed: int = 0
    """Seed of the controller's phases, frequency disorder and routing noise."""
    controller_fields: bool = True
    """Route with the controller's fields (True), or observe and tick only and route by the
    plain top-k of z (False: the ablation). Used when enable_chronovisor."""

    def __post_init__(self) -> None:
        for name, lo in (("vocab_size", 1), ("hidden_dim", 1), ("num_layers", 1),
                         ("num_experts", 1), ("num_heads", 1), ("num_kv_heads", 1),
                         ("top_k", 1), ("max_seq_length", 1), ("init_seed", 0),
                         ("controller_seed", 0)):
            _check_int(name, getattr(self, name), lo)
        if not isinstance(self.enable_chronovisor, bool):
            raise ValueError(f"MixtralConfig.enable_chronovisor={self.enable_chronovisor!r}: "
                             f"expected a bool")
        if not isinstance(self.controller_fields, bool):
            raise ValueError(f"MixtralConfig.controller_fields={self.controller_fields!r}: "
                             f"expected a bool")
        if not isinstance(self.router_renormalize, bool):
            raise ValueError(f"MixtralConfig.router_renormalize={self.router_renormalize!r}: "
                             f"expected a bool")
        if self.intermediate_dim is None:
            object.__setattr__(self, "intermediate_dim", 2 * self.hidden_dim)
        _check_int("intermediate_dim", self.intermediate_dim, 1)
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"MixtralConfig.num_heads={self.num_heads!r}: must divide "
                             f"hidden_dim={self.hidden_dim}")
        if (self.hidden_dim // self.num_heads) % 2:
            raise ValueError(f"MixtralConfig.num_heads={self.num_heads!r}: head dim "
                             f"hidden_dim/num_heads={self.hidden_dim // self.num_heads} must be "
                             f"even for rotary positions")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"MixtralConfig.num_kv_heads={self.num_kv_heads!r}: must divide "
                             f"num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MixtralConfig.top_k={self.top_k!r}: must be <= "
                             f"num_experts={self.num_experts}")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            _check_positive(name, getattr(self, name))
        if isinstance(self.aux_free_bias_rate, bool) or \
                not isinstance(self.aux_free_bias_rate, (int, float)) or \
                not math.isfinite(self.aux_free_bias_rate) or self.aux_free_bias_rate < 0:
            raise ValueError(f"MixtralConfig.aux_free_bias_rate={self.aux_free_bias_rate!r}: "
                             f"expected a finite number >= 0")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"MixtralConfig.expert_backend={self.expert_backend!r}: allowed "
                             f"values are {EXPERT_BACKENDS}")
        if not isinstance(self.controller_config, ControllerConfig):
            raise ValueError(f"MixtralConfig.controller_config: expected a ControllerConfig, "
                             f"got {type(self.controller_config).__name__}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["controller_config"] = self.controller_config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixtralConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MixtralConfig field(s): {unknown}")
        d = dict(d)
        if isinstance(d.get("controller_config"), dict):
            d["controller_config"] = ControllerConfig.from_dict(d["controller_config"])
        return cls(**d)

    def replace(self, **changes: Any) -> "MixtralConfig":
        """A copy with some fields changed (validated again). A resolved ``intermediate_dim``
        is kept: pass ``intermediate_dim=None`` with a new ``hidden_dim`` to re-derive it."""
        return replace(self, **changes)
