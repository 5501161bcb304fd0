"""ChronoMoETrainer: the step, the loop, logging, metrics, skips of bad steps, bad batches,
no-sync steps, data order and in-process resume. Tiny models, a dozen steps each."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from chronomoe_dyn.plot import read_metrics_jsonl
from chronomoe_torch import checkpoint as ckpt
from chronomoe_torch.config import TrainingConfig
from chronomoe_torch.loss import causal_lm_token_loss
from chronomoe_torch.model import ChronovisorMixtralForCausalLM, MixtralConfig
from chronomoe_torch.trainer import (BadBatchError, ChronoMoETrainer, NonFiniteTrainingError,
                                     RunDirError)
from _progressions import S, V, Progressions  # V vocabulary, S sequence length
from _sync import SyncCounter

STEP_RE = re.compile(r"^Step (\d+) \| Loss: (-?\d+\.\d{4}|nan) \| κ: (-?\d\.\d{2}) \(([a-z_]+)\) "
                     r"\| R: (\d\.\d{2}|n/a) \| Gate: (\d\.\d{2})$")
LANDSCAPE_RE = re.compile(r"^  Landscape(\[layer \d+\])?: var=\d+\.\d{4}, valleys=\[(\d+(, \d+)*)?\], "
                          r"ridges=\[(\d+(, \d+)*)?\]$")




def tiny_model(chronovisor: bool = True, **kw) -> ChronovisorMixtralForCausalLM:
    return ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_dim=32, num_layers=2, num_experts=4, num_heads=4, num_kv_heads=2,
        top_k=2, max_seq_length=32, enable_chronovisor=chronovisor, **kw))


def tiny_config(tmp_path, **kw) -> TrainingConfig:
    base = dict(learning_rate=3e-3, max_steps=12, kappa_warmup_steps=2, log_every_n_steps=1,
                eval_every_n_steps=0, save_every_n_steps=0, progress_bar=False,
                run_dir=str(tmp_path / "run"), checkpoint_dir=str(tmp_path / "ckpt"),
                save_final=False, save_best=False)
    base.update(kw)
    return TrainingConfig(**base)


def loader(n: int = 64, batch_size: int = 4, shuffle: bool = True, seed: int = 0) -> DataLoader:
    return DataLoader(Progressions(n, seed), batch_size=batch_size, shuffle=shuffle)


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def law_state(controller) -> dict[str, torch.Tensor]:
    """Controller buffers that a skipped tick must leave untouched (the clock, its skip count
    and the history rings legitimately move; κ is constant in these tests)."""
    moving = {"tick_counter", "skipped_ticks", "coherence_history", "meta_knob_history"}
    return {k: v.clone() for k, v in controller.state_dict().items() if k not in moving}


def opt_state(trainer) -> list[torch.Tensor]:
    return [v.clone() for st in trainer.base_optimizer.state.values() for v in st.values()]


def equal_lists(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------
# the loop, results, log lines, metrics
# ----------------------------------------------------------------------------------------
def test_train_returns_results_and_learns(tmp_path):
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=30, log_every_n_steps=5),
                          loader(), loader(16, shuffle=False, seed=1))
    before = tr.evaluate()["eval_loss"]
    res = tr.train()
    assert res["global_step"] == res["steps_run"] == res["total_steps"] == 30
    assert res["stop_reason"] == "max_steps"
    assert res["step_history"] == [5, 10, 15, 20, 25, 30]
    for k in ("loss_history", "lm_loss_history", "coherence_history", "kappa_history",
              "gate_history", "lr_history"):
        assert len(res[k]) == 6, k
    assert res["final_loss"] == res["loss_history"][-1]
    assert res["final_eval_loss"] < before - 0.3          # it learns the progressions
    assert res["best_eval_loss"] == res["final_eval_loss"]
    assert math.isclose(res["final_eval_perplexity"], math.exp(res["final_eval_loss"]))
    assert res["skipped_steps"] == 0 and res["tokens"] == 30 * 4 * S
    assert all(0.0 <= r <= 1.0 for r in res["coherence_history"])
    assert all(0.5 <= g <= 1.0 for g in res["gate_history"])   # strength 0.5: gate in [0.5, 1]
    assert res["kappa_history"][0] > res["kappa_history"][-1]   # κ anneals 0.5 → -0.3
    assert res["kappa_history"][-1] == pytest.approx(-0.3, abs=0.01)
    assert set(res["landscape"]) >= {"variance", "valleys", "ridges", "formed"}
    assert res["valley_health"]["layer"] is None and len(res["valley_health"]["layers"]) == 2
    assert tr.controller.num_ticks == 30                   # one tick per optimizer step


def test_log_lines_have_the_seed_format(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=20), loader())
    tr.train()
    lines = [r.getMessage() for r in caplog.records if r.name == "chronomoe_torch"]
    step_lines = [ln for ln in lines if ln.startswith("Step ")]
    assert len(step_lines) == 20
    for i, ln in enumerate(step_lines, start=1):
        m = STEP_RE.match(ln)
        assert m, ln
        assert int(m.group(1)) == i
    assert STEP_RE.match(step_lines[0]).group(4) == "warmup_explore"
    assert STEP_RE.match(step_lines[5]).group(4) == "cosine_anneal"
    # v2: one landscape per layer, every 10th log line, in layer order after the step line.
    land = [i for i, ln in enumerate(lines) if ln.startswith("  Landscape")]
    assert len(land) == 2 * 2
    for i in land:
        assert LANDSCAPE_RE.match(lines[i]), lines[i]
    assert [lines[i][:20] for i in land[:2]] == ["  Landscape[layer 0]", "  Landscape[layer 1]"]
    assert [int(STEP_RE.match(lines[i - 1]).group(1)) for i in land[::2]] == [10, 20]


def test_log_lines_reproduce_the_seed_example():
    from chronomoe_torch.metrics import format_landscape_line, format_step_line
    assert format_step_line(1000, 4.2345, 0.48, "warmup_explore", 0.32, 0.67) == \
        "Step 1000 | Loss: 4.2345 | κ: 0.48 (warmup_explore) | R: 0.32 | Gate: 0.67"
    assert format_step_line(2000, 3.8901, 0.42, "cosine_anneal", 0.45, 0.83) == \
        "Step 2000 | Loss: 3.8901 | κ: 0.42 (cosine_anneal) | R: 0.45 | Gate: 0.83"
    assert format_landscape_line(0.0234, [2, 5], [1, 7]) == \
        "  Landscape: var=0.0234, valleys=[2, 5], ridges=[1, 7]"
    assert format_step_line(7, 1.0, -0.3, "final_exploit", None, 1.0) == \
        "Step 7 | Loss: 1.0000 | κ: -0.30 (final_exploit) | R: n/a | Gate: 1.00"
    assert format_landscape_line(0.0, [], []) == "  Landscape: var=0.0000, valleys=[], ridges=[]"
    assert format_landscape_line(0.0234, [2, 5], [1, 7], layer=3) == \
        "  Landscape[layer 3]: var=0.0234, valleys=[2, 5], ridges=[1, 7]"


def test_metrics_writer_validates_and_is_a_no_op_without_a_dir(tmp_path):
    from chronomoe_dyn.plot import MetricsFormatError
    from chronomoe_torch.metrics import MetricsWriter
    MetricsWriter(None).write({"no step": 1})              # no run dir: nothing at all
    with MetricsWriter(tmp_path) as w:
        w.write({"step": 1, "loss": float("nan"), "valleys": (1, 2)})
        with pytest.raises(MetricsFormatError, match="field 'R' must be a number"):
            w.write({"step": 2, "R": "high"})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == \
        {"step": 1, "loss": None, "valleys": [1, 2]}


def test_metrics_jsonl_follows_the_schema(tmp_path):
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=6, log_every_n_steps=2,
                                                    eval_every_n_steps=3),
                          loader(), loader(8, shuffle=False))
    tr.train()
    path = tmp_path / "run" / "metrics.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    evals = [r for r in recs if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in train:
        for k in ("loss", "loss_lm", "loss_balance", "loss_coherence", "loss_valley", "loss_z",
                  "lr", "R", "dR", "kappa", "phase", "gate", "tbar_variance", "valleys",
                  "ridges", "load_LE", "tbar_local_LE", "tbar_global",
                  # run metrics v2 (docs/CONTRACTS.md)
                  "maxvio_L", "maxvio", "routing_entropy", "load_entropy", "exploration_rate",
                  "logit_scale_L"):
            assert k in r, k
        assert "tbar_global_E" not in r and isinstance(r["tbar_global"], float)
        load = torch.tensor(r["load_LE"])
        assert load.shape == (2, 4) and torch.all(load.sum(1) == 4 * S * 2)  # B·S·K slots
        maxvio_L = (load.amax(1) / load.mean(1) - 1).tolist()
        assert r["maxvio_L"] == pytest.approx(maxvio_L)
        assert r["maxvio"] == pytest.approx(sum(maxvio_L) / 2)
        share = load / load.sum(1, keepdim=True)
        ent = -(share * share.log()).sum(1).mean()
        assert r["load_entropy"] == pytest.approx(float(ent))
        assert 0.0 < r["routing_entropy"] <= math.log(4) + 1e-6
        assert 0.0 <= r["exploration_rate"] <= 1.0
        assert len(r["logit_scale_L"]) == 2 and all(v > 0 for v in r["logit_scale_L"])
    # τ₀ = 0.1 draws noise in training: some slots leave the noiseless top-k over the run.
    assert any(r["exploration_rate"] > 0 for r in train)
    for r in evals:
        for k in ("loss", "perplexity", "maxvio_global", "maxvio_global_L", "routing_entropy",
                  "exploration_rate"):
            assert k in r, k
        assert r["exploration_rate"] == 0.0 and len(r["maxvio_global_L"]) == 2
        assert r["maxvio_global"] == pytest.approx(sum(r["maxvio_global_L"]) / 2)
    series = read_metrics_jsonl(path)                        # the plot reader accepts it
    assert list(series.step_T) == [2, 4, 6]
    assert series.logit_scale_TL.shape == (3, 2) and series.scalar("exploration_rate") is not None
    assert list(series.eval_maxvio_global) == [r["maxvio_global"] for r in evals]
    from chronomoe_dyn.plot import plot_run
    names = {p.name for p in plot_run(tmp_path / "run")}
    assert "routing.png" in names and "load.png" in names
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["training"]["max_steps"] == 6 and cfg["model"]["num_experts"] == 4


def test_run_metrics_read_the_routed_counts(tmp_path):
    """Run metrics (law v2.1): MaxVio and the load are the routed counts (the load the experts
    really got), not the noiseless counts the controller reads; explored and entropy sit at
    3E + 2 and 3E + 3. A model without ``routing_stats`` logs its load counts through the same
    reader (padded to a 3E + 4 row). Catches the metrics reading the v2.0 offsets or c°."""
    from chronomoe_torch.metrics import routing_metrics
    from chronomoe_torch.routing import stats_width
    E = 4
    row = np.zeros((1, stats_width(E)))
    row[0, :E] = [4.0, 4.0, 4.0, 4.0]                   # routed: balanced
    row[0, 2 * E + 1] = 8.0                             # tokens
    row[0, 2 * E + 2:3 * E + 2] = [16.0, 0.0, 0.0, 0.0]  # the router's own choice: one expert
    row[0, 3 * E + 2:] = [12.0, 4.0]                    # explored slots, Σ entropy
    m = routing_metrics(row)
    assert m["maxvio"] == 0.0 and m["load_LE"].tolist() == [[0.25] * 4]
    assert m["exploration_rate"] == 12.0 / 16.0 and m["routing_entropy"] == 0.5
    model = tiny_model()
    model.routing_stats = None                          # the counts-only log path
    tr = ChronoMoETrainer(model, tiny_config(tmp_path, max_steps=3), loader())
    tr.train()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        load = torch.tensor(r["load_LE"])
        assert load.shape == (2, 4) and torch.all(load.sum(1) == 4 * S * 2)  # B·S·K slots
        assert r["maxvio_L"] == pytest.approx((load.amax(1) / load.mean(1) - 1).tolist())
        assert "exploration_rate" not in r


def test_eval_maxvio_global_is_over_the_whole_eval_set(tmp_path):
    """maxvio_global sums the slot counts over every eval batch before max/mean − 1 (not a mean
    of per-batch MaxVio). Catches: taking the routing stats of the last eval batch only."""
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=3), loader(),
                          loader(12, shuffle=False))
    tr.train()
    got = tr.evaluate()["eval_routing"]
    model = tr.model.eval()
    counts = torch.zeros(2, 4)
    per_batch = []
    with torch.no_grad():
        for b in loader(12, shuffle=False):
            out = model(b["input_ids"])
            c = torch.stack([torch.bincount(i.reshape(-1), minlength=4).float()
                             for i in out.expert_indices])
            counts += c
            per_batch.append((c.amax(1) / c.mean(1) - 1).mean().item())
    want_L = (counts.amax(1) / counts.mean(1) - 1).tolist()
    assert got["maxvio_global_L"] == pytest.approx(want_L)
    assert got["maxvio_global"] == pytest.approx(sum(want_L) / 2)
    assert got["maxvio_global"] != pytest.approx(sum(per_batch) / len(per_batch))


def test_plain_moe_baseline_without_controller(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    cfg = tiny_config(tmp_path, balance_mode="switch", lambda_balance=0.0, max_steps=4)
    tr = ChronoMoETrainer(tiny_model(chronovisor=False), cfg, loader())
    assert tr.controller is None and not tr.gated
    out = tr.train_step([next(iter(tr.train_dataloader))])
    assert torch.equal(out.losses[0], out.losses[1])        # total == LM with λ = 0
    res = tr.train()
    assert res["landscape"] is None and res["valley_health"] is None
    assert res["gate_history"] == [1.0] * 3 and res["coherence_history"] == [None] * 3
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Step 2 "))
    assert STEP_RE.match(line) and "| R: n/a | Gate: 1.00" in line


def test_epochs_can_end_the_run_before_max_steps(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=1000, max_epochs=1, log_every_n_steps=4)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader())       # 16 batches per epoch
    assert (tr.total_steps, tr.schedule_steps) == (16, 1000)
    res = tr.train()
    assert res["global_step"] == 16 and res["stop_reason"] == "max_epochs"
    assert res["kappa_history"][-1] > 0.49                   # κ spans max_steps: barely moved


def test_warmup_must_fit_the_epoch_schedule(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=None, max_epochs=1, kappa_warmup_steps=16)
    with pytest.raises(ValueError, match="kappa_warmup_steps=16 must be < the schedule length 16"):
        ChronoMoETrainer(tiny_model(), cfg, loader())
    with pytest.raises(ValueError, match="fewer than gradient_accumulation_steps=3"):
        ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, gradient_accumulation_steps=3),
                         [Progressions(4).ids] * 2)


# ----------------------------------------------------------------------------------------
# gradient accumulation
# ----------------------------------------------------------------------------------------
def test_accumulation_equals_one_big_batch(tmp_path):
    """G micro-batches of B give the step of one batch of G·B: the same gradient reaches the
    optimizer, and the controller ticks once over the summed observation (LM loss only, so the
    loss is linear in the batch split)."""
    ids = Progressions(8).ids
    kw = dict(balance_mode="switch", lambda_balance=0.0, max_steps=4)
    a = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, gradient_accumulation_steps=2, **kw),
                         [ids[:4], ids[4:]])
    b = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, **kw), [ids])
    grads = {}
    for name, t in (("a", a), ("b", b)):
        t.base_optimizer.register_step_pre_hook(
            lambda opt, *_, name=name: grads.__setitem__(
                name, [p.grad.clone() for g in opt.param_groups for p in g["params"]]))
    a.train_step([ids[:4], ids[4:]])
    b.train_step([ids])
    assert a.controller.num_ticks == b.controller.num_ticks == 1
    assert a.micro_step == 2 and b.micro_step == 1
    for ga, gb in zip(grads["a"], grads["b"]):
        torch.testing.assert_close(ga, gb)
    sa, sb = a.controller.state_dict(), b.controller.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_accumulation_steps_and_epochs(tmp_path):
    # 10 batches, G = 3: 3 optimizer steps per epoch (the 10th batch is dropped), 2 epochs.
    cfg = tiny_config(tmp_path, gradient_accumulation_steps=3, max_steps=None, max_epochs=2,
                      kappa_warmup_steps=1)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader(40))
    assert tr.steps_per_epoch == 3 and tr.total_steps == 6
    res = tr.train()
    assert res["global_step"] == 6 and tr.micro_step == 18 and res["stop_reason"] == "max_epochs"
    assert tr.controller.num_ticks == 6


# ----------------------------------------------------------------------------------------
# bad steps: skipped on the device, counted, logged; too many in a row stop training
# ----------------------------------------------------------------------------------------
class Fault:
    """Switchable fault injection: NaN router logits, an infinite LM logit, or a NaN gradient."""

    def __init__(self, model, kind: str) -> None:
        self.on = False
        if kind == "router":
            self.h = model.layers[0].moe.router.register_forward_hook(
                lambda m, a, out: out._replace(logits_NE=out.logits_NE * math.nan)
                if self.on else None)
        elif kind == "loss":
            def hook(m, a, out):
                if self.on:
                    out.logits = out.logits.index_fill(-1, torch.tensor([3]), math.inf)
                return out
            self.h = model.register_forward_hook(hook)
        elif kind == "grad":
            self.h = model.layers[1].moe.w_up_EHI.register_hook(
                lambda g: g * math.nan if self.on else g)


@pytest.mark.parametrize("kind", ["router", "loss", "grad"])
def test_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, caplog, kind):
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    model = tiny_model()
    tr = ChronoMoETrainer(model, tiny_config(tmp_path, kappa_schedule="constant",
                                             kappa_warmup_steps=0, max_steps=8), loader())
    fault = Fault(model, kind)
    batches = tr._next_micro_batches(), tr._next_micro_batches(), tr._next_micro_batches()
    tr.train_step(batches[0])
    p0, o0, c0 = params_of(model), opt_state(tr), law_state(tr.controller)
    fault.on = True
    out = tr.train_step(batches[1])
    fault.on = False
    assert not bool(out.ok) and float(out.gate) == 0.0
    assert equal_lists(params_of(model), p0)                 # parameters untouched
    assert equal_lists(opt_state(tr), o0)                    # AdamW moments and step count too
    c1 = law_state(tr.controller)
    assert all(torch.equal(c0[k], c1[k]) for k in c0)        # controller law state untouched
    assert int(tr.controller.skipped_ticks) == 1 and tr.controller.num_ticks == 2
    assert int(tr._skips_total) == 1 and int(tr._skips_run) == 1
    out = tr.train_step(batches[2])                          # the next good step applies
    assert bool(out.ok) and not equal_lists(params_of(model), p0)
    assert int(tr._skips_run) == 0 and int(tr._skips_total) == 1
    res = tr.train()                                          # the loop reports the skip
    assert res["skipped_steps"] == 1 and res["global_step"] == 8
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 step(s)" in w and "1 in total" in w for w in warn), warn


def test_consecutive_skips_stop_with_last_good_checkpoint(tmp_path):
    model = tiny_model()
    cfg = tiny_config(tmp_path, max_steps=20, max_consecutive_skips=3, log_every_n_steps=2)
    tr = ChronoMoETrainer(model, cfg, loader(shuffle=False))
    fault = Fault(model, "router")
    snap = {}   # parameters after each step (post-hook: global_step is incremented later)
    h = tr.optimizer.register_step_post_hook(
        lambda *a: snap.__setitem__(tr.global_step + 1, params_of(model)))
    orig = tr.train_step

    def step(group, log=False):  # fault from the 5th step on (global_step 4 → 5)
        fault.on = tr.global_step >= 4
        return orig(group, log=log)

    tr.train_step = step
    with pytest.raises(NonFiniteTrainingError, match="consecutive optimizer steps") as ei:
        tr.train()
    h.remove()
    # steps 5, 6 skipped: run 2 < 3 at the log of step 6; 7, 8: run 4 ≥ 3 at the log of step 8
    assert ei.value.step == 8 and ei.value.consecutive == 4
    assert ei.value.checkpoint == tmp_path / "ckpt" / "last_good"
    good = params_of(model)
    assert not equal_lists(snap[4], snap[3])                 # step 4 applied, 5–8 did not
    assert all(equal_lists(snap[s], snap[4]) for s in (5, 6, 7, 8))
    assert equal_lists(good, snap[4])
    fresh = tiny_model()
    tr2 = ChronoMoETrainer(fresh, cfg, loader(shuffle=False))
    tr2.load_checkpoint("last_good")
    assert equal_lists(params_of(fresh), good)
    assert int(tr2._skips_total) == 4 and tr2.global_step == 8


# ----------------------------------------------------------------------------------------
# bad batches
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"input_ids": torch.full((4, S), V)}, f"token id {V}, outside the vocabulary \\[0, {V}\\)"),
    ({"input_ids": torch.full((4, S), -1)}, "token id -1, outside"),
    ({"input_ids": torch.zeros(4, S, 2, dtype=torch.long)},
     r"\[B, S\] tensor, got shape \[4, 17, 2\]"),
    ({"input_ids": torch.zeros(4, S)}, "integer token ids, got torch.float32"),
    ({"input_ids": torch.zeros(4, S, dtype=torch.long),
      "labels": torch.zeros(4, S - 1, dtype=torch.long)},
     r"labels shape \[4, 16\] != input_ids shape \[4, 17\]"),
    ({"input_ids": torch.zeros(4, 40, dtype=torch.long)}, "exceeds the model's max_seq_length=32"),
    ({"ids": torch.zeros(4, S, dtype=torch.long)}, "no 'input_ids'"),
    ("text", "expected a dict with 'input_ids'"),
])
def test_bad_batch_names_the_batch(tmp_path, bad, match):
    good = [{"input_ids": Progressions(4).ids} for _ in range(3)]
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path), good + [bad] + good)
    with pytest.raises(BadBatchError, match=match) as ei:
        tr.train()
    assert "train batch 3 (epoch 0)" in str(ei.value)
    assert tr.global_step == 3


def test_labels_may_use_ignore_index(tmp_path):
    ids = Progressions(4).ids
    labels = ids.clone()
    labels[:, :5] = -100
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=3),
                          [{"input_ids": ids, "labels": labels}] * 3)
    assert tr.train()["global_step"] == 3


def test_bad_eval_batch_names_it(tmp_path):
    ev = [{"input_ids": Progressions(4).ids}, {"input_ids": torch.full((4, S), 999)}]
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path), loader(), ev)
    with pytest.raises(BadBatchError, match="eval batch 1: input_ids holds token id 999"):
        tr.evaluate()


# ----------------------------------------------------------------------------------------
# no host sync in a step; one read per log step
# ----------------------------------------------------------------------------------------




@pytest.mark.parametrize("chronovisor, mode, accum", [(True, "chronomoe", 2), (False, "switch", 1),
                                                      (True, "aux_free", 1)])
def test_train_step_does_not_sync(tmp_path, chronovisor, mode, accum):
    tr = ChronoMoETrainer(tiny_model(chronovisor),
                          tiny_config(tmp_path, balance_mode=mode, lambda_z=1e-3,
                                      gradient_accumulation_steps=accum), loader())
    reads = []
    to_host = tr._to_host
    tr._to_host = lambda t: reads.append(1) or to_host(t)
    groups = [tr._next_micro_batches() for _ in range(3)]   # validated on the host, up front
    tr.train_step(groups[0])                                 # lazy optimizer state created
    with SyncCounter() as sc:
        out = tr.train_step(groups[1])
    assert sc.syncs == [] and reads == []
    tr._log_step(tr.train_step(groups[2], log=True))
    assert reads == [1]                                      # one host read per log step
    assert bool(out.ok)


# ----------------------------------------------------------------------------------------
# evaluation, balance modes, precision
# ----------------------------------------------------------------------------------------
def test_evaluate_is_the_token_weighted_lm_loss(tmp_path):
    model = tiny_model()
    ev = loader(12, batch_size=5, shuffle=False, seed=3)    # batches of 5, 5, 2
    tr = ChronoMoETrainer(model, tiny_config(tmp_path), loader(), ev)
    r = tr.evaluate()
    assert model.training                                   # restored after evaluation
    assert not model.controller.observation_buffer().any()  # evaluation observes nothing
    model.eval()
    tot = cnt = 0.0
    with torch.no_grad():
        for b in ev:
            tok, valid = causal_lm_token_loss(model(b["input_ids"]).logits, b["input_ids"])
            tot += float(tok.sum())
            cnt += float(valid.sum())
    assert r["eval_tokens"] == cnt == 12 * (S - 1)
    assert r["eval_loss"] == pytest.approx(tot / cnt, rel=1e-6)
    assert r["eval_perplexity"] == pytest.approx(math.exp(tot / cnt), rel=1e-6)


def test_aux_free_mode_moves_biases_and_skips_restore_them(tmp_path):
    model = tiny_model(aux_free_bias_rate=0.01)
    tr = ChronoMoETrainer(model, tiny_config(tmp_path, balance_mode="aux_free",
                                             kappa_schedule="constant", kappa_warmup_steps=0),
                          loader())
    biases = lambda: [l.moe.router.aux_free_bias_E.clone() for l in model.layers]  # noqa: E731
    b0 = biases()
    tr.train_step(tr._next_micro_batches())
    b1 = biases()
    assert not equal_lists(b0, b1)
    fault = Fault(model, "router")
    fault.on = True
    tr.train_step(tr._next_micro_batches())
    assert equal_lists(biases(), b1)


def test_bf16_autocast_trains(tmp_path):
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, bf16=True, max_steps=3), loader())
    res = tr.train()
    assert res["skipped_steps"] == 0 and all(math.isfinite(x) for x in res["loss_history"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())


def test_cosine_lr_schedule_with_warmup(tmp_path):
    cfg = tiny_config(tmp_path, lr_schedule="cosine", lr_warmup_steps=2, max_steps=10,
                      min_lr_ratio=0.1)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader())
    lr = cfg.learning_rate
    assert [tr._lr_factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert tr._lr_factor(2) == pytest.approx(1.0) and tr._lr_factor(10) == pytest.approx(0.1)
    res = tr.train()                                         # step n runs at lr·factor(n − 1)
    assert res["lr_history"] == [pytest.approx(lr * tr._lr_factor(n)) for n in range(10)]
    assert tr.base_optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.1)


def test_adaptive_kappa_is_fed_on_the_log_cadence(tmp_path):
    cfg = tiny_config(tmp_path, kappa_schedule="adaptive", max_steps=12, log_every_n_steps=3)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader())
    res = tr.train()
    assert tr.knob_scheduler.adaptive.state.updates == 4      # one rule update per log
    assert all(-1.0 <= k <= 1.0 for k in res["kappa_history"])


# ----------------------------------------------------------------------------------------
# data order and resume
# ----------------------------------------------------------------------------------------
def test_data_order_is_a_function_of_the_seed(tmp_path):
    def order(seed):
        tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, seed=seed), loader())
        return [tr._next_micro_batches()[0].input_ids for _ in range(20)]  # crosses an epoch
    a, b, c = order(0), order(0), order(1)
    assert equal_lists(a, b) and not equal_lists(a, c)
    assert not equal_lists(a[16:20], a[0:4])                 # each epoch is reshuffled


def test_resume_in_process_is_exact(tmp_path):
    """10 steps straight (saving at step 6) == a fresh trainer that loads step_6 and trains the
    last 4: identical parameters, controller, optimizer state and loss history. (Fresh-process
    and SIGKILL variants live in the checkpoint tests.)"""
    cfg = tiny_config(tmp_path, max_steps=10, save_every_n_steps=6, gradient_accumulation_steps=2)
    a = ChronoMoETrainer(tiny_model(), cfg, loader(24))
    ra = a.train()
    c = ChronoMoETrainer(tiny_model(init_seed=5), cfg, loader(24))
    c.load_checkpoint("step_6")
    assert c.global_step == 6 and (c.epoch, c.batch_in_epoch) == (1, 6)   # 3 steps per epoch
    rc = c.train()
    assert rc["steps_run"] == 4 and rc["global_step"] == 10
    assert equal_lists(params_of(a.model), params_of(c.model))
    assert ckpt.trees_equal(a.model.controller.state_dict(), c.model.controller.state_dict())
    assert ckpt.trees_equal(a.optimizer.state_dict(), c.optimizer.state_dict())
    assert ra["loss_history"] == rc["loss_history"] and len(rc["loss_history"]) == 10


@pytest.mark.parametrize("new_max", [20, 8])
def test_resume_with_another_max_steps_continues_the_schedules(tmp_path, caplog, new_max):
    """Issue 11: resuming with a larger --steps restarted part of the κ and LR schedules
    (κ −0.30 → −0.185, LR 3.0e-4 → 6.5e-4 at the resume point). The rule now: the schedules
    keep the checkpoint's length, so κ and the LR of a run resumed at step 6 with another
    max_steps are those of the straight 10-step run, and past step 10 they hold their final
    values. Mutation caught: ``_continue_schedules`` returning at once (the schedules then span
    ``new_max`` and jump at step 7)."""
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    cfg = tiny_config(tmp_path, max_steps=10, save_every_n_steps=6, lr_schedule="cosine",
                      lr_warmup_steps=2, min_lr_ratio=0.1)
    ra = ChronoMoETrainer(tiny_model(), cfg, loader()).train()
    c = ChronoMoETrainer(tiny_model(), cfg.replace(max_steps=new_max), loader())
    c.load_checkpoint("step_6")
    rc = c.train()
    assert rc["global_step"] == new_max and len(rc["kappa_history"]) == new_max
    n = min(new_max, 10)
    assert rc["kappa_history"][:n] == ra["kappa_history"][:n]
    assert rc["lr_history"][:n] == ra["lr_history"][:n]
    if new_max > 10:       # past the schedules' end: their final values
        assert rc["kappa_history"][10:] == [pytest.approx(-0.3)] * (new_max - 10)
        assert rc["lr_history"][10:] == [pytest.approx(3e-4)] * (new_max - 10)
    assert any("the κ and LR schedules keep the checkpoint's length of 10 steps" in
               r.getMessage() for r in caplog.records)


def test_keep_last_n_checkpoints(tmp_path, caplog):
    """The 2 newest step_<n> checkpoints and whatever a pointer names survive, the rule and each
    deletion are logged, and one state is written once whatever names it gets (step_5 is
    `best` when saved; step_10 is periodic, best and final)."""
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    cfg = tiny_config(tmp_path, max_steps=10, save_every_n_steps=2, keep_last_n_checkpoints=2,
                      save_final=True, save_best=True, eval_every_n_steps=5)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader(), loader(8, shuffle=False))
    tr.train()
    names = sorted(p.name for p in ckpt.list_checkpoints(tmp_path / "ckpt"))
    assert names == ["step_10", "step_8"]
    assert ckpt.pointers(tmp_path / "ckpt") == {"best": "step_10", "final": "step_10",
                                                "latest": "step_10"}
    lines = [r.getMessage() for r in caplog.records]
    assert any(ln.startswith("checkpoints: step_<n> every 2 steps") and "the 2 newest" in ln
               for ln in lines)
    deleted = [ln for ln in lines if "deleted checkpoint(s)" in ln]
    assert [ln.split("deleted checkpoint(s) ")[1].split(" (")[0] for ln in deleted] == \
        ["step_2, step_4", "step_5, step_6"]
    assert sum("saved checkpoint" in ln for ln in lines) == 6     # 2, 4, 5, 6, 8, 10


def test_save_chronovisor_state_false_drops_the_landscape(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=6, save_chronovisor_state=False)
    tr = ChronoMoETrainer(tiny_model(), cfg, loader())
    tr.train()
    path = tr.save_checkpoint("no_geo")
    tree = ckpt.load_state(path)
    assert not any(k.startswith("controller.") for k in tree["model"])
    fresh = tiny_model()
    tr2 = ChronoMoETrainer(fresh, cfg, loader())
    tr2.load_checkpoint("no_geo")                            # loads; the landscape starts flat
    assert int(fresh.controller.tick_counter) == 0
    assert torch.equal(fresh.embed_tokens.weight, tr.model.embed_tokens.weight)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path), loader())
    tr.save_checkpoint("a")
    other = ChronovisorMixtralForCausalLM(MixtralConfig(
        vocab_size=V, hidden_dim=32, num_layers=2, num_experts=8, num_heads=4, num_kv_heads=2,
        max_seq_length=32))
    tr2 = ChronoMoETrainer(other, tiny_config(tmp_path), loader())
    with pytest.raises(ckpt.CheckpointMismatchError, match="'num_experts': 4.*'num_experts': 8"):
        tr2.load_checkpoint("a")


# ----------------------------------------------------------------------------------------
# the gate's path, the train stream on its own
# ----------------------------------------------------------------------------------------
def test_the_gate_goes_through_fused_adamws_lr(tmp_path):
    """The trainer's fused AdamW puts the CoherenceGatedOptimizer on its "lr" path (both
    paths are compared in test_optim.py); the former class name still imports."""
    from chronomoe_torch.optim import CoherenceGatedOptimizer
    from chronomoe_torch.trainer import LrGatedAdamW
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path), loader())
    assert isinstance(tr.optimizer, CoherenceGatedOptimizer) and tr.optimizer.gate_via == "lr"
    assert issubclass(LrGatedAdamW, CoherenceGatedOptimizer)
    tr.train_step(tr._next_micro_batches())
    assert type(tr.base_optimizer.param_groups[0]["lr"]) is float
    assert not hasattr(tr.base_optimizer, "found_inf")


def test_train_stream_state_dict_resumes_mid_epoch():
    from chronomoe_torch._batches import TrainStream, prepare_batch

    def stream():
        return TrainStream(loader(40, batch_size=4), 2, 3, 7,
                           lambda raw, where: prepare_batch(raw, where, torch.device("cpu"), V))

    a = stream()
    first = [a.next_group() for _ in range(3)]
    sd = a.state_dict()
    assert (sd["epoch"], sd["batch_in_epoch"], sd["epoch_open"]) == (0, 6, True)
    rest = [a.next_group() for _ in range(5)]               # 5 groups per epoch: crosses one
    b = stream()
    b.load_state_dict(sd)
    again = [b.next_group() for _ in range(5)]
    ids = lambda groups: [mb.input_ids for g in groups for mb in g]  # noqa: E731
    assert equal_lists(ids(rest), ids(again)) and not equal_lists(ids(first), ids(rest)[:6])
    assert (a.epoch, b.epoch) == (1, 1)
    c = stream()                                            # no resume: a different position
    assert not equal_lists(ids([c.next_group()]), ids(rest[:1]))


def test_tensorboard_scalars_when_asked(tmp_path):
    pytest.importorskip("tensorboard")
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=3, tensorboard=True),
                          loader())
    tr.train()
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/R", "train/gate", "train/kappa"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="TrainingConfig.device='cuda': CUDA is not available"):
        ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, device="cuda"), loader())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_with_bf16(tmp_path):
    tr = ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, device="cuda", bf16=True,
                                                    max_steps=4), loader())
    res = tr.train()
    assert next(tr.model.parameters()).is_cuda and res["skipped_steps"] == 0
    assert all(math.isfinite(x) for x in res["loss_history"])


def test_an_iterable_without_len_ends_by_epochs_and_logs_its_last_step(tmp_path):
    class Stream:                      # re-iterable, no __len__: 5 batches per pass
        def __iter__(self):
            return iter([Progressions(4, seed=i).ids for i in range(5)])

    cfg = tiny_config(tmp_path, max_steps=100, max_epochs=2, log_every_n_steps=4)
    tr = ChronoMoETrainer(tiny_model(), cfg, Stream())
    assert tr.steps_per_epoch is None and tr.total_steps == 100
    res = tr.train()
    assert res["global_step"] == 10 and res["stop_reason"] == "max_epochs"
    assert res["step_history"] == [4, 8, 10]


# ----------------------------------------------------------------------------------------
# issue 11: a run directory belongs to one run; threads said first
# ----------------------------------------------------------------------------------------
def _files(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_a_run_dir_of_an_earlier_run_is_refused_or_overwritten(tmp_path, caplog):
    """The library follows the CLI's rule. Mutations caught: no claim in ``train()`` (the
    second run appends to metrics.jsonl), ``overwrite`` ignored, ``clear`` deleting files that
    are not a run's outputs."""
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    cfg = tiny_config(tmp_path, max_steps=3, save_final=True)
    ChronoMoETrainer(tiny_model(), cfg, loader()).train()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    for other in (cfg, cfg.replace(run_dir=str(tmp_path / "new"))):   # run dir, checkpoint dir
        tr = ChronoMoETrainer(tiny_model(), other, loader())
        with pytest.raises(RunDirError, match=r"is not empty .*belongs to one run.*"
                                              r"load_checkpoint.*overwrite=True"):
            tr.train()
        assert tr.global_step == 0
    assert _files(tmp_path) == before                        # nothing written or replaced
    tr = ChronoMoETrainer(tiny_model(), cfg.replace(overwrite=True, max_steps=3,
                                                    save_final=False, save_every_n_steps=2),
                          loader())
    tr.train()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run_id"] == tr.run_id
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ckpt")] == ["step_2"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"   # not a run's output: kept
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("overwrite: left files that are not a run's outputs") and
               "notes.txt" in m for m in msgs)


