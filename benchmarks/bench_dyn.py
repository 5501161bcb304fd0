"""Speed of chronomoe_dyn, measured in one process (numbers for the README).

    python benchmarks/bench_dyn.py [--json PATH] [--quick]

1. simulate_kuramoto: oscillator-steps/s for B=32 systems × N=1000 oscillators without noise,
   against the plain NumPy mean-field loop (simulate_kuramoto(backend="numpy")).
2. simulate: system-ticks/s at L=8, E=8, top-2, 256 tokens per layer per tick, for B=1 and
   B=1024 (record_layers=False), against the NumPy reference path (env in NumPy + the
   reference ``step`` in a Python loop, i.e. simulate(backend="numpy")).
3. One reference ``step`` at L=32, E=64 (µs).
4. ``import chronomoe_dyn`` in a fresh interpreter (s), and whether it pulled in numba/torch.

Kernels are compiled (or loaded from the on-disk cache) before timing. Each figure is the best
of a few repeats of CPU-bound work, as wall-clock time: on a shared machine the best repeat is
the least disturbed one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def best_time(fn, repeats: int) -> float:
    """Best wall-clock time of ``repeats`` calls."""
    return best_times(fn, repeats)[0]


def best_times(fn, repeats: int) -> tuple[float, float]:
    """(wall s, CPU s of this process, all threads) of the fastest of ``repeats`` calls. On a
    shared machine the CPU time shows the work done when other jobs take the cores."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if wall < best[0]:
            best = (wall, cpu)
    return best


def bench_kuramoto(quick: bool) -> dict:
    from chronomoe_dyn import simulate_kuramoto
    B, N = 32, 1000
    omega = np.random.default_rng(0).standard_normal((B, N)) * 0.1
    K, dt = 0.5, 0.1
    simulate_kuramoto(omega, K, dt, 5)                      # compile / load the cache
    steps_nb = 500 if quick else 3000
    steps_np = 50 if quick else 300
    t_nb = best_time(lambda: simulate_kuramoto(omega, K, dt, steps_nb, record_every=100), 3)
    t_np = best_time(lambda: simulate_kuramoto(omega, K, dt, steps_np, record_every=steps_np,
                                               backend="numpy"), 2)
    nb = B * N * steps_nb / t_nb
    npy = B * N * steps_np / t_np
    return {"B": B, "N": N, "numba_osc_steps_per_s": nb, "numpy_osc_steps_per_s": npy,
            "ratio": nb / npy}


def bench_simulate(quick: bool) -> dict:
    from chronomoe_dyn.env import EnvConfig
    from chronomoe_dyn.simulate import simulate
    env = EnvConfig(num_layers=8, num_experts=8, top_k=2, tokens_per_tick=256)
    simulate(env=env, num_systems=2, ticks=20, record_every=10)   # compile / load the cache
    out = {"L": 8, "E": 8, "top_k": 2, "tokens_per_tick": 256}
    t1 = 200 if quick else 1000
    t, c = best_times(lambda: simulate(env=env, num_systems=1, ticks=t1, record_every=10), 3)
    out["numba_B1_system_ticks_per_s"] = t1 / t
    out["numba_B1_cpu_us_per_system_tick"] = c / t1 * 1e6
    B, tb = 1024, (10 if quick else 40)
    t, c = best_times(lambda: simulate(env=env, num_systems=B, ticks=tb, record_every=10,
                                       record_layers=False), 2)
    out["numba_B1024_system_ticks_per_s"] = B * tb / t
    out["numba_B1024_cpu_us_per_system_tick"] = c / (B * tb) * 1e6
    out["numba_B1024_cores_used"] = c / t
    tn = 30 if quick else 150
    t, c = best_times(lambda: simulate(env=env, num_systems=1, ticks=tn, record_every=10,
                                       backend="numpy"), 2)
    out["numpy_reference_system_ticks_per_s"] = tn / t
    out["numpy_reference_cpu_us_per_system_tick"] = c / tn * 1e6
    ref = out["numpy_reference_system_ticks_per_s"]
    out["ratio_B1"] = out["numba_B1_system_ticks_per_s"] / ref
    out["ratio_B1024"] = out["numba_B1024_system_ticks_per_s"] / ref
    return out


def bench_step() -> dict:
    from chronomoe_dyn import ControllerConfig, RoutingObservation, init_state, step
    L, E = 32, 64
    cfg = ControllerConfig(phase_noise=0.05)
    state = init_state(cfg, L, E, seed=0)
    r = np.random.default_rng(0)
    obs = RoutingObservation(r.integers(0, 20, (L, E)).astype(float), r.random((L, E)) * 5,
                             r.random((L, E)) * 30)
    n = 400
    state = step(state, cfg, obs, 0.2)

    def run():
        s = state
        for _ in range(n):
            s = step(s, cfg, obs, 0.2)
    return {"L": L, "E": E, "step_us": best_time(run, 3) / n * 1e6}


def bench_import() -> dict:
    code = ("import time, sys; t = time.perf_counter(); import chronomoe_dyn; "
            "d = time.perf_counter() - t; "
            "print(d, 'numba' in sys.modules, 'torch' in sys.modules)")
    best, numba_loaded, torch_loaded = float("inf"), None, None
    for _ in range(3):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        d, nb, tc = res.stdout.split()
        if float(d) < best:
            best, numba_loaded, torch_loaded = float(d), nb == "True", tc == "True"
    return {"import_s": best, "imports_numba": numba_loaded, "imports_torch": torch_loaded}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    args = ap.parse_args(argv)
    import numba
    res = {"cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
           "numba": numba.__version__, "numpy": np.__version__}
    res["import"] = bench_import()
    print(f"import chronomoe_dyn: {res['import']['import_s']:.3f} s "
          f"(numba imported: {res['import']['imports_numba']}, "
          f"torch imported: {res['import']['imports_torch']})", flush=True)
    res["kuramoto"] = k = bench_kuramoto(args.quick)
    print(f"simulate_kuramoto B=32 N=1000: numba {k['numba_osc_steps_per_s']:.3g} osc-steps/s, "
          f"numpy loop {k['numpy_osc_steps_per_s']:.3g} osc-steps/s, ratio {k['ratio']:.1f}x",
          flush=True)
    res["simulate"] = s = bench_simulate(args.quick)
    print(f"simulate L=8 E=8 top-2 256 tok: B=1 {s['numba_B1_system_ticks_per_s']:.4g} "
          f"system-ticks/s, B=1024 {s['numba_B1024_system_ticks_per_s']:.4g} system-ticks/s, "
          f"NumPy reference {s['numpy_reference_system_ticks_per_s']:.4g} system-ticks/s "
          f"(ratio B=1 {s['ratio_B1']:.1f}x, B=1024 {s['ratio_B1024']:.1f}x); CPU per "
          f"system-tick: numba {s['numba_B1024_cpu_us_per_system_tick']:.0f} us "
          f"(B=1024, {s['numba_B1024_cores_used']:.2f} cores busy), NumPy "
          f"{s['numpy_reference_cpu_us_per_system_tick']:.0f} us", flush=True)
    res["step"] = st = bench_step()
    print(f"reference step L=32 E=64: {st['step_us']:.1f} us", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
