"""The forward hook ``attach()`` puts on each router: route by the v2 rule, observe, hand over.

Per router call (layer ℓ, N tokens) the hook reads the router's raw logits z [N, E] from its
output and, with the controller's fields (``controller_fields=True``), re-routes with
``routing.route`` (the native model's rule: noise in training mode only) and returns the router's
output with the controller's experts and gates in it (``_hand_over``); without fields the
router's own routing stands. In training mode (or with ``observe_in_eval``) it adds the call's
stats row to the controller's observation, once per forward (an activation-checkpoint recompute,
inside backward, is not observed twice), and, when the handle's ``RoutingStats`` are on, to the
run metrics. A logits-only router gets the selected experts' logits lifted by a per-token
constant (``attach`` module docstring).

The hook holds its ``AttachHandle`` weakly and reads from it the controller, the padding mask of
the current forward (``_valid_N``), the stats accumulators and the routing record.

Shape legend: N routed tokens (rows of a router call), E experts, K top-k.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ._attach_plan import RouterPlan
from .routing import in_backward, route, stats_row

__all__ = ["RouterHook"]


class RouterHook:
    """Forward hook of one router: routes by the v2 rule from its raw logits, observes."""

    def __init__(self, handle: Any, layer: int, plan: RouterPlan) -> None:
        self.handle_ref = weakref.ref(handle)
        self.layer = layer
        self.plan = plan

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        handle = self.handle_ref()
        if handle is None:
            return None
        plan, layer, ctrl = self.plan, self.layer, handle.controller
        is_tensor = isinstance(output, torch.Tensor)
        z = output if is_tensor else output[0]
        z_NE = z if z.dim() == 2 else z.reshape(-1, z.shape[-1])
        observing = handle._observing(module)
        stats = handle.routing_stats if module.training else handle.eval_routing_stats
        full = stats.enabled and not in_backward()
        has_idx = plan.output_kind == "hf" or (
            not is_tensor and len(output) >= 3 and isinstance(output[2], torch.Tensor)
            and not output[2].is_floating_point())
        renorm, cast = plan.gate_rule(module)
        K = plan.top_k if plan.top_k is not None else module.top_k
        fields = noise = None
        if handle.controller_fields:
            fields = ctrl.layer_fields(layer)
            if module.training:
                noise = ctrl.noise_key(layer, z_NE.shape[0])
        valid_N = handle._valid_N
        if valid_N is not None and valid_N.numel() != z_NE.shape[0]:
            valid_N = None                          # a router called on other tokens

        result, idx_NK, gate_NK, row = output, None, None, None
        if fields is None and has_idx:
            # The router's own routing stands (plain top-k of z); observe it as it is.
            if observing or full or handle.record_routing:
                idx_NK = output[2].reshape(-1, output[2].shape[-1])
                gate_NK = output[1].reshape(idx_NK.shape)
                row = stats_row(idx_NK, gate_NK.detach(), z_NE.detach(), valid_N, full=full)
        elif fields is not None or observing or full or handle.record_routing:
            r = route(z_NE, K, fields=fields, renormalize=renorm,
                      gate_dtype=z.dtype if cast else torch.float32, training=module.training,
                      valid_N=valid_N, noise=noise, want_probs=False, full_stats=full)
            idx_NK, gate_NK, row = r.expert_idx_NK, r.gate_NK, r.stats_F
            if fields is not None:
                result = self._hand_over(output, z, z_NE, idx_NK, gate_NK, has_idx, is_tensor)
        if observing:
            ctrl.observe_stats(layer, row)
            handle._observed = True
        elif not module.training:
            handle._eval_calls = True
        if full:
            stats.add(layer, row)
        if handle.record_routing:
            handle._records[layer] = (z_NE, idx_NK, gate_NK)
        if result is output:
            return None
        if is_tensor or type(output) is tuple:
            return result
        if hasattr(output, "_fields"):           # a NamedTuple
            return type(output)(*result)
        return type(output)(result)

    @staticmethod
    def _hand_over(output: Any, z: torch.Tensor, z_NE: torch.Tensor, idx_NK: torch.Tensor,
                   gate_NK: torch.Tensor, has_idx: bool, is_tensor: bool) -> Any:
        """The router's output with the controller's routing in it."""
        if has_idx:
            gates = gate_NK.to(output[1].dtype).reshape(output[1].shape)
            return (output[0], gates, idx_NK.reshape(output[2].shape), *output[3:])
        # Logits only: lift the selected experts by a per-token constant (module docstring).
        with torch.no_grad():
            c_N1 = (z_NE.amax(-1, keepdim=True) - z_NE.amin(-1, keepdim=True)).float() + 1.0
            lift_NE = torch.zeros(z_NE.shape, dtype=torch.float32, device=z.device
                                  ).scatter_(1, idx_NK, c_N1.expand_as(idx_NK))
        shifted = (z_NE.float() + lift_NE).to(z.dtype).reshape(z.shape)
        return shifted if is_tensor else (shifted, *output[1:])