def test_resume_into_another_runs_dir_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=4, save_every_n_steps=2)
    ChronoMoETrainer(tiny_model(), cfg, loader()).train()
    other = cfg.replace(run_dir=str(tmp_path / "run2"), checkpoint_dir=str(tmp_path / "ck2"))
    ChronoMoETrainer(tiny_model(), other, loader()).train()        # another run in run2
    tr = ChronoMoETrainer(tiny_model(), other, loader())
    tr.load_checkpoint(tmp_path / "ckpt" / "step_2")               # run 1's checkpoint
    with pytest.raises(RunDirError, match=r"holds another run \(run_id "):
        tr.train()


def test_train_says_its_threads_first_and_honours_num_threads(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="chronomoe_torch")
    before = torch.get_num_threads()
    try:
        ChronoMoETrainer(tiny_model(), tiny_config(tmp_path, max_steps=3, num_threads=2),
                         loader()).train()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    first = caplog.records[0].getMessage()
    assert first.startswith("CPU threads: 2 CPU threads (given), OpenMP wait policy "), first


def test_resume_does_not_fetch_the_consumed_batches(tmp_path):
    """The train stream skips a resumed epoch's consumed batches as index lists (today it read
    and collated them all again). Mutation caught: skipping by ``next(iterator)``."""
    class Counting(Progressions):
        fetched = 0

        def __getitem__(self, i):
            Counting.fetched += 1
            return super().__getitem__(i)

    def dl():
        return DataLoader(Counting(64), batch_size=4, shuffle=True)

    cfg = tiny_config(tmp_path, max_steps=12, save_every_n_steps=10)
    a = ChronoMoETrainer(tiny_model(), cfg, dl())
    ra = a.train()                                       # 16 batches per epoch: step 10 is mid-epoch
    c = ChronoMoETrainer(tiny_model(), cfg, dl())
    Counting.fetched = 0
    c.load_checkpoint("step_10")
    rc = c.train()
    assert Counting.fetched == 2 * 4                     # steps 11 and 12 only
    assert rc["loss_history"] == ra["loss_history"]


