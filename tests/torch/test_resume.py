"""Exact resume across processes (issue 4, item 3).

For each variant (default recipe with phase noise, κ smoothing, LR warm-up + cosine and a
shuffled loader; gradient accumulation; aux-free balancing):
  A. one process trains 2N steps without saving;
  B. the same process (global RNGs reseeded) trains 2N steps saving ``step_N`` on the way, and
     ``final`` at the end;
  C. a FRESH process builds the trainer from scratch (another init seed, so nothing matches
     by accident), calls ``trainer.load_checkpoint("step_N")`` (the seed's usage) and
     ``trainer.train()``, which continues to ``max_steps``.
Then: A == B == C bit for bit on the whole trainer tree (parameters, controller buffers,
optimizer and gate state, LR and κ schedulers, loss state incl. aux-free biases, RNG states,
data position, counters, every per-step history incl. the loss sequence); saving does not
perturb training (A == B); and the checkpoints hold the live controller state (``final`` and
a ``ChronovisorCheckpoint`` of the live controller both match it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _trees import tree_diff as _diff

from chronomoe_torch import checkpoint as ckpt

N = 6  # steps before the checkpoint; 2N in all

WORKER = r'''
import json, os, random, sys
import numpy as np
import torch
torch.set_num_threads(1)  # the same kernels (and reductions) in every process
from torch.utils.data import DataLoader, Dataset
from chronomoe_dyn import ControllerConfig
from chronomoe_torch import checkpoint as ckpt
from chronomoe_torch.config import TrainingConfig
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
from chronomoe_torch.trainer import ChronoMoETrainer

N = int(os.environ["RESUME_N"])
V, S = 64, 17


class Progressions(Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, V, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(S)) % V
    def __len__(self):
        return self.ids.shape[0]
    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


VARIANTS = {
    # 10 batches per epoch: step N=6 is mid-epoch, 2N=12 crosses into epoch 1
    "default": dict(model=dict(controller_config=ControllerConfig(phase_noise=0.05, kappa_smoothing=0.3)),
                    train=dict(kappa_schedule="cosine", lr_schedule="cosine", lr_warmup_steps=2,
                               eval_every_n_steps=4, eval_max_batches=2),
                    n=40, eval=True),
    # G=2 over 6 batches: 3 steps per epoch, so step N=6 ends epoch 1 exactly (the resumed
    # run must open epoch 2 with the generator state the straight run has there)
    "accum": dict(model=dict(), train=dict(gradient_accumulation_steps=2, kappa_schedule="linear"),
                  n=24),
    "aux_free": dict(model=dict(aux_free_bias_rate=1e-2), train=dict(balance_mode="aux_free"), n=40),
}


def build(variant, ckdir, init_seed=0, save_every=0):
    v = VARIANTS[variant]
    model = ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_dim=32, num_layers=2, num_experts=4, num_heads=4, num_kv_heads=2,
        top_k=2, max_seq_length=32, init_seed=init_seed, **v["model"]))
    train = {"eval_every_n_steps": 0, **v["train"]}
    cfg = TrainingConfig(learning_rate=3e-3, max_steps=2 * N, kappa_warmup_steps=2,
                         log_every_n_steps=1, save_every_n_steps=save_every,
                         keep_last_n_checkpoints=None, progress_bar=False, run_dir=None,
                         checkpoint_dir=ckdir, save_final=bool(save_every), save_best=True,
                         device="cpu", **train)
    loader = DataLoader(Progressions(v["n"]), batch_size=4, shuffle=True)
    evl = DataLoader(Progressions(8, seed=1), batch_size=4) if v.get("eval") else None
    return ChronoMoETrainer(model, cfg, loader, evl)


def reseed():
    random.seed(123); np.random.seed(123); torch.manual_seed(123)


def main(mode, variant, out):
    out = os.path.abspath(out)
    ckdir = os.path.join(out, f"ckpt_{variant}")
    report = {}
    if mode == "straight":
        reseed()
        a = build(variant, os.path.join(out, f"unused_{variant}"))
        a.train()
        ckpt.save_state(os.path.join(out, f"A_{variant}"), a.state_dict(), kind="result")
        reseed()
        b = build(variant, ckdir, save_every=N)
        b.train()
        ckpt.save_state(os.path.join(out, f"B_{variant}"), b.state_dict(), kind="result")
        # the checkpoints hold the live controller state
        live = b.model.controller
        final = ckpt.load_state(os.path.join(ckdir, "final"))["model"]
        sd = {k: v for k, v in b.model.state_dict().items()}
        report["final_equals_live_model"] = ckpt.trees_equal(dict(final), sd)
        report["final_chronovisor_matches_live"] = \
            ckpt.ChronovisorCheckpoint.load(os.path.join(ckdir, "final")).matches(live)
        geo = ckpt.ChronovisorCheckpoint.from_controller(live)
        geo.save(os.path.join(out, f"geo_{variant}"))
        back = ckpt.ChronovisorCheckpoint.load(os.path.join(out, f"geo_{variant}"))
        report["geo_matches_live"] = back.matches(live)
        report["geo_tick"] = back.tick
        report["geo_history_len"] = int(back.coherence_history.shape[0])
    else:
        c = build(variant, ckdir, init_seed=7)
        name = "latest" if mode == "resume_latest" else f"step_{N}"
        c.load_checkpoint(name)
        report["step_after_load"] = c.global_step
        report["position_after_load"] = [c.epoch, c.batch_in_epoch]
        res = c.train()
        report["steps_run"] = res["steps_run"]
        report["global_step"] = res["global_step"]
        ckpt.save_state(os.path.join(out, f"C_{variant}"), c.state_dict(), kind="result")
    with open(os.path.join(out, f"report_{mode}_{variant}.json"), "w") as f:
        json.dump(report, f)


for variant in sys.argv[3:]:
    main(sys.argv[1], variant, sys.argv[2])
'''

VARIANTS = ("default", "accum", "aux_free")




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "RESUME_N": str(N), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()

    def run(*args):
        r = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"worker {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"

    run("straight", str(out), *VARIANTS)
    for v in VARIANTS:  # one fresh process per resumed run
        run("resume", str(out), v)
    # the `latest` pointer: B's last save was `final`; point it at step_N like a crash would
    # leave it had the run died after saving step_N, and resume through it
    (out / "ckpt_default" / "latest").write_text(f"step_{N}\n")
    os.rename(out / "C_default", out / "C_default_step")
    run("resume_latest", str(out), "default")
    print(f"\nresume runs: {time.monotonic() - t0:.1f} s")
    return out


# Config keys the runs set differently on purpose (where to save, how often, init seed).
# Everything else in the trees must be bit-identical.
_INTENDED = {"training": ("checkpoint_dir", "save_every_n_steps", "save_final"),
             "model": ("init_seed",)}


def _load(out: Path, name: str):
    tree = ckpt.load_state(out / name, kind="result")
    for part, keys in _INTENDED.items():
        for k in keys:
            assert k in tree["configs"][part], k
            del tree["configs"][part][k]
    # each run has its own id (a resumed run keeps the checkpoint's): A and B are two runs
    assert isinstance(tree["configs"].pop("run_id"), str)
    return tree


def _report(out: Path, mode: str, variant: str) -> dict:
    return json.loads((out / f"report_{mode}_{variant}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_process_resume_is_bit_identical(runs, variant):
    A = _load(runs, f"A_{variant}")
    B = _load(runs, f"B_{variant}")
    C = _load(runs, f"C_{variant}" if variant != "default" else "C_default_step")
    rep = _report(runs, "resume", variant)
    assert rep["step_after_load"] == N
    assert rep["position_after_load"] == {"default": [0, 6], "accum": [1, 6],
                                          "aux_free": [0, 6]}[variant]
    assert rep["steps_run"] == N and rep["global_step"] == 2 * N
    # saving does not perturb training
    assert _diff(A, B) == []
    # the resumed run is the uninterrupted one, bit for bit, everywhere
    assert _diff(A, C) == []
    # and the comparison is not vacuous: the pieces the issue names are all there and moved
    assert len(A["history"]["loss"]) == 2 * N and A["history"]["loss"] == C["history"]["loss"]
    assert A["counters"]["global_step"] == 2 * N
    if variant == "default":  # evaluations at steps 4, 8, 12 (and `best` saves) in all runs
        assert [e["step"] for e in A["eval_history"]] == [4, 8, 12]
    ctrl = {k: v for k, v in A["model"].items() if k.startswith("controller.")}
    assert int(ctrl["controller.tick_counter"]) == 2 * N and len(ctrl) >= 19
    assert A["optimizer"]["state"], "optimizer state is empty"
    if variant == "aux_free":
        biases = [v for k, v in A["model"].items() if k.endswith("aux_free_bias_E")]
        assert biases and any(b.abs().sum() > 0 for b in biases)


@pytest.mark.slow
def test_resume_through_latest_pointer(runs):
    rep = _report(runs, "resume_latest", "default")
    assert rep["step_after_load"] == N and rep["global_step"] == 2 * N
    assert _diff(_load(runs, "A_default"), _load(runs, "C_default")) == []


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoints_hold_the_live_controller_state(runs, variant):
    rep = _report(runs, "straight", variant)
    assert rep["final_equals_live_model"]
    assert rep["final_chronovisor_matches_live"]
    assert rep["geo_matches_live"]
    assert rep["geo_tick"] == 2 * N and rep["geo_history_len"] == 2 * N


@pytest.mark.slow
def test_step_checkpoint_differs_from_final(runs):
    """Guards the comparisons above against comparing a state with itself."""
    step = ckpt.load_state(runs / "ckpt_default" / f"step_{N}")
    final = ckpt.load_state(runs / "ckpt_default" / "final")
    assert int(step["model"]["controller.tick_counter"]) == N
    assert int(final["model"]["controller.tick_counter"]) == 2 * N
    assert _diff(step["model"], final["model"]) != []
