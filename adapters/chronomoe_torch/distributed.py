"""Data-parallel support: one all-reduce of the routing observation per optimizer step.

Under data parallelism (DDP, FSDP, plain ``torch.distributed``) every rank routes its own shard
of the global batch. The controller must see the *global* routing, so once per optimizer step,
at the start of ``PxTController.tick`` (the one tick path of the native model, the trainer and
``attach``), each rank's accumulated observation ([L, 4E + 2] per layer: top-k slot counts,
gate-weight sums, Σ logit std, tokens, noiseless counts, token-loss sums) is summed over the
ranks with a single ``all_reduce(SUM)`` of the flattened buffer. Every rank then runs the same
deterministic tick on the same numbers, so the controllers stay bitwise identical without ever
broadcasting their state, and they equal one process that routed the whole global batch (up to
the summation order of the floating-point sums).

The controller's state is a few [L, E] buffers: replicate it on every rank (never shard it under
FSDP), checkpoint it from rank 0 only, and load the same file on every rank.

``ChronoMoETrainer`` uses the rest under ``torchrun``: ``init_from_env`` (the process group from
the launcher's environment), ``all_reduce_sum_`` (several tensors in one collective), ``all_true``
(a step is skipped on every rank when it is bad on one).

Shape legend: L routed layers, E experts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "is_main_process", "all_reduce_observation",
           "barrier", "replicated_checksum_equal", "init_from_env", "all_reduce_sum_",
           "all_true", "broadcast_str"]


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Under a launcher that sets ``WORLD_SIZE`` > 1 (``torchrun``), initialise the default
    process group if nobody has (gloo for CPU, nccl for CUDA, rendezvous from the environment)
    and, on CUDA, use the GPU ``LOCAL_RANK``. Returns (device, whether this call initialised
    the group). Outside a launcher: (device, False), nothing done."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def all_reduce_sum_(tensors: list[torch.Tensor], group=None) -> None:
    """Sum each tensor over the ranks in place: one collective per dtype (a no-op outside
    torch.distributed). The tensors must live on the backend's device."""
    if not tensors or not is_distributed(group):
        return
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for t, part in zip(same, flat.split([t.numel() for t in same])):
            t.copy_(part.view_as(t))


def broadcast_str(text: str, group=None) -> str:
    """Rank 0's ``text`` on every rank (``text`` itself outside torch.distributed)."""
    if not is_distributed(group):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_true(ok: torch.Tensor, group=None) -> torch.Tensor:
    """A 0-d bool tensor: ``ok`` on every rank (no host sync; ``ok`` itself outside
    torch.distributed)."""
    if not is_distributed(group):
        return ok
    v = ok.to(torch.float32).reshape(1)
    dist.all_reduce(v, op=dist.ReduceOp.MIN, group=group)
    return v[0] > 0.5


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
