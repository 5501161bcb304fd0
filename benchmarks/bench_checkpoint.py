"""Checkpoint save/load time and size for the default small model.

Question: what does a trainer checkpoint of the default small model cost (MixtralConfig(vocab
256, hidden 128, 4 layers, 8 experts) + fused AdamW moments + controller + schedulers + RNG),
on disk and in time, with and without the read-back verification of ``save_state``? And the
controller's ``ChronovisorCheckpoint`` alone?

Method: one trainer, two optimizer steps (so AdamW state exists), then each operation timed
``--repeats`` times into a temporary directory on the same filesystem as ``--dir``; medians (and
minima) printed. Checkpoints are write-once, so each timed save writes a new directory; moving a
pointer (``final``) is timed on its own. Saves include every fsync; loads include reading and hashing every file (the
page cache is warm: it measures the CPU side, not the disk).

Run: ``python benchmarks/bench_checkpoint.py [--repeats 7] [--dir /tmp] [--threads 1] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from chronomoe_torch import checkpoint as ckpt
from chronomoe_torch.config import TrainingConfig
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
from chronomoe_torch.trainer import ChronoMoETrainer

# ---- config -----------------------------------------------------------------------------
MODEL = dict(vocab_size=256, hidden_dim=128, num_layers=4, num_experts=8)
BATCH, SEQ, STEPS = 4, 64, 2


def build(workdir: Path) -> ChronoMoETrainer:
    model = ChronovisorMixtralForCausalLM(MixtralConfig(**MODEL, max_seq_length=SEQ))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, MODEL["vocab_size"], (BATCH * STEPS, SEQ), generator=g))
    cfg = TrainingConfig(max_steps=STEPS, kappa_warmup_steps=1, log_every_n_steps=1,
                         eval_every_n_steps=0, save_every_n_steps=0, save_final=False,
                         save_best=False, progress_bar=False, run_dir=None, device="cpu",
                         checkpoint_dir=str(workdir / "ckpt"))
    tr = ChronoMoETrainer(model, cfg, DataLoader(data, batch_size=BATCH))
    tr.train()
    return tr


def timed(fn, repeats: int) -> dict[str, float]:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"median_s": statistics.median(ts), "min_s": min(ts)}


def dir_size(p: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(p.iterdir())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        tr = build(d)
        n_params = sum(p.numel() for p in tr.model.parameters())
        tree = tr.state_dict()
        r: dict[str, object] = {"model": MODEL, "parameters": n_params}

        counter = iter(range(1 << 30))   # checkpoints are write-once: a new name per save

        def fresh(prefix: str) -> Path:
            return d / "ckpt" / f"{prefix}_{next(counter)}"

        r["trainer_save_verified"] = timed(
            lambda: ckpt.save_state(fresh("v"), tr.state_dict(), kind="trainer"), args.repeats)
        r["save_state_unverified"] = timed(
            lambda: ckpt.save_state(fresh("nv"), tr.state_dict(), verify=False), args.repeats)
        ckpt.save_state(d / "ckpt" / "bench", tree)
        r["pointer_move"] = timed(lambda: ckpt.write_pointer(d / "ckpt", "final", "bench"),
                                  args.repeats)
        r["state_dict_only"] = timed(tr.state_dict, args.repeats)
        r["load_state"] = timed(lambda: ckpt.load_state(d / "ckpt" / "bench"), args.repeats)
        r["trainer_load_checkpoint"] = timed(lambda: tr.load_checkpoint("bench"), args.repeats)
        r["verify_checksums_only"] = timed(lambda: ckpt.verify_checkpoint(d / "ckpt" / "bench"),
                                           args.repeats)
        files = dir_size(d / "ckpt" / "bench")
        r["trainer_files_bytes"] = files
        r["trainer_total_bytes"] = sum(files.values())
        enc = ckpt._Encoder()
        enc.encode(tree)
        r["tensors_in_tree"] = len(enc.tensors)
        r["tensor_bytes"] = sum(t.numel() * t.element_size() for t in enc.tensors.values())

        ctrl = tr.model.controller
        r["geo_capture"] = timed(lambda: ckpt.ChronovisorCheckpoint.from_controller(ctrl),
                                 args.repeats)
        geo = ckpt.ChronovisorCheckpoint.from_controller(ctrl)
        r["geo_save"] = timed(lambda: geo.save(fresh("geo"), update_latest=False), args.repeats)
        geo.save(d / "geo", update_latest=False)
        r["geo_load_restore"] = timed(
            lambda: ckpt.ChronovisorCheckpoint.load(d / "geo").restore_to_controller(ctrl),
            args.repeats)
        r["geo_total_bytes"] = sum(dir_size(d / "geo").values())

    mb = 1e6
    print(f"model: {MODEL}, {n_params / 1e6:.2f} M parameters, fused AdamW, controller "
          f"(history 10000), {args.threads} thread(s), {args.repeats} repeats (median / min)")
    print(f"trainer checkpoint: {r['trainer_total_bytes'] / mb:.1f} MB on disk "
          f"({r['tensors_in_tree']} tensors, {r['tensor_bytes'] / mb:.1f} MB of tensor data; "
          + ", ".join(f"{k} {v / mb:.2f} MB" for k, v in r["trainer_files_bytes"].items()) + ")")
    for k in ("trainer_save_verified", "save_state_unverified", "pointer_move", "state_dict_only",
              "load_state", "trainer_load_checkpoint", "verify_checksums_only", "geo_capture",
              "geo_save", "geo_load_restore"):
        v = r[k]
        print(f"  {k:26s} {v['median_s'] * 1e3:8.1f} ms   (min {v['min_s'] * 1e3:.1f} ms)")
    print(f"ChronovisorCheckpoint: {r['geo_total_bytes'] / 1e3:.1f} kB on disk")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
