"""Which modules ``attach()`` hooks, and how: router discovery and the per-router plan.

A plan records, for each router (one MoE layer, in module order): its module path (wrapper
prefixes of DDP/FSDP/torch.compile stripped), its expert count, its top-k (read from the module
at call time for a transformers router), its gate rule and the kind of output it returns.

Supported transformers 5.x routers are found by class (``SUPPORTED_ROUTERS``, with each family's
gate rule: renormalise over the top-k? cast the gates back to the logits' dtype?); any other MoE
passes ``routers=[module, ...]``, whose expert count and top-k are read from the module's
attributes (or an ``nn.Linear``'s width) or given. Planning validates everything before a hook is
installed: a refusal (``AttachError``) leaves the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

__all__ = ["AttachError", "GateRule", "SUPPORTED_ROUTERS", "find_routers", "plan_routers",
           "RouterPlan"]


class AttachError(ValueError):
    """attach() refused: no router found, inconsistent expert counts, already attached, or a
    state_dict for another model. The model is left untouched."""


GateRule = Callable[[nn.Module], "tuple[bool, bool]"]

# transformers 5.x router classes (``model.layers[i].mlp.gate``), by class name: Mixtral always
# renormalises and keeps float32 gates; Qwen2-MoE / Qwen3-MoE / OLMoE renormalise only with
# ``norm_topk_prob`` and cast the gates back to the logits' dtype.
SUPPORTED_ROUTERS: dict[str, GateRule] = {
    "MixtralTopKRouter": lambda m: (True, False),
    "Qwen2MoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
    "Qwen3MoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
    "OlmoeTopKRouter": lambda m: (bool(m.norm_topk_prob), True),
}


def _is_hf_router(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ in SUPPORTED_ROUTERS and cls.__module__.startswith("transformers.")


def _strip_wrappers(name: str) -> str:
    """Module path without the prefixes that DDP/FSDP/torch.compile wrappers add."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod", "_fsdp_wrapped_module",
                                                       "_checkpoint_wrapped_module")]
    return ".".join(parts)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recognised transformers routers of ``model`` in module order, as (name, module)."""
    return [(_strip_wrappers(n), m) for n, m in model.named_modules() if _is_hf_router(m)]


@dataclass
class RouterPlan:
    """How one router is hooked (see the module docstring)."""
    name: str
    module: nn.Module
    num_experts: int
    top_k: int | None
    """K, or None for a supported transformers router (read from the module at call time)."""
    gate_rule: GateRule
    output_kind: str
    """"hf": (logits, gates, idx) from a supported transformers router; "generic": a user's
    router, its output read at call time (a tensor of logits, a tuple (logits, gates, idx, ...)
    whose gates and indices are recomputed, or a tuple whose first entry is the logits)."""


def _expert_count(m: nn.Module, num_experts: int | None) -> int | None:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    if isinstance(m, nn.Linear):
        return m.out_features
    return num_experts


def _top_k_of(m: nn.Module, top_k: int | None) -> int | None:
    if top_k is not None:
        return top_k
    for attr in ("top_k", "num_experts_per_tok", "k"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def plan_routers(model: nn.Module, routers: Iterable[nn.Module] | None, num_experts: int | None,
                 top_k: int | None, renormalize: bool) -> list[RouterPlan]:
    """The plans of ``routers`` (None: the supported transformers routers of ``model``), each
    checked to have ``num_experts`` experts (None: the first router's count); raises
    ``AttachError`` naming what is wrong."""
    names = {id(m): _strip_wrappers(n) for n, m in model.named_modules()}
    plans: list[RouterPlan] = []
    if routers is None:
        found = find_routers(model)
        if not found:
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if "router" in type(m).__name__.lower()
                            or "gate" in type(m).__name__.lower()})
            raise AttachError(
                f"attach: no supported router in {type(model).__name__}; expected modules of "
                f"class {sorted(SUPPORTED_ROUTERS)} (transformers 5.x); router-like classes "
                f"found: {kinds or 'none'}. For another MoE pass routers=[module, ...]")
        for name, m in found:
            plans.append(RouterPlan(name, m, int(m.num_experts), None,
                                     SUPPORTED_ROUTERS[type(m).__name__], "hf"))
    else:
        routers = list(routers)
        if not routers:
            raise AttachError("attach: routers=[] is empty; pass the router modules, or "
                              "routers=None to find transformers routers")
        seen: set[int] = set()
        for i, m in enumerate(routers):
            if not isinstance(m, nn.Module):
                raise AttachError(f"attach: routers[{i}] is a {type(m).__name__}, expected an "
                                  "nn.Module")
            if id(m) not in names:
                raise AttachError(f"attach: routers[{i}] ({type(m).__name__}) is not a "
                                  f"submodule of the {type(model).__name__} given")
            if id(m) in seen:
                raise AttachError(f"attach: routers[{i}] ({names[id(m)]}) is listed twice")
            seen.add(id(m))
            E = _expert_count(m, num_experts)
            if E is None:
                raise AttachError(f"attach: cannot tell the expert count of {names[id(m)]} "
                                  f"({type(m).__name__}: no num_experts attribute, not an "
                                  "nn.Linear); pass num_experts=")
            if _is_hf_router(m):
                plans.append(RouterPlan(names[id(m)], m, E, None,
                                         SUPPORTED_ROUTERS[type(m).__name__], "hf"))
                continue
            k = _top_k_of(m, top_k)
            if k is None:
                raise AttachError(f"attach: cannot tell the top-k of {names[id(m)]} "
                                  f"({type(m).__name__}: no top_k attribute); pass top_k=")
            plans.append(RouterPlan(names[id(m)], m, E, k, lambda _m: (renormalize, False),
                                     "generic"))
    counts = {p.name: p.num_experts for p in plans}
    expected = num_experts if num_experts is not None else plans[0].num_experts
    bad = {n: e for n, e in counts.items() if e != expected}
    if bad:
        raise AttachError(f"attach: expert count mismatch: expected {expected} experts "
                          f"({'num_experts' if num_experts is not None else plans[0].name}), "
                          f"found {bad}")
    return plans
