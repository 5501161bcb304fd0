"""The routing noise: its key, its draws, and the keys of one ``PxTController``.

Noise. u comes from the counter hash of ``chronomoe_dyn.rng`` (ported in ``_rng``), keyed on
``NoiseKey.prefix`` = hash(seed, STREAM_GUMBEL, tick, layer) and on the token's position p among
the tokens this layer routed since the tick (index p·E + e): micro-batches of one optimizer step
continue the positions, so gradient accumulation draws the noise of the whole batch at once.
Data-parallel ranks interleave positions (p·world + rank), so they never share draws. A pure
function of the key: exact resume stays bitwise with no generator state in the checkpoint (the
tick *is* the state), and an activation-checkpoint recompute (a forward inside backward,
``in_backward``) reuses the key of the forward it repeats. DESIGN.md asks for "a seeded generator
whose state is checkpointed": a pure function of the checkpointed tick is the stronger form of
that. u is the top 23 bits of the hash, ((h >> 9) + 0.5)·2⁻²³, and g = −log(−log u) is computed in
float32 (torch's log); the NumPy reference's u keeps all 32 bits, so the two agree through given
uniforms (tests), not draw for draw.

``NoiseKeys`` keeps a controller's host-side bookkeeping of the key:

  * per layer, the position offset (tokens routed since the tick; micro-batches of a step
    continue it) and the offset of the last forward (a recompute repeats it);
  * per tick, computed once on first use: the data-parallel layout (rank, world) and every
    layer's prefix on the host;
  * the draws of the current forward: the first layer that asks at a given (offset, N) draws
    every layer's noise in one pass (the layers of a forward route the same tokens), up to
    ``NOISE_BATCH_MAX`` values; the others take their row.

All of it is host state that the tick counter and the seed determine: nothing is checkpointed
(``start`` rebuilds it after a tick or a load), and no device value is read.

Shape legend: L layers, N tokens of a router call, E experts, M = N·E.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from . import _rng
from . import distributed as _dist

__all__ = ["NoiseKey", "gumbel_NE", "gumbel_from_uniform", "in_backward", "NoiseKeys",
           "NOISE_BATCH_MAX"]

NOISE_BATCH_MAX = 1 << 22
"""Most Gumbel values (L·N·E) drawn at once for all layers (16 MiB of float32)."""


def in_backward() -> bool:
    """Whether this forward runs inside backward (an activation-checkpoint recompute): its
    routing was already observed by the forward it repeats."""
    return torch._C._current_graph_task_id() != -1


class NoiseKey(NamedTuple):
    """What the Gumbel noise of one router call is keyed on (host ints; no device state)."""
    prefix: int
    """hash of (seed, STREAM_GUMBEL, tick, layer), < 2³² (``_rng.gumbel_prefix``)."""
    offset: int = 0
    """Position of this call's first token among the layer's tokens since the tick."""
    rank: int = 0
    """Data-parallel rank ..."""
    world: int = 1
    """... and world size: token n has position ((offset + n)·world + rank)."""
    gumbel_NE: torch.Tensor | None = None
    """The draws of this key, if already made (``PxTController.noise_key`` draws every layer's
    noise of a forward at once); else ``route`` draws them."""


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """g = −log(−log u), standard Gumbel, for u in (0, 1) (float64 recommended)."""
    return -torch.log(-torch.log(u))


def gumbel_NE(key: NoiseKey, N: int, E: int, device: torch.device,
              prefixes_L: "torch.Tensor | Sequence[int] | None" = None) -> torch.Tensor:
    """[N, E] float32 standard Gumbel draws of ``key``; token n at position ((offset + n)·world
    + rank), index position·E + e (32-bit: positions wrap past 2³²/E tokens per layer and
    tick). With ``prefixes_L`` (one prefix per layer instead of ``key.prefix``: host ints, or an
    [L, 1] int64 tensor on the device): [L, N, E], every layer's draws in one pass.

    u = ((h >> 9) + 0.5)·2⁻²³ from the 32-bit hash h: its top 23 bits, exact in float32 and never
    0 or 1 (float32 logs cost half of float64's; exploration needs no finer u). On CPU with host
    prefixes the integers come from one Numba pass (``chronomoe_dyn``'s counter-RNG kernel
    ``uniform23_into``), elsewhere from tensor ops: the same u bit for bit (tested); the logs
    are torch's either way."""
    if device.type == "cpu" and not isinstance(prefixes_L, torch.Tensor):
        u = _uniform23_cpu(key, N, E, prefixes_L)
    else:
        u = _uniform23_tensor(key, N, E, device, prefixes_L)
    g = torch.log(torch.log(u).neg_()).neg_()
    return g.view(N, E) if prefixes_L is None else g.view(-1, N, E)


_KERNEL: list = []


def _uniform23_cpu(key: NoiseKey, N: int, E: int, prefixes: "Sequence[int] | None"
                   ) -> torch.Tensor:
    """[L, N·E] float32 u on the host, one Numba pass (imported, and compiled or loaded from its
    on-disk cache, on the first draw)."""
    if not _KERNEL:
        from chronomoe_dyn._kernels.libm import uniform23_into
        _KERNEL.append(uniform23_into)
    pre = np.asarray([key.prefix] if prefixes is None else prefixes, dtype=np.uint64)
    out = np.empty((pre.shape[0], N * E), dtype=np.float32)
    _KERNEL[0](pre, key.offset, key.world, key.rank, E, out)
    return torch.from_numpy(out)


def _uniform23_tensor(key: NoiseKey, N: int, E: int, device: torch.device,
                      prefixes_L: "torch.Tensor | Sequence[int] | None") -> torch.Tensor:
    """[L, N·E] (or [N·E] without ``prefixes_L``) float32 u from int64 tensor ops."""
    if prefixes_L is not None and not isinstance(prefixes_L, torch.Tensor):
        prefixes_L = torch.tensor([int(p) for p in prefixes_L], dtype=torch.int64,
                                  device=device).unsqueeze(1)
    if key.world == 1:
        idx = _arange(N * E, device)
        if key.offset:
            idx = (idx + key.offset * E) & _rng.MASK32
    else:
        pos_N1 = (torch.arange(N, dtype=torch.int64, device=device).unsqueeze(1) + key.offset) \
            * key.world + key.rank
        idx = (pos_N1 * E + torch.arange(E, dtype=torch.int64, device=device)
               ).reshape(-1) & _rng.MASK32
    h = _rng.mix32_wrap(idx ^ (key.prefix if prefixes_L is None else prefixes_L))
    # u = ((h >> 9) + 0.5)·2⁻²³ in one fused op.
    k = (h >> 9).to(torch.float32)
    half, scale = _u23_consts(device)
    return torch.addcmul(half, k, scale)


_U23_CONSTS: dict = {}


def _u23_consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(2⁻²⁴, 2⁻²³) as cached 0-d float32 tensors on ``device`` (read only)."""
    c = _U23_CONSTS.get(device)
    if c is None:
        c = _U23_CONSTS[device] = tuple(torch.full((), v, dtype=torch.float32, device=device)
                                        for v in (2.0 ** -24, 2.0 ** -23))
    return c


_ARANGES: dict = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """A cached int64 arange(n) (read only)."""
    key = (n, device)
    t = _ARANGES.get(key)
    if t is None:
        if len(_ARANGES) > 16:
            _ARANGES.clear()
        t = _ARANGES[key] = torch.arange(n, dtype=torch.int64, device=device)
    return t



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
        """Tick ``tick`` of seed ``seed`` begins (after a tick or a load): positions restart at
        0; the layout, prefixes and draws are made again on first use."""
        self.seed, self.tick = int(seed), int(tick)
        self.offset_L = [0] * self.num_layers
        self.last_offset_L = [0] * self.num_layers
        self.invalidate()

    def invalidate(self) -> None:
        """Drop what was made for the current device and process group (a device move, a new
        group), keeping the tick's token positions: micro-batches after it continue them."""
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
