"""Benchmark: PxTController tick (law v2) and CoherenceGatedOptimizer overhead.

Question: what does a controller tick cost on CPU (the prototype took 57–86 ms at L = 32,
E = 64), in kernels and in time, at a small (L = 8, E = 8) and a large (L = 32, E = 64) size, in
float32 and float64, with and without phase noise and loss observations; and what does coherence
gating add to a plain AdamW step?

Run:  python benchmarks/bench_controller.py [--device cpu|cuda] [--ticks 2000] [--threads N]
      [--sizes 8x8,32x64]

Tick figures cycle through plain, micro (every 5th) and macro (every 20th) ticks and report,
per kind, the number of aten ops one tick dispatches (counted with a TorchDispatchMode; it does
not depend on the machine's load) and the median time, both as the CPU time of the calling
thread (``time.thread_time``) and as wall time; "mean" is the thread CPU time averaged over all
ticks (what a training run pays per step). On a machine shared with other jobs the wall time
mostly measures waiting for a core; the thread CPU time is the work the tick really does (torch
runs these [L, E]-sized ops on the calling thread). The tick is latency bound: its time is the
number of kernels times a few µs of dispatch, more inside a training step, where caches are cold
(``bench_attach.py`` measures it there). On CUDA the ticks are queued without syncs, so the
figure that matters is the wall time of the whole run divided by the ticks (one synchronize at
the end). The optimizer figures time ``step()`` alone and a full forward/backward/step on a small
MLP, likewise in wall and thread CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from chronomoe_dyn import ControllerConfig
from chronomoe_torch.controller import PxTController
from chronomoe_torch.optim import CoherenceGatedOptimizer

SIZES = ((8, 8), (32, 64))
KINDS = ("plain", "micro", "macro")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kind(cfg: ControllerConfig, t: int) -> str:
    return "macro" if t % cfg.macro_period == 0 else \
        "micro" if t % cfg.micro_period == 0 else "plain"


def bench_tick(L: int, E: int, dtype: torch.dtype, device: torch.device, ticks: int,
               noise: float, with_loss: bool) -> dict:
    cfg = ControllerConfig(phase_noise=noise)
    ctrl = PxTController(L, E, cfg, dtype=dtype, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.randint(0, 200, (8, L, E), generator=g).to(device=device, dtype=torch.float32)
    loss = counts * 2.5
    scale = (torch.rand(8, L, generator=g) + 0.5).to(device)     # observed logit scale (v2)

    def observe(i: int) -> None:
        ctrl.observe_all(counts[i % 8], counts[i % 8], loss[i % 8] if with_loss else None,
                         scale[i % 8])

    for i in range(40):                                   # warm-up (allocator, kernels)
        observe(i)
        ctrl.tick()
    ops: dict[str, int] = {}
    for i in range(cfg.macro_period):                     # one tick of each kind
        observe(i)
        kind = _kind(cfg, ctrl.num_ticks + 1)
        with OpCounter() as c:
            ctrl.tick()
        ops.setdefault(kind, c.count)
    wall: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    _sync(device)
    t_all = time.perf_counter()
    for i in range(ticks):
        observe(i)
        kind = _kind(cfg, ctrl.num_ticks + 1)
        c0, t0 = time.thread_time(), time.perf_counter()
        ctrl.tick()
        wall[kind].append(time.perf_counter() - t0)
        cpu[kind].append(time.thread_time() - c0)
    _sync(device)
    out: dict = {"run_wall_per_tick_ms": 1e3 * (time.perf_counter() - t_all) / ticks, "ops": ops}
    for name, d in (("wall", wall), ("cpu", cpu)):
        every = [x for v in d.values() for x in v]
        out[name] = {"all": 1e3 * statistics.median(every), "mean": 1e3 * statistics.mean(every),
                     **{k: 1e3 * statistics.median(v) for k, v in d.items()}}
    return out


def _mlp(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(256, 16)).to(device)


def bench_optimizer(device: torch.device, steps: int) -> dict:
    """Median ms of step() alone and of forward/backward/step, plain AdamW vs gated."""
    results = {}
    x = torch.randn(64, 256, device=device)
    y = torch.randn(64, 16, device=device)
    R = torch.tensor(0.6, device=device)
    for name in ("plain", "gated", "gated_strength1"):
        model = _mlp(0, device)
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if name != "plain":
            opt = CoherenceGatedOptimizer(opt, lambda: R,
                                          gating_strength=1.0 if name.endswith("1") else 0.5)
        times: dict[str, list[float]] = {"step": [], "full": [], "step_cpu": [], "full_cpu": []}
        for i in range(steps + 10):
            c0, t0 = time.thread_time(), time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            _sync(device)
            c1, t1 = time.thread_time(), time.perf_counter()
            opt.step()
            _sync(device)
            c2, t2 = time.thread_time(), time.perf_counter()
            if i >= 10:
                times["step"].append(t2 - t1)
                times["full"].append(t2 - t0)
                times["step_cpu"].append(c2 - c1)
                times["full_cpu"].append(c2 - c0)
        results[name] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    results["params"] = sum(p.numel() for p in _mlp(0, device).parameters())
    results["tensors"] = len(list(_mlp(0, device).parameters()))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1, so thread CPU time is all the work)")
    ap.add_argument("--sizes", default=",".join(f"{L}x{E}" for L, E in SIZES),
                    help="comma-separated LxE sizes (default 8x8,32x64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print("\nController tick: aten ops per tick, median ms per tick as thread CPU time "
          "[wall time], by kind (plain / micro / macro), and the mean over all ticks")
    for L, E in sizes:
        print(f" L={L}, E={E}")
        for dtype in (torch.float32, torch.float64):
            for noise, with_loss in ((0.0, False), (0.0, True), (0.1, True)):
                r = bench_tick(L, E, dtype, device, args.ticks, noise, with_loss)
                label = (f"{str(dtype).replace('torch.', ''):7s} noise={noise} "
                         f"{'loss   ' if with_loss else 'no loss'}")
                ops = "/".join(str(r["ops"][k]) for k in KINDS)
                kinds = " ".join(f"{r['cpu'][k]:.3f} [{r['wall'][k]:.3f}]" for k in KINDS)
                print(f"  {label}: ops {ops:11s} ms {kinds}  mean {r['cpu']['mean']:.3f}"
                      f"  | run wall/tick {r['run_wall_per_tick_ms']:.3f}")
    r = bench_optimizer(device, args.steps)
    print(f"\nAdamW on an MLP ({r['params']:,} parameters in {r['tensors']} tensors): median ms, "
          f"thread CPU time [wall time]")
    base = r["plain"]
    for name in ("plain", "gated", "gated_strength1"):
        m = r[name]
        print(f"  {name:16s} step() {m['step_cpu']:7.3f} [{m['step']:7.3f}]   "
              f"fwd+bwd+step {m['full_cpu']:7.3f} [{m['full']:7.3f}]   "
              f"overhead: step +{m['step_cpu'] - base['step_cpu']:.3f} ms "
              f"(x{m['step_cpu'] / base['step_cpu']:.2f}), "
              f"full x{m['full_cpu'] / base['full_cpu']:.3f}")


if __name__ == "__main__":
    main()