def test_sharded_stream_over_loaders_that_cannot_be_resampled():
    """Rank 0 of 2 over (a) a re-iterable without a length and (b) a DataLoader subclass:
    the share is every other batch, the length is None for (a) (caught: ``len()`` on the
    sharding wrapper raised TypeError at trainer construction), and the subclass's shuffling
    generators are still seeded and recorded for exact resume (caught: the wrapper hid the
    DataLoader, so ``generators()`` returned nothing)."""
    from chronomoe_torch._batches import TrainStream, prepare_batch

    def prep(raw, where):
        return prepare_batch(raw, where, torch.device("cpu"), V)

    batches = [torch.full((2, 8), i) for i in range(6)]

    class NoLen:
        def __iter__(self):
            return iter(batches)

    s = TrainStream(NoLen(), 1, 1, 0, prep, rank=0, world=2)
    assert s.batches_per_epoch() is None and s.generators() == {}
    got = [int(g[0].input_ids[0, 0]) for g in iter(s.next_group, None)]
    assert got == [0, 2, 4]

    class MyLoader(DataLoader):
        pass

    dl = MyLoader(torch.arange(64).view(16, 4) % V, batch_size=2, shuffle=True)
    s = TrainStream(dl, 1, 1, 5, prep, rank=0, world=2)
    assert s.batches_per_epoch() == 4
    gens = s.generators()
    assert {"sampler0", "loader"} <= set(gens) and gens["loader"] is dl.generator
