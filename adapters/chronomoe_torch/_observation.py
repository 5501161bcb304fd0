"""The observation side of ``PxTController`` (mixed into it): what the routers and the loss add
to the controller between two ticks.

One flat device buffer ``_obs_LF`` [L, 4E + 2] per controller (layout: ``_tick.obs_views``):
top-k slot counts [E] | gate-weight sums [E] | Σ logit std | tokens | noiseless counts [E] |
token-loss sums [E]. The noiseless counts (law v2.1) are the top-k slots of the score without
the exploration noise, counted like the counts: usage, drift and pressure read them,
reliability reads the counts; without noise they equal the counts. The routers add a row of
``routing.route`` (``observe_stats``, its first 3E + 2 entries) or their counts and sums
(``observe``, ``observe_all``); the loss adds per-expert token-loss sums
(``observe_loss``, ``observe_loss_all``), which switches that layer's reliability to the loss
path at the next tick. Everything is detached and stays on the device (no host sync); the buffer
is the one tensor the data-parallel all-reduce sums before a tick, which then clears it.

Bad input: a wrong shape, dtype or layer index raises ``ValueError`` before anything is added (a
bad call accumulates nothing); values are checked by the tick, on the device (including that
each layer's noiseless counts sum to its counts' total).

Uses the controller's ``num_layers``, ``num_experts``, ``dtype``, ``_check_layer`` and the
buffers ``_obs_LF`` and ``_has_loss_L``.

Shape legend: L layers, E experts, F = 4E + 2 observation entries per layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _tick
from ._noise import in_backward
from .routing import obs_width

__all__ = ["ObservationMixin"]


class ObservationMixin:
    """``observe*``, ``observation_buffer``, ``observation_views``, ``clear_observations``."""

    def _as_obs(self, x: Any, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if tuple(x.shape) != shape:
            raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {shape}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{what} has dtype {x.dtype}, expected a real number type")
        return x.detach().to(device=self._obs_LF.device, dtype=self.dtype)

    def observation_views(self) -> dict[str, torch.Tensor]:
        """Named views of the observation buffer: counts_LE, wsum_LE, logit_std_sum_L,
        tokens_L, noiseless_LE, loss_LE."""
        return _tick.obs_views(self._obs_LF, self.num_experts)

    def observe_stats(self, layer: int, stats_F: torch.Tensor) -> None:
        """Add a router call's stats row (``routing.route``; its first 3E + 2 entries: counts,
        gate sums, Σ logit std, tokens, noiseless counts). Not counted when called inside
        backward (an activation-checkpoint recompute repeats a forward already observed)."""
        li = self._check_layer(layer)
        if in_backward():
            return
        w = obs_width(self.num_experts)
        if stats_F.dim() != 1 or stats_F.shape[0] < w:
            raise ValueError(f"observe_stats(layer={li}): stats_F has shape "
                             f"{tuple(stats_F.shape)}, expected [>= {w}]")
        obs = self._buffers["_obs_LF"]
        rows = self._obs_rows
        if rows is None or rows[0] is not obs:            # views cached per buffer object
            rows = self._obs_rows = (obs, obs[:, :w].unbind(0))
        rows[1][li].add_(stats_F[:w])

    def observe(self, layer: int, counts_E: torch.Tensor, weight_sum_E: torch.Tensor,
                loss_sum_E: torch.Tensor | None = None, logit_std_sum: Any = None,
                tokens: Any = None, noiseless_counts_E: torch.Tensor | None = None) -> None:
        """Add one layer's routing of one micro-batch: top-k slots per expert, the sum of their
        gate weights, optionally their token-loss sums and, together, the sum over tokens of
        the std across experts of the raw logits and the token count (for σ_L).
        ``noiseless_counts_E``: the top-k slots per expert of the score without the exploration
        noise, over the same tokens (the same total as ``counts_E``; a tick whose totals differ
        is skipped); None: equal to ``counts_E`` (a routing without noise)."""
        li = self._check_layer(layer)
        E = self.num_experts
        c = self._as_obs(counts_E, f"observe(layer={li}): counts_E", (E,))
        w = self._as_obs(weight_sum_E, f"observe(layer={li}): weight_sum_E", (E,))
        lo = None if loss_sum_E is None else \
            self._as_obs(loss_sum_E, f"observe(layer={li}): loss_sum_E", (E,))
        nc = None if noiseless_counts_E is None else \
            self._as_obs(noiseless_counts_E, f"observe(layer={li}): noiseless_counts_E", (E,))
        if (logit_std_sum is None) != (tokens is None):
            raise ValueError(f"observe(layer={li}): logit_std_sum and tokens go together")
        st = None
        if tokens is not None:
            st = torch.stack([self._as_obs(logit_std_sum, "observe: logit_std_sum", ()),
                              self._as_obs(tokens, "observe: tokens", ())])
        # Validated before anything is added: a bad call accumulates nothing.
        v = self.observation_views()
        pair = _tick.counts_pair(self._obs_LF, E)[li]            # [2, E]: counts, noiseless
        pair.add_(c if nc is None else torch.stack([c, nc]))
        v["wsum_LE"][li].add_(w)
        if st is not None:
            self._obs_LF[li, 2 * E:2 * E + 2].add_(st)
        if lo is not None:
            self._add_loss(li, lo)

    def observe_loss(self, layer: int, loss_sum_E: torch.Tensor) -> None:
        """Add the per-expert sums of the token losses of one layer (enables loss-based
        reliability for that layer at the next tick)."""
        li = self._check_layer(layer)
        self._add_loss(li, self._as_obs(loss_sum_E, f"observe_loss(layer={li}): loss_sum_E",
                                        (self.num_experts,)))

    def observe_loss_all(self, loss_LE: torch.Tensor) -> None:
        """Add the token-loss sums of every layer at once ([L, E])."""
        lo = self._as_obs(loss_LE, "observe_loss_all: loss_LE", (self.num_layers,
                                                                  self.num_experts))
        self.observation_views()["loss_LE"].add_(lo)
        self._mark_all_loss()

    def _add_loss(self, li: int, loss_E: torch.Tensor) -> None:
        self.observation_views()["loss_LE"][li].add_(loss_E)
        if li not in self._loss_layers:
            self._has_loss_L[li] = True
            self._loss_layers.add(li)

    def _mark_all_loss(self) -> None:
        if len(self._loss_layers) < self.num_layers:
            self._has_loss_L.fill_(True)
            self._loss_layers.update(range(self.num_layers))

    def observe_all(self, counts_LE: torch.Tensor, wsum_LE: torch.Tensor,
                    loss_LE: torch.Tensor | None = None,
                    logit_scale_L: torch.Tensor | None = None,
                    noiseless_counts_LE: torch.Tensor | None = None) -> None:
        """Add the routing of every layer at once ([L, E] each). ``logit_scale_L`` [L] (the
        mean per-token logit std) is weighted by the layer's slot count (so one call per tick
        gives the reference's ``RoutingObservation.logit_scale``). ``noiseless_counts_LE``: the
        reference's ``RoutingObservation.noiseless_counts`` (None: the counts)."""
        LE = (self.num_layers, self.num_experts)
        c = self._as_obs(counts_LE, "observe_all: counts_LE", LE)
        w = self._as_obs(wsum_LE, "observe_all: wsum_LE", LE)
        lo = None if loss_LE is None else self._as_obs(loss_LE, "observe_all: loss_LE", LE)
        sc = None if logit_scale_L is None else \
            self._as_obs(logit_scale_L, "observe_all: logit_scale_L", (self.num_layers,))
        nc = None if noiseless_counts_LE is None else \
            self._as_obs(noiseless_counts_LE, "observe_all: noiseless_counts_LE", LE)
        v = self.observation_views()
        pair = _tick.counts_pair(self._obs_LF, self.num_experts)   # [L, 2, E]
        pair.add_(c.unsqueeze(1) if nc is None else torch.stack([c, nc], dim=1))
        v["wsum_LE"].add_(w)
        if sc is not None:
            n_L = c.sum(dim=1)
            v["logit_std_sum_L"].add_(sc * n_L)
            v["tokens_L"].add_(n_L)
        if lo is not None:
            v["loss_LE"].add_(lo)
            self._mark_all_loss()

    def clear_observations(self) -> None:
        """Drop the accumulated observation without ticking."""
        self._obs_LF.zero_()
        if self._loss_layers:
            self._has_loss_L.zero_()
            self._loss_layers.clear()

    def observation_buffer(self) -> torch.Tensor:
        """The observation [L, 4E + 2] (views: ``observation_views``), the one tensor the
        data-parallel all-reduce sums."""
        return self._obs_LF
