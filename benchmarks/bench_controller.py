"""Benchmark: PxTController tick and CoherenceGatedOptimizer overhead.

Question: does a controller tick at L = 32, E = 64 stay under 1 ms on CPU (the prototype took
57–86 ms), in float32 and float64; and what does coherence gating add to a plain AdamW step?

Run:  python benchmarks/bench_controller.py [--device cpu|cuda] [--ticks 2000] [--threads N]

Tick times are per tick over a run that cycles through plain, micro (every 5th) and macro (every
20th) ticks; median and mean are reported for each kind (on a shared machine the median is the
number to trust). On CUDA the ticks are queued without syncs, so the time per tick is the wall
time of the whole run divided by the ticks, with one synchronize at the end.
The optimizer figures time ``step()`` alone and a full forward/backward/step on a small MLP.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from chronomoe_dyn import ControllerConfig
from chronomoe_torch.controller import PxTController
from chronomoe_torch.optim import CoherenceGatedOptimizer

L, E = 32, 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_tick(dtype: torch.dtype, device: torch.device, ticks: int, noise: float) -> dict:
    cfg = ControllerConfig(phase_noise=noise)
    ctrl = PxTController(L, E, cfg, dtype=dtype, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.randint(0, 200, (8, L, E), generator=g).to(device=device, dtype=torch.float32)
    loss = counts * 2.5
    for i in range(40):                                   # warm-up (allocator, kernels)
        ctrl.observe_all(counts[i % 8], counts[i % 8], loss[i % 8])
        ctrl.tick()
    by_kind: dict[str, list[float]] = {"plain": [], "micro": [], "macro": []}
    _sync(device)
    t_all = time.perf_counter()
    for i in range(ticks):
        ctrl.observe_all(counts[i % 8], counts[i % 8], loss[i % 8])
        t = ctrl.num_ticks + 1
        kind = "macro" if t % cfg.macro_period == 0 else \
            "micro" if t % cfg.micro_period == 0 else "plain"
        t0 = time.perf_counter()
        ctrl.tick()
        by_kind[kind].append(time.perf_counter() - t0)
    _sync(device)
    wall = (time.perf_counter() - t_all) / ticks
    out = {"wall_per_tick_ms": 1e3 * wall}
    every = [x for v in by_kind.values() for x in v]
    out["all"] = (1e3 * statistics.median(every), 1e3 * statistics.fmean(every))
    for k, v in by_kind.items():
        out[k] = (1e3 * statistics.median(v), 1e3 * statistics.fmean(v))
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
        step_t, full_t = [], []
        for i in range(steps + 10):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if i >= 10:
                step_t.append(t2 - t1)
                full_t.append(t2 - t0)
        results[name] = (1e3 * statistics.median(step_t), 1e3 * statistics.median(full_t))
    results["params"] = sum(p.numel() for p in _mlp(0, device).parameters())
    results["tensors"] = len(list(_mlp(0, device).parameters()))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"\nController tick, L={L}, E={E} (ms per tick: median / mean)")
    for dtype in (torch.float32, torch.float64):
        for noise in (0.0, 0.1):
            r = bench_tick(dtype, device, args.ticks, noise)
            label = f"{str(dtype).replace('torch.', ''):8s} phase_noise={noise}"
            kinds = "  ".join(f"{k} {r[k][0]:.3f}/{r[k][1]:.3f}" for k in
                              ("all", "plain", "micro", "macro"))
            print(f"  {label}: {kinds}  | wall/tick {r['wall_per_tick_ms']:.3f}")
    r = bench_optimizer(device, args.steps)
    print(f"\nAdamW on an MLP ({r['params']:,} parameters in {r['tensors']} tensors), "
          f"median ms: step() / forward+backward+step")
    base_s, base_f = r["plain"]
    for name in ("plain", "gated", "gated_strength1"):
        s, f = r[name]
        print(f"  {name:16s} {s:7.3f} / {f:7.3f}   (step x{s / base_s:.2f}, "
              f"full step x{f / base_f:.3f})")


if __name__ == "__main__":
    main()
