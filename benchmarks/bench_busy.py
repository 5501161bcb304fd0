"""Training on a busy machine: a 30-step ``chronomoe-train`` run idle vs with one other CPU-bound
process, before and after the CPU threading policy of ``chronomoe_torch._threads``.

Question (issue 11, item 2): on a 2-core machine with one other CPU-bound process running, is a
30-step run within 2x of the idle figure? Before the policy, torch's OpenMP worker threads
spin-waited at every parallel region while the other process held a core (seen: 3.4 s/step).

Variants (each run is a fresh ``python`` process: the OpenMP wait policy is fixed when torch
loads its OpenMP runtime):
  before  the old behaviour: torch imported before chronomoe_torch (so nothing chooses a wait
          policy: libgomp's default spin-then-sleep) and torch's default thread count
          (``--threads`` = the usable cores);
  auto    ``chronomoe-train`` as a user runs it now (threads and wait policy chosen by
          ``chronomoe_torch._threads``; its first line says what it chose);
  passive / one   exploration: OMP_WAIT_POLICY=PASSIVE with all cores; one thread.
Conditions: idle; busy = one extra process running ``while True: pass`` (pure Python, one core)
for the whole run. Figures: ``train_s``, the wall time of ``trainer.train()`` (30 steps with
their evaluations, from summary.json ``elapsed_s``), and ``wall_s``, the whole process. Runs are
interleaved (variant-major inside each repeat) and the median over ``--repeats`` is printed, with
busy/idle ratios of the medians. Machine load (1-min load average) is printed before and after:
the figures mean something only when nothing else ran.

Run:  python benchmarks/bench_busy.py [--repeats 3] [--variants before,auto] [--steps 30]
          [--model tiny|readme] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 30
MODELS = {
    # chronomoe-train's defaults (hidden 64, 2 layers, 4 experts, seq 64, batch 16)
    "tiny": [],
    # the README's training example (hidden 128, 4 layers, 8 experts, seq 128, batch 8)
    "readme": ["--hidden-dim", "128", "--layers", "4", "--experts", "8", "--seq-len", "127",
               "--batch-size", "8"],
}
BEFORE_LAUNCHER = ("import sys, torch\n"          # torch first: chronomoe_torch chooses nothing
                   "from chronomoe_torch.cli import main\n"
                   "sys.exit(main(sys.argv[1:]))\n")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def command(variant: str, run_dir: Path, steps: int, model: str) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    args = ["--steps", str(steps), "--no-plots", "--no-progress", "--run-dir", str(run_dir),
            *MODELS[model]]
    if variant == "before":
        return [sys.executable, "-c", BEFORE_LAUNCHER, *args, "--threads", str(cores())], env
    if variant == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        return [sys.executable, "-m", "chronomoe_torch.cli", *args, "--threads",
                str(cores())], env
    if variant == "one":
        return [sys.executable, "-m", "chronomoe_torch.cli", *args, "--threads", "1"], env
    if variant == "auto":
        return [sys.executable, "-m", "chronomoe_torch.cli", *args], env
    raise SystemExit(f"unknown variant {variant!r} (before, auto, passive, one)")


def run_once(variant: str, steps: int, model: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        cmd, env = command(variant, run_dir, steps, model)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{variant}: exit {p.returncode}\n{p.stderr[-2000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
        first = p.stdout.splitlines()[0] if p.stdout else ""
        return {"train_s": summary["elapsed_s"], "wall_s": wall, "first_line": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="before,auto")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    variants = args.variants.split(",")
    print(f"{cores()} usable cores; load average before: {os.getloadavg()[0]:.2f}; "
          f"model {args.model}; {args.steps} steps; {args.repeats} repeats", flush=True)
    res: dict = {v: {"idle": [], "busy": []} for v in variants}
    firsts: dict = {}
    for r in range(args.repeats):
        for cond in ("idle", "busy"):
            hog = None
            if cond == "busy":
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.5)
            try:
                for v in variants:
                    out = run_once(v, args.steps, args.model, args.timeout)
                    res[v][cond].append(out)
                    firsts[v] = out["first_line"]
                    print(f"  repeat {r} {cond:4s} {v:8s} train {out['train_s']:7.2f} s  "
                          f"process {out['wall_s']:7.2f} s", flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    summary = {}
    print(f"\n{'variant':8s} {'idle train s':>13s} {'busy train s':>13s} {'busy/idle':>10s} "
          f"{'idle proc s':>12s} {'busy proc s':>12s}")
    for v in variants:
        med = {c: {k: statistics.median(o[k] for o in res[v][c]) for k in ("train_s", "wall_s")}
               for c in ("idle", "busy")}
        ratio = med["busy"]["train_s"] / med["idle"]["train_s"]
        summary[v] = {**med, "busy_over_idle": ratio, "first_line": firsts[v]}
        print(f"{v:8s} {med['idle']['train_s']:13.2f} {med['busy']['train_s']:13.2f} "
              f"{ratio:10.2f} {med['idle']['wall_s']:12.2f} {med['busy']['wall_s']:12.2f}")
    for v in variants:
        print(f"first line ({v}): {firsts[v]}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
