"""One run of ``chronomoe-train compare``: training an (arm, seed), and reading it back.

``run_task`` trains one (arm, seed) of the benchmark recipe into its own folder, in a worker
process of the execution layer or in this one: the arm's model and ``TrainingConfig``
(``arms.resolve_arm``), the byte corpus split into train and eval (``data``), the optional
domain shift (``BenchmarkSpec.shift_at_step``: a fixed byte permutation from that step on), the
trainer's outputs, ``summary.json`` and plots, and last, atomically, ``done.json`` with the run's
config ``fingerprint``. It never raises: a failure is returned and written to ``error.json``.

``summarise_run`` recomputes the table's numbers of a finished run (``RUN_METRICS``) from its
``metrics.jsonl``, so a reused run gives the same row as a fresh one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .arms import Arm, BenchmarkSpec, resolve_arm

__all__ = ["run_task", "summarise_run", "read_run_records", "fingerprint", "run_dir_for",
           "RUN_METRICS", "DONE_FILE", "ERROR_FILE"]

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
           "eval_batches": spec.eval_batches, "shift_at_step": spec.shift_at_step,
           "python": sys.version_info[:2], "version": chronomoe_dyn.__version__}
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


def write_json_atomic(path: Path, obj: Any) -> None:
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
        write_json_atomic(out / "summary.json", summary)
        if task.get("plots", True):
            from chronomoe_dyn.plot import plot_run
            plot_run(out)
        write_json_atomic(out / DONE_FILE, {"fingerprint": task["fingerprint"],
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
            write_json_atomic(out / ERROR_FILE, err)
        except OSError:
            pass
        return err


# ------------------------------------------------------------------------------------------
# reading a run back: every number of the table comes from metrics.jsonl

def read_run_records(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl (``chronomoe_dyn.runlog.read_records``
    without the line numbers)."""
    from chronomoe_dyn.runlog import read_records
    train, evals = read_records(path)
    return [r for _, r in train], [r for _, r in evals]


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
