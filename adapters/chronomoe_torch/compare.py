"""``chronomoe-train compare``: arms × seeds of the project's own trainer, side by side.

    chronomoe-train compare --arms plain,switch,aux_free,pxt,pxt-fields-off --seeds 0,1,2 \\
        --steps 500 --run-dir runs/compare

Every (arm, seed) is one run of ``ChronoMoETrainer`` on the same benchmark recipe
(``arms.BenchmarkSpec``: model, data, data order and seed per column), in its own folder
``<run-dir>/<arm>/seed<s>/`` with the trainer's usual outputs (``metrics.jsonl``,
``config.json``, ``summary.json``, ``plots/``). At the top: ``results.csv`` (one row per arm),
``runs.csv`` (one row per run), ``results.md`` (the table) and the plots of
``compare_plots``. Every number in the table is recomputed from the runs' ``metrics.jsonl``
(``summarise_run``), so a reused run gives the same row as a fresh one.

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
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chronomoe_dyn import cluster

from .arms import Arm, ArmError, BenchmarkSpec, parse_arms, resolve_arm

__all__ = ["run_comparison", "ComparisonResult", "summarise_run", "read_run_records",
           "run_task", "main", "build_parser", "RUN_METRICS"]

DONE_FILE, ERROR_FILE = "done.json", "error.json"
RUN_METRICS = ("eval_loss", "perplexity", "maxvio_batch", "maxvio_global", "routing_entropy",
               "exploration_rate", "R_mean", "R_p10", "R_p90", "gate_mean", "tokens_per_s",
               "skipped_steps")
"""What ``summarise_run`` reports per run (and the table per arm, mean ± sd over seeds)."""


# ------------------------------------------------------------------------------------------
# one run (executed in a worker process, or in this one)

def run_dir_for(root: Path, arm: str, seed: int) -> Path:
    return root / arm / f"seed{seed}"


def fingerprint(arm: Arm, spec: BenchmarkSpec, seed: int) -> str:
    """Hash of everything that decides a run's metrics (configs, data, code version)."""
    import chronomoe_dyn
    model, training = resolve_arm(arm, spec, seed)
    tr = training.to_dict()
    for k in ("run_dir", "checkpoint_dir", "progress_bar", "tensorboard"):
        tr.pop(k, None)
    doc = {"model": model.to_dict(), "training": tr, "data": spec.data,
           "seq_len": spec.seq_len, "eval_fraction": spec.eval_fraction,
           "eval_batches": spec.eval_batches, "shift_at_step": spec.shift_at_step, "python": sys.version_info[:2],
           "version": chronomoe_dyn.__version__}
    blob = json.dumps(doc, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


@functools.lru_cache(maxsize=4)
def _datasets(data: tuple[str, ...] | None, seq_len: int, eval_fraction: float):
    from .data import ByteDataset
    # one file cannot be split by file: hold out its tail instead
    split_by = "position" if data is not None and len(data) == 1 else "file"
    kw = dict(seq_len=seq_len, eval_fraction=eval_fraction, split_by=split_by)
    return ByteDataset(data, split="train", **kw), ByteDataset(data, split="eval", **kw)


class _ByteShift:
    """The disruption of ``BenchmarkSpec.shift_at_step``: a loader wrapper that maps every byte
    b of a batch to perm[b] once ``clock[0]`` (train batches yielded so far) reaches ``start``.
    The train wrapper advances the clock; the eval wrapper only reads it."""

    SEED = 0x5EED

    def __init__(self, loader: Any, start: int, clock: list[int], counts: bool) -> None:
        import torch
        self.loader, self.start, self.clock, self.counts = loader, start, clock, counts
        self.perm = torch.randperm(256, generator=torch.Generator().manual_seed(self.SEED))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.clock[0] >= self.start:
                batch = {k: self.perm[v] for k, v in batch.items()}
            if self.counts:
                self.clock[0] += 1
            yield batch


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) into ``task["dir"]``; never raises (a failure is returned and
    written to ``error.json``). ``task``: arm (dict), seed, spec (dict), dir, threads,
    fingerprint, plots. Picklable in and out, for the execution layer."""
    t0 = time.perf_counter()
    out = Path(task["dir"])
    arm_d, seed = task["arm"], int(task["seed"])
    try:
        import torch
        threads = task.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        arm = Arm(**arm_d)
        spec_d = dict(task["spec"])
        if spec_d.get("data") is not None:
            spec_d["data"] = tuple(spec_d["data"])
        spec = BenchmarkSpec(**spec_d)
        from .data import byte_dataloader
        from .model import ChronovisorMixtralForCausalLM
        from .trainer import ChronoMoETrainer
        model_cfg, train_cfg = resolve_arm(arm, spec, seed, out)
        train_ds, eval_ds = _datasets(spec.data, spec.seq_len, spec.eval_fraction)
        train_dl = byte_dataloader(train_ds, spec.batch_size, seed=seed)
        eval_dl = byte_dataloader(eval_ds, spec.batch_size, shuffle=False, drop_last=False)
        if spec.shift_at_step is not None:
            clock = [0]
            start = spec.shift_at_step * train_cfg.gradient_accumulation_steps
            train_dl = _ByteShift(train_dl, start, clock, counts=True)
            eval_dl = _ByteShift(eval_dl, start, clock, counts=False)
        out.mkdir(parents=True, exist_ok=True)
        trainer = ChronoMoETrainer(ChronovisorMixtralForCausalLM(model_cfg), train_cfg,
                                   train_dl, eval_dl)
        log = logging.getLogger("chronomoe_torch")
        level = log.level
        log.setLevel(logging.WARNING)          # the comparison reports; runs keep quiet
        try:
            res = trainer.train()
        finally:
            log.setLevel(level)
        summary = {k: v for k, v in res.items() if not k.endswith("_history")}
        summary.update(arm=arm.name, seed=seed, unigram_baseline=eval_ds.unigram_entropy(),
                       threads=torch.get_num_threads())
        _write_json_atomic(out / "summary.json", summary)
        if task.get("plots", True):
            from chronomoe_dyn.plot import plot_run
            plot_run(out)
        _write_json_atomic(out / DONE_FILE, {"fingerprint": task["fingerprint"],
                                             "arm": arm.name, "seed": seed,
                                             "tokens_per_s": summary.get("tokens_per_s"),
                                             "elapsed_s": time.perf_counter() - t0})
        return {"arm": arm.name, "seed": seed, "status": "ok",
                "elapsed_s": time.perf_counter() - t0}
    except BaseException as e:  # noqa: BLE001 - reported, never propagated
        if isinstance(e, KeyboardInterrupt):
            raise
        err = {"arm": arm_d.get("name"), "seed": seed, "status": "error",
               "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(out / ERROR_FILE, err)
        except OSError:
            pass
        return err


# ------------------------------------------------------------------------------------------
# reading a run back: every number of the table comes from metrics.jsonl

def read_run_records(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl, sorted by step; a step logged twice
    keeps the later line. Known fields are validated against the schema (and converted), other
    keys are kept as written."""
    from chronomoe_dyn.plot import MetricsFormatError, validate_metrics_record
    p = Path(path)
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsFormatError(f"{p} line {lineno}: not valid JSON ({e.msg})") from None
            # the schema checks the fields it knows; keys it does not know are kept as written
            rec = {**raw, **validate_metrics_record(raw, f"{p} line {lineno}")}
            (evals if rec.get("split", "train") == "eval" else train)[rec["step"]] = rec
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _maxvio(load: Any) -> float | None:
    """Mean over layers of max/mean − 1 of a [L, E] load (counts or shares)."""
    if load is None:
        return None
    a = np.asarray(load, dtype=np.float64)
    m = a.mean(axis=-1)
    if np.any(m <= 0):
        return None
    return float((a.max(axis=-1) / m - 1.0).mean())


