"""TrainingConfig: the seed's fields and defaults, validation naming field/value/range,
immutability, dict round trip, and the step budget."""

from __future__ import annotations

import dataclasses
import json

import pytest

from chronomoe_torch.config import TrainingConfig

SEED_DEFAULTS = dict(
    learning_rate=1e-4, weight_decay=0.01, max_epochs=10, batch_size=8,
    gradient_accumulation_steps=1, max_grad_norm=1.0,
    lambda_balance=0.01, lambda_coherence=0.001, lambda_valley=0.0001,
    initial_kappa=0.5, final_kappa=-0.3, kappa_warmup_steps=1000, kappa_schedule="cosine",
    use_coherence_gating=True, min_coherence=0.2, gating_strength=0.5,
    checkpoint_dir="checkpoints", save_every_n_steps=1000, save_chronovisor_state=True,
)


def test_every_seed_field_with_the_seed_default():
    cfg = TrainingConfig()
    for name, value in SEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
        assert type(getattr(cfg, name)) is type(value), name


def test_the_seed_example_arguments_are_accepted():
    cfg = TrainingConfig(learning_rate=1e-4, max_steps=100000, initial_kappa=0.5,
                         final_kappa=-0.3, kappa_schedule="cosine", use_coherence_gating=True)
    assert cfg.max_steps == 100000


def test_every_field_has_a_docstring_in_the_source():
    import inspect
    src = inspect.getsource(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        i = src.index(f"    {f.name}: ")
        nxt = src[i:].split("\n", 2)[1].strip()
        assert nxt.startswith('"""'), f.name


@pytest.mark.parametrize("field, value, allowed", [
    ("learning_rate", 0.0, r"\(0.0, inf\]"),
    ("learning_rate", float("nan"), "finite"),
    ("weight_decay", -0.1, r"\[0.0, inf\]"),
    ("max_epochs", 0, "integer >= 1"),
    ("batch_size", 2.0, "integer >= 1"),
    ("gradient_accumulation_steps", True, "integer >= 1"),
    ("max_grad_norm", 0.0, r"\(0.0, inf\]"),
    ("lambda_balance", -0.01, r"\[0.0, inf\]"),
    ("lambda_coherence", -1e-3, r"\[0.0, inf\]"),
    ("lambda_valley", float("inf"), "finite"),
    ("lambda_z", -1.0, r"\[0.0, inf\]"),
    ("initial_kappa", 1.5, r"\[-1.0, 1.0\]"),
    ("final_kappa", -1.01, r"\[-1.0, 1.0\]"),
    ("kappa_warmup_steps", -1, "integer >= 0"),
    ("kappa_schedule", "exponential", "allowed values are .*'cosine'"),
    ("use_coherence_gating", 1, "True or False"),
    ("min_coherence", 1.0, r"\[0.0, 1.0\)"),
    ("min_coherence", -0.1, r"\[0.0, 1.0\)"),
    ("gating_strength", 1.5, r"\[0.0, 1.0\]"),
    ("checkpoint_dir", "", "non-empty path"),
    ("save_every_n_steps", -5, "integer >= 0"),
    ("save_chronovisor_state", "yes", "True or False"),
    ("max_steps", 0, "integer >= 1 or None"),
    ("eval_every_n_steps", -1, "integer >= 0"),
    ("eval_max_batches", 0, "integer >= 1 or None"),
    ("log_every_n_steps", 0, "integer >= 1"),
    ("balance_mode", "deepseek", "allowed values are .*'aux_free'"),
    ("lr_schedule", "linear", "allowed values are"),
    ("lr_warmup_steps", -2, "integer >= 0"),
    ("min_lr_ratio", 1.5, r"\[0.0, 1.0\]"),
    ("device", "gpu", "auto, cpu, mps, cuda or cuda:<index>"),
    ("bf16", None, "True or False"),
    ("seed", -1, "integer >= 0"),
    ("run_dir", "", "non-empty path string or None"),
    ("tensorboard", "no", "True or False"),
    ("progress_bar", 0, "True or False"),
    ("max_consecutive_skips", 0, "integer >= 1"),
    ("keep_last_n_checkpoints", 0, "integer >= 1 or None"),
    ("num_threads", 0, "integer >= 1 or None"),
    ("overwrite", "yes", "True or False"),
])
def test_invalid_values_raise_naming_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as ei:
        TrainingConfig(**{field: value})
    msg = str(ei.value)
    assert f"TrainingConfig.{field}={value!r}" in msg
    assert __import__("re").search(allowed, msg), msg


@pytest.mark.parametrize("field", ["kappa_warmup_steps", "lr_warmup_steps"])
def test_warmup_must_be_below_max_steps(field):
    other = {"kappa_warmup_steps": 10} if field == "lr_warmup_steps" else {}
    with pytest.raises(ValueError, match=f"TrainingConfig.{field}=100 must be < max_steps=100"):
        TrainingConfig(max_steps=100, **{field: 100}, **other)
    assert getattr(TrainingConfig(max_steps=101, **{field: 100}, **other), field) == 100


def test_frozen_and_replace_revalidates():
    cfg = TrainingConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0  # type: ignore[misc]
    assert cfg.replace(learning_rate=3e-3).learning_rate == 3e-3
    with pytest.raises(ValueError, match="min_coherence"):
        cfg.replace(min_coherence=1.0)


def test_dict_round_trip_through_json():
    cfg = TrainingConfig(max_steps=500, kappa_warmup_steps=50, balance_mode="aux_free",
                         max_grad_norm=None, run_dir=None, keep_last_n_checkpoints=None)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainingConfig.from_dict(d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(TrainingConfig)}
    with pytest.raises(ValueError, match=r"unknown TrainingConfig field\(s\): \['lr'\]"):
        TrainingConfig.from_dict({**d, "lr": 1.0})


def test_total_steps_is_the_tighter_bound():
    assert TrainingConfig(max_steps=5000, kappa_warmup_steps=10).total_steps(100) == 1000
    assert TrainingConfig(max_steps=500, kappa_warmup_steps=10).total_steps(100) == 500
    assert TrainingConfig(max_steps=500, kappa_warmup_steps=10).total_steps(None) == 500
    assert TrainingConfig(max_epochs=3).total_steps(7) == 21
    with pytest.raises(ValueError, match="set max_steps"):
        TrainingConfig().total_steps(None)
