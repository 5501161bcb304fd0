"""``chronomoe-train``: train a small ChronoMoE language model on real text, offline.

    chronomoe-train --steps 300                       # CPU or GPU (--device auto)
    chronomoe-train --steps 300 --no-chronovisor      # the plain-MoE baseline
    chronomoe-train --data notes.txt other.txt        # your own text files
    chronomoe-train compare --arms plain,switch,pxt   # arms x seeds side by side (compare.py)

Default corpus: the Python standard library's own sources, byte level (``data.ByteDataset``),
with its deterministic file-level train/eval split. Writes into ``--run-dir``: ``metrics.jsonl``
(one record per log step and per evaluation), ``config.json``, ``summary.json`` (the results of
``train()`` plus the unigram baseline), ``plots/*.png`` (loss, R/κ/gate, T̄ landscape, expert
load; via ``chronomoe_dyn.plot.plot_run``) and ``checkpoints/`` (``final``; ``step_<n>`` with
``--save-every``). Prints the unigram baseline (the entropy of the eval split's bytes: the best
loss of a model that ignores context) and whether the final eval loss went below it.

The first line says how many CPU threads it uses and the OpenMP wait policy (chosen to stay
fast on a shared machine, see ``chronomoe_torch._threads``; ``--threads`` overrides). A run
directory belongs to one run: a non-empty ``--run-dir`` is refused unless ``--resume NAME``
continues its run or ``--overwrite`` deletes it first. Exit status 0 on success, 1 when
``--require-below-baseline`` is given and the eval loss did not go below the baseline, 2 on a
user mistake (bad option, unreadable ``--data`` file, missing/corrupt/mismatched checkpoint,
unavailable device, a run directory of another run), reported in one ``error:`` line
(``--debug``: with the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chronomoe-train",
        description="Train a small ChronoMoE model on byte-level text (default: the Python "
                    "standard library's sources) and write metrics, plots and checkpoints.")
    a = p.add_argument
    a("--steps", type=int, default=300, help="optimizer steps (default 300)")
    a("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:<n>, mps")
    a("--run-dir", default="runs/chronomoe-train", help="output directory")
    a("--data", nargs="+", default=None, metavar="FILE",
      help="text files to train on (default: the Python standard library's .py files)")
    a("--eval-fraction", type=float, default=0.1, help="share of files held out for eval")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-dim", type=int, default=64)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--experts", type=int, default=4)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=2)
    g.add_argument("--no-chronovisor", action="store_true",
                   help="plain sparse MoE: no controller, no gating (the baseline)")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    t.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    t.add_argument("--lr-warmup", type=int, default=None, help="default: steps // 20")
    t.add_argument("--kappa-schedule", default="cosine",
                   choices=("constant", "linear", "cosine", "step", "adaptive"))
    t.add_argument("--kappa-warmup", type=int, default=None, help="default: steps // 10")
    t.add_argument("--balance-mode", choices=("chronomoe", "switch", "aux_free"),
                   default="chronomoe")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument("--seed", type=int, default=0)
    o = p.add_argument_group("logging and outputs")
    o.add_argument("--log-every", type=int, default=None, help="default: steps // 30, >= 1")
    o.add_argument("--eval-every", type=int, default=None, help="default: steps // 4")
    o.add_argument("--eval-batches", type=int, default=50, help="batches per evaluation")
    o.add_argument("--save-every", type=int, default=0, help="periodic checkpoints (0: off)")
    o.add_argument("--resume", default=None, metavar="NAME",
                   help="continue the run in --run-dir from this checkpoint (step_<n>, latest, "
                        "final, best: names in <run-dir>/checkpoints; or a path)")
    o.add_argument("--overwrite", action="store_true",
                   help="a non-empty --run-dir: delete the earlier run's outputs first")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    o.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: chosen for a shared machine, see the first "
                        "output line)")
    o.add_argument("--debug", action="store_true", help="tracebacks for errors")
    o.add_argument("--require-below-baseline", action="store_true",
                   help="exit 1 unless the final eval loss is below the unigram baseline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:             # `chronomoe-train compare ...` (compare.py)
        from .compare import main as compare_main
        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.steps < 1:
        build_parser().error(f"--steps={args.steps}: expected an integer >= 1")
    if args.threads is not None and args.threads < 1:
        build_parser().error(f"--threads={args.threads}: expected an integer >= 1")
    # `import chronomoe_torch` (this module's package) has already chosen the OpenMP wait
    # policy, before torch loaded its OpenMP runtime.
    from ._threads import apply_threads
    print(f"chronomoe-train: {apply_threads(args.threads).describe()}", flush=True)
    try:
        trainer, baseline, run_dir = _setup(args)
    except Exception as e:
        if args.debug or not _user_mistake(e):
            raise
        print(f"chronomoe-train: error: {e}", file=sys.stderr)
        return 2
    return _train(trainer, baseline, run_dir, args)


def _user_mistake(e: BaseException) -> bool:
    """Errors that come from what the user asked for (options, files, checkpoints, device, run
    directory); anything else is a bug and keeps its traceback."""
    return isinstance(e, (ValueError, OSError, UnicodeError))


def _setup(args: argparse.Namespace):
    """Configs, data, model, trainer, the run directory and the resumed checkpoint: everything
    a user mistake can break, before the run writes anything."""
    from .config import TrainingConfig
    from .data import BYTE_VOCAB_SIZE, ByteDataset, byte_dataloader
    from .model import ChronovisorMixtralForCausalLM, MixtralConfig
    from .trainer import ChronoMoETrainer

    run_dir = Path(args.run_dir)
    steps = args.steps
    model_cfg = MixtralConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_dim=args.hidden_dim, num_layers=args.layers,
        num_experts=args.experts, enable_chronovisor=not args.no_chronovisor,
        num_heads=args.heads, num_kv_heads=args.kv_heads, top_k=args.top_k,
        max_seq_length=args.seq_len + 1, init_seed=args.seed, controller_seed=args.seed)
    train_cfg = TrainingConfig(
        learning_rate=args.lr, max_steps=steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        kappa_warmup_steps=steps // 10 if args.kappa_warmup is None else args.kappa_warmup,
        kappa_schedule=args.kappa_schedule, balance_mode=args.balance_mode,
        lr_schedule=args.lr_schedule,
        lr_warmup_steps=steps // 20 if args.lr_warmup is None else args.lr_warmup,
        log_every_n_steps=max(1, steps // 30) if args.log_every is None else args.log_every,
        eval_every_n_steps=(steps // 4 if args.eval_every is None else args.eval_every),
        eval_max_batches=args.eval_batches, save_every_n_steps=args.save_every,
        checkpoint_dir=str(run_dir / "checkpoints"), run_dir=str(run_dir),
        device=args.device, bf16=args.bf16, seed=args.seed,
        progress_bar=not args.no_progress, tensorboard=args.tensorboard,
        save_best=False, overwrite=args.overwrite, num_threads=args.threads)
    # Configs first (cheap), then the corpus (reads every file).
    ds_kw = dict(seq_len=args.seq_len, eval_fraction=args.eval_fraction)
    train_ds = ByteDataset(args.data, split="train", **ds_kw)
    eval_ds = ByteDataset(args.data, split="eval", **ds_kw)
    baseline = eval_ds.unigram_entropy()
    train_loader = byte_dataloader(train_ds, args.batch_size, seed=args.seed)
    eval_loader = byte_dataloader(eval_ds, args.batch_size, shuffle=False, drop_last=False)
    model = ChronovisorMixtralForCausalLM(model_cfg)
    trainer = ChronoMoETrainer(model, train_cfg, train_loader, eval_loader)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    trainer.prepare_run_dirs()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"chronomoe-train: {len(train_ds.files)} train files ({train_ds.num_bytes:,} bytes), "
          f"{len(eval_ds.files)} eval files ({eval_ds.num_bytes:,} bytes); "
          f"{n_params:,} parameters; device {trainer.device}; "
          f"{'ChronoMoE' if model.controller is not None else 'plain MoE (no controller)'}")
    print(f"unigram baseline (entropy of the eval bytes): {baseline:.4f} nats/byte")
    return trainer, baseline, run_dir


def _train(trainer: Any, baseline: float, run_dir: Path, args: argparse.Namespace) -> int:
    results = trainer.train()
    final = results["final_eval_loss"]
    below = final is not None and final < baseline
    summary = {"unigram_baseline": baseline, "below_unigram_baseline": below,
               **{k: v for k, v in results.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n",
                                          encoding="utf-8")
    if not args.no_plots:
        from chronomoe_dyn.plot import plot_run
        for p in plot_run(run_dir):
            print(f"plot: {p}")
    rate = results["tokens_per_s"]
    print(f"trained {results['steps_run']} steps ({results['tokens']:,} tokens"
          + (f", {rate:,.0f} tokens/s" if rate else "") + f"); skipped steps: "
          f"{results['skipped_steps']}")
    if final is not None:
        print(f"final eval loss {final:.4f} nats/byte vs unigram baseline {baseline:.4f}: "
              f"{'below' if below else 'NOT below'} the baseline")
    print(f"outputs in {run_dir}")
    return 1 if args.require_below_baseline and not below else 0


if __name__ == "__main__":
    sys.exit(main())
