"""``chronomoe-train compare``: arms × seeds of the project's own trainer, side by side.

    chronomoe-train compare --arms plain,switch,aux_free,pxt,pxt-fields-off --seeds 0,1,2 \\
        --steps 500 --run-dir runs/compare

Every (arm, seed) is one run of ``ChronoMoETrainer`` on the same benchmark recipe
(``arms.BenchmarkSpec``: model, data, data order and seed per column), in its own folder
``<run-dir>/<arm>/seed<s>/`` with the trainer's usual outputs (``metrics.jsonl``,
``config.json``, ``summary.json``, ``plots/``). At the top: ``results.csv`` (one row per arm),
``runs.csv`` (one row per run), ``results.md`` (the table) and the plots of
``compare_plots``. Every number in the table is recomputed from the runs' ``metrics.jsonl``
(``summarise_run``), so a reused run gives the same row as a fresh one. One run (training it,
reading it back) is ``compare_run``; the table and figures are ``compare_report``.

Runs are idempotent: a finished run leaves ``done.json`` (its config fingerprint and summary)
written last and atomically; a rerun reuses finished runs with the same fingerprint, reruns
unfinished or failed ones (their folders are cleared first), and refuses, before running
anything, a folder that holds a finished run of *other* settings (``overwrite=True`` discards
it). A failed run writes ``error.json``, is reported in the table with its error and does not
stop the others.

Execution: the runs go to the execution layer ``chronomoe_dyn.cluster`` — a
``dask.distributed`` ``LocalCluster`` sized to the machine by default (workers × torch threads ≤
cores), an existing cluster with ``scheduler="tcp://HOST:PORT"``, or this process
(``in_process=True``). The same (arm, seed) and thread count give bitwise the same
``metrics.jsonl`` wherever it runs (CPU; tested with a two-worker LocalCluster).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chronomoe_dyn import cluster

from .arms import Arm, ArmError, BenchmarkSpec, parse_arms
from .compare_run import (DONE_FILE, ERROR_FILE, RUN_METRICS, fingerprint, read_run_records,
                          run_dir_for, run_task, summarise_run, write_json_atomic)

__all__ = ["run_comparison", "ComparisonResult", "summarise_run", "read_run_records",
           "run_task", "main", "build_parser", "RUN_METRICS"]

# ------------------------------------------------------------------------------------------
# the comparison

@dataclass
class ComparisonResult:
    """What ``run_comparison`` returns: per-run rows, per-arm rows, and the files written."""
    runs: list[dict[str, Any]]
    arms: list[dict[str, Any]]
    files: list[Path]
    reused: int
    ran: int
    failed: int

    def table(self) -> str:
        from .compare_report import markdown_table
        return markdown_table(self.arms, self.runs)


def _plan(arms: Sequence[Arm], seeds: Sequence[int], spec: BenchmarkSpec, root: Path,
          overwrite: bool) -> tuple[list[dict], list[tuple[Arm, int]], list[Path]]:
    """Check every (arm, seed) before anything runs: (tasks to run, reused runs, dirs to clear).
    Raises ArmError for a bad arm and FileExistsError for a folder holding other settings."""
    todo, reused, clear, conflicts = [], [], [], []
    for arm in arms:
        for s in seeds:
            fp = fingerprint(arm, spec, s)       # resolves and validates every field
            d = run_dir_for(root, arm.name, s)
            done = d / DONE_FILE
            if done.is_file():
                try:
                    old = json.loads(done.read_text(encoding="utf-8")).get("fingerprint")
                except (OSError, ValueError):
                    old = None
                if old == fp:
                    reused.append((arm, s))
                    continue
                if not overwrite:
                    conflicts.append(d)
                    continue
            if d.exists():
                clear.append(d)
            todo.append({"arm": arm.to_dict(), "seed": int(s), "spec": spec.to_dict(),
                         "dir": str(d), "fingerprint": fp})
    if conflicts:
        listed = ", ".join(str(c) for c in conflicts[:4]) + (" ..." if len(conflicts) > 4 else "")
        raise FileExistsError(f"{len(conflicts)} run folder(s) hold finished runs of other "
                              f"settings ({listed}); pass --overwrite to discard them, or "
                              f"choose another --run-dir")
    return todo, reused, clear


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**32:
            raise ArmError(f"seed {s!r}: expected an integer in [0, 2**32)")
        out.append(int(s))
    if not out:
        raise ArmError("no seeds given")
    if len(set(out)) != len(out):
        raise ArmError(f"seeds {out}: a seed is listed twice")
    return out


def run_comparison(arms: Sequence[str | Arm], seeds: Sequence[int] = (0, 1, 2), *,
                   steps: int = 500, run_dir: str | Path = "runs/compare",
                   arms_file: str | Path | None = None, data: Sequence[str] | None = None,
                   workers: int | None = None, threads: int | None = None,
                   scheduler: str | None = None, in_process: bool = False,
                   overwrite: bool = False, progress: bool = True, plots: bool = True,
                   shift_at: int | None = None, spec: BenchmarkSpec | None = None
                   ) -> ComparisonResult:
    """Run arms × seeds (see the module docstring) and write the table and plots.

    arms: names (built-ins, ``kappa=<v>``, or arms of ``arms_file``) or ``Arm`` objects.
    steps, data, shift_at: the benchmark's length, text files and disruption step (``spec``
    gives the whole recipe instead).
    workers, threads, scheduler, in_process: where the runs go (``chronomoe_dyn.cluster``).
    Every argument is checked, and the scheduler contacted, before any run starts."""
    named = [a for a in arms if isinstance(a, str)]
    parsed = iter(parse_arms(named, arms_file) if named else [])
    arm_list = [a if isinstance(a, Arm) else next(parsed) for a in arms]
    seeds = _check_seeds(list(seeds))
    if spec is None:
        spec = BenchmarkSpec(steps=steps, data=tuple(data) if data else None,
                             shift_at_step=shift_at)
    if spec.data is not None:
        for f in spec.data:
            if not Path(f).is_file():
                raise ArmError(f"--data: no such file {f}")
    root = Path(run_dir)
    todo, reused, clear = _plan(arm_list, seeds, spec, root, overwrite)
    cspec = None if in_process else cluster.ClusterSpec(scheduler=scheduler, workers=workers,
                                                        threads=threads)
    if in_process and (workers is not None or scheduler is not None):
        raise ArmError("--in-process runs here: leave out --workers and --scheduler")
    n_threads = cluster.ClusterSpec(threads=threads).threads_per_task if in_process \
        else cspec.threads_per_task
    client = cluster.open_client(cspec) if cspec is not None and todo else None  # may refuse
    try:
        for t in todo:
            t["threads"] = n_threads
            t["plots"] = plots
        for d in clear:
            shutil.rmtree(d)
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "comparison.json",
                           {"arms": [a.to_dict() for a in arm_list], "seeds": seeds,
                            "spec": spec.to_dict(), "threads": n_threads,
                            "execution": cluster.describe(cspec)})
        outcomes: dict[tuple[str, int], dict] = {}
        if todo:
            def done(name: str, r: dict) -> None:
                outcomes[(r.get("arm"), r.get("seed"))] = r

            def failed(name: str, exc: BaseException) -> None:   # a worker died
                arm, _, seed = name.rpartition("/seed")
                outcomes[(arm, int(seed))] = {"status": "error",
                                              "error": f"{type(exc).__name__}: {exc}"}

            cluster.run_tasks(client, {f"{t['arm']['name']}/seed{t['seed']}": t for t in todo},
                              run_task, on_done=done, on_error=failed, progress=progress,
                              desc="compare", unit="run", threads=n_threads)
    finally:
        cluster.close_client(client)
    from .compare_report import write_report
    runs = []
    for arm in arm_list:
        for s in seeds:
            d = run_dir_for(root, arm.name, s)
            row: dict[str, Any] = {"arm": arm.name, "seed": s, "dir": str(d)}
            if (d / DONE_FILE).is_file():
                row.update(status="ok", **summarise_run(d))
            else:
                err = outcomes.get((arm.name, s))
                if err is None and (d / ERROR_FILE).is_file():
                    err = json.loads((d / ERROR_FILE).read_text(encoding="utf-8"))
                row.update(status="error", error=(err or {}).get("error", "did not finish"))
            runs.append(row)
    arm_rows, files = write_report(root, arm_list, runs, plots=plots)
    failed = sum(r["status"] != "ok" for r in runs)
    return ComparisonResult(runs=runs, arms=arm_rows, files=files, reused=len(reused),
                            ran=len(todo), failed=failed)


# ------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chronomoe-train compare",
        description="Run routing arms x seeds of the ChronoMoE trainer on the same model, data "
                    "and seeds, and write a table (results.md/csv) and plots of load balance "
                    "against loss.")
    a = p.add_argument
    a("--arms", required=True,
      help="comma-separated arms: plain, switch, aux_free, zloss, pxt, pxt-fields-off, "
           "pxt-nogate, kappa=<v>, or names from --arms-file")
    a("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a("--steps", type=int, default=500, help="optimizer steps per run (default 500)")
    a("--run-dir", default="runs/compare", help="output folder (default runs/compare)")
    a("--arms-file", default=None, help="TOML file defining more arms (see chronomoe_torch.arms)")
    a("--data", nargs="+", default=None, metavar="FILE",
      help="text files (default: the Python standard library's sources)")
    a("--shift-at", type=int, default=None, metavar="STEP",
      help="disrupt routing: from STEP on, a fixed byte permutation of the text (domain shift)")
    a("--workers", type=int, default=None, help="LocalCluster workers (default: cores/threads)")
    a("--threads", type=int, default=None, help="torch threads per run (default 1)")
    a("--scheduler", default=None, metavar="tcp://HOST:PORT",
      help="run on an existing Dask cluster instead of a LocalCluster")
    a("--in-process", action="store_true", help="run one after another in this process")
    a("--overwrite", action="store_true",
      help="discard finished runs in --run-dir whose settings differ")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            seeds = [int(s) for s in _split(args.seeds)]
        except ValueError:
            raise ArmError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if args.steps < 1:
            raise ArmError(f"--steps={args.steps}: expected an integer >= 1")
        res = run_comparison(_split(args.arms), seeds, steps=args.steps, run_dir=args.run_dir,
                             arms_file=args.arms_file, data=args.data, workers=args.workers,
                             threads=args.threads, scheduler=args.scheduler,
                             in_process=args.in_process, overwrite=args.overwrite,
                             shift_at=args.shift_at,
                             progress=not args.no_progress, plots=not args.no_plots)
    except (ArmError, FileExistsError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"chronomoe-train compare: error: {e}", file=sys.stderr)
        return 2
    print(res.table())
    print(f"\n{res.ran} run(s) trained, {res.reused} reused, {res.failed} failed; "
          f"outputs in {args.run_dir}")
    return 1 if res.failed else 0
