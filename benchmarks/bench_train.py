"""Training throughput: the full ChronoMoE trainer over a plain sparse-MoE training loop.

Question (issue 3, "Speed and memory"): on CPU, at hidden 128, 4 layers, 8 experts, top-2,
seq 128, batch 8, does the full ChronoMoE trainer (controller ticks, the four-term loss, the
coherence gate, skip-on-non-finite, the trainer's loop and log cadence) reach ≥ 0.95× the
tokens/s of the same model with ``enable_chronovisor=False`` trained on the LM loss alone?

  A  baseline: the model with enable_chronovisor=False; a bare loop: forward, causal LM
     cross-entropy, backward, clip_grad_norm_(1.0), fused AdamW step, zero_grad. No trainer.
  B  ChronoMoE: the model with enable_chronovisor=True in ``ChronoMoETrainer.train()`` with the
     seed's TrainingConfig (λ 0.01/0.001/0.0001, gating on, cosine κ), logging every 100 steps,
     no eval, no checkpoints, no metrics file (those cost nothing per step by design).

Both see the same pre-made batches of real text (Python standard library bytes) and use the
same AdamW settings. Timing: short interleaved blocks in ABBA order (A, B, B, A, A, B, …) of
``--steps`` optimizer steps after a warm-up block each, so drifts in machine load cancel; per
block tokens/s from wall time and from the thread's CPU time (``time.thread_time``: the work
this process did, much less sensitive to other jobs on a shared machine). We report the median
of each, the ratio of medians and the median of the per-pair ratios. One CPU thread by default
(see bench_moe.py: on a shared machine more threads turn the figures into noise).

Run:  python benchmarks/bench_train.py [--steps 4] [--repeats 16] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from chronomoe_torch.config import TrainingConfig
from chronomoe_torch.data import ByteDataset
from chronomoe_torch.loss import causal_lm_token_loss
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
from chronomoe_torch.trainer import ChronoMoETrainer

H, L, E, K, SEQ, BATCH = 128, 4, 8, 2, 128, 8


def model_config(chronovisor: bool) -> MixtralConfig:
    return MixtralConfig(vocab_size=256, hidden_dim=H, num_layers=L, num_experts=E, top_k=K,
                         max_seq_length=SEQ, enable_chronovisor=chronovisor)


def make_batches(n: int) -> list[torch.Tensor]:
    ds = ByteDataset(seq_len=SEQ - 1)           # windows of SEQ tokens
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(ds), generator=g)[:n * BATCH].view(n, BATCH)
    return [torch.stack([ds[int(i)]["input_ids"] for i in row]) for row in idx]


class Baseline:
    """A: plain MoE, LM loss only, a bare loop."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.model = ChronovisorMixtralForCausalLM(model_config(False))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01,
                                     fused=True)
        self.batches = batches
        self.i = 0

    def run(self, steps: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            ids = self.batches[self.i % len(self.batches)]
            self.i += 1
            out = self.model(ids)
            tok, valid = causal_lm_token_loss(out.logits, ids)
            loss = tok.sum() / valid.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        n = steps * BATCH * SEQ
        return n / (time.perf_counter() - t0), n / (time.thread_time() - c0)


class Full:
    """B: ChronoMoE model in the full trainer loop; each block is one ``train()`` call that
    runs the next ``steps`` optimizer steps (model, optimizer, controller carry on)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.model = ChronovisorMixtralForCausalLM(model_config(True))
        cfg = TrainingConfig(max_steps=1_000_000, log_every_n_steps=100, eval_every_n_steps=0,
                             save_every_n_steps=0, run_dir=None, progress_bar=False,
                             save_final=False, save_best=False)
        self.trainer = ChronoMoETrainer(self.model, cfg, batches * 100_000)

    def run(self, steps: int) -> tuple[float, float]:
        self.trainer.total_steps = self.trainer.global_step + steps   # end of this block
        t0, c0 = time.perf_counter(), time.thread_time()
        self.trainer.train()
        n = steps * BATCH * SEQ
        return n / (time.perf_counter() - t0), n / (time.thread_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per timed block")
    ap.add_argument("--repeats", type=int, default=16, help="blocks of each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of B")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("chronomoe_torch").setLevel(logging.WARNING)

    batches = make_batches(32)
    a, b = Baseline(batches), Full(batches)
    a.run(3), b.run(3)                                      # warm-up (lazy state, caches)
    ra, rb = [], []
    for r in range(args.repeats):                           # ABBA: load drifts cancel
        first, second = ((a, ra), (b, rb)) if r % 2 == 0 else ((b, rb), (a, ra))
        first[1].append(first[0].run(args.steps))
        second[1].append(second[0].run(args.steps))
    print(f"config: hidden {H}, {L} layers, {E} experts, top-{K}, seq {SEQ}, batch {BATCH}; "
          f"{args.threads} thread(s); {args.repeats} blocks of {args.steps} steps each, ABBA")
    for j, clock in enumerate(("wall", "cpu")):
        xa, xb = [x[j] for x in ra], [x[j] for x in rb]
        ma, mb = statistics.median(xa), statistics.median(xb)
        pair = statistics.median(y / x for x, y in zip(xa, xb))
        print(f"[{clock} time] A plain MoE, LM loss, bare loop: {ma:7.0f} tokens/s | "
              f"B ChronoMoE trainer: {mb:7.0f} tokens/s | B/A {mb / ma:.3f} (medians), "
              f"{pair:.3f} (median pair ratio); target >= 0.95")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            b.run(args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