def _mean_of(recs: list[dict], key: str) -> float | None:
    v = [r[key] for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.mean(v)) if v else None


def summarise_run(run_dir: str | Path) -> dict[str, Any]:
    """The table's numbers of one finished run, recomputed from its metrics.jsonl:

    eval_loss: the last evaluation's loss (nats/byte); perplexity: exp of it;
    maxvio_batch: mean over logged training steps of MaxVio (``maxvio``, or from ``load_LE``);
    maxvio_global: the last evaluation's ``maxvio_global`` (slot counts summed over the eval
    set); routing_entropy, exploration_rate, gate_mean: means over logged steps; R_mean,
    R_p10, R_p90: mean and 10th/90th percentiles of R over logged steps; skipped_steps: the
    last record's count. tokens_per_s comes from done.json (timing is not in the metrics)."""
    d = Path(run_dir)
    train, evals = read_run_records(d / "metrics.jsonl")
    out: dict[str, Any] = dict.fromkeys(RUN_METRICS)
    if evals:
        last = evals[-1]
        out["eval_loss"] = last.get("loss")
        if isinstance(out["eval_loss"], (int, float)):
            out["perplexity"] = math.exp(min(out["eval_loss"], 700.0))
        out["maxvio_global"] = last.get("maxvio_global")
    vio = [r["maxvio"] if isinstance(r.get("maxvio"), (int, float)) else _maxvio(r.get("load_LE"))
           for r in train]
    vio = [v for v in vio if v is not None and math.isfinite(v)]
    out["maxvio_batch"] = float(np.mean(vio)) if vio else None
    for key, name in (("routing_entropy", "routing_entropy"),
                      ("exploration_rate", "exploration_rate"), ("gate", "gate_mean")):
        out[name] = _mean_of(train, key)
    R = [r["R"] for r in train if isinstance(r.get("R"), (int, float)) and math.isfinite(r["R"])]
    if R:
        out["R_mean"] = float(np.mean(R))
        out["R_p10"], out["R_p90"] = (float(x) for x in np.percentile(R, [10, 90]))
    if train:
        out["skipped_steps"] = train[-1].get("skipped_steps")
    done = d / DONE_FILE
    if done.is_file():
        out["tokens_per_s"] = json.loads(done.read_text(encoding="utf-8")).get("tokens_per_s")
    return out


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
        _write_json_atomic(root / "comparison.json",
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
