"""Data-parallel support: one all-reduce of the routing observation per optimizer step.

Under data parallelism (DDP, FSDP, plain ``torch.distributed``) every rank routes its own shard
of the global batch. The controller must see the *global* routing, so once per optimizer step,
at the start of ``PxTController.tick`` (the one tick path of the native model, the trainer and
``attach``), each rank's accumulated observation ([L, 3E + 2] per layer: top-k slot counts,
gate-weight sums, Σ logit std, tokens, token-loss sums) is summed over the ranks with a single
``all_reduce(SUM)`` of the flattened buffer. Every rank then runs the same deterministic tick on
the same numbers, so the controllers stay bitwise identical without ever broadcasting their state,
and they equal one process that routed the whole global batch (up to the summation order of the
floating-point sums).

The controller's state is a few [L, E] buffers: replicate it on every rank (never shard it under
FSDP), checkpoint it from rank 0 only, and load the same file on every rank.

Shape legend: L routed layers, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "is_main_process", "all_reduce_observation",
           "barrier", "replicated_checksum_equal"]


def is_distributed(group=None) -> bool:
    """True when a default process group is up and it (or ``group``) has more than one rank."""
    return (dist.is_available() and dist.is_initialized()
            and dist.get_world_size(group) > 1)


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0


def is_main_process(group=None) -> bool:
    """Rank 0 (or no process group): the one process that writes checkpoints and metrics."""
    return rank(group) == 0


def barrier(group=None) -> None:
    """``dist.barrier`` when distributed, else nothing."""
    if is_distributed(group):
        dist.barrier(group)


def all_reduce_observation(obs: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``obs`` over the ranks of ``group`` in place (one collective); returns it.

    A no-op outside torch.distributed or with one rank. The buffer must be contiguous and live
    on the device the backend expects (CPU for gloo, CUDA for nccl): it is the tensor the routers
    accumulate into, so it already does. Asynchronous on CUDA like any collective: no host sync.
    """
    if not is_distributed(group):
        return obs
    if not obs.is_contiguous():
        raise ValueError("all_reduce_observation: the observation buffer must be contiguous")
    dist.all_reduce(obs.view(-1), op=dist.ReduceOp.SUM, group=group)
    return obs


@torch.no_grad()
def replicated_checksum_equal(tensors, group=None) -> bool:
    """Whether ``tensors`` (an iterable of tensors, e.g. ``controller.state_dict().values()``)
    hold the same bits on every rank: compares a bitwise fingerprint with one all-gather.
    A debugging aid (it synchronises with the host); True outside torch.distributed."""
    if not is_distributed(group):
        return True
    parts = []
    for t in tensors:
        t = t.detach().contiguous().reshape(-1)
        if t.dtype.is_floating_point or t.dtype.is_complex:
            # Reinterpret the bytes as integers: -0.0 vs 0.0 and NaN payloads count as different.
            t = t.view(torch.uint8)
        parts.append(t.to(torch.float64).cpu())
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    # Position-weighted sums in float64 are exact for byte values on vectors of this size.
    idx = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    fp = torch.stack([flat.sum(), (flat * idx).sum(), (flat * idx.remainder(97)).sum()])
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    fp = fp.to(device)
    out = [torch.empty_like(fp) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, fp, group=group)
    return all(torch.equal(o, out[0]) for o in out)
