"""transformers.Trainer integration: a tiny Mixtral trained a few steps with the ChronoMoE
callback and Trainer subclass, then resumed from its checkpoint with the controller restored."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")     # transformers.Trainer needs it

import _attach_models as M  # noqa: E402
from chronomoe_dyn import ControllerConfig  # noqa: E402
from chronomoe_dyn.plot import read_metrics_jsonl  # noqa: E402
from chronomoe_torch.checkpoint import load_state  # noqa: E402
from chronomoe_torch.hf_callback import (LOG_PREFIX, STATE_DIRNAME, ChronoMoECallback,  # noqa: E402
                                         ChronoMoEHFTrainer)
from chronomoe_torch.knob import KnobScheduler  # noqa: E402
from chronomoe_torch.optim import CoherenceGatedOptimizer  # noqa: E402
from transformers import (MixtralForCausalLM, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)

STEPS, SAVE_AT, ACCUM = 6, 3, 2
CFG = ControllerConfig(micro_period=1, macro_period=2)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, S: int = 8) -> None:
        ids = M.tokens(B=n, S=S, seed=7)
        mask = torch.ones_like(ids)
        mask[::3, -2:] = 0                          # some padding
        labels = ids.masked_fill(mask == 0, -100)
        self.rows = [{"input_ids": i, "attention_mask": a, "labels": l}
                     for i, a, l in zip(ids, mask, labels)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _args(out, **over) -> TrainingArguments:
    kw = dict(output_dir=str(out), per_device_train_batch_size=2,
              gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=5e-3,
              logging_steps=1, save_strategy="steps", save_steps=SAVE_AT, use_cpu=True,
              report_to=[], seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
              )
    kw.update(over)
    return TrainingArguments(**kw)


def _trainer(out, model=None, callbacks=None, **over) -> ChronoMoEHFTrainer:
    knob = KnobScheduler("linear", initial_kappa=0.5, final_kappa=-0.3, warmup_steps=1,
                         total_steps=STEPS)
    cb = ChronoMoECallback(CFG, seed=1, knob=knob)
    return ChronoMoEHFTrainer(model=model if model is not None else M.make_hf("mixtral", seed=0),
                              args=_args(out, **over), train_dataset=_Tokens(), chronomoe=cb,
                              gating_strength=0.9, callbacks=callbacks)


class _StateAtTrainBegin(TrainerCallback):
    """Runs after ChronoMoECallback: records the controller state it restored."""

    def __init__(self, cb) -> None:
        self.cb, self.state = cb, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {k: v.clone() for k, v in self.cb.controller.state_dict().items()}


def _controller_state(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.chronomoe.controller.state_dict().items()}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    trainer = _trainer(out)
    trainer.train()
    return out, trainer


def test_trains_ticks_once_per_optimizer_step_and_gates(full_run):
    out, trainer = full_run
    cb = trainer.chronomoe
    assert cb.controller.num_ticks == STEPS and cb.handle.ticks == STEPS
    gated = trainer.optimizer.optimizer
    assert isinstance(gated, CoherenceGatedOptimizer) and gated.num_steps == STEPS
    # The gate used R after this step's tick: 1 − 0.9·(1 − g(R)) with the final R.
    R = float(cb.controller.R)
    g = 0.0 if R < 0.2 else (R - 0.2) / 0.8
    assert gated.last_gate_float() == pytest.approx(1 - 0.9 * (1 - g), abs=1e-6)
    # κ followed the schedule to its end.
    assert cb.knob.step_count == STEPS
    assert float(cb.controller.kappa) == pytest.approx(-0.3)
    # Router weights trained (gradients reached them through the modified routing).
    assert not torch.equal(M.hf_routers(trainer.model)[0].weight,
                           M.hf_routers(M.make_hf("mixtral", seed=0))[0].weight)


def test_logs_through_the_trainer_and_to_jsonl(full_run):
    out, trainer = full_run
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == STEPS
    for h in train_logs:
        for k in ("R", "dR", "kappa", "gate", "tbar_variance", "maxvio", "loss_lm",
                  "loss_balance", "loss_coherence", "loss_valley", "valleys", "ridges",
                  "tbar_global", "routing_entropy", "load_entropy", "exploration_rate"):
            assert LOG_PREFIX + k in h, k
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    for r in lines:
        assert len(r["load_LE"]) == 2 and len(r["load_LE"][0]) == M.E
        assert sum(r["load_LE"][0]) == pytest.approx(1.0)
        assert r["maxvio"] == pytest.approx(
            sum((max(row) - 1 / M.E) * M.E for row in r["load_LE"]) / 2)
        assert r["phase"] and 0.0 <= r["gate"] <= 1.0
        # Run metrics v2: the same keys as the torch trainer's.
        assert r["maxvio_L"] == pytest.approx([(max(row) - 1 / M.E) * M.E
                                               for row in r["load_LE"]])
        assert len(r["logit_scale_L"]) == 2 and all(v > 0 for v in r["logit_scale_L"])
        assert 0.0 <= r["exploration_rate"] <= 1.0 and r["routing_entropy"] > 0.0
        assert isinstance(r["tbar_global"], float) and "tbar_global_E" not in r
    # The Trainer's logged R is the JSONL's R; the last one is the controller's.
    assert [h[LOG_PREFIX + "R"] for h in train_logs] == [r["R"] for r in lines]
    assert lines[-1]["R"] == pytest.approx(float(trainer.chronomoe.controller.R))
    series = read_metrics_jsonl(out / "metrics.jsonl")   # the plot reader accepts the file
    assert series is not None


def test_checkpoint_holds_the_controller_and_resume_restores_it(full_run, tmp_path):
    out, trainer = full_run
    for step in (SAVE_AT, STEPS):
        assert (out / f"checkpoint-{step}" / STATE_DIRNAME / "manifest.json").is_file()
    final = _controller_state(trainer)
    mid = load_state(out / f"checkpoint-{SAVE_AT}" / STATE_DIRNAME)["attach"]["controller"]
    assert int(mid["tick_counter"]) == SAVE_AT
    # transformers 5.24's Trainer resume loads the checkpoint's weights without the MoE weight
    # conversion that save_pretrained applied (transformers issue #48805), so the experts would
    # keep their initial weights; from_pretrained converts them. The controller is ours.
    ckpt = out / f"checkpoint-{SAVE_AT}"
    model = MixtralForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
    resumed = _trainer(out, model=model, output_dir=str(tmp_path),
                       callbacks=[_StateAtTrainBegin(None)])
    probe = next(c for c in resumed.callback_handler.callbacks
                 if isinstance(c, _StateAtTrainBegin))
    probe.cb = resumed.chronomoe
    resumed.train(resume_from_checkpoint=str(ckpt))
    # Restored at the start exactly as saved ...
    assert probe.state.keys() == mid.keys()
    for k in mid:
        assert torch.equal(probe.state[k], mid[k]), k
    # ... and the resumed run ends where the uninterrupted one ended.
    assert resumed.chronomoe.controller.num_ticks == STEPS
    assert resumed.chronomoe.knob.step_count == STEPS
    got = _controller_state(resumed)
    for k in final:
        assert torch.equal(got[k], final[k]), k


def test_evaluate_uses_the_chronomoe_loss_without_observing(full_run):
    out, trainer = full_run
    cb = trainer.chronomoe
    before = cb.controller.observation_buffer().clone()
    n_lines = len((out / "metrics.jsonl").read_text().splitlines())
    metrics = trainer.evaluate(eval_dataset=_Tokens(n=4))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert torch.equal(cb.controller.observation_buffer(), before)   # eval routes, never counts
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == n_lines + 1
    rec = json.loads(lines[-1])
    assert {k: rec[k] for k in ("step", "split", "loss")} == {
        "step": STEPS, "split": "eval", "loss": pytest.approx(metrics["eval_loss"])}
    # maxvio_global over the eval set (4 samples of 8 tokens, K slots each), no noise in eval.
    assert rec["exploration_rate"] == 0.0 and len(rec["maxvio_global_L"]) == 2
    assert rec["maxvio_global"] == pytest.approx(sum(rec["maxvio_global_L"]) / 2)


def test_resume_without_controller_state_is_refused(full_run, tmp_path):
    out, _ = full_run
    import shutil
    ckpt = tmp_path / f"checkpoint-{SAVE_AT}"
    shutil.copytree(out / f"checkpoint-{SAVE_AT}", ckpt)
    shutil.rmtree(ckpt / STATE_DIRNAME)
    trainer = _trainer(out, output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=STATE_DIRNAME):
        trainer.train(resume_from_checkpoint=str(ckpt))


class _SeenLogs(TrainerCallback):
    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_alone_with_a_plain_trainer(tmp_path):
    """Without the subclass: the model's own loss, no gate; the controller still attaches,
    ticks once per optimizer step, checkpoints, writes the JSONL and hands its scalars to the
    callbacks after it (the Trainer's log_history was already written when callbacks run)."""
    pytest.importorskip("tensorboard")
    cb, seen = ChronoMoECallback(CFG, tensorboard=True), _SeenLogs()
    model = M.make_hf("mixtral", seed=0)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4, save_steps=4),
                      train_dataset=_Tokens(), callbacks=[cb, seen])
    trainer.train()
    assert cb.controller.num_ticks == 4
    train_logs = [h for h in seen.logs if "loss" in h]
    assert len(train_logs) == 4 and all(LOG_PREFIX + "R" in h for h in train_logs)
    assert (tmp_path / "checkpoint-4" / STATE_DIRNAME).is_dir()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert "gate" not in lines[0]                     # no gated optimizer in this mode
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
