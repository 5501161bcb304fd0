"""Worker for test_distributed.py: train a tiny attached HF Mixtral with DDP (gloo, CPU).

Launched as ``python -m torch.distributed.run --nproc_per_node 2 ... dist_attach_worker.py --out
DIR``. Every rank builds the same model (same seed), wraps it in DDP, attaches the controller with
the tick on the optimizer, and trains STEPS optimizer steps of ACCUM micro-batches on its shard of
each global batch. Then rank 0 alone writes the controller checkpoint, every rank loads it into a
fresh attachment, and each rank writes its final controller state and checks to
``DIR/rank<r>/``. ``run_single`` is the same training in one process over the whole global batch.

Second part, the native model (``ChronovisorMixtralForCausalLM``, controller ticking in the
optimizer's step pre-hook through ``register_on``, no attach) under DDP: the controller's own
tick all-reduces the observation (one collective per step), every rank ends bitwise equal, and
equal to ``run_native_single`` over the global batch. The routing noise is off here
(``exploration_tau0=0``): its positions interleave over ranks, so a rank-major single-process
batch draws other noise; ``NATIVE_NOISY`` runs with noise and only checks rank equality.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _attach_models as M  # noqa: E402

STEPS, ACCUM, B_MICRO, WORLD = 4, 2, 2, 2
CONFIG = dict(micro_period=1, macro_period=2, pressure_gain=2.0, exploration_tau0=0.0)
NATIVE_NOISY = dict(micro_period=1, macro_period=2, pressure_gain=2.0, exploration_tau0=0.3)


def global_batch(step: int) -> torch.Tensor:
    """[WORLD·ACCUM·B_MICRO, S] tokens of one optimizer step; rank r owns rows of its slice."""
    return M.tokens(B=WORLD * ACCUM * B_MICRO, S=8, seed=100 + step)


def micro_batches(step: int, rank: int | None) -> list[torch.Tensor]:
    """The micro-batches a rank (or, for None, the single process) runs at ``step``."""
    mbs = list(global_batch(step).split(B_MICRO))            # WORLD·ACCUM of them, rank-major
    return mbs if rank is None else mbs[rank * ACCUM:(rank + 1) * ACCUM]


def build():
    from chronomoe_dyn import ControllerConfig
    model = M.make_hf("mixtral", seed=0)
    return model, ControllerConfig(**CONFIG)


def run_single() -> dict:
    """One process, the global batch: the reference the ranks must match."""
    from chronomoe_torch.attach import attach
    torch.set_num_threads(1)
    model, cfg = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    handle = attach(model, cfg, optimizer=opt, seed=3)
    n = WORLD * ACCUM
    for step in range(STEPS):
        for mb in micro_batches(step, None):
            (model(mb, labels=mb).loss / n).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in handle.controller.state_dict().items()}


def build_native(**config):
    from chronomoe_dyn import ControllerConfig
    from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
    cfg = MixtralConfig(vocab_size=M.VOCAB, hidden_dim=16, num_layers=2, num_experts=4,
                        num_heads=2, num_kv_heads=1, top_k=2, max_seq_length=16,
                        controller_config=ControllerConfig(**(config or CONFIG)),
                        controller_seed=3)
    return ChronovisorMixtralForCausalLM(cfg)


def _native_step(model, opt, mbs, n, ddp=None) -> None:
    """One optimizer step over ``mbs``; with ``ddp``, all but the last micro-batch under
    ``no_sync`` (without it, DDP syncs gradients and broadcasts buffers at every forward)."""
    for i, mb in enumerate(mbs):
        ctx = ddp.no_sync() if ddp is not None and i < len(mbs) - 1 else torch.enable_grad()
        with ctx:
            (model(mb, labels=mb).loss / n).backward()
    opt.step()
    opt.zero_grad()


def run_native_single() -> dict:
    """The native model in one process over the global batch (the reference for the ranks)."""
    torch.set_num_threads(1)
    model = build_native().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.controller.register_on(opt)
    for step in range(STEPS):
        _native_step(model, opt, micro_batches(step, None), WORLD * ACCUM)
    return {k: v.clone() for k, v in model.controller.state_dict().items()}


def run_native_rank(rank: int, calls: list, no_sync: bool, **config) -> tuple[dict, int, list]:
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = build_native(**config).train()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    model.controller.register_on(opt)
    del calls[:]
    for step in range(STEPS):
        _native_step(ddp, opt, micro_batches(step, rank), ACCUM, ddp if no_sync else None)
    return ({k: v.clone() for k, v in model.controller.state_dict().items()},
            model.controller.num_ticks, calls[:])


def run_rank(out: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from chronomoe_torch import distributed as cdist
    from chronomoe_torch.attach import attach
    from chronomoe_torch.checkpoint import save_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    # Count the Python-level all_reduce calls (DDP's gradient buckets go through its C++
    # reducer, not this function): the controller must make exactly one per optimizer step.
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        model, cfg = build()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        handle = attach(ddp, cfg, optimizer=opt, seed=3)     # through the DDP wrapper
        for step in range(STEPS):
            for i, mb in enumerate(micro_batches(step, rank)):
                last = i == ACCUM - 1
                ctx = ddp.no_sync() if not last else torch.enable_grad()
                with ctx:
                    (ddp(mb, labels=mb).loss / ACCUM).backward()
            opt.step()
            opt.zero_grad()
        checks = {"ticks": handle.controller.num_ticks, "all_reduce_calls": calls[:],
                  "replicated": cdist.replicated_checksum_equal(
                      handle.controller.state_dict().values())}

        # Checkpoint: rank 0 writes, everyone loads.
        ckpt = out / "controller"
        if cdist.is_main_process():
            handle.save(ckpt)
        cdist.barrier()
        fresh_model, _ = build()
        fresh = attach(fresh_model, cfg, seed=99)
        fresh.load(ckpt)
        a, b = handle.controller.state_dict(), fresh.controller.state_dict()
        checks["loaded_equal"] = all(torch.equal(a[k], b[k]) for k in a)
        checks["router_names"] = handle.router_names

        mine = out / f"rank{rank}"
        save_state(mine / "state", dict(handle.controller.state_dict()), kind="attach-test")
        for name, no_sync, config in (("native", False, {}),
                                      ("native_noisy", True, NATIVE_NOISY)):
            state, ticks, native_calls = run_native_rank(rank, calls, no_sync, **config)
            save_state(mine / name, state, kind="native-test")
            checks[name] = {"ticks": ticks, "all_reduce_calls": native_calls,
                            "replicated": cdist.replicated_checksum_equal(state.values())}
        (mine / "checks.json").write_text(json.dumps(checks))
        dist.barrier()
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    run_rank(args.out)


if __name__ == "__main__":
    main()
