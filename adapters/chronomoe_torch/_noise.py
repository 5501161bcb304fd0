"""Keys of the routing noise of one ``PxTController``: positions, per-tick prefixes, shared draws.

The Gumbel noise of a router call is a pure function of (seed, tick, layer) and the positions of
its tokens among those the layer routed since the tick, interleaved over data-parallel ranks
(``routing`` module docstring). This module keeps the host-side bookkeeping of that key:

  * per layer, the position offset (tokens routed since the tick; micro-batches of a step
    continue it) and the offset of the last forward (an activation-checkpoint recompute, which
    runs inside backward, repeats it);
  * per tick, computed once on first use: the data-parallel layout (rank, world) and every
    layer's prefix hash(seed, STREAM_GUMBEL, tick, layer) on the host;
  * the draws of the current forward: the first layer that asks at a given (offset, N) draws
    every layer's noise in one pass (the layers of a forward route the same tokens), up to
    ``NOISE_BATCH_MAX`` values; the others take their row.

Everything here is host state that the tick counter and the seed determine: nothing is
checkpointed (``start`` rebuilds it after a tick or a load), and no device value is read.

Shape legend: L layers, N tokens of a router call, E experts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _rng
from . import distributed as _dist
from .routing import NoiseKey, gumbel_NE, in_backward

__all__ = ["NoiseKeys", "NOISE_BATCH_MAX"]

NOISE_BATCH_MAX = 1 << 22
"""Most Gumbel values (L·N·E) drawn at once for all layers (16 MiB of float32)."""


class NoiseKeys:
    """The noise keys of one controller (L layers, E experts) on ``device``.

    ``distributed`` / ``process_group``: as ``PxTController.set_distributed`` (None: interleave
    over the ranks of an initialised process group with more than one rank)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = int(num_layers), int(num_experts)
        self.distributed: bool | None = None
        self.process_group: Any = None
        self.start(0, 0)

    def start(self, seed: int, tick: int) -> None:
        """Tick ``tick`` of seed ``seed`` begins (after a tick, a load or a device move):
        positions restart at 0; the layout, prefixes and draws are made again on first use."""
        self.seed, self.tick = int(seed), int(tick)
        self.offset_L = [0] * self.num_layers
        self.last_offset_L = [0] * self.num_layers
        self._tick_consts: tuple | None = None   # (rank, world, prefixes, batch prefixes)
        self._draws: tuple | None = None          # (tag, rows of [L, N, E])

    def _consts(self, device: torch.device) -> tuple:
        """(rank, world, per-layer prefixes as host ints, the prefixes ``gumbel_NE`` takes for
        the all-layer draw: a uint64 array on CPU, where the hash runs on the host; elsewhere
        an [L, 1] int64 tensor hashed on the device from one host word, no copy)."""
        c = self._tick_consts
        if c is None:
            rank, world = 0, 1
            if self.distributed is not False and _dist.is_distributed(self.process_group):
                rank = _dist.rank(self.process_group)
                world = _dist.world_size(self.process_group)
            h1 = _rng.key_prefix(self.seed, _rng.STREAM_GUMBEL, self.tick)
            prefixes = tuple(_rng.mix32_int(h1 ^ li) for li in range(self.num_layers))
            if device.type == "cpu":
                batch = np.array(prefixes, dtype=np.uint64)
            else:
                layers = torch.arange(self.num_layers, dtype=torch.int64, device=device)
                batch = _rng.mix32(layers ^ h1).unsqueeze(1)
            c = self._tick_consts = (rank, world, prefixes, batch)
        return c

    def key(self, layer: int, num_tokens: int, device: torch.device) -> NoiseKey:
        """The key of a call of ``num_tokens`` tokens of layer ``layer`` (an index in range),
        with its draws when they fit in one all-layer pass (see ``PxTController.noise_key``)."""
        N = num_tokens
        if in_backward():
            offset = self.last_offset_L[layer]
        else:
            offset = self.offset_L[layer]
            self.last_offset_L[layer] = offset
            self.offset_L[layer] = offset + N
        rank, world, prefixes, batch = self._consts(device)
        E = self.num_experts
        if self.num_layers * N * E > NOISE_BATCH_MAX:
            return NoiseKey(prefixes[layer], offset, rank, world)
        tag = (offset, N)
        draws = self._draws
        if draws is None or draws[0] != tag:
            g_LNE = gumbel_NE(NoiseKey(prefixes[0], offset, rank, world), N, E, device, batch)
            draws = self._draws = (tag, g_LNE.unbind(0))
        return NoiseKey(prefixes[layer], offset, rank, world, draws[1][layer])
