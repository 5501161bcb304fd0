"""Worker for test_distributed.py's trainer tests: the user's single-process training script,
run unchanged under ``torchrun --nproc-per-node 2`` (gloo, CPU).

``script()`` is what a user writes for one process: model, TrainingConfig, DataLoaders,
``ChronoMoETrainer(...).train()``. Under torchrun the trainer makes the process group, wraps the
model in DDP, shards the batches and all-reduces what must be global. ``main`` (the harness, not
the user's script) runs three scenarios on every rank and saves each rank's final trainer state
to ``OUT/rank<r>/<scenario>`` for the test:
  * ``chronomoe``: the seed's loss terms, G=2 micro-batches per rank, evaluation every 3 steps
    over 3 batches (an odd count: shards of 2 and 1), metrics and checkpoints every 3 steps;
  * ``resumed``: a fresh trainer (another init seed) that loads ``step_3`` of that run on every
    rank and trains to the end: it must equal ``chronomoe`` bit for bit;
  * ``aux_free``: DeepSeek-style bias balancing, and router logits made NaN on rank 1 only at
    step 3: both ranks must skip that step.
``run_single(scenario, out)`` is the same script in one process over the same global batches
(W·G micro-batches per step), the reference the ranks must match.

  * ``chronomoe_tau0``: ``chronomoe`` with the routing noise off (``exploration_tau0=0``), the
    scenario compared with one process. With noise the ranks draw different Gumbel noise than
    one process would (each rank keys it on its own tokens' positions, interleaved over the
    ranks: ``chronomoe_torch.routing``), so the two are different samples of the same routing
    distribution, not the same numbers; the ranks still stay bitwise equal to each other.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _progressions import V, Progressions  # noqa: E402

B, STEPS, WORLD, ACCUM = 4, 6, 2, 2


def script(out: Path, accum: int, aux_free: bool = False, init_seed: int = 0,
           resume: str | None = None, save_every: int = 3, noise: bool = True):
    """The user's script (one process or torchrun: the same code)."""
    from chronomoe_dyn import ControllerConfig
    from chronomoe_torch.config import TrainingConfig
    from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
    from chronomoe_torch.trainer import ChronoMoETrainer

    model = ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_dim=32, num_layers=2, num_experts=4, num_heads=4, num_kv_heads=2,
        top_k=2, max_seq_length=32, init_seed=init_seed,
        controller_config=ControllerConfig(**({} if noise else {"exploration_tau0": 0.0})),
        **({"aux_free_bias_rate": 1e-2} if aux_free else {})))
    cfg = TrainingConfig(
        learning_rate=3e-3, max_steps=STEPS, kappa_warmup_steps=2, log_every_n_steps=1,
        gradient_accumulation_steps=accum, eval_every_n_steps=3, eval_max_batches=3,
        save_every_n_steps=save_every, keep_last_n_checkpoints=None, progress_bar=False,
        run_dir=str(out / "run"), checkpoint_dir=str(out / "ckpt"), device="cpu",
        balance_mode="aux_free" if aux_free else "chronomoe", save_best=False)
    train = DataLoader(Progressions(64), batch_size=B, shuffle=True)
    evals = DataLoader(Progressions(20, seed=1), batch_size=B)
    trainer = ChronoMoETrainer(model, cfg, train, evals)
    if resume:
        trainer.load_checkpoint(resume)
    return trainer


def result_tree(trainer, results: dict) -> dict:
    """What the test compares: the trainer's state without the RNG states (the trainer draws
    nothing from them; Python's differs per process), plus the results' scalars."""
    tree = trainer.state_dict()
    del tree["rng"]
    tree["results"] = {k: results[k] for k in ("final_eval_loss", "skipped_steps",
                                                "global_step", "loss_history")}
    return tree


def run_single(scenario: str, out: Path) -> dict:
    """One process, W·G micro-batches per step: the reference (no fault)."""
    torch.set_num_threads(1)
    tr = script(out, accum=WORLD * ACCUM if scenario.startswith("chronomoe") else WORLD,
                aux_free=scenario == "aux_free", save_every=0,
                noise=scenario != "chronomoe_tau0")
    return result_tree(tr, tr.train())


def main() -> None:
    from chronomoe_torch import checkpoint as ckpt
    torch.set_num_threads(1)
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    rank = int(os.environ["RANK"])
    mine = out / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)

    tr = script(out / "chronomoe", accum=ACCUM)
    ckpt.save_state(mine / "chronomoe", result_tree(tr, tr.train()), kind="result")

    tr = script(out / "chronomoe", accum=ACCUM, init_seed=7, resume="step_3")
    ckpt.save_state(mine / "resumed", result_tree(tr, tr.train()), kind="result")

    tr = script(out / "chronomoe_tau0", accum=ACCUM, noise=False)
    ckpt.save_state(mine / "chronomoe_tau0", result_tree(tr, tr.train()), kind="result")

    tr = script(out / "aux_free", accum=1, aux_free=True)
    if rank == 1:       # NaN router logits on this rank only, during step 3
        router = tr.model.layers[0].moe.router
        router.register_forward_hook(
            lambda m, a, o: o._replace(logits_NE=o.logits_NE * math.nan)
            if tr.global_step == 2 else None)
    ckpt.save_state(mine / "aux_free", result_tree(tr, tr.train()), kind="result")
    (mine / "done.json").write_text(json.dumps({"world": tr.world_size, "rank": tr.rank}))


if __name__ == "__main__":
    main()
